"""Sigma grids: decreasing 1-D float64 tensors of noise levels that end at 0.

All grids live in EDM/VE variables (``x = x0 + sigma * eps``). A grid for ``n`` steps
has ``n + 1`` entries: ``n`` noise levels from ``sigma_max`` down to ``sigma_min`` and a
final 0, so a sampler that takes one model call per step spends exactly ``n`` calls.

Every grid is a plain function ``grid(n, sigma_min, sigma_max, **options)``. Grids defined
on a model's own time variable (``linspace``/``leading``/``trailing``, ``sgm_uniform``,
``beta`` in its paper form) also take ``model_schedule=`` (a ``pipeline.denoisers``
``NoiseSchedule``: ``VPDiscrete``, ``VPContinuous``, ``Flow``, ...).

Infinite noise levels. A zero-terminal-SNR VP schedule (Lin et al. 2024) has sigma = inf at its
last training step: ``VPDiscrete`` clamps it to ``SIGMA_INF_CLAMP`` = 4096 = sqrt((1 - 2^-24) / 2^-24),
as diffusers does for ``rescale_betas_zero_snr``, and sigma-space grids clamp an infinite
``sigma_max`` to the same value. The ``flow`` grid with ``sigma_max = inf`` (and an explicit grid
whose first entry is inf) keeps the infinity: ``sample()`` then takes the first step as its exact
limit, ``x_1 = D(noise at sigma -> inf) + sigma_1 * noise``, and gives the rest to the method.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import torch

from .errors import ParameterError

Grid = Callable[..., torch.Tensor]

SIGMA_INF_CLAMP = 4096.0


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _finite(sigma: float) -> float:
    return min(float(sigma), SIGMA_INF_CLAMP)


def _need(model_schedule: Any, grid: str, attr: str) -> Any:
    if model_schedule is None or not hasattr(model_schedule, attr):
        raise ParameterError("model_schedule", f"grid {grid!r} needs the model's noise schedule "
                         f"(an object with .{attr}, e.g. pipeline.denoisers.VPDiscrete), got {model_schedule!r}")
    return model_schedule


# ---------------------------------------------------------------- sigma-space grids
def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 ("Elucidating the Design Space...", eq. 5): uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), _finite(sigma_max) ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log(sigma), i.e. uniform in log-SNR (the DPM-Solver paper's "logSNR" grid)."""
    return _append_zero(torch.linspace(math.log(_finite(sigma_max)), math.log(sigma_min), n,
                                       dtype=torch.float64).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polyexponential grid: log(sigma) on a rho-warped ramp (rho=1 is `exponential`)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    lo, hi = math.log(sigma_min), math.log(_finite(sigma_max))
    return _append_zero(torch.exp(ramp * (hi - lo) + lo))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sabour, Fidler & Kreis 2024 ("Align Your Steps", the KL-optimal grid of its appendix):
    uniform in arctan(sigma), ``sigma_i = tan((1 - u_i) atan(sigma_max) + u_i atan(sigma_min))``."""
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    return _append_zero(torch.tan((1 - u) * math.atan(_finite(sigma_max)) + u * math.atan(sigma_min)))


def _beta_ppf(q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    from scipy.special import (
        betaincinv,  # scipy ships with scikit-learn; imported lazily
    )
    return torch.as_tensor(betaincinv(a, b, q.numpy()), dtype=torch.float64)


def beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6,
         model_schedule: Any = None) -> torch.Tensor:
    """Lee et al. 2024, "Beta Sampling is All You Need": step positions at Beta(alpha, beta) quantiles.

    With a ``model_schedule`` the quantiles are placed in the model's time (the paper's form);
    without, they are placed linearly in sigma between sigma_min and sigma_max (diffusers'
    ``use_beta_sigmas``). Dense steps at both ends, sparse in the middle.
    """
    q = _beta_ppf(1 - torch.linspace(0, 1, n, dtype=torch.float64), alpha, beta)
    if model_schedule is None:
        return _append_zero(sigma_min + q * (_finite(sigma_max) - sigma_min))
    return _time_ramp(model_schedule, q, sigma_min, sigma_max, "beta")


def _time_ramp(ms: Any, q: torch.Tensor, sigma_min: float, sigma_max: float, grid: str) -> torch.Tensor:
    """Sigmas at fractions ``q`` (1 = sigma_max, 0 = sigma_min) of the model's time axis."""
    ms = _need(ms, grid, "sigma")
    lo, hi = (ms.t(torch.tensor([s], dtype=torch.float64)).item() for s in (sigma_min, _finite(sigma_max)))
    return _append_zero(ms.sigma(lo + q * (hi - lo)).to(torch.float64).clamp(max=SIGMA_INF_CLAMP))


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, model_schedule: Any = None) -> torch.Tensor:
    """ComfyUI's ``sgm_uniform`` (Stability's generative-models "uniform" discretisation):
    ``n + 1`` points uniform in the model's time from t(sigma_max) to t(sigma_min), the last
    one dropped, then 0 appended."""
    q = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
    return _time_ramp(model_schedule, q, sigma_min, sigma_max, "sgm_uniform")


