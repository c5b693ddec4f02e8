"""Sampling: ``sample()`` over a named method and grid, a solver plan, or ``auto``; budget checks.

``sample`` takes the grid's settings (``schedule``, ``final``, ``schedule_options``,
``model_schedule``) as named parameters and passes every other keyword to the method, as
k-diffusion keeps ``extra_args`` apart from a sampler's own options.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
from typing import Callable, Sequence

import torch

from ..denoisers import VPDiscrete
from ..errors import ParameterError
from ..schedules import INF_GRIDS, MODEL_TIME_GRIDS, check_budget, get_sigmas
from .noise import NoiseSource
from .plan import SolverPlan
from .planned import plan_multistep
from .registry import FINAL_POLICIES, SAMPLERS, BudgetExceeded


def _count_calls(denoiser: Callable, budget: int) -> Callable:
    """``denoiser``, refusing to be called more than ``budget`` times (``BudgetExceeded``)."""
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
    guidance scale and budget of ``nfe`` calls.

    DPM-Solver++(2M) (Lu et al. 2022) on Karras sigmas, or on the shifted flow grid diffusers uses for
    flow models (``flow_uniform``), at every guidance scale and NFE: ``bench/auto_rule.py`` tried nine
    other (method, grid) pairs on 64 random exact problems (VP, EDM and flow schedules, guidance 1-9,
    NFE 5-20), and each one that is better on average is worse than this on some problem; only a
    calibrated plan (``calibrate``) is better everywhere it is accepted. ``guidance`` is part of the
    rule's interface for that reason: no fixed choice was safe at any guidance scale.
    """
    if kind == "flow":
        return "dpmpp_2m", "flow_uniform", {}
    return "dpmpp_2m", "karras", {}


def build_grid(method: str, nfe: int, sigma_min: float, sigma_max: float,
               schedule: str | torch.Tensor | None = None, final: str = "zero", model_schedule=None,
               schedule_options: dict | None = None, options: dict | None = None) -> tuple[torch.Tensor, dict]:
    """The sigma grid ``sample`` integrates over and the extra options the method's plan adds.

    ``final="zero"`` ends the grid at sigma 0 (the last step returns a clean estimate);
    ``final="sigma_min"`` ends it at the last nonzero level without a final denoising step,
    as diffusers' ``final_sigmas_type="sigma_min"``: the result keeps noise of std sigma_min.
    """
    if final not in FINAL_POLICIES:
        raise ParameterError("final", f"unknown final-step policy {final!r}; allowed: {FINAL_POLICIES}")
    spec, zero = SAMPLERS[method], final == "zero"
    if isinstance(schedule, torch.Tensor):
        sigmas = get_sigmas(schedule, 0, sigma_min, sigma_max)
        sigmas = sigmas if zero else sigmas[:-1]
        if len(sigmas) < 2:
            raise ParameterError("schedule", "the explicit grid has no step left with final='sigma_min'")
        extra = {}
    else:
        name = spec.schedule if schedule is None else schedule
        inf = int(math.isinf(sigma_max) and name in INF_GRIDS)      # grid starts at t = 1: one limit step
        if nfe - inf < 1:
            raise ParameterError("nfe", f"a grid from sigma = inf needs nfe >= 2, got {nfe}")
        steps, extra = spec.plan(nfe - inf, zero, options)
        sigmas = get_sigmas(name, steps + inf + (0 if zero else 1), sigma_min, sigma_max,
                            model_schedule=model_schedule, **(schedule_options or {}))
        sigmas = sigmas if zero else sigmas[:-1]
        if spec.calls(len(sigmas) - 1 - inf, zero, {**(options or {}), **extra}) > nfe - inf:
            raise ParameterError("nfe", f"{method!r} needs at least {spec.calls(1, zero, options) + inf} calls "
                             f"with final={final!r}, got nfe={nfe}")
    inf = int(math.isinf(float(sigmas[0])))
    steps = len(sigmas) - 1 - inf
    if steps < 1 or spec.calls(steps, zero, {**(options or {}), **extra}) > nfe - inf:
        raise ParameterError("schedule", f"the grid has {steps} steps, more than nfe={nfe} allows "
                         f"for {method!r} ({spec.calls_per_step} call(s) per step)")
    return sigmas, extra


