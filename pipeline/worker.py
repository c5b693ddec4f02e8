"""The Generator: the callable class behind Ray Data's actor pool and the Serve deployment.

``__init__`` loads the model once (from a path, never from an object passed through the
object store); ``__call__`` takes a table of normalised rows (``manifest.ROW_SCHEMA``)
and returns it with ``model_id``, ``image`` (encoded bytes) and ``json`` (the sidecar
metadata) added. Rows are grouped by (height, width, sampler, nfe) and sampled in
micro-batches of ``batch_size``; every row's noise comes from its own seeded generator,
so an image never depends on its batch, its worker or the order of rows.
"""
from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .config import JobConfig, from_dict
from .denoisers import cfg as cfg_denoiser
from .models import load_model
from .samplers import sample
from .samplers.noise import initial_noise, row_generators

log = logging.getLogger(__name__)
GROUP_FIELDS = ("height", "width", "sampler", "nfe")


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encode one ``uint8`` image (``[H, W]`` or ``[H, W, 3]``); deterministic bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"output.image_format: unknown format {fmt!r}")
    return buf.getvalue()


def metadata(row: dict, model_id: str, schedule: str | None) -> dict:
    """The ``.json`` sidecar: what is needed to reproduce the image, plus the row's extra columns."""
    meta = {"key": row["key"], "prompt": row["prompt"], "negative_prompt": row["negative_prompt"],
            "seed": row["seed"], "sampler": row["sampler"], "schedule": schedule, "nfe": row["nfe"],
            "guidance_scale": row["guidance_scale"], "height": row["height"], "width": row["width"],
            "model_id": model_id, "row": row["row"], "source_row": row["source_row"]}
    extra = json.loads(row["extra"]) if row.get("extra") else {}
    return {**meta, **{k: v for k, v in extra.items() if k not in meta}}


class Generator:
    """Conditioning -> sampler(denoiser, noise, sigmas) -> decoding -> encoded images."""

    def __init__(self, cfg: dict | JobConfig):
        self.cfg = cfg if isinstance(cfg, JobConfig) else from_dict(cfg)
        threads = self.cfg.model.threads or max(1, math.ceil(self.cfg.ray.num_cpus_per_actor))
        torch.set_num_threads(threads)
        self.model = load_model(self.cfg.model)
        log.info("generator ready: %s on %s (%d threads)", self.model.model_id, self.model.device, threads)

    def generate(self, rows: list[dict]) -> np.ndarray:
        """Sample one micro-batch of rows that share height, width, sampler and nfe."""
        m, s, r0 = self.model, self.cfg.sampler, rows[0]
        gens = row_generators([r["seed"] for r in rows])
        noise = initial_noise(gens, m.latent_shape(r0["height"], r0["width"])).to(m.device)
        cond, uncond = m.encode([r["prompt"] for r in rows], [r["negative_prompt"] for r in rows])
        scale = torch.tensor([r["guidance_scale"] for r in rows], dtype=torch.float32)
        denoiser = cfg_denoiser(m.model_fn, cond, uncond, scale)
        x0 = sample(denoiser, noise, method=r0["sampler"], nfe=int(r0["nfe"]), sigma_min=m.sigma_min,
                    sigma_max=m.sigma_max, schedule=s.schedule, generator=gens, **s.options)
        return m.decode(x0, r0["height"], r0["width"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images: list[bytes | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(tuple(r[f] for f in GROUP_FIELDS), []).append(i)
        bs, fmt, q = self.cfg.ray.batch_size, self.cfg.output.image_format, self.cfg.output.quality
        for idx in groups.values():
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                pixels = self.generate([rows[i] for i in chunk])
                for i, px in zip(chunk, pixels):
                    images[i] = encode_image(px, fmt, q)
        mid = self.model.model_id
        sidecars = [json.dumps(metadata(r, mid, self.cfg.sampler.schedule), sort_keys=True, ensure_ascii=False)
                    for r in rows]
        return (batch.append_column("model_id", pa.array([mid] * len(rows), pa.string()))
                .append_column("image", pa.array(images, pa.binary()))
                .append_column("json", pa.array(sidecars, pa.string())))
