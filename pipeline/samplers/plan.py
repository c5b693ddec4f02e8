"""Solver plans: a calibrated sampler as data, and the sampler that runs one.

A ``SolverPlan`` is a small, frozen, versioned JSON document: a base method, an explicit
float64 sigma grid, per-step parameters (evaluation-time shifts and gains on the multistep
differences), the nfe and sigma range it was made for, what it was calibrated on (model,
schedule kind, guidance scale, resolution), the calibration figures, and a content hash.
``pipeline.samplers.calibrate`` makes plans; ``sample(..., method=plan)`` runs them with
``plan_multistep``, the same short pure-function loop as any other sampler.

A plan whose ``base`` is another registered method (the acceptance gate's fallback, when
calibration did not beat that baseline) carries no per-step parameters and runs that method
on the plan's explicit grid.
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
from ..storage import write_bytes_atomic
from .basic import _sigma_batch, report
from .registry import SAMPLERS

PLAN_VERSION = 1
CALIBRATED_BASE = "dpmpp_2m"     # the method whose update the per-step parameters extend


def direction(hist, s, s_next, h_last, g1=0.0, g2=0.0, order: int = 2):
    """The data estimate ``d`` a DPM-Solver++ step integrates, from the newest-first data predictions
    ``hist``: ``D_0 + (1/(2r) + g1)(D_0 - D_1) + g2 (D_1 - D_2)`` (order 2; order 1: ``D_0`` plus the
    gains), with r = h_last / h; a step to sigma = 0 gets no 1/(2r) term."""
    d = hist[0]
    if len(hist) > 1:
        # the 2M term 1/(2r) = h / (2 h_last) (steps to sigma > 0) plus the gain on the first difference
        two_m = 0.5 * (s.log() - s_next.log()) / h_last if order == 2 and s_next > 0 else 0.0
        d = d + torch.as_tensor(g1 + two_m).to(hist[0].dtype) * (hist[0] - hist[1])
    if len(hist) > 2:
        # the gain on the second difference
        d = d + torch.as_tensor(g2).to(hist[0].dtype) * (hist[1] - hist[2])
    return d


def ei_step(x, d, s, s_next):
    """The exponential-integrator step in data-prediction form; to sigma = 0 it returns ``d``."""
    if s_next == 0:
        return d
    return (s_next / s).to(x.dtype) * x - torch.expm1(s_next.log() - s.log()).to(x.dtype) * d


def plan_multistep(denoiser, x, sigmas, *, shifts=None, gains=None, order: int = 2, beta: float = 1.0,
                   on_step=None):
    """DPM-Solver++(2M) with calibrated per-step parameters (Lu et al. 2022, Alg. 2, extended).

    With t = -log(sigma), h_i = t_{i+1} - t_i and r_i = h_{i-1} / h_i, step i evaluates
    ``D_i = denoiser(x_i, sigma_i * exp(shift_i))`` (a decoupled evaluation time, as the time
    shifts of LD3-style calibration) and moves along the exponential integrator
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h_i) d_i`` with
    ``d_i = D_i + (1/(2 r_i) + g_i1)(D_i - D_{i-1}) + g_i2 (D_{i-1} - D_{i-2})`` (``direction``): zero-sum
    corrections on the first and second differences (an S4S-style coefficient search that keeps a
    constant D integrated exactly). The step to sigma = 0 returns ``d_i`` without the 1/(2r) term.
    ``order=1`` drops the 2M term (DDIM); ``beta < 1`` is Polyak heavy-ball momentum on ``d``
    (Wizadwongsa et al. 2023, ``v = (1 - beta) v + beta d``). With all shifts and gains zero and
    beta = 1 this is exactly DPM-Solver++(2M) on ``sigmas``. Works on tensors that require grad
    (the calibrator backpropagates through it).
    """
    n = len(sigmas) - 1
    shifts = torch.zeros(n, dtype=torch.float64) if shifts is None else torch.as_tensor(shifts, dtype=torch.float64)
    gains = torch.zeros(n, 2, dtype=torch.float64) if gains is None else torch.as_tensor(gains, dtype=torch.float64)
    hist, h_last, v = [], None, None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        # model call at the (shifted) evaluation level
        denoised = denoiser(x, _sigma_batch(s * torch.exp(shifts[i]), x))
        hist = [denoised, *hist[:2]]
        # the calibrated multistep estimate, averaged by the momentum, then the step
        d = direction(hist, s, s_next, h_last, gains[i, 0], gains[i, 1], order)
        v = d if v is None or beta == 1 else (1 - beta) * v + beta * d
        x = ei_step(x, v, s, s_next)
        h_last = s.log() - s_next.log() if s_next > 0 else None
        report(on_step, i, sigmas, x, denoised)
    return x


class PlanModel(BaseModel):
    """What a plan was calibrated on: the model and how its noise schedule maps to sigma."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: Optional[str] = None                 # the model's id (weights digest); None = any model
    schedule: str = "ve"                     # ve | vp_discrete | vp_continuous | flow
    schedule_options: dict[str, Any] = Field(default_factory=dict)   # e.g. the flow shift of grids