def sample(denoiser: Callable, noise: torch.Tensor, method: str | SolverPlan = "dpmpp_2m", nfe: int = 10,
           sigma_min: float = 0.0292, sigma_max: float = 14.6146,
           schedule: str | torch.Tensor | None = None, *, final: str = "zero",
           schedule_options: dict | None = None, model_schedule=None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           on_step: Callable[[dict], None] | None = None,
           **options) -> torch.Tensor:
    """Draw samples: scale standard-normal ``noise`` to ``sigma_max`` and integrate to sigma 0.

    ``nfe`` is a budget of denoiser calls (one call = one batched evaluation); a method that
    cannot spend it exactly uses fewer. The grid: ``schedule`` (a name, or an explicit decreasing
    tensor; None: the method's own), ``final`` (``"zero"``: end with a clean estimate;
    ``"sigma_min"``: stop at sigma_min without the last denoising step), ``schedule_options`` (the
    grid's own parameters: ``rho``, ``shift``, ...) and ``model_schedule`` (the model's
    ``NoiseSchedule``, for grids on its time axis and for ``auto``). ``generator`` (one per row, or
    one for the batch) feeds stochastic methods so their output is reproducible per row.
    ``on_step`` is called after each step with a dict (``i``, ``sigma``, ``sigma_next``, ``x``,
    ``denoised``), as k-diffusion's ``callback``. Every other keyword is an option of the method
    (e.g. ``eta`` for DDIM).

    ``method="auto"`` takes the (method, grid) of ``auto_method`` for the model's schedule kind
    (``model_schedule.kind``); an explicit ``schedule`` still overrides its grid. ``method`` may also
    be a ``SolverPlan`` (its own grid and parameters; ``nfe`` and the sigma range must be the plan's).
    An infinite ``sigma_max`` is clamped to ``pipeline.schedules.SIGMA_INF_CLAMP`` (4096).
    """
    if isinstance(method, SolverPlan):
        if options or final != "zero" or schedule is not None:
            given = sorted(options) + (["final"] if final != "zero" else []) + (["schedule"] if schedule is not None else [])
            raise ParameterError("options", f"a solver plan fixes its own grid and options, got {given}")
        return _sample_plan(method, denoiser, noise, nfe, sigma_min, sigma_max, generator, on_step)
    if method == "auto" and isinstance(nfe, int) and nfe >= 1:
        method, auto_grid, auto_opts = auto_method(nfe, kind=getattr(model_schedule, "kind", "ve"))
        schedule = auto_grid if schedule is None else schedule
        options = {**auto_opts, **options}
    if method not in SAMPLERS:
        raise ParameterError("method", f"unknown sampler {method!r}; allowed: {sorted(SAMPLERS)} or 'auto'")
    check_budget("nfe", nfe, sigma_min, sigma_max)
    sigmas, extra = build_grid(method, nfe, sigma_min, sigma_max, schedule, final, model_schedule,
                               schedule_options, options)
    denoiser, source = _count_calls(denoiser, nfe), NoiseSource(generator)
    x, sigmas = _start(denoiser, noise, sigmas)
    return SAMPLERS[method].fn(denoiser, x, sigmas, noise=source, on_step=on_step, **{**extra, **options})


