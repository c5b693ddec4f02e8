"""Shard writers and the commit protocol: ``ShardSink`` is a Ray Data ``Datasink``.

Layout under the output URL::

    shards/shard-000000.tar        WebDataset: {key}.{png|jpg|webp}, {key}.json, {key}.txt
    parquet/shard-000000.parquet   the same rows: metadata columns + image bytes
    _errors/shard-000000.parquet   rows of the shard that failed (key, row, stage, error, request)
    stats/shard-000000.json        the shard's commit marker, written last
    _SUCCESS                       the job's manifest of shards, written last of all

A shard is one block: rows ``[k * rows_per_shard, (k+1) * rows_per_shard)``. Its files are
built in memory, written under ``_tmp/`` with a unique name and moved into place, then the
stats file commits it. A shard whose stats file exists is never written again, so a
retried task or a resumed job cannot produce a second copy of a key. Tar members have a
fixed mtime and owner, and rows are sorted by index, so a rerun is byte-identical.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from .errors import ErrorBudgetExceeded
from .manifest import Plan, shard_name
from .request import model_calls
from .storage import OutputDir

log = logging.getLogger(__name__)

TAR_MTIME = 0.0
IMAGE_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PARQUET_DROP = ("json", "error", "error_stage")
ERROR_COLUMNS = ["key", "row", "source_row", "shard", "stage", "error", "seed", "prompt", "negative_prompt",
                 "guidance_scale", "nfe", "sampler", "schedule", "sampler_options", "final", "plan", "height", "width",
                 "search", "extra"]


@ray.remote(num_cpus=0, max_restarts=-1)
class ShardTally:
    """Counts committed shards' rows and failed rows (idempotent under retries): the error
    budget is enforced on it early, and the driver's progress log reads it."""

    def __init__(self, budget: int, already: int = 0):
        self.budget, self.already, self.per_shard = budget, already, {}

    def report(self, shard: int, rows: int, errors: int, calls: int = 0) -> tuple[int, int]:
        self.per_shard[shard] = (rows, errors, calls)
        return self.totals()

    def totals(self) -> tuple[int, int]:
        """(failed rows so far, the budget)."""
        return self.already + sum(e for _, e, _ in self.per_shard.values()), self.budget

    def progress(self) -> tuple[int, int, int, int]:
        """(shards committed, images in them, failed rows in them, model calls they cost)."""
        done = self.per_shard.values()
        return len(done), sum(r for r, _, _ in done), sum(e for _, e, _ in done), sum(c for _, _, c in done)


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


class ShardSink(Datasink[list]):
    """Writes each shard's rows as a WebDataset tar and/or a Parquet file, then commits it."""

    def __init__(self, url: str, *, image_format: str, webdataset: bool, parquet: bool,
                 plan: Plan, tally_actor: str | None = None):
        self.url, self.ext = url, IMAGE_EXT[image_format]
        self.webdataset, self.parquet = webdataset, parquet
        self.plan, self.tally_actor = plan, tally_actor

    def write(self, blocks: Iterable[Block], ctx) -> list:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        out, shard_col = [], table["shard"].to_numpy()
        for shard in sorted(set(shard_col.tolist())):
            rows = table.filter(pa.array(shard_col == shard)).sort_by("row")
            stats = self.write_shard(int(shard), rows)
            self.report(stats)
            out.append(stats)
        return out

    def report(self, stats: dict) -> None:
        """Count a committed shard; stop the job once failed rows exceed the error budget."""
        if self.tally_actor is None:
            return
        try:
            actor = ray.get_actor(self.tally_actor)
            total, budget = ray.get(actor.report.remote(stats["shard"], stats["rows"], stats["errors"],
                                                stats.get("model_calls", 0)), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError) as e:
            # early stopping is best effort; the job re-counts errors from committed shards at the end
            log.warning("shard tally actor unavailable (%s); shard %s not counted early", type(e).__name__,
                        stats["shard"])
            return
        if total > budget:
            raise ErrorBudgetExceeded(f"{self.url}/_errors/", f"{total} rows failed, more than the error budget of "
                                      f"{budget} (errors.max_errors / errors.max_error_fraction)",
                                      failed=total, budget=budget)

    def write_shard(self, shard: int, rows: pa.Table) -> dict:
        out, name = OutputDir(self.url, retry_s=self.plan.cfg.output.storage_retry_s), shard_name(shard)
        if out.exists("stats", f"{name}.json"):      # committed by an earlier attempt or run
            return out.read_json("stats", f"{name}.json")
        if rows.num_rows != self.plan.shard_rows(shard):
            raise RuntimeError(f"{name}: got {rows.num_rows} rows, expected {self.plan.shard_rows(shard)}; "
                               "a shard must reach the sink as one block")
        failed = pc.is_valid(rows["error"])
        good, bad = rows.filter(pc.invert(failed)), rows.filter(failed)
        files = {}
        if self.webdataset:
            files[f"shards/{name}.tar"] = tar_bytes(good, self.ext)
        if self.parquet:
            files[f"parquet/{name}.parquet"] = parquet_bytes(good.drop_columns(list(PARQUET_DROP)))
        if bad.num_rows:
            files[f"_errors/{name}.parquet"] = parquet_bytes(error_table(bad))
        for rel, data in files.items():
            out.publish(rel, data)
        if not bad.num_rows:          # an earlier, uncommitted attempt may have failed rows this one did not
            out.remove(f"_errors/{name}.parquet")
        keys = good["key"].to_pylist()
        stats = {"shard": shard, "name": name, "rows": good.num_rows, "errors": bad.num_rows,
                 "model_calls": model_calls(rows),               # nfe x particles of every row, failed ones too
                 "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None,
                 "first_row": int(rows["row"][0].as_py()), "last_row": int(rows["row"][-1].as_py()),
                 "files": {rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                           for rel, data in files.items()}}
        out.publish(f"stats/{name}.json", (json.dumps(stats, indent=1, sort_keys=True) + "\n").encode())
        return stats

    def get_name(self) -> str:
        return "ShardSink"
