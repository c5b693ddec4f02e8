"""Ray Serve endpoint: the batch job's ``Generator`` behind HTTP.

    client -> Serve HTTP proxy (127.0.0.1)  -- max_queued_requests: 503/429 + Retry-After
           -> ImageService replica (FastAPI ingress; max_ongoing_requests)
              POST /generate: body size limit (413) -> strict JSON (no NaN/Infinity, no
              duplicate keys) -> GenerateRequest (request.RequestFields, strict, no unknown fields)
              -> serve limits -> request.Resolver (the batch job's own defaults, checks, sampler
              resolution, keys and seeds) -> resolved requests (rows)
           -> @serve.batch generate_batch(jobs)  (max_batch_size, batch_wait_timeout_s)
           -> one worker thread: Generator(table) -> encoded images + the batch job's sidecars

A request is turned into exactly the rows a one-line manifest would give the batch job, and
the rows go through the same ``Generator``, so the endpoint returns the batch job's bytes for
the same prompt/seed/sampler/nfe/guidance/size/format. A request without a seed gets a random
one (0..2**31-1), returned in its metadata. Every model evaluation is a heartbeat: the
replica's ``check_health`` fails when a generation makes no progress for
``serve.stall_timeout_s``, and a request past ``serve.request_timeout_s`` is answered 408 and
its generation is abandoned at the next model evaluation, so the replica moves on.
"""
import asyncio
import base64
import dataclasses
import json
import logging
import math
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field
from ray import serve

from .config import IMAGE_FORMATS, ConfigError, JobConfig, ManifestConfig, merge_config, validate
from .models.base import RequestError
from .request import ROW_SCHEMA, RequestFields, Resolver, parse_fields, resolver_for

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "digits.yaml"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
RANDOM_SEED_RANGE = 2 ** 31


# ---------------------------------------------------------------- configuration
@dataclass
class ServeConfig:
    """The ``serve`` section: where the endpoint listens, its limits, batching and backpressure."""
    host: str = "127.0.0.1"            # HTTP proxy address: localhost only unless set otherwise
    port: int = 8000
    app_name: str = "raydiffusion"
    route_prefix: str = "/"
    # limits: every request costs accelerator seconds
    max_body_bytes: int = 16384
    max_prompt_chars: int = 256
    max_num_images: int = 8
    max_steps: int = 100               # nfe / steps per image
    max_side: int = 256                # height and width
    max_pixels: int = 65536            # height * width of one image
    max_request_pixels: int = 262144   # num_images * height * width
    max_guidance_scale: float = 30.0
    # dynamic batching (@serve.batch): requests per model call and how long to wait for them
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    # backpressure
    max_ongoing_requests: int = 32     # per replica (keep >= max_batch_size)
    max_queued_requests: int = 64      # waiting for a replica; beyond: rejected at once
    backpressure_status: int = 503     # 503 or 429
    retry_after_s: float = 1.0         # Retry-After on rejected requests
    request_timeout_s: float = 30.0    # per request, on the replica: 408 after it
    # health: a generation with no model evaluation for this long marks the replica unhealthy
    stall_timeout_s: float = 30.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    # replicas (autoscaling when max_replicas > min_replicas); resources come from ray.*_per_actor
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0


