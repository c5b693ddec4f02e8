"""Samplers built around others: Restart sampling, heavy-ball momentum, time-shifted DDIM."""
from __future__ import annotations

import math

import torch

from ..errors import ParameterError
from ..schedules import karras
from .registry import SAMPLERS, register
from .basic import _sigma_batch, report
from .planned import plan_multistep

# ---------------------------------------------------------------- Restart sampling
RESTART_DEFAULTS = {"inner": "heun", "t_min": 0.06, "t_max": 0.30, "K": 1, "restart_steps": 3}


def _inner(options: dict):
    name = options.get("inner", RESTART_DEFAULTS["inner"])
    spec = SAMPLERS.get(name)
    if spec is None or spec.planner is not None or spec.counter is not None or name == "restart":
        simple = sorted(k for k, v in SAMPLERS.items() if v.planner is None and v.counter is None)
        raise ParameterError("inner", f"restart needs an ODE method with a fixed cost per step; allowed: {simple}")
    return spec


def _restart_calls(steps: int, ends_at_zero: bool, options: dict) -> int:
    spec, o = _inner(options), {**RESTART_DEFAULTS, **options}
    return spec.calls(steps, ends_at_zero) + int(o["K"]) * spec.calls(int(o["restart_steps"]), False)


def _restart_plan(nfe: int, ends_at_zero: bool, options: dict) -> tuple[int, dict]:
    """As many main-grid steps as fit after the K restarts; K drops to 0 when even one step does not fit."""
    if _restart_calls(1, ends_at_zero, options) > nfe:
        return _inner(options).plan(nfe, ends_at_zero)[0], {"K": 0}
    steps = 1
    while _restart_calls(steps + 1, ends_at_zero, options) <= nfe:
        steps += 1
    return steps, {}


@register("restart", stochastic=True, planner=_restart_plan, counter=_restart_calls)
def restart(denoiser, x, sigmas, *, noise=None, on_step=None, inner: str = "heun", t_min: float = 0.06,
            t_max: float = 0.30, K: int = 1, restart_steps: int = 3, **inner_options):
    """Restart sampling, Xu et al. 2023 ("Restart Sampling for Improving Generative Processes").

    Runs the ODE method ``inner`` down the grid to the level nearest ``t_min``; then ``K`` times:
    jump forward to ``t_max`` by adding per-row noise of std ``sqrt(t_max^2 - t_min^2)`` and solve the
    ODE back to ``t_min`` on a ``restart_steps``-step Karras grid; then finish the grid. The extra
    calls come out of the same NFE budget (``sample()`` shortens the main grid). The defaults are the
    first restart segment of the paper's EDM setting ([0.06, 0.30], 3 Heun steps); wide intervals
    need more inner steps, or the coarse backward solve inflates the variance.
    """
    fn = SAMPLERS[inner].fn
    run = lambda x, grid: fn(denoiser, x, grid, noise=noise, on_step=None, **inner_options)  # noqa: E731
    nonzero = sigmas[:-1] if float(sigmas[-1]) == 0 else sigmas
    j = int((nonzero - t_min).abs().argmin())            # the grid level where restarts happen
    s_j = sigmas[j]
    if j > 0:
        x = run(x, sigmas[: j + 1])                       # main ODE down to t_min
    if t_max > float(s_j) and K > 0 and j < len(sigmas) - 1:
        loop = karras(restart_steps + 1, float(s_j), t_max)[:-1].to(sigmas)
        for _ in range(K):
            # forward jump: per-row noise from t_min up to t_max, then the ODE back down
            x = x + noise(x) * (loop[0] ** 2 - s_j ** 2).sqrt().to(x.dtype)
            x = run(x, loop)
    if j < len(sigmas) - 1:
        x = run(x, sigmas[j:])                            # finish the main grid
    report(on_step, len(sigmas) - 2, sigmas, x, x)
    return x


# ---------------------------------------------------------------- heavy-ball momentum
def _momentum(beta: float) -> float:
    if not 0 < beta <= 1:
        raise ParameterError("beta", f"momentum coefficient must be in (0, 1], got {beta}")
    return beta


@register("euler_hb")
def euler_hb(denoiser, x, sigmas, *, noise=None, on_step=None, beta: float = 0.8):
    """Euler/DDIM with Polyak heavy-ball momentum on its data estimate (Wizadwongsa et al. 2023,
    "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", PHB): ``v = (1 - beta) v
    + beta D``, ``x' = (sigma'/sigma) x + (1 - sigma'/sigma) v``; beta = 1 is DDIM, smaller beta damps
    the oscillations of high guidance. ``plan_multistep`` with order 1 and momentum."""
    return plan_multistep(denoiser, x, sigmas, order=1, beta=_momentum(beta), on_step=on_step)


@register("dpmpp_2m_hb")
def dpmpp_2m_hb(denoiser, x, sigmas, *, noise=None, on_step=None, beta: float = 0.8):
    """DPM-Solver++(2M) with heavy-ball momentum on its multistep estimate (Wizadwongsa et al. 2023);
    see ``euler_hb``."""
    return plan_multistep(denoiser, x, sigmas, order=2, beta=_momentum(beta), on_step=on_step)


# ---------------------------------------------------------------- time-shifted sampling
def matched_sigma(x: torch.Tensor, sigma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per row, the noise level whose VP variance ``sigma'^2 / (1 + sigma'^2)`` equals the variance of
    the current sample in VP space, ``var(x) / (1 + sigma^2)`` (Li et al. 2024), clipped to [lo, hi]."""
    # per-row variance one row at a time (a batched reduction can depend on the batch size)
    v = torch.stack([row.var() for row in x.flatten(1).to(torch.float64)]) / (1 + sigma.to(torch.float64) ** 2)
    s = (v / (1 - v).clamp(min=1e-12)).sqrt()
    return torch.minimum(torch.maximum(s, lo.to(s)), hi.to(s))


@register("ddim_ts", schedule="karras")
def ddim_ts(denoiser, x, sigmas, *, noise=None, on_step=None, window: float = 0.25, cutoff: float = 0.5):
    """Time-shifted DDIM, Li et al. 2024 ("Alleviating Exposure Bias in Diffusion Models through
    Sampling with Shifted Time Steps", TS-DDIM).

    While sigma > ``cutoff``, each step replaces the nominal level by the one, within a window of
    ``+- window * h`` in log-sigma (h = this step's log-sigma length), whose noise variance best
    matches the current sample's (``matched_sigma``, per row); the model is evaluated there and the
    DDIM step ``x' = D + (sigma'/sigma_ts) (x - D)`` starts from it. Below the cutoff it is plain DDIM.
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        s_row = _sigma_batch(s, x).to(torch.float64)
        if float(s) > cutoff and s_next > 0:
            # shifted time step: match the sample's variance inside the window
            h = float(s.log() - s_next.log())
            s_row = matched_sigma(x, s_row, s * math.exp(-window * h), s * math.exp(window * h))
        denoised = denoiser(x, s_row.to(x.dtype))
        ratio = (s_next / s_row).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x = denoised + ratio * (x - denoised)                 # DDIM step from the (shifted) level
        report(on_step, i, sigmas, x, denoised)
    return x
