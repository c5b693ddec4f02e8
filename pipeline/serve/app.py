"""The Serve application: a light router in front of the model replicas, admission, health, the builder.

    Router (FastAPI ingress, no model, no CPU reserved): owns every HTTP route; health and metadata
      are answered from state it keeps, so they never wait behind a generation; /generate is checked,
      admitted or refused at once (admission.py), then forwarded with its deadline
    ImageGenerator (DeploymentHandle; no HTTP): @serve.batch -> one worker thread (engine.py);
      ``status`` answers the router's polls; ``check_health`` is Serve's own health check

No ``from __future__ import annotations`` here: FastAPI must see the routes' real annotations
through Serve's ingress wrapper.
"""

import asyncio
import base64
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..config import IMAGE_FORMATS, ConfigError, ServeJobConfig, load_serve_config
from ..request import RequestFields, resolver_for
from .admission import Admission, Decision
from .engine import GenerationEngine, Job, JobResult, job_work
from .metrics import GeneratorMetrics, RouterMetrics
from .schema import (
    MEDIA_TYPES,
    RANDOM_SEED_RANGE,
    GenerateRequest,
    InvalidRequest,
    check_limits,
    negotiate,
    parse_json_strict,
    request_rows,
    request_work,
    validate_request,
)

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "digits.yaml"
STATUS_HEADROOM = 16          # generator slots beyond the router's admitted requests: status polls never queue
UNBOUNDED_SLOTS = 100_000     # a generator's slots when serve.max_queued_requests is -1
ROUTER_SLOTS = 100_000        # the router answers everything itself: at once, or after admission


# ---------------------------------------------------------------- the HTTP app
app = FastAPI(title="raydiffusion", version="0.1.0",
              description="Diffusion image generation with the batch pipeline's generator. "
                          "No authentication: bind to localhost and put an authenticating proxy in front.")

