"""The Generator: the callable class behind Ray Data's actor pool and the Serve deployment, and
the CPU stage after it that encodes its images.

``__init__`` loads the model (and the job's solver plan) once, from paths, never from an object
passed through the object store; ``__call__`` takes a table of resolved requests
(``request.ROW_SCHEMA``, one ``request.Request`` per row) and returns it with ``model_id``,
``pixels`` (the decoded ``uint8`` image, raw), ``pixels_shape``, ``error`` and ``error_stage``
added: the model actor's work ends at decoding. ``encode_block`` (a separate map stage of CPU
tasks in the job, the engine thread in Serve) turns the pixels into PNG/JPEG/WebP bytes and
writes each image's ``.json`` sidecar (the request verbatim), so an accelerator never waits on
an image encoder. Rows with the same size and sampler are sampled together in micro-batches of
``batch_size``; every row's noise comes from its own seeded generator, so an image never
depends on its batch, worker or row order.

Failures stay per row: a micro-batch that raises is split in halves until the failing
rows are isolated (an out-of-memory error also halves the batch size for the rest of the
actor's life); a sample with NaN/Inf or a blank image, or a micro-batch running past
``errors.row_timeout_s``, becomes an error row instead of an image. A generator left with
a stalled thread exits at its next call, so Ray restarts the actor and retries the batch.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import logging
import math
import os
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .config import JobConfig, from_dict, load_plan
from .denoisers import cat_cond, take_cond
from .models import load_model
from .models.compile_cache import CompileCache, cache_key
from .models.base import float_images
from .request import PLAN, ROW_SCHEMA, Request, Resolver
from .rewards import Reward, RewardError, load_reward, score
from .samplers import sample
from .samplers.noise import initial_noise, row_generators
from .search import STEERED, SearchOptions, Steering, particle_seeds, pick, resampling_seed, rgb

log = logging.getLogger(__name__)
Result = tuple[np.ndarray | None, str | None, str | None, dict | None]    # (pixels, error, stage, search result)
PIXEL_COLUMNS = ("pixels", "pixels_shape")
SEARCH_COLUMNS = {"search_reward": pa.float64(), "search_rewards": pa.list_(pa.float64()),
                  "search_particle": pa.int32()}    # the kept particle's reward, every particle's, its index
PROMPT_CACHE = 1024          # (prompt, negative prompt) embeddings each actor keeps


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


def encode_block(batch: pa.Table, image_format: str, quality: int = 95) -> pa.Table:
    """The stage after the model: each row's raw pixels encoded as ``image_format`` (column ``image``)
    and its sidecar (``json``: the resolved request and the model id); the pixel columns dropped."""
    rows = batch.select(["pixels", "pixels_shape", "model_id", *SEARCH_COLUMNS, *ROW_SCHEMA.names]).to_pylist()
    images = [None if r["pixels"] is None else
              encode_image(np.frombuffer(r["pixels"], np.uint8).reshape(r["pixels_shape"]), image_format, quality)
              for r in rows]
    results = [{k: r[k] for k in SEARCH_COLUMNS if r[k] is not None} for r in rows]
    sidecars = [json.dumps(Request.from_row(r).metadata(r["model_id"], res), sort_keys=True, ensure_ascii=False)
                for r, res in zip(rows, results)]
    return (batch.drop_columns(list(PIXEL_COLUMNS)).append_column("image", pa.array(images, pa.binary()))
            .append_column("json", pa.array(sidecars, pa.string())))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Conditioned:
    """A batch's guided denoiser (the model's guidance around ``model_fn``) whose rows can be
    subset, as calibration minibatches need (``pipeline.samplers.calibrate``)."""

    def __init__(self, model, cond, uncond, scale: torch.Tensor, model_fn=None):
        self.model, self.cond, self.uncond, self.scale, self.model_fn = model, cond, uncond, scale, model_fn
        self.fn = model.guided_denoiser(cond, uncond, scale, model_fn=model_fn)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.fn(x, sigma)

    def subset(self, idx: torch.Tensor) -> "Conditioned":
        return Conditioned(self.model, take_cond(self.cond, idx), take_cond(self.uncond, idx), self.scale[idx],
                           self.model_fn)


class Generator:
    """Conditioning -> sampler(denoiser, noise, sigmas) -> decoding -> encoded images."""

    def __init__(self, cfg: dict | JobConfig, wrap_model_fn=None):
        self.cfg = cfg if isinstance(cfg, JobConfig) else from_dict(cfg)
        self.wrap_model_fn = wrap_model_fn       # e.g. Serve's heartbeat around every model call
        threads = self.cfg.model.threads or max(1, math.ceil(self.cfg.ray.num_cpus_per_actor))
        torch.set_num_threads(threads)
        self.model = load_model(self.cfg.model)
        self.plan = load_plan(self.cfg)
        self._embeddings: OrderedDict[tuple[str, str], tuple[Any, Any]] = OrderedDict()
        self._rewards: dict[str, Reward] = {}
        self.batch_size = self.cfg.ray.batch_size
        self._pool = cf.ThreadPoolExecutor(max_workers=1)
        self._stalled: cf.Future | None = None
        self.warmup_s = 0.0
        if self.cfg.model.compile:
            self.warm_up()
        log.info("generator ready: %s on %s (%d threads)", self.model.model_id, self.model.device, threads)

    # ------------------------------------------------------------ compiled models: static shapes
    def padded_sizes(self) -> list[int]:
        """The batch sizes a compiled model runs at: ``batch_size``, ``/2``, ``/4`` and ``/8``."""
        return sorted({max(1, self.batch_size // 2 ** k) for k in range(4)})

    def padded_size(self, n: int) -> int:
        """With ``model.compile``, the batch size ``n`` rows run at: the smallest padded size that
        holds them, so a compiled model sees at most four shapes (rows are padded with copies of the
        last one; their outputs are dropped)."""
        if not self.cfg.model.compile:
            return n
        return next((b for b in self.padded_sizes() if b >= n), n)

    def warm_up(self) -> None:
        """Compile the model for every padded batch size at the job's default request, here in the
        constructor: outside every row's timeout, before the actor takes work. A request of another
        size compiles when it first comes (and that call counts against its row timeout)."""
        t0 = time.time()
        m = self.model
        mode = self.cfg.model.compile_mode or ("reduce-overhead" if m.device.type == "cuda" else "default")
        resolve = Resolver(self.cfg, lambda *a: None, m.schedule_kind, m.fixed_latent, None)
        row = resolve({"prompt": "", "seed": 0, "nfe": 2, "sampler": "euler", "search": {"method": "none"}})[0].to_row()
        sizes = self.padded_sizes()[::-1]
        key = cache_key(m, self.cfg.model, sizes)
        with CompileCache(self.cfg.model.compile_cache, key):      # compiled code shared by actors and jobs
            m.compile(mode, self.cfg.model.compile_backend)
            for size in sizes:      # on the generation thread: CUDA graphs are recorded per thread
                self._pool.submit(self.generate, [row] * size).result()
        self.warmup_s = time.time() - t0
        log.info("compiled %s (mode %s, backend %s) for batch sizes %s in %.1f s", m.model_id, mode,
                 self.cfg.model.compile_backend, sizes, self.warmup_s)

    # ------------------------------------------------------------ one micro-batch
    def encode(self, rows: list[dict]) -> tuple[Any, Any]:
        """The rows' prompt and negative-prompt embeddings: each distinct pair is encoded once, and kept
        for later batches in a least-recently-used cache of ``PROMPT_CACHE`` pairs."""
        keys = [(r["prompt"], r["negative_prompt"]) for r in rows]
        new = [k for k in dict.fromkeys(keys) if k not in self._embeddings]
        if new:
            with torch.no_grad():
                cond, uncond = self.model.encode([k[0] for k in new], [k[1] for k in new])
            for j, k in enumerate(new):
                at = torch.tensor([j])
                self._embeddings[k] = (take_cond(cond, at), take_cond(uncond, at))
        for k in keys:
            self._embeddings.move_to_end(k)
        parts = [self._embeddings[k] for k in keys]
        while len(self._embeddings) > max(PROMPT_CACHE, len(new)):
            self._embeddings.popitem(last=False)
        return cat_cond(*(c for c, _ in parts)), cat_cond(*(u for _, u in parts))

    def denoiser(self, rows: list[dict], model_fn=None) -> Conditioned:
        """The guided denoiser of these rows' prompts, negative prompts and guidance scales."""
        cond, uncond = self.encode(rows)
        scale = torch.tensor([r["guidance_scale"] for r in rows], dtype=torch.float32, device=self.model.device)
        return Conditioned(self.model, cond, uncond, scale, model_fn)

    def reward(self, search: dict) -> Reward:
        """The search's reward, loaded once per (name, options) on the model's device."""
        key = json.dumps([search["reward"], search["reward_options"]], sort_keys=True)
        if key not in self._rewards:
            self._rewards[key] = load_reward(search["reward"], search["reward_options"], self.model.device)
        return self._rewards[key]

    def noise(self, rows: list[dict]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each row's starting noise (the first draw of its seeded generator) and the generators."""
        gens = row_generators([r["seed"] for r in rows])
        shape = self.model.latent_shape(rows[0]["height"], rows[0]["width"])
        return initial_noise(gens, shape).to(self.model.device), gens

    def model_fn_for(self, rows: list[dict]):
        """The model function these rows run through (``pipeline.faults`` wraps it for fault drills)."""
        fn = self.model.model_fn
        return self.wrap_model_fn(fn) if self.wrap_model_fn else fn

    @torch.inference_mode()
    def generate(self, rows: list[dict]) -> tuple[np.ndarray, list[bool], list[dict | None]]:
        """Sample rows that share size, sampler and search: images, a per-row 'finite' flag and, with a
        search, each row's result (the kept particle, its reward and every particle's reward)."""
        m, req, n = self.model, Request.from_row(rows[0]), len(rows)
        search, k = req.search, req.particles
        # the particle axis: row i's particles are model rows i*k .. i*k+k-1, each with its own noise seed
        prows = [{**r, "seed": s} for r in rows for s in particle_seeds(r["seed"], k)]
        groups = [i for i in range(n) for _ in range(k)]
        pad = self.padded_size(len(prows)) - len(prows)           # static shapes for a compiled model
        rows, groups = prows + [prows[-1]] * pad, groups + list(range(n, n + pad))
        noise, gens = self.noise(rows)
        model_fn = self.model_fn_for(rows)
        lo, hi = m.sigma_range(req.height, req.width)
        if req.sampler == PLAN:
            if self.plan is None or self.plan.hash != req.plan:
                raise ValueError(f"plan: solver plan {req.plan} is not loaded (sampler.plan has "
                                 f"{self.plan.hash if self.plan else 'none'})")
            method, options = self.plan, {}
        else:
            options = dict(req.sampler_options)
            grid_opts = {**m.grid_options(req.schedule, req.height, req.width), **options.pop("schedule_options", {})}
            options.update(schedule=req.schedule, final=req.final, model_schedule=m.schedule,
                           **({"schedule_options": grid_opts} if grid_opts else {}))
            method = req.sampler
        denoiser = self.denoiser(rows, model_fn)
        prompts = [r["prompt"] for r in rows]
        if search is not None and search["method"] in STEERED:
            reward = self.reward(search)

            def scorer(d: torch.Tensor) -> torch.Tensor:
                scores = score(reward, search["reward"], rgb(m.images(d, req.height, req.width)), prompts)
                if torch.isnan(scores[:n * k]).any():
                    raise RewardError(search["reward"], "returned NaN for a clean estimate mid-trajectory")
                return scores
            seeds = {g: resampling_seed(rows[g * k]["seed"]) if g < n else 0 for g in set(groups)}
            denoiser = Steering(denoiser, groups, search["method"], SearchOptions(**search["options"]), scorer,
                                seeds, req.nfe)
        x0 = sample(denoiser, noise, method=method, nfe=req.nfe, sigma_min=lo, sigma_max=hi,
                    generator=gens, **options)
        finite = torch.isfinite(x0.reshape(len(rows), -1)).all(dim=1).tolist()
        pixels = m.decode(torch.nan_to_num(x0), req.height, req.width)[:n * k]
        if search is None:
            return pixels, finite[:n], [None] * n
        return self.choose(search, pixels, finite[:n * k], prompts[:n * k], n, k)

    def choose(self, search: dict, pixels: np.ndarray, finite: list[bool], prompts: list[str], n: int,
               k: int) -> tuple[np.ndarray, list[bool], list[dict | None]]:
        """Each row's kept particle: the best reward of its finished images (the pixels that land)."""
        images = rgb(float_images(pixels, self.model.device))
        rewards = score(self.reward(search), search["reward"], images, prompts).view(n, k)
        ok = torch.tensor(finite).view(n, k)
        kept, flags, results = [], [], []
        for i in range(n):
            if torch.isnan(rewards[i]).any():
                kept.append(pixels[i * k]), flags.append(True)
                results.append({"error": f"reward {search['reward']!r} returned NaN for particle(s) "
                                         f"{torch.isnan(rewards[i]).nonzero()[:, 0].tolist()}"})
                continue
            p = pick(torch.where(ok[i], rewards[i], -math.inf)) if ok[i].any() else 0
            kept.append(pixels[i * k + p]), flags.append(bool(ok[i, p]))
            results.append({"search_reward": float(rewards[i, p]), "search_rewards": rewards[i].tolist(),
                            "search_particle": p})
        return np.stack(kept), flags, results

    def _checked(self, pixels: np.ndarray, finite: bool, result: dict | None) -> Result:
        if result is not None and "error" in result:
            return None, result["error"], "reward", None
        if not finite:
            return None, "the sample has NaN/Inf values", "generate", None
        if self.cfg.errors.reject_blank and pixels.min() == pixels.max():
            return None, f"blank image (every pixel is {int(pixels.min())})", "generate", None
        return pixels, None, None, result

    def _run(self, rows: list[dict]) -> list[Result]:
        """One micro-batch with a deadline; failures are bisected down to the rows that cause them."""
        timeout = self.cfg.errors.row_timeout_s
        future = self._pool.submit(self.generate, rows)
        try:
            pixels, finite, searched = future.result(timeout=timeout)
        except cf.TimeoutError:
            log.error("micro-batch of %d rows exceeded %.0fs; marking them as timeouts", len(rows), timeout)
            self._stalled = future
            self._pool = cf.ThreadPoolExecutor(max_workers=1)     # keep serving on a fresh thread
            return [(None, f"timed out after {timeout:g}s", "timeout", None)] * len(rows)
        except Exception as e:  # noqa: BLE001 - any model failure becomes per-row errors
            failure, oom = f"{type(e).__name__}: {e}", is_oom(e)
            stage = "reward" if isinstance(e, RewardError) else "generate"
        else:
            return [self._checked(px, ok, res) for px, ok, res in zip(pixels, finite, searched)]
        # retried outside the `except` block, with the future dropped: the failed call's traceback
        # frames (and the GPU tensors they hold) are gone, so empty_cache can free that memory
        del future
        if len(rows) == 1:
            return [(None, failure, stage, None)]
        if oom:
            self.batch_size = max(1, len(rows) // 2)
            log.warning("out of memory at batch %d; batch size is now %d", len(rows), self.batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        mid = len(rows) // 2
        return self._run(rows[:mid]) + self._run(rows[mid:])

    # ------------------------------------------------------------ a block of rows
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Generate a block of resolved requests: their decoded pixels (or errors), not yet encoded."""
        if self._stalled is not None and not self._stalled.done():
            log.error("a generation thread is still stalled; exiting so Ray restarts this actor")
            os._exit(1)
        rows = batch.to_pylist()
        results: list[Result] = [(None, None, None, None)] * len(rows)
        requests = [Request.from_row(r) for r in rows]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.sampler_spec(), []).append(i)
        for idx in groups.values():
            start, particles = 0, requests[idx[0]].particles
            while start < len(idx):
                chunk = idx[start:start + max(1, self.batch_size // particles)]   # model rows: rows x particles
                for i, res in zip(chunk, self._run([rows[i] for i in chunk])):
                    results[i] = res
                start += len(chunk)
        pixels, errors, stages, searched = zip(*results) if results else ((), (), (), ())
        for name, typ in SEARCH_COLUMNS.items():
            batch = batch.append_column(name, pa.array([(s or {}).get(name) for s in searched], typ))
        return (batch.append_column("model_id", pa.array([self.model.model_id] * len(rows), pa.string()))
                .append_column("pixels", pa.array([None if p is None else p.tobytes() for p in pixels], pa.binary()))
                .append_column("pixels_shape", pa.array([None if p is None else list(p.shape) for p in pixels],
                                                        pa.list_(pa.int32())))
                .append_column("error", pa.array(errors, pa.string()))
                .append_column("error_stage", pa.array(stages, pa.string())))

    def images(self, batch: pa.Table, image_format: str | None = None) -> pa.Table:
        """Generate and encode in one call (in-process use, Serve): ``encode_block(self(batch))``."""
        o = self.cfg.output
        return encode_block(self(batch), image_format or o.image_format, o.quality)
