"""Shard writers and the commit protocol: ``ShardSink`` is a Ray Data ``Datasink``.

Layout under the output URL::

    shards/shard-000000.tar        WebDataset: {key}.{png|jpg|webp}, {key}.json, {key}.txt
    parquet/shard-000000.parquet   the same rows: metadata columns + image bytes
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
import posixpath
import uuid
from typing import Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from .manifest import shard_name

TAR_MTIME = 0.0
IMAGE_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PARQUET_DROP = ("json",)


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
    pq.write_table(table.drop_columns([c for c in PARQUET_DROP if c in table.column_names]), buf,
                   compression="zstd")
    return buf.getvalue()


class OutputDir:
    """An fsspec output location with publish-by-move writes."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> dict:
        with self.fs.open(self.path(*parts), "rb") as f:
            return json.loads(f.read())

    def publish(self, rel: str, data: bytes) -> None:
        """Write ``data`` to a unique temporary name, then move it to ``rel``."""
        tmp = self.path("_tmp", f"{posixpath.basename(rel)}.{uuid.uuid4().hex}")
        self.fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        self.fs.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, self.path(rel))

    def committed_shards(self) -> list[int]:
        """Shard indices whose stats file (commit marker) exists."""
        pattern = self.path("stats", "shard-*.json")
        return sorted(int(posixpath.basename(p)[6:12]) for p in self.fs.glob(pattern))


class ShardSink(Datasink[list]):
    """Writes each shard's rows as a WebDataset tar and/or a Parquet file, then commits it."""

    def __init__(self, url: str, *, image_format: str, webdataset: bool, parquet: bool,
                 rows_per_shard: int, num_rows: int):
        self.url, self.ext = url, IMAGE_EXT[image_format]
        self.webdataset, self.parquet = webdataset, parquet
        self.rows_per_shard, self.num_rows = rows_per_shard, num_rows
        self.written: list[dict] = []

    def expected_rows(self, shard: int) -> int:
        return min(self.rows_per_shard, self.num_rows - shard * self.rows_per_shard)

    def write(self, blocks: Iterable[Block], ctx) -> list:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        out, shard_col = [], table["shard"].to_numpy()
        for shard in sorted(set(shard_col.tolist())):
            rows = table.filter(pa.array(shard_col == shard)).sort_by("row")
            out.append(self.write_shard(int(shard), rows))
        return out

    def write_shard(self, shard: int, rows: pa.Table) -> dict:
        out, name = OutputDir(self.url), shard_name(shard)
        if out.exists("stats", f"{name}.json"):      # committed by an earlier attempt or run
            return out.read_json("stats", f"{name}.json")
        if rows.num_rows != self.expected_rows(shard):
            raise RuntimeError(f"{name}: got {rows.num_rows} rows, expected {self.expected_rows(shard)}; "
                               "a shard must reach the sink as one block")
        files = {}
        if self.webdataset:
            files[f"shards/{name}.tar"] = tar_bytes(rows, self.ext)
        if self.parquet:
            files[f"parquet/{name}.parquet"] = parquet_bytes(rows)
        for rel, data in files.items():
            out.publish(rel, data)
        keys = rows["key"].to_pylist()
        stats = {"shard": shard, "name": name, "rows": rows.num_rows, "first_key": keys[0], "last_key": keys[-1],
                 "first_row": int(rows["row"][0].as_py()), "last_row": int(rows["row"][-1].as_py()),
                 "files": {rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                           for rel, data in files.items()}}
        out.publish(f"stats/{name}.json", (json.dumps(stats, indent=1, sort_keys=True) + "\n").encode())
        return stats

    def on_write_complete(self, write_result) -> None:
        self.written = [s for ret in write_result.write_returns for s in ret]

    def get_name(self) -> str:
        return "ShardSink"
