"""Shard writers and the commit protocol: ``ShardSink`` is a Ray Data ``Datasink``.

Layout under the output URL::

    shards/shard-000000.tar        WebDataset: {key}.{png|jpg|webp}, {key}.json, {key}.txt
    parquet/shard-000000.parquet   the same rows: metadata columns + image bytes
    _errors/shard-000000.parquet   rows of the shard that failed (key, row, stage, error, request)
    stats/shard-000000.json        the shard's commit marker (``ShardStats``), written last
    _SUCCESS                       the job's manifest of shards, written last of all

A shard is one block: rows ``[k * rows_per_shard, (k+1) * rows_per_shard)``. Its files are
built in memory, written under ``_tmp/`` with a unique name and moved into place, then the
stats file commits it. A shard whose stats file exists is never written again, so a
retried task or a resumed job cannot produce a second copy of a key. Tar members have a
fixed mtime and owner, and rows are sorted by index, so a rerun is byte-identical.

The sink follows Ray's write lifecycle: ``on_write_start`` (on the driver, once the first shard is
generated) checks the blocks' columns, that the output is still this job's, and starts the tally of
committed shards; ``write`` (tasks) writes and commits shards; ``on_write_complete`` verifies that
every shard of the plan is committed and publishes ``_SUCCESS`` (``commit``). The checks that
must come before any generation (a writable output, another job's output) run earlier, when the
job plans (``pipeline.job``): Ray calls ``on_write_start`` only after the first block arrives.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import IMAGE_FORMATS
from .contact_sheet import write_contact_sheet
from .encode import TIMING_COLUMNS
from .errors import ErrorBudgetExceeded, OutputConflict
from .manifest import Plan, parse_shard, shard_name
from .request import ROW_SCHEMA, model_calls
from .storage import OutputDir

log = logging.getLogger(__name__)

TAR_MTIME = 0.0
CONFIG_FILE = "config.json"
PARQUET_DROP = ("json", "error", "error_stage", "savings", *TIMING_COLUMNS)   # (savings: in each sidecar)
ERROR_COLUMNS = ["key", "row", "source_row", "shard", "stage", "error", "seed", "prompt", "negative_prompt",
                 "guidance_scale", "nfe", "sampler", "schedule", "sampler_options", "final", "plan", "height", "width",
                 "search", "extra"]
BLOCK_COLUMNS = {"shard", *ROW_SCHEMA.names}      # what every block of the job carries, at any stage


@dataclass
class ShardStats:
    """A committed shard's record (``stats/shard-N.json``): rows, failures, cost, keys, file checksums."""
    shard: int
    name: str
    rows: int                          # images written
    errors: int                        # rows that failed (in _errors/)
    first_row: int
    last_row: int
    first_key: str | None = None
    last_key: str | None = None
    model_calls: int = 0               # nfe x particles of every row, failed ones too (0: older versions)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # rel path -> {bytes, sha256}

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict) -> "ShardStats":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @classmethod
    def read(cls, out: OutputDir, shards: list[int]) -> dict[int, "ShardStats"]:
        """The stats files (commit markers) of these shards, by shard index."""
        docs = out.read_json_many([f"stats/{shard_name(s)}.json" for s in shards])
        return {s: cls.from_dict(d) for s, d in zip(shards, docs)}


@dataclass
class ShardWrite:
    """What a write task returns for a shard: its stats and, when this attempt generated it, its time
    inside model calls and on the generator actor (not in the stats file: timing differs run to run)."""
    stats: ShardStats
    model_busy_s: float = 0.0
    actor_wall_s: float = 0.0


def committed_shards(out: OutputDir) -> list[int]:
    """Shard indices whose stats file (commit marker) exists."""
    return sorted(parse_shard(p.rsplit("/", 1)[-1]) for p in out.glob("stats", "shard-*.json"))


@ray.remote(num_cpus=0, max_restarts=-1)
class ShardTally:
    """Counts committed shards' rows and failed rows (idempotent under retries): the error
    budget is enforced on it early, and the driver's progress log reads it."""

    def __init__(self, budget: int, already: int = 0):
        self.budget, self.already, self.per_shard = budget, already, {}

    def report(self, shard: int, rows: int, errors: int, calls: int = 0, busy: float = 0.0,
               wall: float = 0.0) -> tuple[int, int]:
        self.per_shard[shard] = (rows, errors, calls, busy, wall)
        return self.totals()

    def totals(self) -> tuple[int, int]:
        """(failed rows so far, the budget)."""
        return self.already + sum(v[1] for v in self.per_shard.values()), self.budget

    def progress(self) -> tuple:
        """(shards committed, images in them, failed rows in them, model calls they cost, seconds in model
        calls, seconds on the generator actors)."""
        done = list(self.per_shard.values())
        return (len(done), *(sum(v[k] for v in done) for k in range(5)))


def error_table(rows: pa.Table) -> pa.Table:
    """Failed rows in the errors-table layout; it can be fed back as a manifest."""
    rows = rows.rename_columns([{"error_stage": "stage"}.get(c, c) for c in rows.column_names])
    return rows.select(ERROR_COLUMNS)


