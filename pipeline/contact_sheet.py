"""A PNG grid of a job's first images with their prompts: people would rather look than read."""
from __future__ import annotations

import io
from typing import Iterator

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from .manifest import shard_name

CELL, CAPTION, COLUMNS = 96, 14, 8


def iter_images(out, limit: int) -> Iterator[tuple[str, bytes]]:
    """(prompt, image bytes) of the first ``limit`` images, in row order, from committed shards."""
    n, shard = 0, 0
    while n < limit and out.exists("stats", f"{shard_name(shard)}.json"):
        name = shard_name(shard)
        if out.exists("parquet", f"{name}.parquet"):
            t = pq.read_table(io.BytesIO(out.read_bytes("parquet", f"{name}.parquet")), columns=["prompt", "image"])
            items = zip(t["prompt"].to_pylist(), t["image"].to_pylist())
        else:
            items = _tar_items(out.read_bytes("shards", f"{name}.tar"))
        for prompt, img in items:
            if n >= limit:
                return
            n += 1
            yield prompt, img
        shard += 1


def _tar_items(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(prompt, image bytes) of a WebDataset shard's samples, read by webdataset itself."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for sample in group_by_keys(tar_file_expander([{"stream": io.BytesIO(data), "url": "shard"}])):
        img = next(sample[k] for k in ("png", "jpg", "webp") if k in sample)
        yield sample.get("txt", b"").decode(), img


def contact_sheet(items: list[tuple[str, bytes]]) -> Image.Image:
    rows = max(1, -(-len(items) // COLUMNS))
    sheet = Image.new("RGB", (COLUMNS * CELL, rows * (CELL + CAPTION)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, (prompt, data) in enumerate(items):
        x, y = (i % COLUMNS) * CELL, (i // COLUMNS) * (CELL + CAPTION)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if max(img.size) > CELL - 4:
            img.thumbnail((CELL - 4, CELL - 4))
        scale = max(1, (CELL - 4) // max(img.size))
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        sheet.paste(img, (x + (CELL - img.width) // 2, y + (CELL - img.height) // 2))
        draw.text((x + 2, y + CELL), prompt[:16], fill="black", font=font)
    return sheet


def write_contact_sheet(out, limit: int) -> str | None:
    """Write ``contact_sheet.png`` at the output root; returns its URL (None if no images)."""
    items = list(iter_images(out, limit))
    if not items:
        return None
    buf = io.BytesIO()
    contact_sheet(items).save(buf, format="PNG")
    out.publish("contact_sheet.png", buf.getvalue())
    return f"{out.url}/contact_sheet.png"
