"""Manifests: reading, validation, keys and seeds, templates, and the shard plan.

A manifest is JSONL, CSV or Parquet with one request per row. The driver streams it once
(constant memory), checks every row, expands ``num_images``, fills defaults, assigns
keys and seeds, and stages the normalised rows as one Parquet file with one row group
per output shard under ``<output>/_staging/``; each shard's read task then reads its
row group. A template (``"digit {d}"`` x values x count) needs no file at all: a shard's
rows are computed from their indices.

Row fields are those of ``pipeline.request.RequestFields``; a ``Resolver`` turns each row into
its resolved ``Request``s (one per image). Any other column is carried to the outputs untouched
(as JSON in the ``extra`` column).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .config import JobConfig
from .errors import ManifestError, RequestError
from .request import ROW_SCHEMA, RequestFields, Resolver
from .storage import OutputDir, open_fs, with_retries

SHARD_RE = re.compile(r"^shard-(\d{6,})(?:\.|$)")


def shard_name(shard: int) -> str:
    """``shard-000042``: at least six digits (more past shard 999,999), so names sort by index up to there."""
    return f"shard-{shard:06d}"


def parse_shard(name: str) -> int:
    """The index in a shard's file name (``shard-1234567.json`` -> 1234567)."""
    m = SHARD_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a shard file name (shard-NNNNNN...)")
    return int(m.group(1))


# ---------------------------------------------------------------- reading raw rows
def _open_text(url: str):
    return fsspec.open(url, "rt", encoding="utf-8", newline="")


def fingerprint(cfg: JobConfig) -> str | None:
    """What identifies the manifest file's content: its ETag where the store gives one, else a
    SHA-256 of its bytes; None for templates (the config describes them) or a missing file (the
    plan reports it). A resumed job compares it, so an edited manifest is never mixed in."""
    if cfg.manifest.template is not None or not cfg.manifest.path:
        return None
    try:
        fs, path = fsspec.core.url_to_fs(cfg.manifest.path)
        info = fs.info(path)
        etag = (info.get("ETag") or info.get("etag") or "").strip('"')
        if etag:
            return f"etag:{etag}:{info.get('size')}"
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    except FileNotFoundError:
        return None


def iter_raw_rows(url: str) -> Iterator[dict]:
    """Yield each manifest row as a dict, streaming; the format follows the suffix."""
    lower = url.lower()
    try:
        if lower.endswith((".jsonl", ".ndjson", ".json")):
            with _open_text(url) as f:
                row = 0                        # rows count from 0, as in every other error (blank lines skipped)
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ManifestError(url, f"row {row} (line {line_no}): not valid JSON ({e.msg})",
                                            row=row) from None
                    if not isinstance(obj, dict):
                        raise ManifestError(url, f"row {row} (line {line_no}): expected a JSON object, got "
                                                 f"{type(obj).__name__}", row=row)
                    row += 1
                    yield obj
        elif lower.endswith((".csv", ".tsv")):
            with _open_text(url) as f:
                reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
                for row, rec in enumerate(reader):
                    if None in rec:
                        raise ManifestError(url, f"row {row} (line {reader.line_num}): more values than header "
                                                 "columns", row=row)
                    yield {k: v for k, v in rec.items() if v not in ("", None)}
        elif lower.endswith((".parquet", ".pq")):
            with fsspec.open(url, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                    for rec in batch.to_pylist():
                        yield {k: v for k, v in rec.items() if v is not None}
        else:
            raise ManifestError(url, "unknown manifest format; use .jsonl, .csv or .parquet")
    except FileNotFoundError:
        raise ManifestError(url, "manifest not found") from None
    except (OSError, UnicodeDecodeError, pa.ArrowException, csv.Error) as e:
        raise ManifestError(url, f"cannot read manifest: {e}") from None


# ---------------------------------------------------------------- templates
@dataclass
class Template:
    """``template`` x the cartesian product of ``values`` x ``count`` seeds, computed per index.

    Row ``i`` uses combination ``i % n_combos`` (so the first rows cover every combination)
    and repeat ``i // n_combos``. A value name that is a request field (e.g.
    ``guidance_scale``) also sets that field; others go to ``extra``.
    """
    template: str
    values: dict[str, list]
    count: int

    def __post_init__(self):
        self.names = list(self.values)
        self.sizes = [len(self.values[k]) for k in self.names]
        missing = set(re.findall(r"{(\w+)[^}]*}", self.template)) - set(self.names)
        if missing:
            raise ManifestError("manifest.template", f"no values for field(s) {sorted(missing)}")
        if any(n == 0 for n in self.sizes):
            raise ManifestError("manifest.values", "every field needs at least one value")
        self.n_combos = math.prod(self.sizes)

    def __len__(self) -> int:
        return self.n_combos * self.count

    def raw_row(self, i: int) -> dict:
        combo, chosen = i % self.n_combos, {}
        for name, size in zip(reversed(self.names), reversed(self.sizes)):
            combo, k = divmod(combo, size)
            chosen[name] = self.values[name][k]
        fields = set(RequestFields.model_fields) - {"key"}
        raw = {k: v for k, v in chosen.items() if k in fields}
        raw["prompt"] = self.template.format(**chosen)
        raw.update({k: v for k, v in chosen.items() if k not in fields})
        return raw


# ---------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What the job will produce: rows, shards, and how a shard's rows are read."""
    num_rows: int
    rows_per_shard: int
    staged_url: str | None = None                 # staged Parquet (file manifests)
    template: Template | None = None              # lazy template (no file)
    cfg: JobConfig | None = field(default=None, repr=False)
    validation_errors: int = 0                    # manifest rows quarantined in _errors/validation.parquet

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.rows_per_shard)

    def shard_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, self.num_rows - shard * self.rows_per_shard)

    def read_shard(self, shard: int, resolver: Resolver) -> pa.Table:
        """The normalised rows of one shard, as a table with ``ROW_SCHEMA`` plus ``shard``."""
        if self.staged_url is not None:
            def read() -> pa.Table:
                fs, path = open_fs(self.staged_url)
                with fs.open(path, "rb") as f:
                    return pq.ParquetFile(f).read_row_group(shard)
            table = with_retries(read, f"read of row group {shard}", self.staged_url,
                                 budget_s=self.cfg.output.storage_retry_s if self.cfg else None)
        else:
            start = shard * self.rows_per_shard
            rows = [resolver(self.template.raw_row(i), i, i)[0].to_row()
                    for i in range(start, start + self.shard_rows(shard))]
            table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        return table.append_column("shard", pa.array([shard] * table.num_rows, pa.int32()))