class SolverPlan(BaseModel):
    """A calibrated solver as data (see the module docstring). Frozen; ``hash`` covers every other field."""
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    version: int = PLAN_VERSION
    base: str = CALIBRATED_BASE              # the method the plan runs (with per-step parameters: dpmpp_2m only)
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
    hash: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "SolverPlan":
        s, inf = self.sigmas, int(math.isinf(self.sigmas[0])) if self.sigmas else 0
        if len(s) != self.nfe + 1 or s[-1] != 0 or any(b >= a for a, b in zip(s, s[1:])):
            raise ValueError(f"sigmas: expected a strictly decreasing grid of nfe + 1 = {self.nfe + 1} levels "
                             f"ending at 0, got {len(s)} levels")
        if not (inf and math.isinf(self.sigma_max)) and not math.isclose(s[0], self.sigma_max, rel_tol=1e-9):
            raise ValueError(f"sigmas: the grid starts at {s[0]}, not at sigma_max = {self.sigma_max}")
        if self.base not in SAMPLERS:
            raise ValueError(f"base: unknown method {self.base!r}; allowed: {sorted(SAMPLERS)}")
        steps = self.nfe - inf
        if self.base == CALIBRATED_BASE:
            if len(self.shifts) not in (0, steps) or len(self.gains) not in (0, steps):
                raise ValueError(f"shifts/gains: expected {steps} per-step values (one per model call after "
                                 f"any first step from sigma = inf), got {len(self.shifts)} and {len(self.gains)}")
        elif self.shifts or self.gains:
            raise ValueError(f"shifts/gains: per-step parameters need base {CALIBRATED_BASE!r}, got {self.base!r}")
        elif SAMPLERS[self.base].calls(steps, True, self.options) > steps:
            raise ValueError(f"base: {self.base!r} needs more than nfe = {self.nfe} calls on this grid")
        return self

    # ------------------------------------------------------------ identity
    def content(self) -> dict:
        """Every field but ``hash``, as plain JSON values (infinity as the string "Infinity")."""
        return json.loads(self.model_dump_json(exclude={"hash"}))

    def content_hash(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def sealed(self) -> "SolverPlan":
        """This plan with its content hash set."""
        return self.model_copy(update={"hash": self.content_hash()})

    # ------------------------------------------------------------ use
    def grid(self) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float64)

    def check(self, nfe: int, sigma_min: float, sigma_max: float, source: str = "method") -> None:
        """Raise ``PlanError`` unless the plan was made for this nfe and sigma range (naming both values)."""
        if nfe != self.nfe:
            raise PlanError(source, f"solver plan {self.hash} was calibrated for nfe={self.nfe}, got nfe={nfe}")
        for name, want, got in (("sigma_min", self.sigma_min, sigma_min), ("sigma_max", self.sigma_max, sigma_max)):
            same = (math.isinf(want) and math.isinf(got)) or math.isclose(want, got, rel_tol=1e-6)
            if not same:
                raise PlanError(source, f"solver plan {self.hash} was calibrated for {name}={want:g}, got {name}={got:g}")

    # ------------------------------------------------------------ files
    def to_json(self, url: str) -> str:
        """Write the sealed plan to a local path or fsspec URL; returns the hash."""
        plan = self.sealed()
        write_bytes_atomic(url, (plan.model_dump_json(indent=1) + "\n").encode())
        return plan.hash

    @classmethod
    def from_json(cls, url: str) -> "SolverPlan":
        """Read a plan; ``PlanError`` (naming the file) if it is missing, truncated, of another version,
        inconsistent, or its content does not match its hash."""
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
        if doc["version"] != PLAN_VERSION:
            raise PlanError(url, f"solver plan version {doc['version']!r}; this version of the pipeline reads "
                                 f"version {PLAN_VERSION} (recalibrate with python -m jobs.calibrate)")
        try:
            plan = cls.model_validate(doc)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "plan"
            raise PlanError(url, f"invalid solver plan: field {field!r}: {err['msg']}") from None
        if plan.hash != plan.content_hash():
            raise PlanError(url, f"content hash mismatch: the file says {plan.hash!r} but its content hashes to "
                                 f"{plan.content_hash()!r} (edited or corrupted)")
        return plan
