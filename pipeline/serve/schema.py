"""The HTTP side of a request: strict JSON, the body schema, the serve limits, content negotiation.

A body is parsed strictly (no NaN/Infinity, no duplicate keys), checked against ``GenerateRequest``
(the manifest row's fields, strict types, no unknown fields) and the ``serve`` limits, then turned
by the batch job's own ``request.Resolver`` into exactly the rows a one-line manifest would give.
Every refusal is an ``InvalidRequest`` naming the field (422, 413 or 406).
"""
from __future__ import annotations

import json
import secrets
from typing import Any, Literal, Optional

from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from ..config import ServeJobConfig
from ..errors import RequestError
from ..request import MAX_NFE, MAX_NUM_IMAGES, RequestFields, Resolver, parse_fields

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
RANDOM_SEED_RANGE = 2 ** 31


class GenerateRequest(RequestFields):
    """``POST /generate`` body: the manifest row's fields (no ``key``: the request id is the key) and
    the response format. Omitted fields take the config's defaults, as in a manifest row."""
    model_config = ConfigDict(extra="forbid")

    format: Optional[Literal["png", "jpeg", "webp"]] = Field(None, description="default: output.image_format")
    # no fixed upper bounds here: check_limits applies the deployment's (serve.max_num_images, serve.max_steps)
    num_images: int = Field(1, ge=1, description="images for this request (at most serve.max_num_images)")
    nfe: Optional[int] = Field(None, ge=1, description="model evaluations per image (at most serve.max_steps)")
    steps: Optional[int] = Field(None, ge=1, description="alias of nfe")


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
    within("num_images", req.num_images, 1, min(s.max_num_images, MAX_NUM_IMAGES))
    for name in ("steps", "nfe"):
        if getattr(req, name) is not None:
            within(name, getattr(req, name), 1, min(s.max_steps, MAX_NFE))
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
    check_search_limits(req, cfg)


def check_search_limits(req: GenerateRequest, cfg: ServeJobConfig) -> None:
    """A request's search: the deployment's reward only (a body never names code to import or a model
    folder to load), at most ``max_particles``, and at most ``max_request_model_calls`` model calls
    (num_images x nfe x particles; 413 beyond)."""
    s, job, sr = cfg.serve, cfg.search, req.search
    if sr is not None and ((sr.reward is not None and sr.reward != job.reward)
                           or (sr.reward_options is not None and sr.reward_options != job.reward_options)):
        raise InvalidRequest("search.reward", f"set by the deployment (search.reward={job.reward!r}); a request "
                                              "may leave it out or repeat it, not change it")
    if ((sr and sr.method) or job.method) == "none":
        return
    particles = search_particles(req, cfg)
    if not isinstance(particles, int) or not 1 <= particles <= s.max_particles:
        raise InvalidRequest("search.particles", f"must be in 1..{s.max_particles}, got {particles}")
    nfe = req.nfe or req.steps or cfg.sampler.nfe
    calls = req.num_images * nfe * particles
    if calls > s.max_request_model_calls:
        raise InvalidRequest("search.particles", f"num_images * nfe * particles must be at most "
                                                 f"{s.max_request_model_calls} model calls, got {req.num_images}*"
                                                 f"{nfe}*{particles}={calls}", status=413)


def search_particles(req: GenerateRequest, cfg: ServeJobConfig) -> Any:
    """Particles per image of the request's search (1 without one); not yet checked."""
    sr, job = req.search, cfg.search
    if ((sr and sr.method) or job.method) == "none":
        return 1
    return sr.particles if sr is not None and sr.particles is not None else job.particles


def request_work(req: GenerateRequest, cfg: ServeJobConfig) -> float:
    """What a checked request will cost, before it is resolved: num_images x nfe x particles x height x
    width, in megapixel model evaluations (the unit of ``engine.job_work``)."""
    d = cfg.defaults
    nfe = req.nfe or req.steps or cfg.sampler.nfe
    return req.num_images * nfe * search_particles(req, cfg) * (req.height or d.height) * (req.width or d.width) / 1e6


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
