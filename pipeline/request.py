"""One image request, typed and resolved once: from a manifest row or an HTTP body to the sidecar.

``RequestFields`` is what a manifest row or an HTTP body may say (pydantic; manifests are parsed
leniently, so a CSV's ``"7"`` is a seed, and keep unknown columns as ``extra``; HTTP bodies are
parsed strictly and may not have unknown fields). ``Resolver`` turns it, on the driver, into one
``Request`` per image: every default filled in from the job config, ``auto`` and any solver plan
resolved into a concrete method, grid and options, and those checked against the method (a dry
run of the sampler). A ``Request`` is what the Generator runs, what goes into the Arrow rows
between the stages (``ROW_SCHEMA``), and, verbatim, what each image's ``.json`` sidecar and
Parquet row record: so the sidecar fed back as a manifest row reproduces the image.

Every validation failure is a ``RequestError`` naming the field; manifests prefix file and row,
HTTP answers 422 with the field.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ParameterError, RequestError, echo

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
MAX_NUM_IMAGES = 10_000
MAX_NFE = 1000
PLAN = "plan"                               # the sampler name of "the job's solver plan"
FINAL_POLICIES = ("zero", "sigma_min")

ROW_SCHEMA = pa.schema([
    ("row", pa.int64()),                # output row index: decides the shard and the default seed
    ("source_row", pa.int64()),         # the manifest row it came from (0-based)
    ("key", pa.string()),
    ("seed", pa.int64()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("guidance_scale", pa.float64()),
    ("nfe", pa.int32()),
    ("sampler", pa.string()),           # a registered method, or "plan"
    ("schedule", pa.string()),          # the grid (null with a plan)
    ("sampler_options", pa.string()),   # JSON object of the method's options
    ("final", pa.string()),             # final-step policy: zero | sigma_min
    ("plan", pa.string()),              # the solver plan's hash (sampler "plan")
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("search", pa.string()),            # JSON object of the resolved search (null: none; pipeline.search)
    ("extra", pa.string()),             # JSON object of the manifest's other columns
])


def _json_object(value: Any, name: str) -> Any:
    """Manifests (CSV, our own Parquet) keep objects as JSON text: parse it."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON object ({e.msg})") from None
    return value


class SearchFields(BaseModel):
    """A request's ``search`` object (``pipeline.search``); omitted keys take the job's ``search.*``."""
    model_config = ConfigDict(extra="forbid")

    method: Optional[str] = Field(None, description="none | best_of_n | fk | svdd")
    particles: Optional[int] = Field(None, description="candidates per image (model calls: nfe x particles)")
    reward: Optional[str] = Field(None, description="a registered reward (digits, clip) or 'module:function'")
    reward_options: Optional[dict[str, Any]] = Field(None, description="the reward's options (clip: path)")
    options: Optional[dict[str, Any]] = Field(None, description="potential, lambda, resample_every, "
                                                                   "resample_steps, ess_threshold")


