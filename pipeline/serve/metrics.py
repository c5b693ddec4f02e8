"""Serve metrics (``ray.serve.metrics``: Ray's metrics API, exported by each node's Prometheus
endpoint with the deployment, replica and application as tags; Ray prefixes the names with ``ray_``).

Router: ``raydiffusion_requests`` (by status), ``raydiffusion_shed`` (by reason), the
``raydiffusion_latency_s`` histogram (by status) and its ``raydiffusion_latency_quantile_s``
(p50/p95/p99 of the recent 200s), ``raydiffusion_in_flight`` and ``raydiffusion_queue_depth``.
Generator: ``raydiffusion_generator_queued`` (requests waiting for a batch), ``..._running`` and
``raydiffusion_generator_cancelled`` (by stage: dropped while queued, or cancelled mid-generation).
"""
from __future__ import annotations

LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60]


class RouterMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("raydiffusion_requests", description="answered /generate requests",
                                        tag_keys=("status",))
        self.shed = metrics.Counter("raydiffusion_shed", description="requests answered 503 before queueing",
                                    tag_keys=("reason",))
        self.latency = metrics.Histogram("raydiffusion_latency_s", description="/generate latency, seconds",
                                         boundaries=LATENCY_BOUNDARIES, tag_keys=("status",))
        self.quantile = metrics.Gauge("raydiffusion_latency_quantile_s", tag_keys=("quantile",),
                                      description="latency percentiles of the recent 200 answers, seconds")
        self.in_flight = metrics.Gauge("raydiffusion_in_flight", description="admitted, not yet answered")
        self.queue_depth = metrics.Gauge("raydiffusion_queue_depth",
                                         description="admitted requests beyond the replicas' ongoing slots")

    def answered(self, status: int, latency_s: float) -> None:
        self.requests.inc(tags={"status": str(status)})
        self.latency.observe(latency_s, tags={"status": str(status)})

    def refused(self, reason: str, status: int) -> None:
        self.shed.inc(tags={"reason": reason})
        self.requests.inc(tags={"status": str(status)})

    def export(self, snapshot: dict) -> None:
        self.in_flight.set(snapshot["in_flight"])
        self.queue_depth.set(snapshot["queue_depth"])
        for q, v in snapshot["latency_s"].items():
            self.quantile.set(v, tags={"quantile": q})


class GeneratorMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.queued = metrics.Gauge("raydiffusion_generator_queued", description="requests waiting for a batch")
        self.running = metrics.Gauge("raydiffusion_generator_running", description="requests in the running batch")
        self.cancelled = metrics.Counter("raydiffusion_generator_cancelled", tag_keys=("stage",),
                                         description="requests dropped before they started or cancelled mid-run")

    def depth(self, queued: int, running: int) -> None:
        self.queued.set(queued)
        self.running.set(running)
