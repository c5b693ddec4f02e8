"""The generation side of Serve: one ``Generator``, one thread, heartbeats, deadlines, service rate.

Requests batched by ``@serve.batch`` run in one worker thread through the batch job's own
``Generator`` (each output format in one call). Every model evaluation is a heartbeat
(``Progress``): the replica's health check fails when a generation makes no progress for
``serve.stall_timeout_s``. A batch is cancelled at a model evaluation once it cannot finish
before the latest deadline of its requests (the evaluations left, at the pace of the ones done),
so the replica moves on. Each finished batch updates the replica's service rate (``ServiceRate``:
work per second), which the router's admission control reads.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from ..config import ServeJobConfig
from ..request import ROW_SCHEMA, Request
from ..batching import micro_batches
from ..worker import Generator

log = logging.getLogger(__name__)
RATE_WEIGHT = 0.3            # weight of the newest batch in the service rate
GENERATION_NICE = 5          # the generation thread's niceness above the replica's (Ray starts workers at 15)
PROJECT_AFTER = 0.25         # a batch's finish is projected once this fraction of its evaluations is done ...
MIN_CALLS_TO_PROJECT = 3     # ... and at least this many (early calls are noisy on a busy machine)
BACK_TO_BACK_S = 0.5         # a batch starting this soon after the last one: the gap counts against the rate


# ---------------------------------------------------------------- requests and what they cost
def job_work(rows: list[dict]) -> float:
    """What a request costs, in megapixel model evaluations: nfe x particles x height x width, summed
    over its images (the unit of ``ServiceRate``)."""
    reqs = [Request.from_row(r) for r in rows]
    return sum(r.model_calls * r.height * r.width for r in reqs) / 1e6


def expected_calls(rows: list[dict], batch_size: int) -> int:
    """Model evaluations the ``Generator`` makes for these rows (one call): ``nfe`` per micro-batch, as
    ``micro_batches`` cuts them (a failed micro-batch bisected runs more; a sampler may stop a call
    short of nfe)."""
    reqs = [Request.from_row(r) for r in rows]
    return sum(reqs[c[0]].sampler.nfe for c in micro_batches(reqs, batch_size))


@dataclass
class Job:
    """One HTTP request on its way through a batch."""
    rows: list[dict]
    fmt: str
    budget_s: float = math.inf       # seconds it had left when the router sent it
    deadline: float = math.inf       # set where it runs, on that process's monotonic clock
    work: float = 0.0                # job_work(rows), computed once by the router

    def start_clock(self) -> None:
        self.deadline = time.monotonic() + self.budget_s


@dataclass
class JobResult:
    rows: list[dict] | None = None           # the rows with model_id, image, json (and error)
    error: str | None = None
    timed_out: bool = False                  # dropped before it started, or cancelled: its deadline
    batch_requests: int = 0
    batch_images: int = 0
    replica: str = ""                        # which replica answered, and its service rate then
    rate: float | None = None
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the generation thread
def yield_cpu() -> None:
    """Lower the calling thread's CPU priority by ``GENERATION_NICE`` (Linux: niceness is per thread,
    and threads it starts, such as torch's intra-op pool, inherit it): on a CPU-bound node, the
    replica's event loop (status calls) and the router and proxy on the same cores run first.
    Harmless where the model runs on a GPU."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + GENERATION_NICE))
    except (AttributeError, OSError):                 # not Linux: run at normal priority
        pass


class Abandoned(Exception):
    """Raised inside the generation thread when the batch cannot finish before its deadline."""