class RequestFields(BaseModel):
    """What a manifest row or an HTTP body may set; omitted fields take the job's defaults."""
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(description='what to draw; built-in model: "7", "digit 7", "a handwritten seven"')
    negative_prompt: Optional[str] = Field(None, description="the unconditional branch of guidance")
    seed: Optional[int] = Field(None, ge=0, le=2 ** 63 - 1, description="first image's seed (image j gets seed + j)")
    key: Optional[str] = Field(None, description="output key: 1-200 of A-Z a-z 0-9 _ - (image j of n: key_j)")
    num_images: int = Field(1, ge=1, le=MAX_NUM_IMAGES, description="images for this request")
    nfe: Optional[int] = Field(None, ge=1, le=MAX_NFE, description="model evaluations per image")
    steps: Optional[int] = Field(None, ge=1, le=MAX_NFE, description="alias of nfe")
    sampler: Optional[str] = Field(None, description="a sampler name, 'auto' or 'plan' (GET /v1/models)")
    schedule: Optional[str] = Field(None, description="sigma grid (karras, exponential, ...); default: the method's")
    sampler_options: Optional[dict[str, Any]] = Field(None, description="the sampler's options, e.g. {\"eta\": 0.5}")
    final: Optional[Literal["zero", "sigma_min"]] = Field(None, description="final-step policy")
    plan: Optional[str] = Field(None, description="the solver plan's hash (must be the configured plan)")
    guidance_scale: Optional[float] = Field(None, allow_inf_nan=False, description="classifier-free guidance scale")
    height: Optional[int] = Field(None, ge=1, description="pixels")
    width: Optional[int] = Field(None, ge=1, description="pixels")
    search: Optional[SearchFields] = Field(None, description="inference-time search: method, particles, reward")

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and not KEY_RE.match(v):
            raise ValueError(f"{echo(v)} is not a valid key: use 1-200 letters, digits, '_' or '-' (no dots, "
                             "slashes or spaces: WebDataset splits file names at the first dot)")
        return v

    @field_validator("sampler_options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        return _json_object(v, "sampler_options")

    @field_validator("search", mode="before")
    @classmethod
    def _search(cls, v: Any) -> Any:
        return _json_object(v, "search")

    @model_validator(mode="after")
    def _steps(self) -> "RequestFields":
        if self.nfe is not None and self.steps is not None and self.nfe != self.steps:
            raise ValueError(f"fields 'nfe' and 'steps' disagree: {self.nfe} != {self.steps}")
        return self


def parse_fields(raw: dict, strict: bool = False, schema: type[RequestFields] = RequestFields) -> RequestFields:
    """``schema`` (``RequestFields`` or a subclass) from a raw dict; the first problem as a
    ``RequestError`` naming its field. ``strict``: no type coercion and no unknown fields (HTTP)."""
    try:
        fields = schema.model_validate(raw, strict=strict)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "nfe"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing (every request needs a prompt; use \"\" for unconditional)" if name == "prompt" else "missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif "input" in err and err["type"] != "value_error":
            msg += f", got {echo(err['input'])}"
        raise RequestError(name, msg) from None
    if strict and fields.model_extra:
        raise RequestError(sorted(fields.model_extra)[0], "unknown field")
    return fields


class Request(BaseModel):
    """One image, fully resolved: what the generator runs and what its sidecar records."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    seed: int
    prompt: str
    negative_prompt: str
    guidance_scale: float
    height: int
    width: int
    nfe: int
    sampler: str                         # a registered method, or "plan"
    schedule: Optional[str] = None       # the grid; None with a plan
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    final: str = "zero"
    plan: Optional[str] = None           # the solver plan's hash
    search: Optional[dict[str, Any]] = None   # the resolved search (pipeline.search.resolve_search)
    row: int = 0
    source_row: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)

    def to_row(self) -> dict:
        """An Arrow row (``ROW_SCHEMA``): objects as JSON text."""
        d = self.model_dump()
        d["sampler_options"] = json.dumps(d["sampler_options"], sort_keys=True)
        d["extra"] = json.dumps(d["extra"], sort_keys=True, ensure_ascii=False, default=str)
        d["search"] = None if d["search"] is None else json.dumps(d["search"], sort_keys=True)
        return d

    @classmethod
    def from_row(cls, row: dict) -> "Request":
        d = {k: row[k] for k in cls.model_fields if k in row}
        d["sampler_options"] = json.loads(row.get("sampler_options") or "{}")
        d["extra"] = json.loads(row.get("extra") or "{}")
        d["search"] = json.loads(row["search"]) if row.get("search") else None
        return cls(**d)

    def sampler_spec(self) -> tuple:
        """What decides how rows can share a model call (rows with equal specs form micro-batches)."""
        return (self.height, self.width, self.sampler, self.nfe, self.schedule,
                json.dumps(self.sampler_options, sort_keys=True), self.final, self.plan,
                json.dumps(self.search, sort_keys=True))

    @property
    def particles(self) -> int:
        return self.search["particles"] if self.search else 1

    @property
    def model_calls(self) -> int:
        """What this image costs: nfe x particles model calls."""
        return self.nfe * self.particles

    def metadata(self, model_id: str, result: dict | None = None) -> dict:
        """The ``.json`` sidecar: this request verbatim (extra columns merged in), the model and, with a
        search, its ``result`` (``search_reward``, ``search_rewards``, ``search_particle``)."""
        d = {**self.model_dump(exclude={"extra"}), "model_id": model_id, **(result or {})}
        return {**{k: v for k, v in self.extra.items() if k not in d}, **d}


def model_calls(table: pa.Table) -> int:
    """The model calls a table of resolved rows costs (``ROW_SCHEMA``): nfe x particles, summed."""
    searches = table["search"].to_pylist() if "search" in table.column_names else [None] * table.num_rows
    return sum(nfe * (json.loads(s)["particles"] if s else 1) for nfe, s in zip(table["nfe"].to_pylist(), searches))


def requests_table(requests: list[Request]) -> pa.Table:
    """Resolved requests as the Arrow table the Generator takes (``ROW_SCHEMA``)."""
    return pa.Table.from_pylist([r.to_row() for r in requests], schema=ROW_SCHEMA)


# ---------------------------------------------------------------- sampler checks
def check_sampler(method: str, nfe: int, schedule: Optional[str], options: dict, final: str,
                  option_field: str = "sampler_options") -> None:
    """Raise ``RequestError`` unless ``method`` runs with these options, grid and budget
    (``pipeline.samplers.check_method``: the option names, then a dry run)."""
    from .samplers import SAMPLERS, check_method

    if method not in SAMPLERS:
        raise RequestError("sampler", f"unknown sampler {echo(method)}; allowed: {sorted(SAMPLERS)}, 'auto' or 'plan'")
    try:
        check_method(method, nfe, schedule, options, final)
    except ParameterError as e:
        field = e.name if e.name in ("schedule", "nfe", "final") else option_field
        raise RequestError(field, e.message if e.name == "options" else f"{method!r}: {e}") from None


# ---------------------------------------------------------------- resolution
@dataclass
class Resolver:
    """Fills a request's defaults from the job config and resolves its sampler (driver side).

    ``check_request(prompt, negative_prompt, height, width)`` is the model's own check;
    ``schedule_kind`` (``ve``, ``vp_discrete``, ``flow``, ...) and ``fixed_latent`` (the latent size
    does not follow the image size) describe the model for ``auto`` and for a plan's reach; ``plan``
    is the job's solver plan, if any.
    """
    cfg: Any                                  # JobConfig (defaults, sampler, manifest.seed)
    check_request: Callable[..., None]
    schedule_kind: str = "ve"
    fixed_latent: bool = False
    plan: Any = None                          # SolverPlan | None

    def plan_fits(self, nfe: int, guidance: float, height: int, width: int) -> Optional[str]:
        """None if the job's plan serves this request, else why not."""
        p = self.plan
        if p is None:
            return "no solver plan is configured (sampler.plan)"
        if nfe != p.nfe:
            return f"solver plan {p.hash} was calibrated for nfe={p.nfe}, the request has nfe={nfe}"
        if p.guidance_scale is not None and guidance != p.guidance_scale:
            return (f"solver plan {p.hash} was calibrated for guidance_scale={p.guidance_scale:g}, "
                    f"the request has {guidance:g}")
        if p.resolution is not None and not self.fixed_latent and (height, width) != tuple(p.resolution):
            return (f"solver plan {p.hash} was calibrated at {p.resolution[0]}x{p.resolution[1]}, "
                    f"the request is {height}x{width}")
        return None

    def search_fields(self, f: RequestFields) -> dict:
        """The request's search settings: its own ``search`` keys over the job's ``search.*``."""
        job = getattr(self.cfg, "search", None)
        merged = {k: getattr(job, k) for k in SearchFields.model_fields} if job is not None else {}
        if f.search is not None:
            merged.update(f.search.model_dump(exclude_none=True))
        return merged

    def sampler_for(self, f: RequestFields, nfe: int, guidance: float, h: int, w: int,
                    steered: bool = False) -> dict:
        """The concrete sampler fields: sampler, schedule, sampler_options, final, plan. ``steered``
        (search fk/svdd): ``auto`` takes the stochastic variant of its rule and never the plan."""
        from .samplers import auto_method

        s = self.cfg.sampler
        method = f.sampler or s.method
        own = method == s.method and f.sampler_options is None
        options = dict(s.options if own else (f.sampler_options or {}))
        schedule, final = f.schedule if f.schedule is not None else s.schedule, f.final or "zero"
        if f.plan is not None:
            if self.plan is None or f.plan != self.plan.hash:
                raise RequestError("plan", f"solver plan {echo(f.plan)} is not this job's plan "
                                           f"({self.plan.hash if self.plan else 'none'}; sampler.plan)")
            method = PLAN if method == "auto" else method
        if method == "auto" and self.plan_fits(nfe, guidance, h, w) is None and f.schedule is None \
                and not options and final == "zero" and not steered:
            method = PLAN
        if method == PLAN:
            why = self.plan_fits(nfe, guidance, h, w)
            if why is not None:
                raise RequestError("sampler", why)
            if f.schedule is not None or options or final != "zero":
                raise RequestError("sampler", "a solver plan fixes its own grid and options: leave schedule, "
                                              "sampler_options and final unset")
            return {"sampler": PLAN, "schedule": None, "sampler_options": {}, "final": "zero", "plan": self.plan.hash}
        if method == "auto":
            method, grid, auto_options = auto_method(nfe, kind=self.schedule_kind, guidance=guidance)
            if steered:         # particles need fresh noise per step: ancestral Euler (pipeline.search.STEERED_AUTO)
                from .search import STEERED_AUTO
                method, grid, auto_options = STEERED_AUTO, "karras", {}
            schedule, options = schedule if schedule is not None else grid, {**auto_options, **options}
        if f.plan is not None:
            raise RequestError("plan", f"a plan hash needs sampler 'plan' or 'auto', got {method!r}")
        from .samplers import SAMPLERS
        if method in SAMPLERS and schedule is None:
            schedule = SAMPLERS[method].schedule          # record the grid that runs, not "the default"
        check_sampler(method, nfe, schedule, options, final,
                      option_field="sampler.options" if own and s.options else "sampler_options")
        return {"sampler": method, "schedule": schedule, "sampler_options": options, "final": final, "plan": None}

    def __call__(self, raw: dict | RequestFields, source_row: int = 0, first_row: int = 0,
                 strict: bool = False) -> list[Request]:
        """The requests (one per image) of a manifest row or HTTP body; ``RequestError`` names the field."""
        f = raw if isinstance(raw, RequestFields) else parse_fields(raw, strict)
        d = self.cfg.defaults
        neg = f.negative_prompt if f.negative_prompt is not None else d.negative_prompt
        h, w = f.height or d.height, f.width or d.width
        guidance = f.guidance_scale if f.guidance_scale is not None else d.guidance_scale
        nfe = f.nfe or f.steps or self.cfg.sampler.nfe
        self.check_request(f.prompt, neg, h, w)
        from .search import STEERED, resolve_search
        search = self.search_fields(f)
        spec = self.sampler_for(f, nfe, guidance, h, w, steered=search.get("method") in STEERED)
        spec["search"] = resolve_search(search, spec["sampler"], spec["sampler_options"],
                                        "sampler" if f.sampler else "sampler.method")
        extra = {k: v for k, v in (f.model_extra or {}).items() if k != "extra"}
        extra.update(_unpack_extra((f.model_extra or {}).get("extra")))
        out = []
        for j in range(f.num_images):
            row = first_row + j
            out.append(Request(
                key=(f.key if f.num_images == 1 else f"{f.key}_{j}") if f.key else f"{row:09d}",
                # an explicit seed counts up across a row's images; otherwise job seed + row index
                seed=(f.seed + j if f.seed is not None else self.cfg.manifest.seed + row) % 2 ** 63,
                prompt=f.prompt, negative_prompt=neg, guidance_scale=guidance, height=h, width=w, nfe=nfe,
                row=row, source_row=source_row, extra=extra, **spec))
        return out


def resolver_for(cfg: Any) -> Resolver:
    """The driver's resolver for a job config: its model's checks and kind, its solver plan (no weights)."""
    from .config import load_plan
    from .models import model_class

    cls = model_class(cfg.model)
    return Resolver(cfg, cls.check_request, cls.schedule_kind, cls.fixed_latent, load_plan(cfg))


def _unpack_extra(value: Any) -> dict:
    """Our outputs keep extra columns as a JSON object in ``extra``; unpack it when fed back."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {"extra": value}
    if value is None:
        return {}
    return value if isinstance(value, dict) else {"extra": value}