GENERATE_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}},
    "responses": {
        "200": {"description": "JSON with base64 images and their metadata, or one raw image for Accept: image/*",
                "content": {"application/json": {}, **{mt: {} for mt in MEDIA_TYPES.values()}}},
        "406": {"description": "Accept: image/* with num_images > 1"},
        "408": {"description": "could not finish within serve.request_timeout_s: dropped before it started, or "
                               "cancelled mid-generation; never a 200 after the timeout"},
        "413": {"description": "body over serve.max_body_bytes"},
        "422": {"description": "invalid field; the message names it and the allowed range"},
        "503": {"description": "overloaded: refused at once, before queueing (the queue is full, or the work "
                               "ahead would push it past its deadline); retry after Retry-After seconds"},
    },
}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest("body", f"must be at most {limit} bytes, got {declared}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequest("body", f"must be at most {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def image_response(result: JobResult, fmt: str, raw: bool, model_id: str, request_id: str) -> Response:
    """JSON with every image (base64) and its sidecar metadata, or the single raw image."""
    failed = [r for r in result.rows if r.get("error") or r.get("image") is None]
    if failed:
        return JSONResponse({"detail": "generation failed", "request_id": request_id,
                             "errors": [{"key": r["key"], "error": r.get("error")} for r in failed]},
                            status_code=500)
    metas = [json.loads(r["json"]) for r in result.rows]
    if raw:
        return Response(result.rows[0]["image"], media_type=MEDIA_TYPES[fmt], headers={
            "X-Image-Key": result.rows[0]["key"], "X-Seed": str(metas[0]["seed"]), "X-Model-Id": model_id,
            "X-Metadata": json.dumps(metas[0], sort_keys=True, ensure_ascii=True)})
    return JSONResponse({
        "request_id": request_id, "model_id": model_id,
        "batch": {"requests": result.batch_requests, "images": result.batch_images},
        "images": [{"format": fmt, "media_type": MEDIA_TYPES[fmt], "metadata": m,
                    "image_base64": base64.b64encode(r["image"]).decode("ascii")}
                   for r, m in zip(result.rows, metas)]})


def overloaded(decision: Decision, request_id: str, status: int) -> JSONResponse:
    """503 (or ``serve.backpressure_status``) with Retry-After: refused before joining any queue."""
    why = {"queue_full": "the queue is full (serve.max_ongoing_requests, serve.max_queued_requests, "
                         "serve.max_backlog_s)",
           "deadline": f"the work ahead would not let it finish in time (estimated {decision.estimated_s:.1f} s)",
           "backpressure": "the generator deployment's queue is full"}[decision.reason]
    return JSONResponse({"detail": f"overloaded: {why}; retry after {decision.retry_after_s} s",
                         "reason": decision.reason, "request_id": request_id},
                        status_code=status, headers={"Retry-After": str(decision.retry_after_s)})


def timed_out(detail: str, request_id: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "request_id": request_id}, status_code=408)


def liveness(status: dict, age: float | None) -> tuple[int, dict]:
    """/healthz from the generator's last status: 503 only when it reports a stall (a generation with no
    model evaluation for serve.stall_timeout_s); busy, starting or restarting is alive."""
    stalled = bool(status.get("stalled"))
    return 503 if stalled else 200, {
        "status": "stalled" if stalled else "ok", "model_id": status.get("model_id"), "busy": status.get("busy", False),
        "seconds_since_progress": status.get("seconds_since_progress"),
        "model_evaluations": status.get("model_evaluations"), "status_age_s": age}


def readiness(status: dict, age: float | None, stale_after: float, error: str, admission: dict) -> tuple[int, dict]:
    """/readyz: 503 while no generator has answered a status call lately or it has stalled; 200 otherwise,
    busy or not, with the queue depth (a busy replica is still ready: it sheds what it cannot take)."""
    reason = None
    if age is None or age > stale_after:
        reason = f"no status from the generator ({error})"
    elif status.get("stalled"):
        reason = "the generator has stalled"
    body = {"ready": reason is None, "reason": reason, "busy": bool(status.get("busy")) or admission["in_flight"] > 0,
            **admission, "status_age_s": age,
            "generator": {k: status.get(k) for k in ("replica", "queued", "running", "rate", "model_evaluations")}}
    return 200 if reason is None else 503, body


async def _awaited(response):
    return await response


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return "local-" + uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- the model replicas
@serve.deployment(name="ImageGenerator")
class ImageGenerator:
    """One model replica: requests batched by ``@serve.batch``, generated in one worker thread."""

    def __init__(self, cfg: ServeJobConfig):
        self.cfg = cfg
        self.engine = GenerationEngine(cfg)
        self.generate_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self.replica, self.metrics = _replica_id(), GeneratorMetrics()
        self.waiting: set[int] = set()             # requests waiting for a batch
        self.running = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny generation, so a broken model fails the replica's start, not a request."""
        rows = [r.to_row() for r in resolver_for(self.cfg)(RequestFields(prompt="", seed=0, nfe=2, sampler="euler"))]
        # in the generation thread, as every batch (its priority, and torch's threads it starts)
        result = self.engine.executor.submit(self.engine.run, [Job(rows, self.cfg.output.image_format)]).result()[0]
        if result.error:
            raise RuntimeError(f"warm-up generation failed: {result.error}")

    def _export(self) -> None:
        self.metrics.depth(len(self.waiting), self.running)

    async def generate(self, job: Job) -> JobResult:
        """One request: its deadline starts here (``job.budget_s``), it waits for a batch, it runs."""
        job.start_clock()
        self.waiting.add(id(job))
        self._export()
        try:
            return await self.generate_batch(job)
        finally:
            self.waiting.discard(id(job))
            self._export()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[Job]) -> list[JobResult]:
        """Dynamic batching: concurrent requests share model calls (the Generator groups shapes). A
        request that can no longer finish in time (its deadline, less its own work at this replica's
        rate) is dropped here, before it reaches the model."""
        now, rate = time.monotonic(), self.engine.rate.value
        late = [j.deadline - now < (j.work / rate if rate else 0.0) for j in jobs]
        run = [j for j, gone in zip(jobs, late) if not gone]
        self.waiting.difference_update(id(j) for j in jobs)
        self.running = len(run)
        self._export()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.engine.executor, self.engine.run, run) \
                if run else []
            done = iter(out)
        finally:
            self.running = 0
            self._export()
        results = [JobResult(error="dropped before it started: it could no longer finish within "
                                   "serve.request_timeout_s", timed_out=True) if gone else next(done) for gone in late]
        for r, gone in zip(results, late):
            r.replica, r.rate = self.replica, self.engine.rate.value
            if r.timed_out:
                self.metrics.cancelled.inc(tags={"stage": "queued" if gone else "running"})
        return results

    async def status(self) -> dict:
        """What the router's health, readiness and metrics need; answered on the event loop, beside the
        generation thread, never behind it."""
        p = self.engine.progress
        return {"replica": self.replica, "model_id": self.engine.model_id,
                "device": str(self.engine.generator.model.device),
                "busy": p.busy_since is not None, "stalled": p.stalled_for() is not None,
                "seconds_since_progress": round(p.clock() - p.last_beat, 3), "model_evaluations": p.evaluations,
                "queued": len(self.waiting), "running": self.running, "rate": self.engine.rate.value}

    def check_health(self) -> None:
        """Called by Serve every ``health_check_period_s``: fails when the generator stalls."""
        self.engine.progress.check()