def _start(denoiser: Callable, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting state on ``sigmas`` and the grid left to integrate (a first step from sigma = inf
    is taken here, ``_step_from_infinity``)."""
    if math.isinf(float(sigmas[0])):
        return _step_from_infinity(denoiser, noise, sigmas), sigmas[1:]
    return noise * sigmas[0].to(noise.dtype), sigmas


SAMPLER_ARGS = ("denoiser", "x", "sigmas", "noise", "on_step")   # not options: every sampler takes these


def method_options(method: str) -> tuple[list[str], bool]:
    """(option names a registered method takes, whether it passes others on to an inner method)."""
    params = inspect.signature(SAMPLERS[method].fn).parameters.values()
    names = [p.name for p in params if p.name not in SAMPLER_ARGS and p.kind is not p.VAR_KEYWORD]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def check_method(method: str, nfe: int, schedule: str | None = None, options: dict | None = None,
                 final: str = "zero", schedule_options: dict | None = None) -> None:
    """Raise ``ParameterError`` (naming the option, ``schedule``, ``schedule_options``, ``nfe`` or
    ``final``) unless ``method`` runs with these options, grid and budget: option names against its
    signature, then a dry run of ``sample`` on a zero denoiser, cached per combination. Grids on a
    model's time axis are tried on the Stable Diffusion schedule."""
    options = options or {}
    names, passes_on = method_options(method)
    unknown = sorted(set(options) - set(names))
    if unknown and not passes_on:
        takes = f"it takes {names}" if names else "it takes none"
        raise ParameterError("options", f"{method!r} does not take option(s) {unknown}; {takes}")
    try:
        _dry_run(method, nfe, schedule, json.dumps(options, sort_keys=True, default=str), final,
                 json.dumps(schedule_options or {}, sort_keys=True, default=str))
    except TypeError as e:             # an option the method passes on (restart's inner method) that is unknown
        raise ParameterError("options", f"{method!r}: {e}") from None


SD_ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)


@functools.lru_cache(maxsize=4096)
def _dry_run(method: str, nfe: int, schedule: str | None, options_json: str, final: str, grid_json: str) -> None:
    model_schedule = VPDiscrete(SD_ALPHAS) if schedule in MODEL_TIME_GRIDS else None
    grid = json.loads(grid_json)
    try:
        build_grid(method, nfe, 0.0292, 14.6146, schedule, final, model_schedule, grid, json.loads(options_json))
    except TypeError as e:             # a parameter the grid does not take
        raise ParameterError("schedule_options", f"grid {schedule!r}: {e}") from None
    sample(lambda x, s: x * 0, torch.zeros(1, 2, dtype=torch.float64), method=method, nfe=nfe, schedule=schedule,
           final=final, schedule_options=grid, model_schedule=model_schedule, generator=torch.Generator(),
           **json.loads(options_json))


def _sample_plan(plan: SolverPlan, denoiser, noise, nfe, sigma_min, sigma_max, generator, on_step) -> torch.Tensor:
    """``sample`` with a ``SolverPlan``: its explicit grid and per-step parameters (``pipeline.samplers.plan``)."""
    plan.check(nfe, sigma_min, sigma_max)
    denoiser, source = _count_calls(denoiser, nfe), NoiseSource(generator)
    x, sigmas = _start(denoiser, noise, plan.grid().to(noise.device))
    if plan.calibrated:
        return plan_multistep(denoiser, x, sigmas, shifts=plan.shifts or None, gains=plan.gains or None,
                              base=plan.base, on_step=on_step)
    return SAMPLERS[plan.base].fn(denoiser, x, sigmas, noise=source, on_step=on_step, **plan.options)


SIGMA_INF_EVAL = 1e8


def _step_from_infinity(denoiser: Callable, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The exact limit of a first DDIM step from sigma = inf (rectified flow at t = 1, zero terminal
    SNR): ``x_1 = D_inf + sigma_1 * noise``, with ``D_inf`` the denoiser at ``noise * 1e8``, 1e8 (whose
    gap to the limit is O(1e-8)). It is one model call, taken before the method's own steps."""
    s = torch.full((noise.shape[0],), SIGMA_INF_EVAL, dtype=noise.dtype, device=noise.device)
    d_inf = denoiser(noise * SIGMA_INF_EVAL, s)
    return d_inf + noise * sigmas[1].to(noise.dtype)
