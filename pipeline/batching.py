"""Process control of a model actor: micro-batches with a deadline, failures isolated to rows.

``BatchRunner`` takes a block of resolved requests and runs them through ``generate(requests) ->
list[RowResult]`` (one micro-batch: rows that share size, sampler and search, at most ``batch_size``
model rows) on one generation thread:

- a micro-batch running past ``timeout_s`` becomes ``timeout`` errors (the whole micro-batch: a
  hang cannot be bisected in time); the runner goes on with a fresh thread and, if the stalled one is
  still stuck when the next block arrives, exits the process so Ray restarts the actor;
- a micro-batch that raises is split in halves until the failing rows are isolated; an out-of-memory
  error also halves the batch size for the rest of the actor's life (the halves run after the failed
  call's frames are released, so ``torch.cuda.empty_cache()`` can free their memory).

With ``stages=(prepare, sample, finish)`` (``generate`` = ``finish(sample(prepare(...)))``) the
micro-batches of a block run as a pipeline: micro-batch i+1's ``prepare`` (noise, conditioning) and
micro-batch i-1's ``finish`` (decoding, the copy to the host, the checks) run on a second thread
while micro-batch i samples, so the model never waits for them. A micro-batch whose
stage fails or runs late is run again on its own through ``run`` (bisection, deadlines, OOM halving).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from typing import Callable, Sequence

import torch

from .encode import RowResult
from .request import Request
from .rewards import RewardError

log = logging.getLogger(__name__)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def micro_batches(requests: Sequence[Request], batch_size: int) -> list[list[int]]:
    """Indices of ``requests`` in the micro-batches the runner makes: requests of equal ``batch_key``
    together, at most ``batch_size`` model rows (rows x particles) each."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.batch_key(), []).append(i)
    per_call = {key: max(1, batch_size // requests[idx[0]].particles) for key, idx in groups.items()}
    return [idx[s:s + per_call[key]] for key, idx in groups.items() for s in range(0, len(idx), per_call[key])]


class BatchRunner:
    """Runs blocks of requests as micro-batches on one generation thread (see the module docstring)."""

    def __init__(self, generate: Callable[[list[Request]], list[RowResult]], timeout_s: float, batch_size: int,
                 stages: tuple[Callable, Callable] | None = None):
        self.generate, self.timeout_s, self.batch_size, self.stages = generate, timeout_s, batch_size, stages
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.finisher = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        self.stalled: cf.Future | None = None

    def submit(self, fn: Callable, *args) -> cf.Future:
        """Run ``fn`` on the generation thread (compiled CUDA graphs are recorded per thread)."""
        return self.pool.submit(fn, *args)

    def exit_if_stalled(self) -> None:
        if self.stalled is not None and not self.stalled.done():
            log.error("a generation thread is still stalled; exiting so Ray restarts this actor")
            os._exit(1)

    def run_block(self, requests: Sequence[Request]) -> list[RowResult]:
        """Every request's result, in order: micro-batches of equal ``batch_key`` and at most
        ``batch_size`` model rows (rows x particles)."""
        self.exit_if_stalled()
        results: list[RowResult | None] = [None] * len(requests)
        chunks = micro_batches(requests, self.batch_size)
        done = self.pipeline([[requests[i] for i in c] for c in chunks]) if self.stages else \
            [self.run([requests[i] for i in c]) for c in chunks]
        for chunk, res in zip(chunks, done):
            for i, r in zip(chunk, res):
                results[i] = r
        return results

    def pipeline(self, chunks: list[list[Request]]) -> list[list[RowResult]]:
        """Each micro-batch sampled on the generation thread, prepared before and finished after on the
        other, so the model only waits for its own steps: while micro-batch i samples, the other thread
        finishes i-1 and prepares i+1. Past ``timeout_s`` (all stages, from when its turn comes) a
        micro-batch becomes timeouts; one that raises runs again alone (``run``: bisection, OOM halving)."""
        prepare, sample, finish = self.stages
        out: list = [None] * len(chunks)
        pending: tuple[int, cf.Future, float] | None = None
        ready = self.finisher.submit(prepare, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            t0 = time.monotonic()
            prepared = self.collect(i, ready, t0, len(chunk), keep=True)
            if i + 1 < len(chunks):      # queued behind finish(i-1): both run while micro-batch i samples
                ready = self.finisher.submit(prepare, chunks[i + 1])
            if prepared is None or isinstance(prepared, list):
                out[i] = prepared         # timeouts, or None: runs again alone below
                continue
            future = self.pool.submit(sample, prepared)
            try:
                sampled = future.result(timeout=max(0.0, t0 + self.timeout_s - time.monotonic()))
            except cf.TimeoutError:
                out[i] = self.timed_out(future, len(chunk), "pool")
                continue
            except Exception:  # noqa: BLE001 - runs again alone below, where the failure is isolated to rows
                continue
            if pending is not None:
                out[pending[0]] = self.collect(*pending, len(chunks[pending[0]]))
            pending = (i, self.finisher.submit(finish, sampled), t0)
        if pending is not None:
            out[pending[0]] = self.collect(*pending, len(chunks[pending[0]]))
        return [res if res is not None else self.run(chunk) for chunk, res in zip(chunks, out)]

    def collect(self, i: int, future: cf.Future, t0: float, n: int, keep: bool = False):
        """A second-thread stage's result (a finish's rows; with ``keep``, whatever it returned); timeouts
        past the micro-batch's deadline, None if it raised, was cancelled with a stalled thread, or never
        started (the thread is stuck on another micro-batch's stage: this one runs again alone)."""
        try:
            return future.result(timeout=max(0.0, t0 + self.timeout_s - time.monotonic()))
        except cf.TimeoutError:
            if keep and future.cancel():
                return None
            return self.timed_out(future, n, "finisher")
        except Exception:  # noqa: BLE001 - runs again alone (run)
            return None

    def timed_out(self, future: cf.Future, n: int, which: str) -> list[RowResult]:
        """A micro-batch past its deadline: ``n`` timeout rows; the stuck thread is left behind (the actor
        exits at the next block if it is still stuck) and a fresh one takes over."""
        log.error("micro-batch of %d rows exceeded %.0fs; marking them as timeouts", n, self.timeout_s)
        self.stalled = future
        getattr(self, which).shutdown(wait=False, cancel_futures=True)    # what is queued behind it: cancelled
        setattr(self, which, cf.ThreadPoolExecutor(max_workers=1))
        return [RowResult.failed(f"timed out after {self.timeout_s:g}s", "timeout")] * n

    def run(self, requests: list[Request]) -> list[RowResult]:
        """One micro-batch with a deadline; failures are bisected down to the rows that cause them."""
        future = self.pool.submit(self.generate, requests)
        try:
            return future.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            return self.timed_out(future, len(requests), "pool")          # go on with a fresh thread
        except Exception as e:  # noqa: BLE001 - any model failure becomes per-row errors
            failure, oom = f"{type(e).__name__}: {e}", is_oom(e)
            stage = "reward" if isinstance(e, RewardError) else "generate"
        # retried outside the `except` block, with the future dropped: the failed call's traceback
        # frames (and the GPU tensors they hold) are gone, so empty_cache can free that memory
        del future
        if len(requests) == 1:
            return [RowResult.failed(failure, stage)]
        if oom:
            self.batch_size = max(1, len(requests) // 2)
            log.warning("out of memory at batch %d; batch size is now %d", len(requests), self.batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        mid = len(requests) // 2
        return self.run(requests[:mid]) + self.run(requests[mid:])