# ---------------------------------------------------------------- the router
@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    """Every HTTP route. Validation and admission on its event loop; generation on the model replicas."""

    def __init__(self, cfg: ServeJobConfig, generator: DeploymentHandle):
        self.cfg, self.generator = cfg, generator
        self.resolver = resolver_for(cfg)
        self.admission, self.metrics = Admission(cfg.serve), RouterMetrics()
        self.status: dict = {}                      # the generator's last status ...
        self.status_at: float | None = None         # ... and when it came
        self.status_error = "no status yet"
        self._poller: asyncio.Task | None = None

    # ------------------------------------------------------------ /generate
    @app.post("/generate", openapi_extra=GENERATE_DOC, summary="Generate images")
    async def generate(self, request: Request) -> Response:
        s, t0 = self.cfg.serve, time.monotonic()
        deadline, request_id = t0 + s.request_timeout_s, "req-" + uuid.uuid4().hex[:16]
        self._ensure_poller()
        try:
            req = validate_request(parse_json_strict(await read_body(request, s.max_body_bytes)))
            check_limits(req, self.cfg)
            fmt, raw = negotiate(req, request.headers.get("accept", ""), self.cfg.output.image_format)
        except InvalidRequest as e:
            return e.response()
        # admission before resolution (the costlier check): a refusal costs the router next to nothing
        decision = self.admission.admit(request_id, request_work(req, self.cfg), deadline - time.monotonic())
        if not decision.admitted:
            self.metrics.refused(decision.reason, s.backpressure_status)
            return overloaded(decision, request_id, s.backpressure_status)
        response = None
        try:
            response = await self._resolve_and_run(req, fmt, raw, request_id, deadline)
            return response
        finally:
            latency, status = time.monotonic() - t0, response.status_code if response is not None else 499
            self.admission.done(request_id, latency if status == 200 else None)
            self.metrics.answered(status, latency)

    async def _resolve_and_run(self, req: GenerateRequest, fmt: str, raw: bool, request_id: str,
                               deadline: float) -> Response:
        try:
            rows = request_rows(req, self.resolver, request_id)
        except InvalidRequest as e:
            return e.response()
        return await self._run(Job(rows, fmt, work=job_work(rows)), raw, request_id, deadline)

    async def _run(self, job: Job, raw: bool, request_id: str, deadline: float) -> Response:
        """Forward an admitted request to a model replica; answer it, never with a 200 past its deadline."""
        s = self.cfg.serve
        too_late = f"request timed out after {s.request_timeout_s} s (serve.request_timeout_s)"
        job.budget_s = deadline - time.monotonic()
        response = self.generator.generate.remote(job)
        try:
            result = await asyncio.wait_for(_awaited(response), max(0.0, job.budget_s))
        except asyncio.TimeoutError:
            response.cancel()                       # frees its place in the replica's queue
            return timed_out(too_late, request_id)
        except asyncio.CancelledError:              # the client went away: so does its place
            response.cancel()
            raise
        except BackPressureError:                   # a handle-side limit set in a Serve config file
            return overloaded(Decision(False, "backpressure", math.ceil(s.retry_after_s)), request_id,
                              s.backpressure_status)
        self.admission.observe(result.replica, result.rate)
        if result.timed_out or time.monotonic() > deadline:
            return timed_out(result.error if result.timed_out else too_late, request_id)
        if result.error:
            return JSONResponse({"detail": result.error, "request_id": request_id}, status_code=500)
        return image_response(result, job.fmt, raw, result.rows[0].get("model_id", ""), request_id)

    # ------------------------------------------------------------ the generator's status
    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Keep the generator's status fresh and export the router's gauges, every ``status_period_s``."""
        while True:
            await self._refresh()
            self.metrics.export(self.admission.snapshot())
            await asyncio.sleep(self.cfg.serve.status_period_s)

    async def _refresh(self, timeout_s: float | None = None) -> None:
        response = self.generator.status.remote()
        try:
            st = await asyncio.wait_for(_awaited(response), timeout_s or max(2.0, 2 * self.cfg.serve.status_period_s))
        except Exception as e:  # noqa: BLE001 - a replica starting, restarting or wedged: not ready
            response.cancel()
            self.status_error = f"{type(e).__name__}: {e}"
            return
        self.status, self.status_at = st, time.monotonic()
        self.admission.observe(st["replica"], st["rate"])

    def _status_age(self) -> float | None:
        return None if self.status_at is None else round(time.monotonic() - self.status_at, 3)

    async def _fresh_status(self) -> float | None:
        """The status's age, after one bounded refresh if it is missing or stale."""
        age = self._status_age()
        if age is None or age > self._stale_after():
            await self._refresh(timeout_s=1.0)
        return self._status_age()

    def _stale_after(self) -> float:
        return max(3.0, 3 * self.cfg.serve.status_period_s)

    # ------------------------------------------------------------ health and metadata
    @app.get("/healthz", summary="Liveness: 200 unless the generator has stalled; never queued behind work")
    async def healthz(self) -> JSONResponse:
        self._ensure_poller()
        status, body = liveness(self.status, self._status_age())
        return JSONResponse(body, status_code=status)

    @app.get("/readyz", summary="Readiness: 200 while a generator answers and has not stalled; busy and queue depth")
    async def readyz(self) -> JSONResponse:
        self._ensure_poller()
        age = await self._fresh_status()
        status, body = readiness(self.status, age, self._stale_after(), self.status_error, self.admission.snapshot())
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models", summary="The loaded model, its defaults and the request limits")
    async def models(self) -> JSONResponse:
        from ..samplers import SAMPLERS
        from ..search import METHODS as SEARCH_METHODS

        self._ensure_poller()
        if self.status_at is None and await self._fresh_status() is None:
            return JSONResponse({"detail": f"the model is not loaded yet ({self.status_error})"}, status_code=503)
        c, plans = self.cfg, self.resolver.plans
        limits = {k: getattr(c.serve, k) for k in (
            "max_body_bytes", "max_prompt_chars", "max_num_images", "max_steps", "max_side", "max_pixels",
            "max_request_pixels", "max_guidance_scale", "max_particles", "max_request_model_calls", "request_timeout_s")}
        return JSONResponse({"models": [{
            "id": self.status["model_id"], "kind": c.model.kind, "loaded": True, "device": self.status["device"],
            "defaults": {"sampler": c.sampler.method, "nfe": c.sampler.nfe, "schedule": c.sampler.schedule,
                         "guidance_scale": c.defaults.guidance_scale, "height": c.defaults.height,
                         "width": c.defaults.width, "negative_prompt": c.defaults.negative_prompt,
                         "format": c.output.image_format, "quality": c.output.quality,
                         "seed": f"random in 0..{RANDOM_SEED_RANGE - 1} (returned in metadata)"},
            "samplers": sorted(SAMPLERS) + ["auto"] + (["plan"] if plans else []), "formats": list(IMAGE_FORMATS),
            "plan": plans and {"hash": plans.hash, "guidance_rule": plans.guidance_rule, "entries": [
                {"hash": p.hash, "nfe": p.nfe, "guidance_scale": p.guidance_scale, "resolution": p.resolution,
                 "base": p.base, "accepted": p.calibration.get("accepted")} for p in plans.entries]},
            "search": {"methods": list(SEARCH_METHODS), "default": c.search.method, "particles": c.search.particles,
                       "reward": c.search.reward, "options": c.search.options},
            "limits": limits,
            "batching": {"max_batch_size": c.serve.max_batch_size, "batch_wait_timeout_s": c.serve.batch_wait_timeout_s},
        }]})


