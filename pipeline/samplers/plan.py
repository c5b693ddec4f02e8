"""Solver plans: a calibrated sampler as data, and families of them.

A ``SolverPlan`` is a small, frozen, versioned JSON document: a base method, an explicit
float64 sigma grid, per-step parameters (evaluation-time shifts and gains on the multistep
differences), the nfe and sigma range it was made for, what it was calibrated on (model,
schedule kind, guidance scale, resolution), the calibration figures, and a content hash.
``pipeline.samplers.calibrate`` makes plans; ``sample(..., method=plan)`` runs them with
``planned.plan_multistep``, the same short pure-function loop as any other sampler.

A plan whose ``base`` is one of ``planned.BASES`` (DPM-Solver++ 2M or 3M, UniPC) runs that base
with its per-step parameters; another registered method (a gate's fallback) runs on the plan's
explicit grid without any.

A ``PlanFamily`` is one file holding plans for several (nfe, guidance scale, size), each with its
own hash: a request runs the entry that fits it (``PlanFamily.find``), and its sidecar names the
entry. A single plan's file reads as a family of one.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Optional

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import PlanError
from ..schedules import SIGMA_INF_CLAMP
from ..storage import write_bytes_atomic
from .planned import BASES
from .registry import SAMPLERS

PLAN_VERSION = 1
FAMILY_VERSION = 1
CALIBRATED_BASE = "dpmpp_2m"     # the base of plans made before there were others (and the gate's usual fallback)


class Sealed(BaseModel):
    """A frozen document whose ``hash`` covers its content (``content_hash``)."""
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")
    hash: str = ""

    def content(self) -> dict:
        """Every field but ``hash``, as plain JSON values (infinity as the string "Infinity")."""
        return json.loads(self.model_dump_json(exclude={"hash"}))

    def content_hash(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def sealed(self):
        """This document with its content hash set."""
        return self.model_copy(update={"hash": self.content_hash()})

    def to_json(self, url: str) -> str:
        """Write the sealed document to a local path or fsspec URL; returns its hash."""
        doc = self.sealed()
        write_bytes_atomic(url, (doc.model_dump_json(indent=1) + "\n").encode())
        return doc.hash


class PlanModel(BaseModel):
    """What a plan was calibrated on: the model and how its noise schedule maps to sigma."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: Optional[str] = None                 # the model's id (weights digest); None = any model
    schedule: str = "ve"                     # ve | vp_discrete | vp_continuous | flow
    schedule_options: dict[str, Any] = Field(default_factory=dict)   # e.g. the flow shift of grids


