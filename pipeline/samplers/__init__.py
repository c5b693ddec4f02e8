"""The sampler library: ``sample()`` and a registry of training-free solvers by name.

Conventions (k-diffusion's): a denoiser is ``denoiser(x, sigma) -> x0_hat`` with
``x = x0 + sigma * eps`` and ``sigma`` a ``[B]`` tensor. A sampler is a pure function
``(denoiser, x, sigmas, *, noise, on_step, **options) -> x0`` over a decreasing grid
that ends at 0. Model-specific details (prediction type, VP scaling, guidance) live in
denoiser wrappers (``pipeline.denoisers``), never in a sampler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..schedules import GRIDS, INF_GRIDS, get_sigmas
from .noise import NoiseSource


Planner = Callable[[int, bool, dict], "tuple[int, dict]"]
Counter = Callable[[int, bool, dict], int]


@dataclass(frozen=True)
class Method:
    """A registered sampler and how it spends a budget of model calls.

    ``calls_per_step`` calls per grid step, ``final_step_calls`` (if set) on a last step to
    sigma = 0 (Heun-type methods finish with one Euler call). ``planner(nfe, ends_at_zero,
    options) -> (steps, extra_options)`` and ``counter(steps, ends_at_zero, options) -> calls``
    override the default accounting for methods with irregular budgets (mixed-order singlestep
    solvers, restart sampling).
    """
    fn: Callable[..., torch.Tensor]
    schedule: str = "karras"          # the grid used when the caller passes schedule=None
    stochastic: bool = False
    calls_per_step: int = 1           # model calls per grid step (Heun-type methods: 2)
    final_step_calls: int | None = None
    planner: Planner | None = None
    counter: Counter | None = None

    def calls(self, steps: int, ends_at_zero: bool = True, options: dict | None = None) -> int:
        """Model calls this method makes on a grid of ``steps`` steps."""
        if self.counter is not None:
            return self.counter(steps, ends_at_zero, options or {})
        last = self.final_step_calls if (ends_at_zero and self.final_step_calls is not None) else self.calls_per_step
        return (steps - 1) * self.calls_per_step + last

    def plan(self, nfe: int, ends_at_zero: bool = True, options: dict | None = None) -> tuple[int, dict]:
        """(grid steps, extra method options) that spend at most ``nfe`` calls (as many as possible)."""
        if self.planner is not None:
            return self.planner(nfe, ends_at_zero, options or {})
        steps = 1
        while self.calls(steps + 1, ends_at_zero, options) <= nfe:
            steps += 1
        return steps, {}

    def steps_for(self, nfe: int) -> int:
        """Grid steps that fit a budget of ``nfe`` model calls (never more calls than nfe)."""
        return self.plan(nfe)[0]


SAMPLERS: dict[str, Method] = {}

AUTO_FALLBACK: tuple[str, str | None, dict] = ("dpmpp_2m", "karras", {})
FINAL_POLICIES = ("zero", "sigma_min")


def register(name: str, **spec) -> Callable:
    def deco(fn: Callable) -> Callable:
        SAMPLERS[name] = Method(fn=fn, **spec)
        return fn
    return deco


class BudgetExceeded(RuntimeError):
    pass


def _count_calls(denoiser: Callable, budget: int) -> Callable:
    calls = 0

    def counted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > budget:
            raise BudgetExceeded(f"sampler called the denoiser more than nfe={budget} times")
        return denoiser(x, sigma)
    return counted


def auto_method(nfe: int, kind: str = "ve", guidance: float | None = None) -> tuple[str, str | None, dict]:
    """The (method, grid, options) that ``method="auto"`` uses without a solver plan, for a model whose
    noise schedule is of ``kind`` (``ve``/EDM, ``vp_discrete``, ``vp_continuous``, ``flow``), at this
    guidance scale and budget of ``nfe`` calls. See ``bench/auto_rule.py`` for how it was chosen."""
    if kind == "flow":
        return "dpmpp_2m", "flow_uniform", {}
    return AUTO_FALLBACK


def build_grid(method: str, nfe: int, sigma_min: float, sigma_max: float,
               schedule: str | torch.Tensor | None = None, final: str = "zero", model_schedule=None,
               schedule_options: dict | None = None, options: dict | None = None) -> tuple[torch.Tensor, dict]:
    """The sigma grid ``sample`` integrates over and the extra options the method's plan adds.

    ``final="zero"`` ends the grid at sigma 0 (the last step returns a clean estimate);
    ``final="sigma_min"`` ends it at the last nonzero level without a final denoising step,
    as diffusers' ``final_sigmas_type="sigma_min"``: the result keeps noise of std sigma_min.
    """
    if final not in FINAL_POLICIES:
        raise ValueError(f"final: unknown final-step policy {final!r}; allowed: {FINAL_POLICIES}")
    spec, zero = SAMPLERS[method], final == "zero"
    if isinstance(schedule, torch.Tensor):
        sigmas = get_sigmas(schedule, 0, sigma_min, sigma_max)
        sigmas = sigmas if zero else sigmas[:-1]
        if len(sigmas) < 2:
            raise ValueError("schedule: the explicit grid has no step left with final='sigma_min'")
        extra = {}
    else:
        name = spec.schedule if schedule is None else schedule
        inf = int(math.isinf(sigma_max) and name in INF_GRIDS)      # grid starts at t = 1: one limit step
        if nfe - inf < 1:
            raise ValueError(f"nfe: a grid from sigma = inf needs nfe >= 2, got {nfe}")
        steps, extra = spec.plan(nfe - inf, zero, options)
        sigmas = get_sigmas(name, steps + inf + (0 if zero else 1), sigma_min, sigma_max,
                            model_schedule=model_schedule, **(schedule_options or {}))
        sigmas = sigmas if zero else sigmas[:-1]
        if spec.calls(len(sigmas) - 1 - inf, zero, {**(options or {}), **extra}) > nfe - inf:
            raise ValueError(f"nfe: {method!r} needs at least {spec.calls(1, zero, options) + inf} calls "
                             f"with final={final!r}, got nfe={nfe}")
    inf = int(math.isinf(float(sigmas[0])))
    steps = len(sigmas) - 1 - inf
    if steps < 1 or spec.calls(steps, zero, {**(options or {}), **extra}) > nfe - inf:
        raise ValueError(f"schedule: the grid has {steps} steps, more than nfe={nfe} allows "
                         f"for {method!r} ({spec.calls_per_step} call(s) per step)")
    return sigmas, extra


def sample(denoiser: Callable, noise: torch.Tensor, method: str = "dpmpp_2m", nfe: int = 10,
           sigma_min: float = 0.0292, sigma_max: float = 14.6146,
           schedule: str | torch.Tensor | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           **options) -> torch.Tensor:
    """Draw samples: scale standard-normal ``noise`` to ``sigma_max`` and integrate to sigma 0.

    ``nfe`` is a budget of denoiser calls (one call = one batched evaluation); a method that
    cannot spend it exactly uses fewer. ``generator`` (one per row, or one for the batch)
    feeds stochastic methods so their output is reproducible per row. ``options`` go to the
    method (e.g. ``eta`` for DDIM), except these, which shape the grid:

    - ``final``: ``"zero"`` (default) or ``"sigma_min"`` (stop at sigma_min, no final denoising).
    - ``model_schedule``: the model's ``NoiseSchedule`` for grids on its time axis
      (``linspace``/``leading``/``trailing``/``sgm_uniform``, ``beta``).
    - ``schedule_options``: a dict of the grid's own parameters (``rho``, ``shift``, ...).

    ``method="auto"`` takes the (method, grid) of ``AUTO_RULE`` for this ``nfe`` (see
    ``auto_method``); an explicit ``schedule`` still overrides its grid. An infinite
    ``sigma_max`` is clamped to ``pipeline.schedules.SIGMA_INF_CLAMP`` (4096).
    """
    from .plan import SolverPlan

    if isinstance(method, SolverPlan):
        return _sample_plan(method, denoiser, noise, nfe, sigma_min, sigma_max, generator, on_step, options)
    if method == "auto" and isinstance(nfe, int) and nfe >= 1:
        kind = getattr(options.get("model_schedule"), "kind", "ve")
        method, auto_grid, auto_opts = auto_method(nfe, kind=kind, guidance=options.pop("guidance", None))
        schedule = auto_grid if schedule is None else schedule
        options = {**auto_opts, **options}
    if method not in SAMPLERS:
        raise ValueError(f"method: unknown sampler {method!r}; allowed: {sorted(SAMPLERS)} or 'auto'")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe: must be an integer >= 1, got {nfe!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min/sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    final = options.pop("final", "zero")
    model_schedule = options.pop("model_schedule", None)
    schedule_options = options.pop("schedule_options", None)
    sigmas, extra = build_grid(method, nfe, sigma_min, sigma_max, schedule, final, model_schedule,
                               schedule_options, options)
    denoiser, source = _count_calls(denoiser, nfe), NoiseSource(generator)
    if math.isinf(float(sigmas[0])):
        x, sigmas = _step_from_infinity(denoiser, noise, sigmas), sigmas[1:]
    else:
        x = noise * sigmas[0].to(noise.dtype)
    return SAMPLERS[method].fn(denoiser, x, sigmas, noise=source, on_step=on_step, **{**extra, **options})


def _sample_plan(plan, denoiser, noise, nfe, sigma_min, sigma_max, generator, on_step, options) -> torch.Tensor:
    """``sample`` with a ``SolverPlan``: its explicit grid and per-step parameters (``pipeline.samplers.plan``)."""
    from .plan import CALIBRATED_BASE, plan_multistep

    plan.check(nfe, sigma_min, sigma_max)
    unknown = sorted(set(options) - {"model_schedule", "schedule_options", "final"})
    if unknown or options.get("final", "zero") != "zero":
        raise ValueError(f"options: a solver plan takes no method options (its own are fixed), got {unknown or ['final']}")
    sigmas = plan.grid().to(noise.device)
    denoiser, source = _count_calls(denoiser, nfe), NoiseSource(generator)
    if math.isinf(float(sigmas[0])):
        x, sigmas = _step_from_infinity(denoiser, noise, sigmas), sigmas[1:]
    else:
        x = noise * sigmas[0].to(noise.dtype)
    if plan.base == CALIBRATED_BASE:
        return plan_multistep(denoiser, x, sigmas, shifts=plan.shifts or None, gains=plan.gains or None, on_step=on_step)
    return SAMPLERS[plan.base].fn(denoiser, x, sigmas, noise=source, on_step=on_step, **plan.options)


SIGMA_INF_EVAL = 1e8


def _step_from_infinity(denoiser: Callable, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The exact limit of a first DDIM step from sigma = inf (rectified flow at t = 1, zero terminal
    SNR): ``x_1 = D_inf + sigma_1 * noise``, with ``D_inf`` the denoiser at ``noise * 1e8``, 1e8 (whose
    gap to the limit is O(1e-8)). It is one model call, taken before the method's own steps."""
    s = torch.full((noise.shape[0],), SIGMA_INF_EVAL, dtype=noise.dtype, device=noise.device)
    d_inf = denoiser(noise * SIGMA_INF_EVAL, s)
    return d_inf + noise * sigmas[1].to(noise.dtype)


__all__ = ["sample", "SAMPLERS", "GRIDS", "Method", "register", "NoiseSource", "BudgetExceeded", "auto_method",
           "build_grid", "calibrate", "SolverPlan", "PlanError"]

def _register_all() -> None:
    """Import every module of this package: each registers its methods with ``@register``."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_register_all()

from .calibrate import calibrate  # noqa: E402  (after the registry: it uses it)
from .plan import PlanError, SolverPlan  # noqa: E402
