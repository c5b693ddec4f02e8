"""Generated rows between the model actor and the sink: each row's typed result, the Arrow columns the
actor adds for it, and the CPU stage that encodes the images and writes their sidecars.

The model actor (``pipeline.worker.Generator``) ends its work at decoded ``uint8`` pixels:
``with_results`` appends ``model_id``, ``pixels``, ``pixels_shape``, ``error``, ``error_stage`` and the
search result columns to the block of resolved requests. ``encode_block`` (a separate map stage of
CPU tasks in the job, the engine thread in Serve) turns the pixels into PNG/JPEG/WebP bytes
(``image``) and each row's ``.json`` sidecar (``json``: the request verbatim, the model and the
search result), so an accelerator never waits on an image encoder.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from .config import IMAGE_FORMATS
from .request import ROW_SCHEMA, Request, SearchResult

PIXEL_COLUMNS = ("pixels", "pixels_shape")
SEARCH_COLUMNS = {"search_reward": pa.float64(), "search_rewards": pa.list_(pa.float64()),
                  "search_particle": pa.int32()}    # the kept particle's reward, every particle's, its index


@dataclass(frozen=True)
class RowResult:
    """One row's outcome in the model actor: its pixels, or an error and the stage it failed at
    (``generate``, ``reward``, ``timeout``); with a search, what the search chose."""
    pixels: np.ndarray | None = None
    error: str | None = None
    stage: str | None = None
    search: SearchResult | None = None

    @classmethod
    def failed(cls, error: str, stage: str = "generate") -> "RowResult":
        return cls(error=error, stage=stage)


TIMING_COLUMNS = ("model_busy_s", "actor_wall_s")   # the block's time in model calls / on the actor, per row


def with_results(batch: pa.Table, results: list[RowResult], model_id: str, busy_s: float = 0.0,
                 wall_s: float = 0.0, savings: dict | None = None) -> pa.Table:
    """The block of resolved requests with each row's result appended as columns, the block's time
    inside model calls and on the actor spread evenly over its rows (a shard's sums are its block's),
    and the model's opt-in savings (``savings``, JSON; null when none is on)."""
    px, n = [r.pixels for r in results], max(1, len(results))
    on = json.dumps(savings, sort_keys=True) if savings else None
    batch = batch.append_column("savings", pa.array([on] * len(results), pa.string()))
    for name, value in zip(TIMING_COLUMNS, (busy_s, wall_s)):
        batch = batch.append_column(name, pa.array([value / n] * len(results), pa.float64()))
    chosen = [r.search.model_dump() if r.search else {} for r in results]
    for name, typ in SEARCH_COLUMNS.items():
        batch = batch.append_column(name, pa.array([c.get(name) for c in chosen], typ))
    return (batch.append_column("model_id", pa.array([model_id] * len(results), pa.string()))
            .append_column("pixels", pa.array([None if p is None else p.tobytes() for p in px], pa.binary()))
            .append_column("pixels_shape", pa.array([None if p is None else list(p.shape) for p in px],
                                                    pa.list_(pa.int32())))
            .append_column("error", pa.array([r.error for r in results], pa.string()))
            .append_column("error_stage", pa.array([r.stage for r in results], pa.string())))


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encode one ``uint8`` image (``[H, W]`` or ``[H, W, 3]``); deterministic bytes."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"output.image_format: unknown format {fmt!r}; allowed: {tuple(IMAGE_FORMATS)}")
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def encode_block(batch: pa.Table, image_format: str, quality: int = 95) -> pa.Table:
    """The stage after the model: each row's raw pixels encoded as ``image_format`` (column ``image``)
    and its sidecar (``json``: the resolved request and the model id); the pixel columns dropped."""
    rows = batch.select(["pixels", "pixels_shape", "model_id", "savings", *SEARCH_COLUMNS, *ROW_SCHEMA.names]).to_pylist()
    images = [None if r["pixels"] is None else
              encode_image(np.frombuffer(r["pixels"], np.uint8).reshape(r["pixels_shape"]), image_format, quality)
              for r in rows]
    sidecars = [json.dumps({**Request.from_row(r).metadata(r["model_id"], _search_result(r)),
                            **({"savings": json.loads(r["savings"])} if r["savings"] else {})}, sort_keys=True,
                           ensure_ascii=False) for r in rows]
    return (batch.drop_columns(list(PIXEL_COLUMNS)).append_column("image", pa.array(images, pa.binary()))
            .append_column("json", pa.array(sidecars, pa.string())))


def _search_result(row: dict) -> SearchResult | None:
    return None if row["search_particle"] is None else SearchResult(**{k: row[k] for k in SEARCH_COLUMNS})
