"""``SamplerSpec``: how one image is sampled, typed and resolved once.

The resolver (``pipeline.request``) turns a manifest row or HTTP body into a ``SamplerSpec``;
the generator runs it (``SamplerSpec.run``) and each image's sidecar records it. Strings are parsed
at that edge only: nothing downstream re-decides ``auto`` or reads options by key.

On the wire (manifest rows, sidecars, the Arrow rows between stages) a spec is the flat fields
``nfe, sampler, schedule, sampler_options, final, plan``; the grid's own parameters travel inside
``sampler_options`` as ``schedule_options`` (``fields`` / ``from_fields``), which keeps every
sidecar written so far a valid manifest row.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import PlanError
from .core import check_method, sample
from .plan import SolverPlan

PLAN = "plan"                   # the method name of "the solver plan entry named by ``plan``"
GRID_OPTIONS = "schedule_options"   # the key of the grid's parameters inside ``sampler_options`` on the wire


class SamplerSpec(BaseModel):
    """One image's sampler: a method (or a solver plan entry), its grid and options, the final step.

    ``grid`` (a grid name: ``karras``, ``flow_uniform``, ...) and ``grid_options`` (the grid's own
    parameters, e.g. ``rho`` or ``shift``) make the sigma grid and ``final`` ends it; ``options`` are
    the method's own (``eta``, ``order``, ...), kept apart from the grid's as k-diffusion keeps
    ``extra_args`` apart from a sampler's options. ``method == "plan"`` runs the solver plan entry
    whose hash is ``plan``, which fixes its own grid and parameters.
    """
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(description="a registered method, or 'plan'")
    nfe: int = Field(ge=1, description="model calls per image (per particle, with a search)")
    grid: Optional[str] = Field(None, description="the sigma grid; None with a plan")
    grid_options: dict[str, Any] = Field(default_factory=dict, description="the grid's own parameters")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options")
    final: Literal["zero", "sigma_min"] = Field("zero", description="end with a clean estimate, or at sigma_min")
    plan: Optional[str] = Field(None, description="the solver plan entry's hash (method 'plan')")

    @model_validator(mode="after")
    def _plan_fixes_the_rest(self) -> "SamplerSpec":
        if (self.method == PLAN) != (self.plan is not None):
            raise ValueError("a solver plan spec needs method 'plan' and the entry's hash, and only then")
        if self.method == PLAN and (self.grid or self.grid_options or self.options or self.final != "zero"):
            raise ValueError("a solver plan fixes its own grid and options: leave schedule, sampler_options and "
                             "final unset")
        return self

    # ------------------------------------------------------------ identity and the wire format
    def key(self) -> str:
        """A canonical string of the whole spec (rows with equal keys can share model calls)."""
        return json.dumps(self.model_dump(), sort_keys=True, default=str)

    def fields(self) -> dict:
        """The flat wire fields: ``nfe, sampler, schedule, sampler_options, final, plan``."""
        options = {**self.options, **({GRID_OPTIONS: dict(self.grid_options)} if self.grid_options else {})}
        return {"nfe": self.nfe, "sampler": self.method, "schedule": self.grid, "sampler_options": options,
                "final": self.final, "plan": self.plan}

    @classmethod
    def from_fields(cls, d: dict) -> "SamplerSpec":
        """The spec of flat wire fields (``fields``)."""
        options = dict(d.get("sampler_options") or {})
        grid_options = options.pop(GRID_OPTIONS, None) or {}
        return cls(method=d["sampler"], nfe=d["nfe"], grid=d.get("schedule"), grid_options=grid_options,
                   options=options, final=d.get("final") or "zero", plan=d.get("plan"))

    # ------------------------------------------------------------ use
    def check(self) -> None:
        """Raise ``ParameterError`` unless the method runs with this grid, options and budget (a dry run)."""
        if self.method != PLAN:
            check_method(self.method, self.nfe, self.grid, self.options, self.final, self.grid_options)

    def run(self, denoiser: Callable, noise: torch.Tensor, sigma_min: float, sigma_max: float, *,
            plan: SolverPlan | None = None, model_schedule=None, model_grid_options: dict | None = None,
            generator=None, on_step: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Sample ``noise`` with this spec (``pipeline.samplers.sample``). ``plan``: the solver plan entry
        a plan spec names; ``model_grid_options``: the model's own parameters of the grid at this size
        (a flow model's shift), which the spec's ``grid_options`` override."""
        if self.method == PLAN:
            if plan is None or plan.hash != self.plan:
                raise PlanError("sampler.plan", f"solver plan entry {self.plan} is not loaded "
                                                f"(got {plan.hash if plan else 'none'})")
            return sample(denoiser, noise, plan, self.nfe, sigma_min, sigma_max, generator=generator,
                          on_step=on_step)
        grid_options = {**(model_grid_options or {}), **self.grid_options}
        return sample(denoiser, noise, self.method, self.nfe, sigma_min, sigma_max, self.grid, final=self.final,
                      schedule_options=grid_options or None, model_schedule=model_schedule, generator=generator,
                      on_step=on_step, **self.options)
