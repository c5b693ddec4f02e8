"""The batch job: plan the shards, stream them through the generator pool, commit, summarise.

    manifest/template -> plan (driver: validate, stage, shard)          manifest.py
    from_items(shards) -> map_batches(read shard)        (Ray tasks)
                       -> map_batches(Generator)          (actor pool)   worker.py
                       -> write_datasink(ShardSink)       (Ray tasks)    sinks.py
    -> _SUCCESS + contact sheet (driver)

Nothing is materialised on the driver: the dataset streams, one block per shard.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass

import ray
from ray.util.annotations import RayDeprecationWarning
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import manifest
from .config import JobConfig, RayConfig, error_budget, to_dict, to_yaml
from .contact_sheet import write_contact_sheet
from .errors import ErrorBudgetExceeded, OutputConflict, caused_by
from .faults import generator_class
from .worker import encode_block
from .manifest import parse_shard, shard_name
from .request import Resolver, resolver_for
from .sinks import ShardSink, ShardTally
from .storage import OutputDir

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
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

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        skipped = self.shards - self.generated_shards
        return (f"wrote {self.images} images in {self.shards} shards to {self.url} "
                f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s, {self.model_calls} model calls)"
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


def ensure_ray(r: RayConfig) -> None:
    """Join ``r.address`` (or ``RAY_ADDRESS``), or start a local instance with the configured size."""
    if ray.is_initialized():
        return
    address = r.address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=False, log_to_driver=True)
    if address is None:          # start a fresh local instance; never join a stray one by accident
        address = "local"
        kwargs.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus, object_store_memory=r.object_store_memory)
    ray.init(address=address, **{k: v for k, v in kwargs.items() if v is not None})


class ProgressLog:
    """Logs, every ``every_s`` seconds while the job runs and once at its end, the shards
    committed so far, images, failed rows, the rate and the time left (read from the tally)."""

    def __init__(self, tally, shards: int, rows: int, every_s: float):
        self.tally, self.shards, self.rows, self.every_s = tally, shards, rows, every_s
        self.t0, self.done = time.time(), threading.Event()
        self.thread = threading.Thread(target=self.run, name="progress-log", daemon=True)
        if every_s > 0:
            self.thread.start()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.log()

    def log(self) -> None:
        try:
            shards, images, errors, calls = ray.get(self.tally.progress.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort; never fail the job over it
            return
        seconds = time.time() - self.t0
        rate = (images + errors) / seconds if seconds > 0 else 0.0
        eta = "unknown"
        if rate > 0:
            left = (self.rows - images - errors) / rate
            eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        log.info("progress: %d/%d shards committed, %d images, %d failed rows, %d model calls "
                 "(nfe x particles), %.1f images/s, ETA %s", shards, self.shards, images, errors, calls, rate, eta)

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


def committed_shards(out: OutputDir) -> list[int]:
    """Shard indices whose stats file (commit marker) exists."""
    return sorted(parse_shard(p.rsplit("/", 1)[-1]) for p in out.glob("stats", "shard-*.json"))


def budget_exceeded(out: OutputDir, failed: int, budget: int, how: str) -> ErrorBudgetExceeded:
    return ErrorBudgetExceeded(f"{out.url}/_errors/", f"{failed} rows {how}, more than the error budget of {budget} "
                                                      "(errors.max_errors / errors.max_error_fraction)",
                               failed=failed, budget=budget)


def read_stats(out: OutputDir, shards: list[int]) -> dict[int, dict]:
    """The stats files (commit markers) of these shards, by shard index."""
    return dict(zip(shards, out.read_json_many([f"stats/{shard_name(s)}.json" for s in shards])))


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


def prepare_output(out: OutputDir, cfg: JobConfig, plan_hash: str | None = None) -> None:
    """Fail fast on an unwritable output; refuse to mix configs in one output (unless overwrite)."""
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


def build_dataset(cfg: JobConfig, plan: manifest.Plan, shards: list[int], resolver: Resolver) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: one block per shard, from its rows to encoded images."""
    r = cfg.ray
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = None      # keep one block per shard: never split or merge a shard
    # retries, explicitly: read/write tasks lost with a node, actor deaths (storage: pipeline.storage)
    ctx.retried_map_errors = list(TRANSIENT_ERRORS)
    ctx.max_map_retries = r.max_retries
    ctx.raise_original_map_exception = True   # typed errors (StorageUnavailable, ...) reach the driver as themselves
    # actors dying while they start (a broken model path, OOM on load) stop the job after this many
    ctx.max_consecutive_actor_init_deaths = MAX_ACTOR_INIT_DEATHS

    def read_shards(batch):
        import pyarrow as pa
        return pa.concat_tables([plan.read_shard(int(s), resolver) for s in batch["shard"].to_pylist()])

    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
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
            generator_class(cfg), fn_constructor_kwargs={"cfg": to_dict(cfg)},
            batch_size=cfg.output.rows_per_shard if r.num_gpus_per_actor else None, batch_format="pyarrow",
            # start the whole pool: Ray Data's budget-based upscaling keeps CPU for the write
            # operator and, on a small cluster, would never add the second actor
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size),
            num_cpus=r.num_cpus_per_actor, num_gpus=r.num_gpus_per_actor or None,
            ray_remote_args_fn=lambda: actor_retries
        # encoding and sidecars: CPU tasks after the model, so the model actors never wait on an encoder
        ).map_batches(encode_block, fn_kwargs={"image_format": cfg.output.image_format, "quality": cfg.output.quality},
                      batch_size=None, batch_format="pyarrow", num_cpus=0.25)


