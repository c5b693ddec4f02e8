"""The Serve application: FastAPI routes, dynamic batching, backpressure, health, the builder.

No ``from __future__ import annotations`` here: FastAPI must see the routes' real annotations
through Serve's ingress wrapper.
"""

import asyncio
import base64
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from ..config import IMAGE_FORMATS, ConfigError, ServeJobConfig, load_serve_config
from ..request import RequestFields, resolver_for
from .engine import GenerationEngine, Job, JobResult
from .schema import (
    MEDIA_TYPES,
    RANDOM_SEED_RANGE,
    GenerateRequest,
    InvalidRequest,
    check_limits,
    negotiate,
    parse_json_strict,
    request_rows,
    validate_request,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "digits.yaml"


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
        "408": {"description": "the request took longer than serve.request_timeout_s"},
        "413": {"description": "body over serve.max_body_bytes"},
        "422": {"description": "invalid field; the message names it and the allowed range"},
        "503": {"description": "overloaded (serve.max_queued_requests); retry after Retry-After seconds"},
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


@serve.deployment(name="ImageGenerator")
@serve.ingress(app)
class ImageService:
    """One replica: validation on the event loop, generation in one worker thread."""

    def __init__(self, cfg: ServeJobConfig):
        self.cfg = cfg
        self.engine = GenerationEngine(cfg)
        self.resolver = resolver_for(cfg)
        self.generate_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny generation, so a broken model fails the replica's start, not a request."""
        rows = [r.to_row() for r in self.resolver(RequestFields(prompt="", seed=0, nfe=2, sampler="euler"))]
        result = self.engine.run([Job(rows, self.cfg.output.image_format, math.inf)])[0]
        if result.error:
            raise RuntimeError(f"warm-up generation failed: {result.error}")

    @app.post("/generate", openapi_extra=GENERATE_DOC, summary="Generate images")
    async def generate(self, request: Request) -> Response:
        s = self.cfg.serve
        deadline = time.monotonic() + s.request_timeout_s
        request_id = "req-" + uuid.uuid4().hex[:16]
        try:
            req = validate_request(parse_json_strict(await read_body(request, s.max_body_bytes)))
            check_limits(req, self.cfg)
            fmt, raw = negotiate(req, request.headers.get("accept", ""), self.cfg.output.image_format)
            job = Job(request_rows(req, self.resolver, request_id), fmt, deadline)
        except InvalidRequest as e:
            return e.response()
        try:
            result = await asyncio.wait_for(self.generate_batch(job), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return JSONResponse({"detail": f"request timed out after {s.request_timeout_s} s "
                                           "(serve.request_timeout_s)", "request_id": request_id}, status_code=408)
        if result.error:
            status = 408 if result.timed_out else 500
            return JSONResponse({"detail": result.error, "request_id": request_id}, status_code=status)
        return image_response(result, fmt, raw, self.engine.model_id, request_id)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[Job]) -> list[JobResult]:
        """Dynamic batching: concurrent requests share model calls (the Generator groups shapes)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.engine.executor, self.engine.run, jobs)

    @app.get("/healthz", summary="Liveness: 200 unless the generator has stalled")
    async def healthz(self) -> JSONResponse:
        p = self.engine.progress
        stalled = p.stalled_for()
        body = {"status": "stalled" if stalled else "ok", "model_id": self.engine.model_id,
                "busy": p.busy_since is not None, "seconds_since_progress": round(p.clock() - p.last_beat, 3),
                "model_evaluations": p.evaluations}
        return JSONResponse(body, status_code=503 if stalled else 200)

    @app.get("/v1/models", summary="The loaded model, its defaults and the request limits")
    async def models(self) -> dict:
        from ..samplers import SAMPLERS
        from ..search import METHODS as SEARCH_METHODS

        c, plans = self.cfg, self.resolver.plans
        limits = {k: getattr(c.serve, k) for k in (
            "max_body_bytes", "max_prompt_chars", "max_num_images", "max_steps", "max_side", "max_pixels",
            "max_request_pixels", "max_guidance_scale", "max_particles", "max_request_model_calls", "request_timeout_s")}
        return {"models": [{
            "id": self.engine.model_id, "kind": c.model.kind, "loaded": True, "device": str(self.engine.generator.model.device),
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
        }]}

    def check_health(self) -> None:
        """Called by Serve every ``health_check_period_s``: fails when the generator stalls."""
        self.engine.progress.check()


# ---------------------------------------------------------------- building the application
def deployment_options(cfg: ServeJobConfig) -> dict:
    """Serve deployment options from the config: backpressure, health checks, replicas, resources."""
    s, r = cfg.serve, cfg.ray
    opts: dict[str, Any] = dict(
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        backpressure_config={"status_code": s.backpressure_status, "retry_after_s": s.retry_after_s},
        health_check_period_s=s.health_check_period_s, health_check_timeout_s=s.health_check_timeout_s,
        ray_actor_options={"num_cpus": r.num_cpus_per_actor, "num_gpus": r.num_gpus_per_actor})
    if s.max_replicas > s.min_replicas:
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                      "initial_replicas": max(1, s.min_replicas),
                                      "target_ongoing_requests": s.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.max_replicas
    return opts


def app_from_config(cfg: ServeJobConfig):
    """The Serve application for a loaded config."""
    return ImageService.options(**deployment_options(cfg)).bind(cfg)


def http_options(cfg: ServeJobConfig) -> dict:
    """Proxy options: the configured address; a backstop timeout well past the replica's own."""
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