def row_failure(source: str, row: int, e: RequestError) -> ManifestError:
    """A row's ``RequestError`` as the manifest's error: ``file: row N: field 'x': ...``."""
    return ManifestError(source, f"row {row}: field {e.field!r}: {e.message}", row=row, field=e.field)


def plan(cfg: JobConfig, out: OutputDir, resolver: Resolver) -> Plan:
    """Read and check the manifest (or template) and decide the shards.

    File manifests are validated row by row here, on the driver, and staged under
    ``out/_staging/``. Bad rows go to ``out/_errors/validation.parquet``; if they exceed the
    error budget, ``ManifestError`` names the first one's file, row and field.
    """
    m, rps = cfg.manifest, cfg.output.rows_per_shard
    if m.template is not None:
        t = Template(m.template, dict(m.values), m.count)
        n = len(t) if m.limit is None else min(len(t), m.limit)
        for i in range(min(n, t.n_combos)):   # every combination once: catches bad values up front
            try:
                resolver(t.raw_row(i), i, i)
            except RequestError as e:
                raise row_failure("manifest.template", i, e) from None
        if n == 0:
            raise ManifestError("manifest.template", "expands to no rows")
        return Plan(n, rps, template=t, cfg=cfg)
    return _stage_file(cfg, m.path, out, resolver)


VALIDATION_ERRORS = "_errors/validation.parquet"
STAGED_ROWS = "_staging/rows.parquet"


def _stage_file(cfg: JobConfig, url: str, out: OutputDir, resolver: Resolver) -> Plan:
    rps, limit = cfg.output.rows_per_shard, cfg.manifest.limit
    keys: set[str] = set()
    buf: list[dict] = []
    bad: list[dict] = []
    first_failure: ManifestError | None = None
    n = seen = 0
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "rows.parquet")
        with pq.ParquetWriter(local, ROW_SCHEMA) as writer:
            for i, raw in enumerate(iter_raw_rows(url)):
                if limit is not None and n >= limit:
                    break
                seen += 1
                try:
                    rows = [r.to_row() for r in resolver(raw, i, n)]
                    dup = next((r["key"] for r in rows if r["key"] in keys), None)
                    if dup is not None:
                        raise RequestError("key", f"duplicate key {dup!r}")
                except RequestError as e:
                    failure = row_failure(url, i, e)
                    first_failure = first_failure or failure
                    bad.append({"source_row": i, "stage": "validate", "error": str(failure),
                                "raw": json.dumps(raw, sort_keys=True, default=str)})
                    if cfg.errors.max_errors is not None and len(bad) > cfg.errors.max_errors:
                        break
                    continue
                keys.update(r["key"] for r in rows)
                rows = rows[: (limit - n) if limit is not None else None]
                n += len(rows)
                buf.extend(rows)
                while len(buf) >= rps:   # one row group per shard
                    writer.write_table(pa.Table.from_pylist(buf[:rps], schema=ROW_SCHEMA), row_group_size=rps)
                    buf = buf[rps:]
            if buf:
                writer.write_table(pa.Table.from_pylist(buf, schema=ROW_SCHEMA), row_group_size=rps)
        budget = cfg.errors.budget(seen)
        if len(bad) > budget:
            more = f" (and {len(bad) - 1} more bad row(s))" if len(bad) > 1 else ""
            raise ManifestError(url, f"{first_failure.message}{more}; {len(bad)} bad row(s) exceed the error budget "
                                     f"of {budget} (errors.max_errors / errors.max_error_fraction)",
                                row=first_failure.row, field=first_failure.field)
        if n == 0:
            raise ManifestError(url, "manifest has no valid rows")
        out.publish_file(STAGED_ROWS, local)
    if bad:
        buf_err = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(bad), buf_err)
        out.publish(VALIDATION_ERRORS, buf_err.getvalue())
    else:
        out.remove(VALIDATION_ERRORS)
    return Plan(n, rps, staged_url=f"{out.url}/{STAGED_ROWS}", cfg=cfg, validation_errors=len(bad))
