"""The Generator: the callable class behind Ray Data's actor pool and the Serve deployment.

``__init__`` loads the model (and the job's solver plan) once, from paths, never from an object
passed through the object store; ``__call__`` takes a block of resolved requests
(``request.ROW_SCHEMA``) and returns it with each row's result appended (``encode.with_results``):
the model actor's work ends at decoded pixels, and ``encode.encode_block`` encodes them in a CPU
stage after it. ``generate`` turns one micro-batch of ``Request``s (same size, sampler and search)
into pixels; ``batching.BatchRunner`` decides the micro-batches and keeps a failure or a hang to
the rows it belongs to. Every row's noise comes from its own seeded generator, so an image never
depends on its batch, worker or row order.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from .batching import BatchRunner
from .config import JobConfig, from_dict, load_plan
from .denoisers import cat_cond, take_cond
from .encode import RowResult, encode_block, with_results
from .models import load_model
from .models.compile_cache import CompileCache, cache_key
from .models.base import float_images
from .plugins import import_object
from .request import Request, RequestFields, Resolver, SearchResult
from .rewards import Reward, RewardError, load_reward, score
from .samplers.noise import initial_noise, row_generators
from .search import SearchSpec, Steering, particle_seeds, pick, resampling_seed, rgb

log = logging.getLogger(__name__)
PROMPT_CACHE = 1024          # (prompt, negative prompt) embeddings each actor keeps


class PromptCache:
    """Prompt and negative-prompt embeddings: each distinct pair is encoded once and kept for later
    batches in a least-recently-used cache of ``size`` pairs."""

    def __init__(self, model, size: int = PROMPT_CACHE):
        self.model, self.size, self.pairs = model, size, OrderedDict()
        self.lock = threading.Lock()        # micro-batches are prepared on either of the runner's threads

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> tuple[Any, Any]:
        with self.lock:
            return self._lookup(pairs)

    def _lookup(self, pairs: Sequence[tuple[str, str]]) -> tuple[Any, Any]:
        new = [k for k in dict.fromkeys(pairs) if k not in self.pairs]
        if new:
            with torch.no_grad():
                cond, uncond = self.model.encode([k[0] for k in new], [k[1] for k in new])
            for j, k in enumerate(new):
                at = torch.tensor([j])
                self.pairs[k] = (take_cond(cond, at), take_cond(uncond, at))
        for k in pairs:
            self.pairs.move_to_end(k)
        parts = [self.pairs[k] for k in pairs]
        while len(self.pairs) > max(self.size, len(new)):
            self.pairs.popitem(last=False)
        return cat_cond(*(c for c, _ in parts)), cat_cond(*(u for _, u in parts))


@dataclass
class Prepared:
    """A micro-batch ready to sample (``Generator.prepare``): its first request, rows and particles per
    row, the model rows' noise and generators (padding included), the guided (or steering) denoiser,
    the real rows' prompts and the solver plan entry, if any."""
    first: Request
    n: int
    k: int
    noise: torch.Tensor
    generators: list
    denoiser: Any
    prompts: list[str]
    plan: Any = None


@dataclass
class Sampled:
    """A micro-batch between ``Generator.sample`` and ``Generator.finish``: its first request (size,
    search), clean latents ``[padded, ...]`` (a compiled decoder runs at its padded batch size; rows
    past ``n * k`` are padding), the particles' prompts, rows and particles per row, and the CUDA event
    after the sampler's work (None on the CPU)."""
    first: Request
    x0: torch.Tensor
    prompts: list[str]
    n: int
    k: int
    event: Any = None


