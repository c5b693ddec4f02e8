"""The batch job: claim the output, plan the shards, stream them through the generator pool, summarise.

    output claim (driver: writable, not another job's)                  job.py
    manifest/template -> plan (driver: validate, stage, shard)          manifest.py
    from_items(shards) -> map_batches(read shard)        (Ray tasks)
                       -> map_batches(Generator)          (actor pool)   worker.py
                       -> map_batches(encode_block)       (Ray tasks)    encode.py
                       -> write_datasink(ShardSink)       (Ray tasks)    sinks.py: shards, then _SUCCESS
    -> summary (driver)

Nothing is materialised on the driver: the dataset streams, one block per shard.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass

import ray
from ray.util.annotations import RayDeprecationWarning

from . import manifest
from .config import JobConfig, RayConfig, to_dict, to_yaml
from .encode import encode_block
from .errors import ErrorBudgetExceeded, OutputConflict, caused_by
from .request import Resolver, resolver_for
from .sinks import CONFIG_FILE, ShardSink, ShardStats, SinkSettings, budget_exceeded, committed_shards
from .storage import OutputDir
from .worker import Generator

log = logging.getLogger(__name__)
MAX_ACTOR_INIT_DEATHS = 8
# Sections and keys that do not change a single output byte, so resuming with other values is fine.
NON_OUTPUT_KEYS = {"name": None, "ray": None, "calibrate": None,
                   "output": ("path", "overwrite", "contact_sheet", "storage_retry_s"),
                   "errors": ("max_errors", "max_error_fraction"), "sampler": ("plan",)}
# Read/write task failures worth retrying: lost nodes. Ray Data matches each pattern, as a substring
# and then as a regex, against "ExceptionClass: message" (and its cause). Storage faults are retried
# where they happen (pipeline.storage, for output.storage_retry_s); a StorageUnavailable means that
# budget is spent, and retrying the task would only spend it again.
TRANSIENT_ERRORS = ("ObjectLostError", "OwnerDiedError", "NodeDiedError")


@dataclass
class Summary:
    url: str
    images: int
    shards: int
    generated_shards: int
    seconds: float
    contact_sheet: str | None
    errors: int = 0
    model_calls: int = 0
    duty_cycle: float | None = None         # time in model calls / time on the generator actors (this run)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        skipped = self.shards - self.generated_shards
        return (f"wrote {self.images} images in {self.shards} shards to {self.url} "
                f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s, {self.model_calls} model calls"
                + (f", model busy {self.duty_cycle:.0%} of actor time" if self.duty_cycle is not None else "") + ")"
                + (f"; {skipped} shard(s) were already committed and skipped" if skipped else "")
                + (f"\n{self.errors} row(s) failed: see {self.url}/_errors/" if self.errors else "")
                + (f"\ncontact sheet: {self.contact_sheet}" if self.contact_sheet else ""))


def output_fingerprint(cfg: JobConfig, plan_hash: str | None = None) -> dict:
    """What decides the output bytes: the config, less ``NON_OUTPUT_KEYS``, the manifest's content and
    the solver plan's content hash (not where the plan file lives)."""
    d = to_dict(cfg)
    for section, keys in NON_OUTPUT_KEYS.items():
        if keys is None:
            d.pop(section)
        else:
            for k in keys:
                d[section].pop(k)
    d["manifest_content"] = manifest.fingerprint(cfg)
    d["plan_hash"] = plan_hash
    return d


def ensure_ray(r: RayConfig, dashboard: bool = False) -> None:
    """Join ``r.address`` (or ``RAY_ADDRESS``), or start a local instance with the configured size (with
    the dashboard, on 127.0.0.1, when ``dashboard``: Ray Train's controller watches its workers through
    the state API the dashboard serves)."""
    if ray.is_initialized():
        return
    address = r.address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=dashboard, log_to_driver=True)
    if address is None:          # start a fresh local instance; never join a stray one by accident
        address = "local"
        kwargs.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus, object_store_memory=r.object_store_memory)
    ray.init(address=address, **{k: v for k, v in kwargs.items() if v is not None})