class SolverPlan(Sealed):
    """A calibrated solver as data (see the module docstring). Frozen; ``hash`` covers every other field."""

    version: int = PLAN_VERSION
    base: str = CALIBRATED_BASE              # the method the plan runs (per-step parameters: one of planned.BASES)
    nfe: int = Field(ge=2)
    sigma_min: float = Field(gt=0)
    sigma_max: float = Field(gt=0)
    sigmas: tuple[float, ...]                # float64 grid: sigma_max (or inf) ... 0
    shifts: tuple[float, ...] = ()           # per model call of the multistep part: log(sigma_eval / sigma_i)
    gains: tuple[tuple[float, float], ...] = ()   # per step: gains on the first and second differences
    options: dict[str, Any] = Field(default_factory=dict)   # method options when base is another method
    model: PlanModel = Field(default_factory=PlanModel)
    guidance_scale: Optional[float] = None   # the guidance it was calibrated at (None: unguided)
    resolution: Optional[tuple[int, int]] = None       # image height, width it was calibrated at
    latent_shape: Optional[tuple[int, ...]] = None     # the sample shape it was calibrated on
    calibration: dict[str, Any] = Field(default_factory=dict)     # figures: errors, model calls, seconds

    @model_validator(mode="after")
    def _consistent(self) -> "SolverPlan":
        s, inf = self.sigmas, int(math.isinf(self.sigmas[0])) if self.sigmas else 0
        if len(s) != self.nfe + 1 or s[-1] != 0 or any(b >= a for a, b in zip(s, s[1:])):
            raise ValueError(f"sigmas: expected a strictly decreasing grid of nfe + 1 = {self.nfe + 1} levels "
                             f"ending at 0, got {len(s)} levels")
        top = min(self.sigma_max, SIGMA_INF_CLAMP)       # sample() clamps a finite sigma_max past 4096
        if not (inf and math.isinf(self.sigma_max)) and not math.isclose(s[0], top, rel_tol=1e-9):
            raise ValueError(f"sigmas: the grid starts at {s[0]}, not at sigma_max = {self.sigma_max}"
                             + (f" clamped to {top:g}" if top != self.sigma_max else ""))
        if self.base not in SAMPLERS:
            raise ValueError(f"base: unknown method {self.base!r}; allowed: {sorted(SAMPLERS)}")
        steps = self.nfe - inf
        if self.base in BASES:
            if len(self.shifts) not in (0, steps) or len(self.gains) not in (0, steps):
                raise ValueError(f"shifts/gains: expected {steps} per-step values (one per model call after "
                                 f"any first step from sigma = inf), got {len(self.shifts)} and {len(self.gains)}")
        elif self.shifts or self.gains:
            raise ValueError(f"shifts/gains: per-step parameters need a base of {list(BASES)}, got {self.base!r}")
        elif SAMPLERS[self.base].calls(steps, True, self.options) > steps:
            raise ValueError(f"base: {self.base!r} needs more than nfe = {self.nfe} calls on this grid")
        return self

    # ------------------------------------------------------------ use
    def grid(self) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float64)

    @property
    def calibrated(self) -> bool:
        """Whether the plan runs a calibrated base (``plan_multistep``) rather than another method."""
        return self.base in BASES

    def label(self) -> str:
        """How the plan is named in messages: its hash, nfe, guidance and size."""
        size = f", {self.resolution[0]}x{self.resolution[1]}" if self.resolution else ""
        g = f", guidance {self.guidance_scale:g}" if self.guidance_scale is not None else ""
        return f"{self.hash} (nfe {self.nfe}{g}{size})"

    def check(self, nfe: int, sigma_min: float, sigma_max: float, source: str = "method") -> None:
        """Raise ``PlanError`` unless the plan was made for this nfe and sigma range (naming both values)."""
        if nfe != self.nfe:
            raise PlanError(source, f"solver plan {self.hash} was calibrated for nfe={self.nfe}, got nfe={nfe}")
        for name, want, got in (("sigma_min", self.sigma_min, sigma_min), ("sigma_max", self.sigma_max, sigma_max)):
            same = (math.isinf(want) and math.isinf(got)) or math.isclose(want, got, rel_tol=1e-6)
            if not same:
                raise PlanError(source, f"solver plan {self.hash} was calibrated for {name}={want:g}, got {name}={got:g}")

    # ------------------------------------------------------------ files
    @classmethod
    def from_json(cls, url: str) -> "SolverPlan":
        """Read a plan; ``PlanError`` (naming the file) if it is missing, truncated, of another version,
        inconsistent, or its content does not match its hash."""
        return _validated(cls, _read_doc(url, PLAN_VERSION), url)


GUIDANCE_RULES = ("exact", "nearest")