# ---------------------------------------------------------------- building the application
def deployment_options(cfg: ServeJobConfig) -> dict:
    """The model deployment's options: health checks, replicas, resources. Its queue is bounded by the
    router's admission, so Serve's own queue limit is off and it keeps ``STATUS_HEADROOM`` spare slots."""
    s, r = cfg.serve, cfg.ray
    queued = UNBOUNDED_SLOTS if s.max_queued_requests < 0 else s.max_queued_requests
    opts: dict[str, Any] = dict(
        max_ongoing_requests=s.max_ongoing_requests + queued + STATUS_HEADROOM, max_queued_requests=-1,
        health_check_period_s=s.health_check_period_s, health_check_timeout_s=s.health_check_timeout_s,
        ray_actor_options={"num_cpus": r.num_cpus_per_actor, "num_gpus": r.num_gpus_per_actor})
    if s.max_replicas > s.min_replicas:
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                      "initial_replicas": max(1, s.min_replicas),
                                      "target_ongoing_requests": s.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.max_replicas
    return opts


def router_options(cfg: ServeJobConfig) -> dict:
    """The router's options: one replica with no CPU reserved (it waits on I/O) that takes every request
    (it answers each at once or admits it), so the proxy never queues a health check."""
    s = cfg.serve
    return dict(num_replicas=1, max_ongoing_requests=ROUTER_SLOTS, max_queued_requests=-1,
                health_check_period_s=s.health_check_period_s, health_check_timeout_s=s.health_check_timeout_s,
                ray_actor_options={"num_cpus": 0})


def app_from_config(cfg: ServeJobConfig):
    """The Serve application for a loaded config: the router in front of the model deployment."""
    generator = ImageGenerator.options(**deployment_options(cfg)).bind(cfg)
    return Router.options(**router_options(cfg)).bind(cfg, generator)


def http_options(cfg: ServeJobConfig) -> dict:
    """Proxy options: the configured address; a backstop timeout well past the router's own."""
    s = cfg.serve
    return {"host": s.host, "port": s.port, "request_timeout_s": 2 * s.request_timeout_s + 10}


def _resolve(path: str | None) -> Path:
    if path is None:
        return DEFAULT_CONFIG
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def build_app(args: dict):
    """Application builder for ``serve run infra/serve.yaml`` (``import_path: pipeline.serve:build_app``).

    ``args``: ``config`` (a YAML path; default ``jobs/configs/digits.yaml``, relative paths
    also tried from the repository root) and ``overrides`` (a list of ``key=value``).
    """
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError("serve application args", f"unknown key(s) {sorted(unknown)}; allowed: config, overrides")
    return app_from_config(load_serve_config(_resolve(args.get("config")), list(args.get("overrides") or [])))