class ProgressLog:
    """Logs, every ``every_s`` seconds while the job runs and once at its end, the shards
    committed so far, images, failed rows, the rate and the time left (read from the sink's tally)."""

    def __init__(self, sink: ShardSink, shards: int, rows: int, every_s: float):
        self.sink, self.shards, self.rows, self.every_s = sink, shards, rows, every_s
        self.t0, self.done = time.time(), threading.Event()
        self.thread = threading.Thread(target=self.run, name="progress-log", daemon=True)
        if every_s > 0:
            self.thread.start()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.log()

    def log(self) -> None:
        try:
            tally = ray.get_actor(self.sink.tally_name)
            shards, images, errors, calls, busy, wall = ray.get(tally.progress.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort (no tally before the first shard)
            return
        seconds = time.time() - self.t0
        rate = (images + errors) / seconds if seconds > 0 else 0.0
        eta = "unknown"
        if rate > 0:
            left = (self.rows - images - errors) / rate
            eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        duty = f", model busy {busy / wall:.0%} of actor time" if wall > 0 else ""
        log.info("progress: %d/%d shards committed, %d images, %d failed rows, %d model calls "
                 "(nfe x particles), %.1f images/s%s, ETA %s", shards, self.shards, images, errors, calls, rate, duty,
                 eta)

    def stop(self) -> None:
        if self.every_s > 0:
            self.done.set()
            self.thread.join()
            self.log()


def pool_size(r: RayConfig) -> int:
    """Generator actors that fit the cluster while leaving ``reserve_cpus`` for read/write tasks."""
    if r.actors:
        return r.actors
    res = ray.cluster_resources()
    if r.num_gpus_per_actor > 0:
        return max(1, int(res.get("GPU", 0) // r.num_gpus_per_actor))
    return max(1, int((res.get("CPU", 1) - r.reserve_cpus) // (r.num_cpus_per_actor or 1)))


def changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += changed_keys(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def prepare_output(out: OutputDir, cfg: JobConfig, plan_hash: str | None = None) -> dict:
    """Claim the output before any work: fail fast if it is not writable, refuse to mix configs in one
    output (unless overwrite); returns the claim (the output fingerprint written to ``config.json``)."""
    out.check_writable()
    fingerprint = output_fingerprint(cfg, plan_hash)
    if out.exists(CONFIG_FILE):
        previous = out.read_json(CONFIG_FILE).get("fingerprint") or {}
        if previous != fingerprint:
            changed = changed_keys(previous, fingerprint)
            if committed_shards(out) and not cfg.output.overwrite:
                raise OutputConflict(out.url, f"already holds output made with a different config or manifest "
                                              f"(changed: {', '.join(changed)}); pick another output.path, or pass "
                                              "output.overwrite=true (--overwrite) to replace it", changed=changed)
            log.warning("%s: removing the previous output at %s (changed: %s)",
                        "overwrite" if cfg.output.overwrite else "it holds no committed shard", out.url,
                        ", ".join(changed))
            for d in ("shards", "parquet", "stats", "_errors", "_staging", "_tmp", "_SUCCESS", "contact_sheet.png"):
                out.remove(d, recursive=True)
    elif [e for e in out.entries() if e != "_tmp"] and not cfg.output.overwrite:
        raise OutputConflict(out.url, "is not empty and was not written by this tool; pick another output.path, "
                                      "or pass output.overwrite=true (--overwrite)", changed=[])
    out.publish(CONFIG_FILE, json.dumps({"config": to_dict(cfg), "fingerprint": fingerprint, "plan_hash": plan_hash},
                                        indent=1, sort_keys=True).encode())
    out.publish("config.yaml", to_yaml(cfg).encode())
    return fingerprint


def build_dataset(cfg: JobConfig, plan: manifest.Plan, shards: list[int], resolver: Resolver) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: one block per shard, from its rows to encoded images."""
    r = cfg.ray

    def read_shards(batch):
        import pyarrow as pa
        return pa.concat_tables([plan.read_shard(int(s), resolver) for s in batch["shard"].to_pylist()])

    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ctx = ds.context                      # this dataset's own context (derived datasets copy it), not the process's
    ctx.target_max_block_size = None      # keep one block per shard: never split or merge a shard
    # retries, explicitly: read/write tasks lost with a node, actor deaths (storage: pipeline.storage)
    ctx.retried_map_errors = list(TRANSIENT_ERRORS)
    ctx.max_map_retries = r.max_retries
    ctx.raise_original_map_exception = True   # typed errors (StorageUnavailable, ...) reach the driver as themselves
    # actors dying while they start (a broken model path, OOM on load) stop the job after this many
    ctx.max_consecutive_actor_init_deaths = MAX_ACTOR_INIT_DEATHS
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
    size = min(pool_size(r), len(shards))
    log.info("generator pool: %d actor(s) x (%g CPU, %g GPU)", size, r.num_cpus_per_actor, r.num_gpus_per_actor)
    actor_retries = {"max_restarts": r.max_actor_restarts, "max_task_retries": r.max_task_retries}
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args_fn but offers no named parameter for actor restarts yet
        warnings.simplefilter("ignore", RayDeprecationWarning)
        # actors load the model from its path in __init__ (never via the object store), so restarts work
        # a batch is a block is a shard; Ray Data wants it spelled out when actors take GPUs (shards are
        # full-size but the last, which comes last, so batches stay aligned with shards)
        return ds.map_batches(
            Generator, fn_constructor_kwargs={"cfg": to_dict(cfg)},
            batch_size=cfg.output.rows_per_shard if r.num_gpus_per_actor else None, batch_format="pyarrow",
            # start the whole pool: Ray Data's budget-based upscaling keeps CPU for the write
            # operator and, on a small cluster, would never add the second actor
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size),
            num_cpus=r.num_cpus_per_actor, num_gpus=r.num_gpus_per_actor or None,
            ray_remote_args_fn=lambda: actor_retries
        # encoding and sidecars: CPU tasks after the model, so the model actors never wait on an encoder
        ).map_batches(encode_block, fn_kwargs={"image_format": cfg.output.image_format, "quality": cfg.output.quality},
                      batch_size=None, batch_format="pyarrow", num_cpus=0.25)


def plan_job(cfg: JobConfig, out: OutputDir, resolver: Resolver, claim: dict, t0: float) -> tuple[manifest.Plan, ShardSink]:
    """The shard plan (manifest validated and staged) and the sink that will write and commit it, with
    the shards earlier runs committed; stops early if failures already exceed the error budget."""
    plan = manifest.plan(cfg, out, resolver)
    committed = sorted(set(committed_shards(out)) & set(range(plan.num_shards)))
    settings = SinkSettings(image_format=cfg.output.image_format, webdataset=cfg.output.webdataset,
                            parquet=cfg.output.parquet, contact_sheet=cfg.output.contact_sheet,
                            budget=cfg.errors.budget(plan.num_rows + plan.validation_errors),
                            fingerprint=claim, storage_retry_s=cfg.output.storage_retry_s)
    sink = ShardSink(out.url, plan, settings, ShardStats.read(out, committed), t0=t0,
                     success={"config": to_dict(cfg), "plan_hash": resolver.plans.hash if resolver.plans else None})
    log.info("%d rows in %d shards; %d to generate, %d already committed",
             plan.num_rows, plan.num_shards, plan.num_shards - len(committed), len(committed))
    if len(committed) < plan.num_shards and sink.failed_before() > settings.budget:
        raise budget_exceeded(out.url, sink.failed_before(), settings.budget, "have already failed")
    return plan, sink


def run_job(cfg: JobConfig) -> Summary:
    """Run a whole batch job; returns its summary. Reruns resume: committed shards are skipped."""
    t0 = time.time()
    out = OutputDir(cfg.output.path, retry_s=cfg.output.storage_retry_s)
    resolver = resolver_for(cfg)                        # request checks, without loading weights
    claim = prepare_output(out, cfg, resolver.plans.hash if resolver.plans else None)
    plan, sink = plan_job(cfg, out, resolver, claim, t0)
    todo = [s for s in range(plan.num_shards) if s not in sink.earlier]
    if todo:
        ensure_ray(cfg.ray)
        progress = ProgressLog(sink, len(todo), sum(plan.shard_rows(s) for s in todo), cfg.ray.progress_interval_s)
        try:
            build_dataset(cfg, plan, todo, resolver).write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
        except Exception as e:
            if caused_by(e, ErrorBudgetExceeded) is None:
                raise
            total, allowed = sink.tally_totals() or (sink.failed_before(), sink.settings.budget)
            raise budget_exceeded(out.url, total, allowed, "failed (the job stopped)") from None
        finally:
            progress.stop()
            sink.stop_tally()
    else:
        sink.commit()                                   # nothing left to write: verify and publish _SUCCESS
    s = sink.success
    return Summary(out.url, s["images"], plan.num_shards, len(todo), time.time() - t0, s["contact_sheet"],
                   s["errors"]["generation"] + s["errors"]["validation"], s["model_calls"], s["timing"]["duty_cycle"])