class SideStream:
    """Where ``finish`` runs on CUDA: a second stream that waits for the sampler's event, so decoding and
    the copy to the host overlap the next micro-batch's denoiser steps; a no-op on the CPU."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def record(self, x: torch.Tensor):
        """An event after the work queued so far on the current stream (None on the CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        x.record_stream(self.stream)           # x's memory stays allocated until the side stream is done
        return event

    @contextlib.contextmanager
    def after(self, event):
        if self.stream is None or event is None:
            yield
            return
        self.stream.wait_event(event)
        with torch.cuda.stream(self.stream):
            yield
        self.stream.synchronize()              # the finishing thread waits, never the sampling one


class ModelClock:
    """Time inside model calls (``busy_s``) and the actor's time between blocks (``lap``): their ratio is
    the model's duty cycle. On CUDA a call's time is read from events recorded around it on the stream
    (collected when the next block starts, so nothing in the step loop waits for the GPU)."""

    def __init__(self):
        self.busy, self.events, self.last = 0.0, [], None

    @property
    def busy_s(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            self.busy += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events = []
        return self.busy

    def lap(self) -> float:
        """Seconds since the previous lap: the actor's time for one block, waiting for it included (the
        first lap starts when the first block arrives, not while the pool starts up)."""
        now = time.perf_counter()
        lap, self.last = now - (self.last if self.last is not None else now), now
        return lap

    def arrive(self) -> None:
        """A block arrives: the first one starts the clock."""
        if self.last is None:
            self.last = time.perf_counter()

    def wrap(self, fn: Callable) -> Callable:
        def timed(x, *args, **kwargs):
            if x.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(x, *args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            t = time.perf_counter()
            out = fn(x, *args, **kwargs)
            self.busy += time.perf_counter() - t
            return out
        return timed


class Conditioned:
    """A batch's guided denoiser (the model's guidance around ``model_fn``) whose rows can be
    subset, as calibration minibatches need (``pipeline.samplers.calibrate``)."""

    def __init__(self, model, cond, uncond, scale: torch.Tensor, model_fn=None, feature_cache: bool = True):
        self.model, self.cond, self.uncond, self.scale, self.model_fn = model, cond, uncond, scale, model_fn
        self.feature_cache = feature_cache
        self.fn = model.guided_denoiser(cond, uncond, scale, model_fn=model_fn, feature_cache=feature_cache)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.fn(x, sigma)

    def subset(self, idx: torch.Tensor) -> "Conditioned":
        return Conditioned(self.model, take_cond(self.cond, idx), take_cond(self.uncond, idx), self.scale[idx],
                           self.model_fn, self.feature_cache)


class Generator:
    """Conditioning -> sampler(denoiser, noise, sigmas) -> decoding, for blocks of resolved requests.

    ``wrap_model_fn`` wraps every model call (Serve's heartbeat); ``model.hook`` names a hook that
    wraps each micro-batch's model function (fault drills: ``pipeline.faults:FaultDrill``).
    """

    def __init__(self, cfg: dict | JobConfig, wrap_model_fn: Callable | None = None):
        self.cfg = cfg if isinstance(cfg, JobConfig) else from_dict(cfg)
        self.wrap_model_fn = wrap_model_fn
        threads = self.cfg.model.threads or max(1, math.ceil(self.cfg.ray.num_cpus_per_actor))
        torch.set_num_threads(threads)
        self.model = load_model(self.cfg.model)
        self.plans = load_plan(self.cfg)          # the job's solver plan family, or None
        self.prompts = PromptCache(self.model)
        self._rewards: dict[str, Reward] = {}
        self.hook = (import_object(self.cfg.model.hook)(self.cfg, **self.cfg.model.hook_options)
                     if self.cfg.model.hook else None)
        self.clock = ModelClock()
        self.side = SideStream(self.model.device)
        self.runner = BatchRunner(self.generate, self.cfg.errors.row_timeout_s, self.cfg.ray.batch_size,
                                  stages=(self.prepare, self.sample, self.finish))
        self.warmup_s = 0.0
        if self.cfg.model.compile:
            self.warm_up()
        log.info("generator ready: %s on %s (%d threads)", self.model.model_id, self.model.device, threads)

    # ------------------------------------------------------------ blocks of rows
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Generate a block of resolved requests: their decoded pixels (or errors), not yet encoded, and the
        block's time inside model calls and on this actor (since its previous block)."""
        self.clock.arrive()
        requests = [Request.from_row(r) for r in batch.to_pylist()]
        busy0 = self.clock.busy_s
        results = self.runner.run_block(requests)
        return with_results(batch, results, self.model.model_id, self.clock.busy_s - busy0, self.clock.lap(),
                            self.model.savings)

    def images(self, batch: pa.Table, image_format: str | None = None) -> pa.Table:
        """Generate and encode in one call (in-process use, Serve): ``encode_block(self(batch))``."""
        o = self.cfg.output
        return encode_block(self(batch), image_format or o.image_format, o.quality)

    # ------------------------------------------------------------ compiled models: static shapes
    def padded_sizes(self) -> list[int]:
        """The batch sizes a compiled model runs at: ``ray.batch_size``, ``/2``, ``/4`` and ``/8``."""
        return sorted({max(1, self.cfg.ray.batch_size // 2 ** k) for k in range(4)})

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
        if self.hook is not None and hasattr(self.hook, "warm_up"):
            self.hook.warm_up()
        m = self.model
        mode = self.cfg.model.compile_mode or ("reduce-overhead" if m.device.type == "cuda" else "default")
        resolve = Resolver(self.cfg, lambda *a: None, m.schedule_kind, m.fixed_latent, None)
        request = resolve(RequestFields(prompt="", seed=0, nfe=2, sampler="euler", search={"method": "none"}))[0]
        sizes = self.padded_sizes()[::-1]
        key = cache_key(m, self.cfg.model, sizes)
        with CompileCache(self.cfg.model.compile_cache, key):      # compiled code shared by actors and jobs
            m.compile(mode, self.cfg.model.compile_backend)
            for size in sizes:      # on the generation thread: CUDA graphs are recorded per thread
                self.runner.submit(self.generate, [request] * size).result()
        self.warmup_s = time.time() - t0
        log.info("compiled %s (mode %s, backend %s) for batch sizes %s in %.1f s", m.model_id, mode,
                 self.cfg.model.compile_backend, sizes, self.warmup_s)

    # ------------------------------------------------------------ one micro-batch
    def denoiser(self, requests: Sequence[Request], model_fn=None) -> Conditioned:
        """The guided denoiser of these requests' prompts, negative prompts and guidance scales (the full
        network at every call under a steering search: a resampled particle must not keep another
        particle's cached deep feature)."""
        cond, uncond = self.prompts([(r.prompt, r.negative_prompt) for r in requests])
        scale = torch.tensor([r.guidance_scale for r in requests], dtype=torch.float32, device=self.model.device)
        steered = requests[0].search is not None and requests[0].search.steered
        return Conditioned(self.model, cond, uncond, scale, model_fn, feature_cache=not steered)

    def noise(self, seeds: Sequence[int], height: int, width: int) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each row's starting noise (the first draw of its seeded generator) and the generators."""
        gens = row_generators(seeds)
        return initial_noise(gens, self.model.latent_shape(height, width)).to(self.model.device), gens

    def reward(self, search: SearchSpec) -> Reward:
        """The search's reward, loaded once per (name, options) on the model's device."""
        key = search.reward_key()
        if key not in self._rewards:
            self._rewards[key] = load_reward(search.reward, search.reward_options, self.model.device)
        return self._rewards[key]

    def model_fn_for(self, requests: Sequence[Request]):
        """The model function these model rows run through: timed, inside the hook's and Serve's wrappers."""
        fn = self.model.model_fn
        fn = self.clock.wrap(self.hook.wrap(fn, requests) if self.hook is not None else fn)
        return self.wrap_model_fn(fn) if self.wrap_model_fn else fn

    def generate(self, requests: list[Request]) -> list[RowResult]:
        """Sample requests that share size, sampler and search (``Request.batch_key``): each row's pixels
        (checked) and, with a search, the particle it kept. ``finish(sample(prepare(requests)))``."""
        return self.finish(self.sample(self.prepare(requests)))

    @torch.inference_mode()
    def prepare(self, requests: list[Request]) -> Prepared:
        """A micro-batch's inputs: model rows (particles, padding), noise, conditioning, the denoiser and
        the plan (the pipeline prepares micro-batch i+1 on its second thread while i samples)."""
        first, n = requests[0], len(requests)
        k = first.particles
        # the particle axis: row i's particles are model rows i*k .. i*k+k-1, each with its own noise seed
        seeds = [s for r in requests for s in particle_seeds(r.seed, k)]
        rows = [r for r in requests for _ in range(k)]
        groups = [i for i in range(n) for _ in range(k)]
        pad = self.padded_size(len(rows)) - len(rows)           # static shapes for a compiled model
        rows, seeds, groups = rows + [rows[-1]] * pad, seeds + [seeds[-1]] * pad, groups + list(range(n, n + pad))
        noise, gens = self.noise(seeds, first.height, first.width)
        denoiser = self.denoiser(rows, self.model_fn_for(rows))
        prompts = [r.prompt for r in rows]
        if first.search is not None and first.search.steered:
            denoiser = self.steering(denoiser, first, groups, seeds, prompts, n * k)
        spec = first.sampler
        plan = self.plans.entry(spec.plan) if self.plans is not None and spec.plan else None
        return Prepared(first, n, k, noise, gens, denoiser, prompts[:n * k], plan)

    @torch.inference_mode()
    def sample(self, p: Prepared) -> Sampled:
        """The micro-batch's clean latents: the sampler, queued on the device without waiting for it
        (``finish`` decodes them, possibly while the next micro-batch samples)."""
        first, spec = p.first, p.first.sampler
        lo, hi = self.model.sigma_range(first.height, first.width)
        x0 = spec.run(p.denoiser, p.noise, lo, hi, plan=p.plan, model_schedule=self.model.schedule,
                      model_grid_options=self.model.grid_options(spec.grid, first.height, first.width),
                      generator=p.generators)
        return Sampled(first, x0, p.prompts, p.n, p.k, self.side.record(x0))

    @torch.inference_mode()
    def finish(self, s: Sampled) -> list[RowResult]:
        """Decode a sampled micro-batch (on a side CUDA stream, after the sampler's work) into checked
        rows: each row's pixels, or the particle its search keeps."""
        with self.side.after(s.event):
            real = s.n * s.k
            finite = torch.isfinite(s.x0[:real].reshape(real, -1)).all(dim=1).tolist()
            pixels = self.model.decode(torch.nan_to_num(s.x0), s.first.height, s.first.width)[:real]
        if s.first.search is None:
            return [self.checked(p, ok) for p, ok in zip(pixels, finite)]
        return self.choose(s.first.search, pixels, finite, s.prompts, s.n, s.k)

    def steering(self, denoiser: Conditioned, first: Request, groups: list[int], seeds: list[int],
                 prompts: list[str], real: int) -> Steering:
        """The particles' steering denoiser: resampling within rows by the reward of clean estimates
        (``real``: the model rows before any padding)."""
        search, reward = first.search, self.reward(first.search)

        def scorer(d: torch.Tensor) -> torch.Tensor:
            scores = score(reward, search.reward, rgb(self.model.images(d, first.height, first.width)), prompts)
            if torch.isnan(scores[:real]).any():
                raise RewardError(search.reward, "returned NaN for a clean estimate mid-trajectory")
            return scores
        k = search.particles
        resampling = {g: resampling_seed(seeds[g * k]) if g * k < real else 0 for g in set(groups)}
        return Steering(denoiser, groups, search, scorer, resampling, first.sampler.nfe)

    def choose(self, search: SearchSpec, pixels: np.ndarray, finite: list[bool], prompts: list[str], n: int,
               k: int) -> list[RowResult]:
        """Each row's kept particle: the best reward of its finished images (the pixels that land)."""
        rewards = score(self.reward(search), search.reward, rgb(float_images(pixels, self.model.device)),
                        prompts).view(n, k)
        ok = torch.tensor(finite).view(n, k)
        out = []
        for i in range(n):
            if torch.isnan(rewards[i]).any():
                out.append(RowResult.failed(f"reward {search.reward!r} returned NaN for particle(s) "
                                            f"{torch.isnan(rewards[i]).nonzero()[:, 0].tolist()}", "reward"))
                continue
            p = pick(torch.where(ok[i], rewards[i], -math.inf)) if ok[i].any() else 0
            chosen = SearchResult(search_particle=p, search_reward=float(rewards[i, p]),
                                  search_rewards=rewards[i].tolist())
            out.append(self.checked(pixels[i * k + p], bool(ok[i, p]), chosen))
        return out

    def checked(self, pixels: np.ndarray, finite: bool, search: SearchResult | None = None) -> RowResult:
        """The row's result: its pixels, or an error if the sample is not finite or blank."""
        if not finite:
            return RowResult.failed("the sample has NaN/Inf values")
        if self.cfg.errors.reject_blank and pixels.min() == pixels.max():
            return RowResult.failed(f"blank image (every pixel is {int(pixels.min())})")
        return RowResult(pixels=pixels, search=search)
