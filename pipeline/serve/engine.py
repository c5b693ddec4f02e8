"""The generation side of Serve: one ``Generator``, one thread, heartbeats and deadlines.

Requests batched by ``@serve.batch`` run in one worker thread through the batch job's own
``Generator`` (each output format in one call). Every model evaluation is a heartbeat
(``Progress``): the replica's health check fails when a generation makes no progress for
``serve.stall_timeout_s``, and a batch whose requests have all passed their deadline is abandoned
at the next model evaluation, so the replica moves on.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from ..config import ServeJobConfig
from ..request import ROW_SCHEMA
from ..worker import Generator

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the generation thread
class Abandoned(Exception):
    """Raised inside the generation thread when every request of the batch has timed out."""


class Progress:
    """Liveness of the generation thread: notices a stalled generator, not only a dead one.

    ``wrap(model_fn)`` makes every model evaluation a heartbeat; it also abandons a batch
    whose requests have all passed their deadline, so a timed-out request frees the replica.
    """

    def __init__(self, stall_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.stall_timeout_s, self.clock = stall_timeout_s, clock
        self.busy_since: float | None = None
        self.last_beat = clock()
        self.deadline = math.inf
        self.evaluations = 0
        self.abandoned = False

    def start(self, deadline: float) -> None:
        self.deadline, self.last_beat, self.busy_since = deadline, self.clock(), self.clock()
        self.abandoned = False

    def stop(self) -> None:
        self.busy_since = None

    def beat(self) -> None:
        now = self.clock()
        self.last_beat = now
        self.evaluations += 1
        if now > self.deadline:
            self.abandoned = True
            raise Abandoned("every request of this batch timed out")

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


@dataclass
class Job:
    """One HTTP request on its way through a batch."""
    rows: list[dict]
    fmt: str
    deadline: float


@dataclass
class JobResult:
    rows: list[dict] | None = None           # the rows with model_id, image, json (and error)
    error: str | None = None
    timed_out: bool = False
    batch_requests: int = 0
    batch_images: int = 0


class GenerationEngine:
    """The ``Generator`` (every model call a ``Progress`` heartbeat) and the one thread that runs it."""

    def __init__(self, cfg: ServeJobConfig):
        self.cfg = cfg
        self.progress = Progress(cfg.serve.stall_timeout_s)
        self.generator = Generator(cfg, wrap_model_fn=self.progress.wrap)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")
        self.lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.generator.model.model_id

    def _generate(self, rows: list[dict], fmt: str) -> list[dict]:
        return self.generator.images(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), image_format=fmt).to_pylist()

    def run(self, jobs: list[Job]) -> list[JobResult]:
        """Generate a batch of jobs (in the worker thread), one Generator call per output format."""
        images = sum(len(j.rows) for j in jobs)
        results = [JobResult(batch_requests=len(jobs), batch_images=images) for _ in jobs]
        with self.lock:
            self.progress.start(max(j.deadline for j in jobs))
            try:
                for fmt in sorted({j.fmt for j in jobs}):
                    idx = [i for i, j in enumerate(jobs) if j.fmt == fmt]
                    out = self._generate([r for i in idx for r in jobs[i].rows], fmt)
                    for i in idx:
                        results[i].rows, out = out[:len(jobs[i].rows)], out[len(jobs[i].rows):]
            except Exception as e:               # a failed batch fails its requests, not the replica
                log.exception("generation failed")
                for r in results:
                    r.error = f"generation failed: {type(e).__name__}: {e}"
            finally:
                self.progress.stop()
            if self.progress.abandoned:          # the Generator turns Abandoned into error rows
                for r in results:
                    r.error, r.timed_out = "every request of this batch timed out", True
        return results