class PlanFamily(Sealed):
    """Solver plans for several (nfe, guidance scale, size) of one model, each entry with its own hash.

    ``find`` picks a request's entry: the same nfe and size (any size for a model whose latent does
    not follow the image size) and the same guidance scale; with ``guidance_rule="nearest"`` a scale
    between the smallest and the largest calibrated one takes the nearest entry (the lower on a tie).
    A request that no entry fits runs ``auto``'s rule.
    """
    version: int = FAMILY_VERSION
    entries: tuple[SolverPlan, ...]
    guidance_rule: str = "exact"

    @model_validator(mode="after")
    def _entries(self) -> "PlanFamily":
        if not self.entries:
            raise ValueError("entries: a plan family needs at least one entry")
        if self.guidance_rule not in GUIDANCE_RULES:
            raise ValueError(f"guidance_rule: expected one of {GUIDANCE_RULES}, got {self.guidance_rule!r}")
        keys = [(e.nfe, e.guidance_scale, e.resolution) for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError("entries: two entries for the same nfe, guidance scale and size")
        if len({e.model.id for e in self.entries}) != 1:
            raise ValueError("entries: all entries must be calibrated for the same model")
        bad = [e.hash for e in self.entries if e.hash != e.content_hash()]
        if bad:
            raise ValueError(f"entries: entry {bad[0]!r} does not match its content hash (edited or corrupted)")
        return self

    @classmethod
    def of(cls, plans, guidance_rule: str = "exact") -> "PlanFamily":
        """A sealed family of sealed ``plans``."""
        return cls(entries=tuple(p.sealed() for p in plans), guidance_rule=guidance_rule).sealed()

    @property
    def model(self) -> PlanModel:
        return self.entries[0].model

    def entry(self, hash: str) -> SolverPlan | None:
        return next((e for e in self.entries if e.hash == hash), None)

    def find(self, nfe: int, guidance: float, height: int, width: int,
             any_size: bool = False) -> tuple[SolverPlan | None, str]:
        """The entry that serves this request, or None and why none does."""
        fits = [e for e in self.entries if e.nfe == nfe and (any_size or e.resolution is None
                                                            or tuple(e.resolution) == (height, width))]
        if not fits:
            return None, (f"no entry of plan family {self.hash} has nfe={nfe} at {height}x{width} "
                          f"(entries: {', '.join(e.label() for e in self.entries)})")
        exact = [e for e in fits if e.guidance_scale is None or e.guidance_scale == guidance]
        if exact:
            return exact[0], ""
        scales = sorted(e.guidance_scale for e in fits)
        if self.guidance_rule == "nearest" and scales[0] <= guidance <= scales[-1]:
            return min(fits, key=lambda e: (abs(e.guidance_scale - guidance), e.guidance_scale)), ""
        where = "" if self.guidance_rule == "exact" else f" or within [{scales[0]:g}, {scales[-1]:g}]"
        return None, (f"plan family {self.hash} was calibrated at nfe={nfe} for guidance_scale "
                      f"{', '.join(f'{g:g}' for g in scales)}{where}; the request has {guidance:g}")

    @classmethod
    def from_json(cls, url: str) -> "PlanFamily":
        """Read a family (a single plan's file reads as a family of one); ``PlanError`` naming the file."""
        doc = _read_doc(url, None)
        if "entries" not in doc:
            return cls.of([_validated(SolverPlan, _check_version(doc, url, PLAN_VERSION), url)])
        return _validated(cls, _check_version(doc, url, FAMILY_VERSION), url)


def _read_doc(url: str, version: int | None) -> dict:
    try:
        with fsspec.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PlanError(url, "solver plan not found") from None
    except OSError as e:
        raise PlanError(url, f"cannot read solver plan: {e}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(url, f"not a solver plan: truncated or not JSON ({e})") from None
    if not isinstance(doc, dict) or "version" not in doc:
        raise PlanError(url, "not a solver plan: no 'version' field")
    return doc if version is None else _check_version(doc, url, version)


def _check_version(doc: dict, url: str, version: int) -> dict:
    if doc["version"] != version:
        raise PlanError(url, f"solver plan version {doc['version']!r}; this version of the pipeline reads "
                             f"version {version} (recalibrate with python -m jobs.calibrate)")
    return doc


def _validated(cls, doc: dict, url: str):
    try:
        obj = cls.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "plan"
        raise PlanError(url, f"invalid solver plan: field {field!r}: {err['msg'].removeprefix('Value error, ')}") from None
    if obj.hash != obj.content_hash():
        raise PlanError(url, f"content hash mismatch: the file says {obj.hash!r} but its content hashes to "
                             f"{obj.content_hash()!r} (edited or corrupted)")
    return obj
