"""The sampler library: ``sample()``, a registry of training-free solvers by name, solver plans.

Conventions (k-diffusion's): a denoiser is ``denoiser(x, sigma) -> x0_hat`` with
``x = x0 + sigma * eps`` and ``sigma`` a ``[B]`` tensor. A sampler is a pure function
``(denoiser, x, sigmas, *, noise, on_step, **options) -> x0`` over a decreasing grid
that ends at 0. Model-specific details (prediction type, VP scaling, guidance) live in
denoiser wrappers (``pipeline.denoisers``), never in a sampler.

Modules, lowest first (no module imports this package's ``__init__``, so there is no import loop):
``registry`` (``Method``, ``register``), ``noise``, the method modules (each registers its
methods), ``planned`` (``plan_multistep``: the solver a plan runs), ``plan`` (``SolverPlan``,
``PlanFamily``: plans as data), ``core`` (``sample``, grids, budgets, checks), ``spec``
(``SamplerSpec``: one image's resolved sampler), ``calibrators`` and ``calibrate`` (making plans).
"""
from __future__ import annotations

# the method modules register their samplers on import
from . import basic, deis, dpm_solver, multistep, singlestep, stochastic, unipc, wrappers  # noqa: F401
from .calibrate import CalibrationResult, CalibrationSpec, calibrate
from .core import SIGMA_INF_EVAL, auto_method, build_grid, check_method, method_options, sample
from .noise import NoiseSource
from .plan import PlanError, PlanFamily, SolverPlan
from .registry import FINAL_POLICIES, SAMPLERS, BudgetExceeded, Method, register
from .spec import PLAN, SamplerSpec

__all__ = ["sample", "SAMPLERS", "Method", "register", "NoiseSource", "BudgetExceeded", "auto_method",
           "build_grid", "calibrate", "CalibrationSpec", "CalibrationResult", "check_method", "method_options",
           "SolverPlan", "PlanFamily", "PlanError", "SamplerSpec",
           "PLAN", "FINAL_POLICIES", "SIGMA_INF_EVAL"]