class Progress:
    """Liveness of the generation thread: notices a stalled generator, not only a dead one.

    ``wrap(model_fn)`` makes every model evaluation a heartbeat; it also abandons a batch that can
    no longer finish before its deadline (past it, or projected past it from the evaluations left at
    the pace of those done), so a request that cannot make it frees the replica.
    """

    def __init__(self, stall_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.stall_timeout_s, self.clock = stall_timeout_s, clock
        self.busy_since: float | None = None
        self.last_beat = clock()
        self.deadline = math.inf
        self.evaluations = 0
        self.abandoned = False
        self.expected = self.done = 0
        self.first_beat: float | None = None

    def start(self, deadline: float, expected_calls: int = 0) -> None:
        self.deadline, self.last_beat, self.busy_since = deadline, self.clock(), self.clock()
        self.abandoned, self.expected, self.done, self.first_beat = False, expected_calls, 0, None

    def stop(self) -> None:
        self.busy_since = None

    def projected_finish(self, now: float) -> float:
        """When the batch will have made its expected evaluations, at the pace of those made so far."""
        if not self.expected or self.done < max(MIN_CALLS_TO_PROJECT, PROJECT_AFTER * self.expected):
            return now
        pace = (now - self.first_beat) / (self.done - 1)
        return now + pace * max(0, self.expected - self.done + 1)

    def beat(self) -> None:
        now = self.clock()
        self.last_beat = now
        self.evaluations += 1
        self.done += 1
        self.first_beat = now if self.first_beat is None else self.first_beat
        if self.abandoned or now > self.deadline or self.projected_finish(now) > self.deadline:
            self.abandoned = True
            raise Abandoned("the batch cannot finish before its requests' deadline")

    def stalled_for(self) -> float | None:
        """Seconds since the last model evaluation of a running generation, if over the limit."""
        if self.busy_since is None:
            return None
        idle = self.clock() - self.last_beat
        return idle if idle > self.stall_timeout_s else None

    def check(self) -> None:
        stalled = self.stalled_for()
        if stalled is not None:
            raise RuntimeError(f"generator stalled: no model evaluation for {stalled:.1f} s "
                               f"(serve.stall_timeout_s={self.stall_timeout_s})")

    def wrap(self, fn: Callable) -> Callable:
        def model_fn(*args, **kwargs):
            self.beat()
            return fn(*args, **kwargs)
        return model_fn


class ServiceRate:
    """This replica's measured service rate: work (``job_work``) per second of its finished batches,
    exponentially weighted (``RATE_WEIGHT`` for the newest); None until a batch has finished. Under
    load (batches back to back) a batch's seconds run from the end of the one before, so the time
    between batches (collecting the next, the event loop, result hand-off) counts too."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.value: float | None = None
        self.clock, self.last_end = clock, -math.inf

    def update(self, work: float, started: float) -> None:
        end = self.clock()
        since = self.last_end if started - self.last_end < BACK_TO_BACK_S else started
        self.last_end = end
        if work <= 0 or end <= since:
            return
        rate = work / (end - since)
        self.value = rate if self.value is None else RATE_WEIGHT * rate + (1 - RATE_WEIGHT) * self.value


class GenerationEngine:
    """The ``Generator`` (every model call a ``Progress`` heartbeat) and the one thread that runs it."""

    def __init__(self, cfg: ServeJobConfig):
        self.cfg = cfg
        self.progress = Progress(cfg.serve.stall_timeout_s)
        self.generator = Generator(cfg, wrap_model_fn=self.progress.wrap)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator", initializer=yield_cpu)
        self.lock = threading.Lock()
        self.rate = ServiceRate()

    @property
    def model_id(self) -> str:
        return self.generator.model.model_id

    def _generate(self, rows: list[dict], fmt: str) -> list[dict]:
        return self.generator.images(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), image_format=fmt).to_pylist()

    def run(self, jobs: list[Job]) -> list[JobResult]:
        """Generate a batch of jobs (in the worker thread), one Generator call per output format."""
        images = sum(len(j.rows) for j in jobs)
        results = [JobResult(batch_requests=len(jobs), batch_images=images) for _ in jobs]
        formats = sorted({j.fmt for j in jobs})
        by_fmt = {f: [i for i, j in enumerate(jobs) if j.fmt == f] for f in formats}
        calls = sum(expected_calls([r for i in idx for r in jobs[i].rows], self.generator.cfg.ray.batch_size)
                    for idx in by_fmt.values())
        with self.lock:
            t0 = time.monotonic()
            self.progress.start(max(j.deadline for j in jobs), calls)
            try:
                for fmt, idx in by_fmt.items():
                    out = self._generate([r for i in idx for r in jobs[i].rows], fmt)
                    for i in idx:
                        results[i].rows, out = out[:len(jobs[i].rows)], out[len(jobs[i].rows):]
            except Exception as e:               # a failed batch fails its requests, not the replica
                log.exception("generation failed")
                for r in results:
                    r.error = f"generation failed: {type(e).__name__}: {e}"
            finally:
                self.progress.stop()
            seconds = time.monotonic() - t0
            if self.progress.abandoned:          # the Generator turns Abandoned into error rows
                for r in results:
                    r.error = "cancelled mid-generation: it could not finish within serve.request_timeout_s"
                    r.timed_out = True
            elif not any(r.error for r in results):
                self.rate.update(sum(j.work for j in jobs), t0)
        for r in results:
            r.stats = {"seconds": round(seconds, 4), "expected_calls": calls}
        return results
