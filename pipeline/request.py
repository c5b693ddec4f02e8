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
from dataclasses import dataclass, replace
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

from .config import ConfigError, JobConfig, load_plan
from .errors import ParameterError, RequestError, echo
from .models import model_class
from .samplers import PLAN, SAMPLERS, PlanFamily, SamplerSpec, SolverPlan, auto_method
from .search import SEARCH_METHODS, STEERED_AUTO, SearchSpec, resolve_search

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
MAX_NUM_IMAGES = 10_000
MAX_NFE = 1000

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


class SearchResult(BaseModel):
    """What a search chose for one image: the kept particle, its reward and every particle's."""
    model_config = ConfigDict(frozen=True)

    search_particle: int
    search_reward: float
    search_rewards: list[float]


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
    sampler: SamplerSpec
    search: Optional[SearchSpec] = None
    row: int = 0
    source_row: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)

    def fields(self) -> dict:
        """The flat fields a manifest row, an Arrow row and a sidecar carry (objects as objects)."""
        return {"key": self.key, "seed": self.seed, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "guidance_scale": self.guidance_scale, "height": self.height, "width": self.width,
                **self.sampler.fields(), "search": None if self.search is None else self.search.model_dump(),
                "row": self.row, "source_row": self.source_row}

    def to_row(self) -> dict:
        """An Arrow row (``ROW_SCHEMA``): objects as JSON text."""
        d = self.fields()
        d["sampler_options"] = json.dumps(d["sampler_options"], sort_keys=True)
        d["search"] = None if d["search"] is None else json.dumps(d["search"], sort_keys=True)
        d["extra"] = json.dumps(self.extra, sort_keys=True, ensure_ascii=False, default=str)
        return d

    @classmethod
    def from_row(cls, row: dict) -> "Request":
        """The request of an Arrow row (``to_row``)."""
        spec = SamplerSpec.from_fields({**row, "sampler_options": json.loads(row.get("sampler_options") or "{}")})
        return cls(key=row["key"], seed=row["seed"], prompt=row["prompt"], negative_prompt=row["negative_prompt"],
                   guidance_scale=row["guidance_scale"], height=row["height"], width=row["width"], sampler=spec,
                   search=SearchSpec(**json.loads(row["search"])) if row.get("search") else None,
                   row=row.get("row", 0), source_row=row.get("source_row", 0),
                   extra=json.loads(row.get("extra") or "{}"))

    def batch_key(self) -> tuple:
        """Rows with equal keys can share model calls (micro-batches): size, sampler and search."""
        return self.height, self.width, self.sampler.key(), None if self.search is None else self.search.key()

    @property
    def particles(self) -> int:
        return self.search.particles if self.search else 1

    @property
    def model_calls(self) -> int:
        """What this image costs: nfe x particles model calls."""
        return self.sampler.nfe * self.particles

    def metadata(self, model_id: str, result: SearchResult | None = None) -> dict:
        """The ``.json`` sidecar: this request's fields (extra columns merged in), the model and, with a
        search, its result."""
        d = {**self.fields(), "model_id": model_id, **(result.model_dump() if result else {})}
        return {**{k: v for k, v in self.extra.items() if k not in d}, **d}


def model_calls(table: pa.Table) -> int:
    """The model calls a table of resolved rows costs (``ROW_SCHEMA``): nfe x particles, summed."""
    searches = table["search"].to_pylist() if "search" in table.column_names else [None] * table.num_rows
    return sum(nfe * (json.loads(s)["particles"] if s else 1) for nfe, s in zip(table["nfe"].to_pylist(), searches))


def requests_table(requests: list[Request]) -> pa.Table:
    """Resolved requests as the Arrow table the Generator takes (``ROW_SCHEMA``)."""
    return pa.Table.from_pylist([r.to_row() for r in requests], schema=ROW_SCHEMA)


# ---------------------------------------------------------------- resolution
# where a sampler check failed (ParameterError.name) -> the request field that names it
PARAMETER_FIELDS = {"schedule": "schedule", "nfe": "nfe", "final": "final", "schedule_options": "sampler_options",
                    "options": "sampler_options"}


