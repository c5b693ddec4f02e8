"""Admission control for the router: say no early, before a request joins any queue.

The router keeps, for each request it has admitted and not yet answered, the work it costs
(``engine.job_work``: megapixel model evaluations); the generator replicas report their measured
service rate (work per second of their recent batches). A new request is answered 503 with
``Retry-After`` at once when

- ``queue_full``: the requests in flight already fill every replica's slots and the queue
  (``serve.max_ongoing_requests`` x replicas + ``serve.max_queued_requests``; Serve's own
  ``max_queued_requests`` semantics, applied here so that health routes never queue), or the
  backlog would exceed ``serve.max_backlog_s`` (the same bound in seconds, whatever the hardware:
  it caps the latency under overload and the time to recover after it), or
- ``deadline``: the work ahead of it, at the measured rate, would push its estimated finish past
  ``serve.admission_headroom`` x the time it has left.

A request with nothing ahead of it is always admitted: if it cannot finish in time on its own,
the model replica drops it or ``engine.Progress`` cancels it mid-generation (408).

The router's event loop is single-threaded: no locks.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import ServeConfig

REPLICA_TTL_S = 60.0         # a replica not heard from for this long no longer counts
LATENCY_WINDOW = 2000        # answered requests the latency percentiles are taken over
QUANTILES = (50, 95, 99)


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: str = ""             # "queue_full" or "deadline" when refused
    retry_after_s: int = 0       # whole seconds, for the Retry-After header
    estimated_s: float = 0.0     # the estimated time to finish at the measured rate (0: unknown)


class Admission:
    """The router's view of the work in flight and of the generators' service rate."""

    def __init__(self, s: ServeConfig, clock: Callable[[], float] = time.monotonic):
        self.s, self.clock = s, clock
        self.in_flight: dict[str, float] = {}                    # request id -> work
        self.rates: dict[str, tuple[float, float]] = {}          # replica -> (work per second, heard at)
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.shed: Counter[str] = Counter()

    # ------------------------------------------------------------ what the replicas report
    def observe(self, replica: str, rate: float | None) -> None:
        """A replica was heard from (a status poll or a result), with its service rate if measured."""
        if replica:
            old = self.rates.get(replica, (0.0, 0.0))[0]
            self.rates[replica] = (rate if rate else old, self.clock())

    def _fresh(self) -> list[float]:
        now = self.clock()
        self.rates = {k: v for k, v in self.rates.items() if now - v[1] <= REPLICA_TTL_S}
        return [rate for rate, _ in self.rates.values()]

    def replicas(self) -> int:
        return max(1, len(self._fresh()))

    def rate(self) -> float | None:
        """Work per second of all the replicas heard from lately; None until one has measured it."""
        total = sum(self._fresh())
        return total or None

    def slots(self) -> int:
        """Requests that may be in flight: replicas x ``max_ongoing_requests`` + ``max_queued_requests``
        (no limit when ``max_queued_requests`` is -1)."""
        s = self.s
        if s.max_queued_requests < 0:
            return math.inf
        return s.max_ongoing_requests * self.replicas() + s.max_queued_requests

    def queue_depth(self) -> int:
        """Admitted requests beyond what the replicas take at once: the ones waiting."""
        return max(0, len(self.in_flight) - self.s.max_ongoing_requests * self.replicas())

    # ------------------------------------------------------------ deciding
    def admit(self, request_id: str, work: float, budget_s: float) -> Decision:
        """Admit the request (it then counts as in flight until ``done``) or say why not."""
        ahead, rate = sum(self.in_flight.values()), self.rate()
        estimated = (ahead + work) / rate if rate else 0.0
        if len(self.in_flight) >= self.slots():
            return self._refuse("queue_full", self.s.retry_after_s, estimated)
        allowed = self.s.admission_headroom * budget_s
        if rate and ahead > 0 and estimated > allowed:
            return self._refuse("deadline", estimated - allowed, estimated)
        if rate and ahead > 0 and estimated > self.s.max_backlog_s:
            return self._refuse("queue_full", estimated - self.s.max_backlog_s, estimated)
        self.in_flight[request_id] = work
        return Decision(True, estimated_s=estimated)

    def _refuse(self, reason: str, wait_s: float, estimated: float) -> Decision:
        self.shed[reason] += 1
        return Decision(False, reason, max(1, math.ceil(max(self.s.retry_after_s, wait_s))), estimated)

    def done(self, request_id: str, latency_s: float | None = None) -> None:
        """The request was answered (``latency_s`` of a 200 feeds the percentiles)."""
        self.in_flight.pop(request_id, None)
        if latency_s is not None:
            self.latencies.append(latency_s)

    # ------------------------------------------------------------ reporting
    def percentiles(self) -> dict[str, float]:
        if not self.latencies:
            return {}
        values = np.percentile(np.fromiter(self.latencies, float), QUANTILES)
        return {f"p{q}": round(float(v), 4) for q, v in zip(QUANTILES, values)}

    def snapshot(self) -> dict:
        rate = self.rate()
        return {"in_flight": len(self.in_flight), "queue_depth": self.queue_depth(), "replicas": self.replicas(),
                "service_rate": rate and round(rate, 4), "shed": dict(self.shed), "latency_s": self.percentiles()}