def tar_bytes(table: pa.Table, ext: str) -> bytes:
    """A WebDataset tar of the rows: ``{key}.{ext}``, ``{key}.json``, ``{key}.txt``."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=TAR_MTIME) as tw:
        for key, img, meta, prompt in zip(*(table[c].to_pylist() for c in ("key", "image", "json", "prompt"))):
            tw.write({"__key__": key, ext: img, "json": meta.encode(), "txt": prompt.encode()})
    return buf.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def budget_exceeded(url: str, failed: int, budget: int, how: str) -> ErrorBudgetExceeded:
    return ErrorBudgetExceeded(f"{url}/_errors/", f"{failed} rows {how}, more than the error budget of {budget} "
                                                  "(errors.max_errors / errors.max_error_fraction)",
                               failed=failed, budget=budget)


@dataclass
class SinkSettings:
    """What the sink writes and how it commits (from the job's config)."""
    image_format: str = "png"
    webdataset: bool = True
    parquet: bool = True
    contact_sheet: int = 0
    budget: int = 0                    # failed rows allowed (errors.max_errors / max_error_fraction)
    fingerprint: dict | None = None    # the job's claim on the output (config.json), re-checked at write start
    storage_retry_s: float | None = None    # how long storage calls retry transient faults (output.storage_retry_s)


class ShardSink(Datasink[ShardStats]):
    """Writes each shard's rows as a WebDataset tar and/or a Parquet file, commits it, then the job."""

    def __init__(self, url: str, plan: Plan, settings: SinkSettings, earlier: dict[int, ShardStats] | None = None,
                 success: dict | None = None, t0: float | None = None):
        self.url, self.plan, self.settings = url, plan, settings
        self.ext = IMAGE_FORMATS[settings.image_format]
        self.earlier = dict(earlier or {})              # shards committed before this run
        self.success_extra = dict(success or {})        # what _SUCCESS carries beside the shards (config, ...)
        self.tally_name = f"shard-tally-{uuid.uuid4().hex[:12]}"
        self.tally = None
        self.t0 = time.time() if t0 is None else t0     # when the job started (for _SUCCESS's rate)
        self.success: dict | None = None                # the published _SUCCESS document

    def failed_before(self) -> int:
        """Failures so far: invalid manifest rows and failed rows of shards committed before this run."""
        return self.plan.validation_errors + sum(s.errors for s in self.earlier.values())

    # ------------------------------------------------------------ Ray's lifecycle (driver)
    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        """Before the first write task: the blocks are the job's resolved rows with their shard (Ray passes
        the schema of the first block reaching the fused write operator), the output is still this
        job's (no other config claimed it meanwhile), and the tally of committed shards runs."""
        missing = BLOCK_COLUMNS - set(schema.names) if schema is not None else set()
        if missing:
            raise TypeError(f"ShardSink: the blocks lack column(s) {sorted(missing)}")
        claim = OutputDir(self.url, retry_s=self.settings.storage_retry_s).read_json(CONFIG_FILE).get("fingerprint")
        if self.settings.fingerprint is not None and claim != self.settings.fingerprint:
            raise OutputConflict(self.url, "another job with a different config claimed this output while this one "
                                           "was planning; rerun once it is done", changed=[])
        self.start_tally()

    def start_tally(self) -> None:
        """The tally actor (on the driver's node: losing a worker node must not lose the count)."""
        if self.tally is None:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self.tally = ShardTally.options(name=self.tally_name, scheduling_strategy=here).remote(
                self.settings.budget, self.failed_before())

    def on_write_complete(self, write_result) -> None:
        """Every shard of the plan committed: verify and publish ``_SUCCESS`` (with this run's timing).
        (The tally outlives the write, for the job's last progress line; the job stops it, ``stop_tally``.)"""
        # each write task returned a list of ShardWrite (one per shard it wrote)
        self.commit([w for task in write_result.write_returns for w in (task or []) if isinstance(w, ShardWrite)])

    def on_write_failed(self, error: Exception) -> None:
        log.error("writing %s failed: %s: %s", self.url, type(error).__name__, error)

    def stop_tally(self) -> None:
        if self.tally is not None:
            ray.kill(self.tally)
            self.tally = None

    def tally_totals(self) -> tuple[int, int] | None:
        """(failed rows, budget) from the tally, if it runs."""
        return None if self.tally is None else ray.get(self.tally.totals.remote())

    # ------------------------------------------------------------ write tasks
    def write(self, blocks: Iterable[Block], ctx) -> list[ShardWrite]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        out, shard_col = [], table["shard"].to_numpy()
        for shard in sorted(set(shard_col.tolist())):
            rows = table.filter(pa.array(shard_col == shard)).sort_by("row")
            timing = [float(pc.sum(rows[c]).as_py() or 0.0) if c in rows.column_names else 0.0
                      for c in TIMING_COLUMNS]
            done = ShardWrite(self.write_shard(int(shard), rows), *timing)
            self.report(done)
            out.append(done)
        return out

    def report(self, done: ShardWrite) -> None:
        """Count a committed shard; stop the job once failed rows exceed the error budget."""
        stats = done.stats
        try:
            actor = ray.get_actor(self.tally_name)
            total, budget = ray.get(actor.report.remote(stats.shard, stats.rows, stats.errors, stats.model_calls,
                                                        done.model_busy_s, done.actor_wall_s), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError) as e:
            # early stopping is best effort; the job re-counts errors from committed shards at the end
            log.warning("shard tally actor unavailable (%s); shard %s not counted early", type(e).__name__, stats.shard)
            return
        if total > budget:
            raise budget_exceeded(self.url, total, budget, "failed (the job stopped)")

    def write_shard(self, shard: int, rows: pa.Table) -> ShardStats:
        out, name = OutputDir(self.url, retry_s=self.settings.storage_retry_s), shard_name(shard)
        if out.exists("stats", f"{name}.json"):      # committed by an earlier attempt or run
            return ShardStats.from_dict(out.read_json("stats", f"{name}.json"))
        if rows.num_rows != self.plan.shard_rows(shard):
            raise RuntimeError(f"{name}: got {rows.num_rows} rows, expected {self.plan.shard_rows(shard)}; "
                               "a shard must reach the sink as one block")
        failed = pc.is_valid(rows["error"])
        good, bad = rows.filter(pc.invert(failed)), rows.filter(failed)
        files = {}
        if self.settings.webdataset:
            files[f"shards/{name}.tar"] = tar_bytes(good, self.ext)
        if self.settings.parquet:
            files[f"parquet/{name}.parquet"] = parquet_bytes(good.drop_columns(list(PARQUET_DROP)))
        if bad.num_rows:
            files[f"_errors/{name}.parquet"] = parquet_bytes(error_table(bad))
        for rel, data in files.items():
            out.publish(rel, data)
        if not bad.num_rows:          # an earlier, uncommitted attempt may have failed rows this one did not
            out.remove(f"_errors/{name}.parquet")
        keys = good["key"].to_pylist()
        stats = ShardStats(shard=shard, name=name, rows=good.num_rows, errors=bad.num_rows,
                           first_row=int(rows["row"][0].as_py()), last_row=int(rows["row"][-1].as_py()),
                           first_key=keys[0] if keys else None, last_key=keys[-1] if keys else None,
                           model_calls=model_calls(rows),
                           files={rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                  for rel, data in files.items()})
        out.publish(f"stats/{name}.json", stats.to_bytes())
        return stats

    # ------------------------------------------------------------ the job's commit (driver)
    def commit(self, written: list[ShardWrite] = ()) -> dict:
        """Verify that every shard of the plan is committed and within the error budget, write the
        contact sheet, and publish ``_SUCCESS`` last (with ``written``'s timing); returns its document."""
        out = OutputDir(self.url, retry_s=self.settings.storage_retry_s)
        out.refresh()                  # cached listings (s3fs) predate the shards committed by this run
        todo = [s for s in range(self.plan.num_shards) if s not in self.earlier]
        stats = [st for _, st in sorted({**self.earlier, **ShardStats.read(out, todo)}.items())]
        images, errors = sum(s.rows for s in stats), sum(s.errors for s in stats)
        if errors + self.plan.validation_errors > self.settings.budget:      # the authoritative count
            raise budget_exceeded(self.url, errors + self.plan.validation_errors, self.settings.budget, "failed")
        if images + errors != self.plan.num_rows:
            raise RuntimeError(f"{self.url}: committed {images} images and {errors} errors, "
                               f"but the plan has {self.plan.num_rows} rows")
        sheet = write_contact_sheet(out, self.settings.contact_sheet) if self.settings.contact_sheet else None
        seconds = time.time() - self.t0
        self.success = {
            "images": images, "errors": {"generation": errors, "validation": self.plan.validation_errors},
            "shards": [dataclasses.asdict(s) for s in stats], "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 3) if seconds > 0 else None, "generated_shards": len(todo),
            # the budget spent: nfe x particles per row (failed rows too; shards of older versions lack it)
            "model_calls": sum(s.model_calls for s in stats), "contact_sheet": sheet, "timing": timing(written),
            **self.success_extra}
        out.publish("_SUCCESS", (json.dumps(self.success, indent=1, sort_keys=True) + "\n").encode())
        out.remove("_tmp", recursive=True)           # last: publishing _SUCCESS goes through _tmp/ on disks
        return self.success

    def get_name(self) -> str:
        return "ShardSink"


def timing(written: list[ShardWrite]) -> dict:
    """This run's time inside model calls and on the generator actors, per shard and in all; their ratio
    is the model's duty cycle (1.0: the model never waited)."""
    busy, wall = sum(w.model_busy_s for w in written), sum(w.actor_wall_s for w in written)
    return {"model_busy_s": round(busy, 3), "actor_wall_s": round(wall, 3),
            "duty_cycle": round(busy / wall, 4) if wall > 0 else None,
            "shards": [{"shard": w.stats.shard, "model_busy_s": round(w.model_busy_s, 3),
                        "actor_wall_s": round(w.actor_wall_s, 3)} for w in sorted(written, key=lambda w: w.stats.shard)]}