@dataclass
class Resolver:
    """Fills a request's defaults from the job config and resolves its sampler and search (driver side).

    ``check_request(prompt, negative_prompt, height, width)`` is the model's own check;
    ``schedule_kind`` (``ve``, ``vp_discrete``, ``flow``, ...) and ``fixed_latent`` (the latent size
    does not follow the image size) describe the model for ``auto`` and for a plan's reach; ``plans``
    is the job's solver plan family, if any. This is the one place that decides what ``auto`` and
    ``plan`` mean for a request: ``auto`` runs the family's entry that fits the request, else
    ``auto_method``'s rule.
    """
    cfg: Any                                  # JobConfig (defaults, sampler, search, manifest.seed)
    check_request: Callable[..., None]
    schedule_kind: str = "ve"
    fixed_latent: bool = False
    plans: Optional[PlanFamily] = None

    def plan_for(self, nfe: int, guidance: float, height: int, width: int) -> tuple[Optional[SolverPlan], str]:
        """The job's plan entry that serves this request (``PlanFamily.find``), or None and why none does."""
        if self.plans is None:
            return None, "no solver plan is configured (sampler.plan)"
        return self.plans.find(nfe, guidance, height, width, any_size=self.fixed_latent)

    def search_fields(self, f: RequestFields) -> dict:
        """The request's search settings: its own ``search`` keys over the job's ``search.*``; the job's
        ``search.options`` apply only to rows that keep the job's search method."""
        job = self.cfg.search
        merged = {k: getattr(job, k) for k in SearchFields.model_fields}
        own = f.search.model_dump(exclude_none=True) if f.search is not None else {}
        if own.get("method", job.method) != job.method and "options" not in own:
            merged["options"] = {}
        return {**merged, **own}

    def sampler_for(self, f: RequestFields, nfe: int, guidance: float, h: int, w: int,
                    steered: bool = False) -> SamplerSpec:
        """The request's concrete ``SamplerSpec``: ``auto`` resolved (the plan where the request fits it,
        else ``auto_method``'s rule; with a steering search ``STEERED_AUTO`` and never the plan),
        defaults filled in, and the method checked against its options, grid and budget."""
        s = self.cfg.sampler
        method = f.sampler or s.method
        own = method == s.method and f.sampler_options is None
        options = dict(s.options if own else (f.sampler_options or {}))
        schedule, final = f.schedule if f.schedule is not None else s.schedule, f.final or "zero"
        if f.plan is not None:
            if self.plans is None or self.plans.entry(f.plan) is None:
                raise RequestError("plan", f"solver plan {echo(f.plan)} is not an entry of this job's plan "
                                           f"({self.plans.hash if self.plans else 'none'}; sampler.plan)")
            if method not in ("auto", PLAN):
                raise RequestError("plan", f"a plan hash needs sampler 'plan' or 'auto', got {method!r}")
            method = PLAN
        entry, why = self.plan_for(nfe, guidance, h, w)
        if method == PLAN or (method == "auto" and not steered and f.schedule is None and not options
                              and final == "zero" and entry is not None):
            return self._plan_spec(f, entry, why, options, final)
        if method == "auto":
            method, grid, auto_options = ((STEERED_AUTO, "karras", {}) if steered else
                                          auto_method(nfe, kind=self.schedule_kind, guidance=guidance))
            schedule, options = schedule if schedule is not None else grid, {**auto_options, **options}
        if method not in SAMPLERS:
            raise RequestError("sampler", f"unknown sampler {echo(method)}; allowed: {sorted(SAMPLERS)}, 'auto' or 'plan'")
        grid_options = options.pop("schedule_options", None) or {}
        spec = SamplerSpec(method=method, nfe=nfe, grid=schedule or SAMPLERS[method].schedule,  # the grid that runs
                           grid_options=grid_options, options=options, final=final)
        _checked(spec, "sampler.options" if own and s.options else "sampler_options")
        return spec

    @staticmethod
    def _plan_spec(f: RequestFields, entry: Optional[SolverPlan], why: str, options: dict, final: str) -> SamplerSpec:
        if entry is None:
            raise RequestError("sampler", why)
        if f.plan is not None and f.plan != entry.hash:
            raise RequestError("plan", f"solver plan entry {f.plan} does not serve this request: the family's entry "
                                       f"for it is {entry.label()}")
        if f.schedule is not None or options or final != "zero":
            raise RequestError("sampler", "a solver plan fixes its own grid and options: leave schedule, "
                                          "sampler_options and final unset")
        return SamplerSpec(method=PLAN, nfe=entry.nfe, plan=entry.hash)

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
        search_fields = self.search_fields(f)
        steered = getattr(SEARCH_METHODS.get(search_fields.get("method")), "steered", False)
        spec = self.sampler_for(f, nfe, guidance, h, w, steered=steered)
        search = resolve_search(search_fields, spec, "sampler" if f.sampler else "sampler.method")
        extra = {k: v for k, v in (f.model_extra or {}).items() if k != "extra"}
        extra.update(_unpack_extra((f.model_extra or {}).get("extra")))
        return [Request(
            key=(f.key if f.num_images == 1 else f"{f.key}_{j}") if f.key else f"{first_row + j:09d}",
            # an explicit seed counts up across a row's images; otherwise job seed + row index
            seed=(f.seed + j if f.seed is not None else self.cfg.manifest.seed + first_row + j) % 2 ** 63,
            prompt=f.prompt, negative_prompt=neg, guidance_scale=guidance, height=h, width=w, sampler=spec,
            search=search, row=first_row + j, source_row=source_row, extra=extra) for j in range(f.num_images)]

    def check_defaults(self) -> None:
        """The job's own defaults resolve: its search runs on its default sampler (``ConfigError`` naming
        the config keys; before Ray starts)."""
        try:
            replace(self, check_request=lambda *a: None)(RequestFields(prompt=""))
        except RequestError as e:
            key = e.field if e.field.startswith(("search.", "sampler.")) else CONFIG_KEYS.get(e.field, "sampler.method")
            raise ConfigError(key, e.message) from None


# a request field -> the config key that sets its default (errors in the job's own defaults)
CONFIG_KEYS = {"sampler": "sampler.method", "schedule": "sampler.schedule", "sampler_options": "sampler.options",
               "nfe": "sampler.nfe", "final": "sampler.method", "plan": "sampler.plan", "prompt": "defaults",
               "negative_prompt": "defaults.negative_prompt", "height": "defaults.height", "width": "defaults.width"}


def _checked(spec: SamplerSpec, option_field: str) -> None:
    """``spec.check()`` with its failure as a ``RequestError`` naming the request field."""
    try:
        spec.check()
    except ParameterError as e:
        field = PARAMETER_FIELDS.get(e.name, "sampler_options")
        field = option_field if field == "sampler_options" else field
        raise RequestError(field, e.message if e.name == "options" else f"{spec.method!r}: {e}") from None


def resolver_for(cfg: JobConfig) -> Resolver:
    """The driver's resolver for a job config: its model's checks and kind, its solver plan (no weights).
    Checks the job's defaults as a whole (``Resolver.check_defaults``)."""
    cls = model_class(cfg.model)
    resolver = Resolver(cfg, cls.check_request, cls.schedule_kind, cls.fixed_latent, load_plan(cfg))
    resolver.check_defaults()
    return resolver


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