def run_job(cfg: JobConfig) -> Summary:
    """Run a whole batch job; returns its summary. Reruns resume: committed shards are skipped."""
    t0 = time.time()
    out = OutputDir(cfg.output.path, retry_s=cfg.output.storage_retry_s)
    resolver = resolver_for(cfg)                        # request checks, without loading weights
    plan_hash = resolver.plan.hash if resolver.plan else None
    prepare_output(out, cfg, plan_hash)
    plan = manifest.plan(cfg, out, resolver)
    committed = sorted(set(committed_shards(out)) & set(range(plan.num_shards)))
    done = set(committed)
    todo = [s for s in range(plan.num_shards) if s not in done]
    log.info("%d rows in %d shards; %d to generate, %d already committed",
             plan.num_rows, plan.num_shards, len(todo), len(committed))
    earlier = read_stats(out, committed)
    # failures so far: invalid rows, and failed rows in shards an earlier run committed
    failed = plan.validation_errors + sum(st["errors"] for st in earlier.values())
    allowed = error_budget(cfg, plan.num_rows + plan.validation_errors)
    if todo and failed > allowed:
        raise budget_exceeded(out, failed, allowed, "have already failed")
    if todo:
        ensure_ray(cfg.ray)
        tally_name = f"shard-tally-{uuid.uuid4().hex[:12]}"
        # the tally lives on the driver's node: losing a worker node must not lose the count
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        tally = ShardTally.options(name=tally_name, scheduling_strategy=here).remote(allowed, failed)
        sink = ShardSink(out.url, image_format=cfg.output.image_format, webdataset=cfg.output.webdataset,
                         parquet=cfg.output.parquet, plan=plan, tally_actor=tally_name)
        progress = ProgressLog(tally, len(todo), sum(plan.shard_rows(s) for s in todo), cfg.ray.progress_interval_s)
        try:
            build_dataset(cfg, plan, todo, resolver).write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
        except Exception as e:
            if caused_by(e, ErrorBudgetExceeded) is None:
                raise
            total, allowed = ray.get(tally.totals.remote())
            raise budget_exceeded(out, total, allowed, "failed (the job stopped)") from None
        finally:
            progress.stop()
            ray.kill(tally)
    out.refresh()                  # cached listings (s3fs) predate the shards committed by this run
    stats = [st for _, st in sorted({**earlier, **read_stats(out, todo)}.items())]
    images, errors = sum(s["rows"] for s in stats), sum(s.get("errors", 0) for s in stats)
    if errors + plan.validation_errors > allowed:        # the authoritative count, from committed shards
        raise budget_exceeded(out, errors + plan.validation_errors, allowed, "failed")
    if images + errors != plan.num_rows:
        raise RuntimeError(f"{out.url}: committed {images} images and {errors} errors, "
                           f"but the plan has {plan.num_rows} rows")
    sheet = write_contact_sheet(out, cfg.output.contact_sheet) if cfg.output.contact_sheet else None
    seconds = time.time() - t0
    calls = sum(s.get("model_calls", 0) for s in stats)
    summary = Summary(out.url, images, plan.num_shards, len(todo), seconds, sheet,
                      errors + plan.validation_errors, calls)
    success = {"images": images, "errors": {"generation": errors, "validation": plan.validation_errors},
               "shards": stats, "seconds": round(seconds, 3), "images_per_s": round(summary.images_per_s, 3),
               "generated_shards": len(todo), "config": to_dict(cfg), "plan_hash": plan_hash,
               # the budget spent: nfe x particles per row (failed rows too; shards of older versions lack it)
               "model_calls": calls}
    out.publish("_SUCCESS", (json.dumps(success, indent=1, sort_keys=True) + "\n").encode())
    out.remove("_tmp", recursive=True)           # last: publishing _SUCCESS goes through _tmp/ on disks
    return summary