# ---------------------------------------------------------------- discrete-VP timestep spacings
def _discrete_sigmas(model_schedule: Any, grid: str) -> torch.Tensor:
    return _need(model_schedule, grid, "sigmas").sigmas.to(torch.float64).clamp(max=SIGMA_INF_CLAMP)


def linspace(n: int, sigma_min: float, sigma_max: float, model_schedule: Any = None) -> torch.Tensor:
    """diffusers' ``timestep_spacing="linspace"`` (Lin et al. 2024, Table 2): timesteps
    ``round(linspace(0, T-1, n+1))`` reversed, the last (t=0) dropped; sigma_min/max are the model's."""
    table = _discrete_sigmas(model_schedule, "linspace")
    ts = torch.linspace(0, len(table) - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1].long()
    return _append_zero(table[ts])


def leading(n: int, sigma_min: float, sigma_max: float, model_schedule: Any = None,
            steps_offset: int = 0) -> torch.Tensor:
    """diffusers' ``timestep_spacing="leading"`` (as in its DPM-Solver/UniPC schedulers):
    ``arange(n + 1) * (T // (n + 1)) + steps_offset`` reversed, the first dropped; SD 1.x configs use
    steps_offset=1. The grid never starts at the last training step (Lin et al. 2024 call that a flaw)."""
    table = _discrete_sigmas(model_schedule, "leading")
    ts = (torch.arange(n + 1) * (len(table) // (n + 1))).flip(0)[:-1] + steps_offset
    return _append_zero(table[ts.clamp(0, len(table) - 1)])


def trailing(n: int, sigma_min: float, sigma_max: float, model_schedule: Any = None) -> torch.Tensor:
    """diffusers' ``timestep_spacing="trailing"`` (Lin et al. 2024): ``round(arange(T, 0, -T/n)) - 1``;
    starts at the last training step, which zero-terminal-SNR models need."""
    table = _discrete_sigmas(model_schedule, "trailing")
    T = len(table)
    ts = (torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1).long()[:n]
    return _append_zero(table[ts])


# ---------------------------------------------------------------- Align Your Steps
AYS_TABLES: dict[str, tuple[float, ...]] = {
    # Sabour, Fidler & Kreis 2024, "Align Your Steps", the 10-step sigmas published by NVIDIA
    # (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html); the 11th value is the
    # model's sigma_min, which the 10-step grid replaces with 0.
    "ays_sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "ays_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "ays_svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def loglinear_interp(values: Sequence[float], num: int) -> torch.Tensor:
    """Resample a decreasing positive sequence to ``num`` points, linearly in log-value over a
    uniform index axis (the AYS paper's recipe for other step counts)."""
    ys = torch.tensor(values, dtype=torch.float64).log()
    xs = torch.linspace(0, 1, len(ys), dtype=torch.float64)
    new = torch.linspace(0, 1, num, dtype=torch.float64)
    idx = torch.searchsorted(xs, new).clamp(1, len(xs) - 1)
    w = (new - xs[idx - 1]) / (xs[idx] - xs[idx - 1])
    return (ys[idx - 1] + w * (ys[idx] - ys[idx - 1])).exp()


def _ays(table: str) -> Grid:
    def grid(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
        sig = loglinear_interp(AYS_TABLES[table], n + 1)
        sig[-1] = 0.0
        return sig
    grid.__name__ = table
    grid.__doc__ = (f"Align Your Steps (Sabour et al. 2024) table {table!r}, log-linearly interpolated to n "
                    "steps; the model's own sigma range is built in, so sigma_min/sigma_max are ignored.")
    return grid


# ---------------------------------------------------------------- rectified flow
def flow_shift_for_resolution(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                              base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """SD3/Flux resolution-dependent shift: ``mu`` linear in the latent sequence length, shift = e^mu."""
    if image_seq_len < 1:
        raise ParameterError("image_seq_len", f"must be >= 1, got {image_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + m * (image_seq_len - base_seq_len))


def flow(n: int, sigma_min: float, sigma_max: float, shift: float = 1.0,
         image_seq_len: int | None = None) -> torch.Tensor:
    """Rectified-flow grid (Esser et al. 2024, SD3): uniform in flow time t, then shifted
    ``t -> shift t / (1 + (shift - 1) t)`` (sigma -> shift * sigma, with sigma = t / (1 - t)).

    The shifted grid spans [sigma_min, sigma_max] exactly; with ``image_seq_len`` the shift is
    resolution-dependent (``flow_shift_for_resolution``, Flux defaults) instead of static.
    ``sigma_max = inf`` starts the grid at t = 1 exactly (pure noise); ``sample()`` takes that
    first step as its exact limit (see ``pipeline.samplers.sample``).
    """
    if image_seq_len is not None:
        shift = flow_shift_for_resolution(image_seq_len)
    if not shift > 0:
        raise ParameterError("shift", f"must be > 0, got {shift}")
    t_hi = 1.0 if math.isinf(sigma_max) else sigma_max / shift / (1 + sigma_max / shift)
    t_lo = sigma_min / shift / (1 + sigma_min / shift)
    t = torch.linspace(t_hi, t_lo, n, dtype=torch.float64)
    ts = shift * t / (1 + (shift - 1) * t)
    return _append_zero(ts / (1 - ts))        # t = 1 gives sigma = inf


def flow_uniform(n: int, sigma_min: float, sigma_max: float, shift: float = 1.0,
                 image_seq_len: int | None = None) -> torch.Tensor:
    """Rectified flow, uniform in t over the whole [0, t(sigma_max)] (``n + 1`` points, the last at
    t = 0), then shifted like ``flow``: diffusers' ``use_flow_sigmas`` grid (DPM-Solver/UniPC for
    SD3/Wan). sigma_min is ignored: the last nonzero level is the shifted t_max / n."""
    if image_seq_len is not None:
        shift = flow_shift_for_resolution(image_seq_len)
    if not shift > 0:
        raise ParameterError("shift", f"must be > 0, got {shift}")
    t_hi = 1.0 if math.isinf(sigma_max) else sigma_max / shift / (1 + sigma_max / shift)
    t = torch.linspace(t_hi, 0, n + 1, dtype=torch.float64)[:-1]
    ts = shift * t / (1 + (shift - 1) * t)
    return _append_zero(ts / (1 - ts))


# ---------------------------------------------------------------- zero terminal SNR
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (sigma = infinity) while
    the first is unchanged. Models trained this way need a grid that starts at the last
    training step (``trailing``); the infinite sigma is clamped to ``SIGMA_INF_CLAMP``."""
    ab = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    a0, aT = ab[0].clone(), ab[-1].clone()
    ab = (ab - aT) * a0 / (a0 - aT)
    ac = ab ** 2
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return 1 - ac / ac_prev


INF_GRIDS = frozenset({"flow", "flow_uniform"})   # grids that start at sigma = inf when sigma_max is inf
# grids on a discrete model's own time axis: they need its NoiseSchedule (model_schedule=)
MODEL_TIME_GRIDS = frozenset({"linspace", "leading", "trailing", "sgm_uniform"})

GRIDS: dict[str, Grid] = {
    "karras": karras,
    "exponential": exponential,
    "logsnr_uniform": exponential,
    "polyexponential": polyexponential,
    "kl_optimal": kl_optimal,
    "beta": beta,
    "sgm_uniform": sgm_uniform,
    "linspace": linspace,
    "leading": leading,
    "trailing": trailing,
    "flow": flow,
    "flow_uniform": flow_uniform,
    **{name: _ays(name) for name in AYS_TABLES},
}


def check_grid(sigmas: torch.Tensor, name: str = "schedule") -> torch.Tensor:
    """Validate a grid: strictly decreasing, 1-D, >= 2 entries, finite except possibly the first (+inf)."""
    sigmas = torch.as_tensor(sigmas).detach().to(torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()) or bool((sigmas < 0).any()) \
            or not bool(torch.isfinite(sigmas[1:]).all()) or bool(torch.isnan(sigmas).any()):
        raise ParameterError(name, f"an explicit sigma grid must be a strictly decreasing 1-D tensor of "
                         f"non-negative values with at least 2 entries, got {sigmas.tolist()}")
    return sigmas


def check_budget(name: str, n, sigma_min: float, sigma_max: float) -> None:
    """``n`` (steps or model calls, named ``name``) is an integer >= 1 and 0 < sigma_min < sigma_max."""
    if not isinstance(n, int) or n < 1:
        raise ParameterError(name, f"must be an integer >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ParameterError("sigma_min/sigma_max", f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


def get_sigmas(schedule: str | torch.Tensor, n: int, sigma_min: float, sigma_max: float,
               model_schedule: Any = None, **options) -> torch.Tensor:
    """Build the grid named ``schedule`` for ``n`` steps, or check an explicit grid.

    An explicit grid must be a decreasing 1-D tensor; a trailing 0 is appended if missing.
    ``model_schedule`` goes to the grids that need the model's time axis; ``options`` are the
    grid's own parameters (``rho``, ``shift``, ``image_seq_len``, ``alpha``/``beta``, ...).
    """
    if isinstance(schedule, torch.Tensor):
        sigmas = check_grid(schedule)
        return sigmas if float(sigmas[-1]) == 0.0 else _append_zero(sigmas)
    if schedule not in GRIDS:
        raise ParameterError("schedule", f"unknown grid {schedule!r}; allowed: {sorted(GRIDS)} or a 1-D tensor")
    check_budget("n", n, sigma_min, sigma_max)
    fn = GRIDS[schedule]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        allowed = [p for p in params if p not in ("n", "sigma_min", "sigma_max", "model_schedule")]
        raise ParameterError("schedule options", f"{unknown} not accepted by grid {schedule!r}; allowed: {allowed}")
    if "model_schedule" in params:
        options["model_schedule"] = model_schedule
    sigmas = fn(n, sigma_min, sigma_max, **options)
    return check_grid(sigmas, f"schedule {schedule!r}")