@dataclass
class ServeJobConfig(JobConfig):
    """The batch job's ``JobConfig`` plus the ``serve`` section (manifest/output are unused)."""
    serve: ServeConfig = field(default_factory=ServeConfig)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate_serve(s: ServeConfig) -> None:
    """Value checks for the ``serve`` section; messages name the key."""
    positive = ("port", "max_body_bytes", "max_prompt_chars", "max_num_images", "max_steps", "max_side",
                "max_pixels", "max_request_pixels", "max_batch_size", "max_ongoing_requests",
                "request_timeout_s", "stall_timeout_s", "health_check_period_s", "health_check_timeout_s",
                "max_replicas", "target_ongoing_requests")
    for name in positive:
        _check(getattr(s, name) > 0, f"serve.{name}", f"must be > 0, got {getattr(s, name)}")
    _check(s.port < 65536, "serve.port", f"must be in 1..65535, got {s.port}")
    _check(s.max_guidance_scale >= 0, "serve.max_guidance_scale", f"must be >= 0, got {s.max_guidance_scale}")
    _check(s.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", f"must be >= 0, got {s.batch_wait_timeout_s}")
    _check(s.max_queued_requests >= -1, "serve.max_queued_requests", "must be >= 0 (-1 = unbounded)")
    _check(s.backpressure_status in (503, 429), "serve.backpressure_status", f"must be 503 or 429, got {s.backpressure_status}")
    _check(s.retry_after_s >= 0, "serve.retry_after_s", f"must be >= 0, got {s.retry_after_s}")
    _check(0 <= s.min_replicas <= s.max_replicas, "serve.min_replicas",
           f"must be in 0..serve.max_replicas ({s.max_replicas}), got {s.min_replicas}")
    _check(s.route_prefix.startswith("/"), "serve.route_prefix", f"must start with '/', got {s.route_prefix!r}")


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeJobConfig:
    """Structured defaults <- YAML <- ``key=value``, validated like the batch job's config.

    The manifest is not needed to serve, so the job checks run with a placeholder one.
    """
    cfg = merge_config(ServeJobConfig, path, overrides)
    validate(dataclasses.replace(cfg, manifest=ManifestConfig(template="serve")))
    validate_serve(cfg.serve)
    return cfg


# ---------------------------------------------------------------- the request
class GenerateRequest(RequestFields):
    """``POST /generate`` body: the manifest row's fields (no ``key``: the request id is the key) and
    the response format. Omitted fields take the config's defaults, as in a manifest row."""
    model_config = ConfigDict(extra="forbid")

    format: Optional[Literal["png", "jpeg", "webp"]] = Field(None, description="default: output.image_format")


class InvalidRequest(Exception):
    """A request answered with a 4xx before it reaches the model; names the field."""

    def __init__(self, field_name: str, message: str, status: int = 422):
        super().__init__(f"field {field_name!r}: {message}")
        self.field, self.message, self.status = field_name, message, status

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": str(self), "field": self.field}, status_code=self.status)


class _NonFinite:
    """Marks a NaN/Infinity literal found by the JSON parser, so the error can name its field."""

    def __init__(self, text: str):
        self.text = text


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise InvalidRequest(k, "appears more than once in the JSON object")
        out[k] = v
    return out


def parse_json_strict(body: bytes) -> dict:
    """Parse a request body as JSON, refusing NaN/Infinity (Python's json accepts them) and duplicate keys."""
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_NonFinite, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise InvalidRequest("body", "must be UTF-8 encoded JSON") from None
    except json.JSONDecodeError as e:
        raise InvalidRequest("body", f"not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("body", f"expected a JSON object, got {type(obj).__name__}")
    for k, v in obj.items():
        if isinstance(v, _NonFinite):
            raise InvalidRequest(k, f"{v.text} is not allowed: numbers must be finite")
    return obj


def validate_request(obj: dict) -> GenerateRequest:
    """The schema check (strict types, no unknown fields); the first error names its field."""
    try:
        req = parse_fields(obj, strict=True, schema=GenerateRequest)
    except RequestError as e:
        raise InvalidRequest(e.field, e.message) from None
    if req.key is not None:
        raise InvalidRequest("key", "set by the server (the request id)")
    return req


def check_limits(req: GenerateRequest, cfg: ServeJobConfig) -> None:
    """The configured limits, on the values the request will actually run with."""
    s, d = cfg.serve, cfg.defaults

    def within(name: str, value: float, lo: float, hi: float) -> None:
        if not lo <= value <= hi:
            raise InvalidRequest(name, f"must be in {lo}..{hi}, got {value}")

    if not req.prompt.strip():
        raise InvalidRequest("prompt", f"must be 1..{s.max_prompt_chars} characters and not blank")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name) or ""
        if len(text) > s.max_prompt_chars:
            raise InvalidRequest(name, f"must be at most {s.max_prompt_chars} characters, got {len(text)}")
    within("num_images", req.num_images, 1, s.max_num_images)
    for name in ("steps", "nfe"):
        if getattr(req, name) is not None:
            within(name, getattr(req, name), 1, s.max_steps)
    if req.guidance_scale is not None:
        within("guidance_scale", req.guidance_scale, 0.0, s.max_guidance_scale)
    h, w = req.height or d.height, req.width or d.width
    within("height", h, 1, s.max_side)
    within("width", w, 1, s.max_side)
    if h * w > s.max_pixels:
        raise InvalidRequest("height", f"height * width must be at most {s.max_pixels} pixels, got {h}*{w}={h * w}")
    if req.num_images * h * w > s.max_request_pixels:
        raise InvalidRequest("num_images", f"num_images * height * width must be at most {s.max_request_pixels} "
                                           f"pixels, got {req.num_images}*{h}*{w}")


def request_rows(req: GenerateRequest, resolver: Resolver, request_id: str) -> list[dict]:
    """The rows a one-line manifest with these fields would give the batch job (key = request id)."""
    seed = req.seed if req.seed is not None else secrets.randbelow(RANDOM_SEED_RANGE)
    fields = RequestFields.model_validate(req.model_dump(exclude={"format"}) | {"seed": seed, "key": request_id})
    try:
        return [r.to_row() for r in resolver(fields)]
    except RequestError as e:
        raise InvalidRequest(e.field, e.message) from None


def negotiate(req: GenerateRequest, accept: str, default_format: str) -> tuple[str, bool]:
    """(image format, raw response?). ``Accept: image/png`` etc. asks for the bare image."""
    wanted = [m.split(";")[0].strip().lower() for m in accept.split(",")] if accept else []
    raw = next((f for f, mt in MEDIA_TYPES.items() if mt in wanted), None)
    if raw is None:
        return req.format or default_format, False
    if req.format is not None and req.format != raw:
        raise InvalidRequest("format", f"{req.format!r} disagrees with Accept: {MEDIA_TYPES[raw]}")
    if req.num_images != 1:
        raise InvalidRequest("num_images", "a raw image response (Accept: image/*) holds exactly 1 image; "
                                           "use Accept: application/json for more", status=406)
    return raw, True


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
    """The ``Generator`` and the one thread that runs it.

    Each output format is encoded by the same Generator with ``output.image_format`` set to
    that format for the duration of the call (calls are serialised on one thread).
    """

    def __init__(self, cfg: ServeJobConfig):
        from .worker import Generator

        self.cfg = cfg
        self.generator = Generator(cfg)
        self.progress = Progress(cfg.serve.stall_timeout_s)
        self.generator.model.model_fn = self.progress.wrap(self.generator.model.model_fn)
        self.configs = {fmt: dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, image_format=fmt))
                        for fmt in IMAGE_FORMATS}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")
        self.lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.generator.model.model_id

    def _generate(self, rows: list[dict], fmt: str) -> list[dict]:
        self.generator.cfg = self.configs[fmt]
        try:
            return self.generator(pa.Table.from_pylist(rows, schema=ROW_SCHEMA)).to_pylist()
        finally:
            self.generator.cfg = self.cfg

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
        from .samplers import SAMPLERS

        c = self.cfg
        limits = {k: getattr(c.serve, k) for k in (
            "max_body_bytes", "max_prompt_chars", "max_num_images", "max_steps", "max_side", "max_pixels",
            "max_request_pixels", "max_guidance_scale", "request_timeout_s")}
        return {"models": [{
            "id": self.engine.model_id, "kind": c.model.kind, "loaded": True, "device": str(self.engine.generator.model.device),
            "defaults": {"sampler": c.sampler.method, "nfe": c.sampler.nfe, "schedule": c.sampler.schedule,
                         "guidance_scale": c.defaults.guidance_scale, "height": c.defaults.height,
                         "width": c.defaults.width, "negative_prompt": c.defaults.negative_prompt,
                         "format": c.output.image_format, "quality": c.output.quality,
                         "seed": f"random in 0..{RANDOM_SEED_RANGE - 1} (returned in metadata)"},
            "samplers": sorted(SAMPLERS), "formats": list(IMAGE_FORMATS), "limits": limits,
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
        raise ConfigError(f"serve application args: unknown key(s) {sorted(unknown)}; allowed: config, overrides")
    return app_from_config(load_serve_config(_resolve(args.get("config")), list(args.get("overrides") or [])))
