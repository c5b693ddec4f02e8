"""Single-step higher-order solvers: Heun, DPM-2, DPM-Solver-1/2/3 and DPM-Solver++(2S).

All work in EDM variables over a decreasing grid. With lambda = -log(sigma), the
noise-prediction exponential integrator of Lu et al. 2022 (DPM-Solver) written in EDM
variables loses its alpha factors: ``x_t = x_s - sigma_t (e^h - 1) eps_s = x_s + (sigma_t - sigma_s) eps_s``
for first order, with ``eps = (x - D(x, sigma)) / sigma``. A step to sigma = 0 has an infinite h,
so every solver here ends with one first-order call there (``x = D``).
"""
from __future__ import annotations

import torch

from ..errors import ParameterError
from .registry import register
from .basic import _sigma_batch, ancestral_step, report


def _eps(denoiser, x, sigma):
    """(denoised, eps) at a scalar noise level ``sigma``."""
    d = denoiser(x, _sigma_batch(sigma, x))
    return d, (x - d) / sigma.to(x.dtype)


@register("heun", calls_per_step=2, final_step_calls=1)
def heun(denoiser, x, sigmas, *, noise=None, on_step=None):
    """Heun's 2nd-order method, Karras et al. 2022 ("Elucidating the Design Space...", Alg. 1).

    ``d = (x - D(x, s)) / s``; Euler predictor ``x' = x + (s' - s) d``; trapezoidal corrector
    ``x = x + (s' - s) (d + d') / 2``. The last step to sigma 0 is plain Euler (one call).
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised, d = _eps(denoiser, x, s)
        dt = (s_next - s).to(x.dtype)
        if s_next == 0:
            x = x + d * dt                          # final Euler step: x = D
        else:
            x_pred = x + d * dt                     # Euler predictor
            _, d2 = _eps(denoiser, x_pred, s_next)
            x = x + (d + d2) * dt / 2               # trapezoidal corrector
        report(on_step, i, sigmas, x, denoised)
    return x


def _dpm_solver_step(denoiser, x, s, t, order, eps_s):
    """One DPM-Solver step of ``order`` 1-3 from sigma ``s`` to ``t > 0`` (Lu et al. 2022, Alg. 1-2).

    Intermediate points sit at fractions r1 (= 1/2 for order 2; 1/3 and r2 = 2/3 for order 3) of
    h in lambda. Order 2 (r1 = 1/2): ``x_t = x_s - sigma_t (e^h - 1) eps(u1)``. Order 3:
    ``u2 = x_s - sigma_s2 (e^{r2 h} - 1) eps_s - sigma_s2 (r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) D1``,
    ``x_t = x_s - sigma_t (e^h - 1) eps_s - (sigma_t / r2) ((e^h - 1)/h - 1) D2`` with ``Dk = eps(uk) - eps_s``.
    """
    h = (s.log() - t.log()).to(torch.float64)
    sig = lambda r: (s.to(torch.float64) * torch.exp(-r * h))  # noqa: E731  sigma at lambda_s + r h
    phi = lambda r: torch.expm1(r * h)                          # noqa: E731  e^{r h} - 1
    c = lambda v: v.to(x.dtype)                                # noqa: E731
    if order == 1:
        return x - c(t * phi(1)) * eps_s
    if order == 2:
        s1 = sig(0.5)
        u1 = x - c(s1 * phi(0.5)) * eps_s
        _, e1 = _eps(denoiser, u1, s1)
        return x - c(t * phi(1)) * e1
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = sig(r1), sig(r2)
    u1 = x - c(s1 * phi(r1)) * eps_s
    _, e1 = _eps(denoiser, u1, s1)
    u2 = x - c(s2 * phi(r2)) * eps_s - c(s2 * (r2 / r1) * (phi(r2) / (r2 * h) - 1)) * (e1 - eps_s)
    _, e2 = _eps(denoiser, u2, s2)
    return x - c(t * phi(1)) * eps_s - c(t / r2 * (phi(1) / h - 1)) * (e2 - eps_s)


def lu_orders(order: int, nfe: int) -> list[int]:
    """Per-step orders for DPM-Solver-``order`` with ``nfe`` calls (Lu et al. 2022, sec. 3.4,
    "DPM-Solver-fast"): as many order-k steps as fit, the remainder as one lower-order step."""
    if nfe < 1:
        return []
    if order == 3:
        k, rem = divmod(nfe, 3)
        return [3] * (k - 1) + [2, 1] if rem == 0 and k >= 1 else [3] * k + ([rem] if rem else [])
    if order == 2:
        return [2] * (nfe // 2) + ([1] if nfe % 2 else [])
    return [1] * nfe


def _dpm_orders_plan(order: int):
    """Planner: Lu's orders for the calls left after the final denoising step (if ending at 0)."""
    def planner(nfe: int, ends_at_zero: bool, options: dict) -> tuple[int, dict]:
        if options.get("orders") is not None:            # the caller's own orders fix the grid
            return len(options["orders"]), {}
        orders = lu_orders(order, nfe - 1 if ends_at_zero else nfe) + ([1] if ends_at_zero else [])
        return len(orders), {"orders": orders}
    return planner


def _dpm_orders_count(order: int):
    def counter(steps: int, ends_at_zero: bool, options: dict) -> int:
        orders = options.get("orders") or _default_orders(order, steps, ends_at_zero)
        return sum(orders)
    return counter


def _default_orders(order: int, steps: int, ends_at_zero: bool) -> list[int]:
    return [order] * (steps - 1) + [1 if ends_at_zero else order]


def dpm_solver(denoiser, x, sigmas, *, noise=None, on_step=None, order=3, orders=None):
    """DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
    Sampling in Around 10 Steps"), singlestep, noise-prediction form, in EDM variables.

    ``orders[i]`` is step i's order (1-3); by default ``order`` everywhere, first order on a
    last step to sigma 0. ``sample()`` plans Lu's DPM-Solver-fast orders from the NFE budget.
    """
    n = len(sigmas) - 1
    orders = list(orders) if orders is not None else _default_orders(order, n, float(sigmas[-1]) == 0)
    if len(orders) != n or any(o not in (1, 2, 3) for o in orders):
        raise ParameterError("orders", f"need {n} orders in 1..3 for a grid of {n} steps, got {orders}")
    for i in range(n):
        s, t = sigmas[i], sigmas[i + 1]
        denoised, eps_s = _eps(denoiser, x, s)
        # a step to sigma 0 returns the data prediction (h is infinite), else a DPM-Solver step
        x = denoised if t == 0 else _dpm_solver_step(denoiser, x, s, t, orders[i], eps_s)
        report(on_step, i, sigmas, x, denoised)
    return x


def _register_dpm_solver(k: int) -> None:
    def fn(denoiser, x, sigmas, *, noise=None, on_step=None, orders=None):
        return dpm_solver(denoiser, x, sigmas, noise=noise, on_step=on_step, order=k, orders=orders)
    fn.__name__ = f"dpm_solver_{k}"
    fn.__doc__ = f"DPM-Solver-{k} singlestep (Lu et al. 2022); see ``dpm_solver``."
    register(f"dpm_solver_{k}", schedule="exponential", calls_per_step=k,
             planner=_dpm_orders_plan(k), counter=_dpm_orders_count(k))(fn)


for _k in (1, 2, 3):
    _register_dpm_solver(_k)


@register("dpm_2", calls_per_step=2, final_step_calls=1)
def dpm_2(denoiser, x, sigmas, *, noise=None, on_step=None):
    """DPM-2 (k-diffusion's ``sample_dpm_2``, after Karras et al. 2022 Alg. 1 with the DPM-Solver-2
    midpoint): Euler to the log-sigma midpoint ``sigma_mid = sqrt(s s')``, then a full step with
    the midpoint's derivative ``x = x + (s' - s) d_mid``. Last step to sigma 0: Euler (x = D)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised, d = _eps(denoiser, x, s)
        if s_next == 0:
            x = denoised                                         # final Euler step
        else:
            s_mid = (s.log() * 0.5 + s_next.log() * 0.5).exp()
            x_mid = x + d * (s_mid - s).to(x.dtype)             # half step to the midpoint
            _, d_mid = _eps(denoiser, x_mid, s_mid)
            x = x + d_mid * (s_next - s).to(x.dtype)             # full step with the midpoint slope
        report(on_step, i, sigmas, x, denoised)
    return x


def _dpmpp_2s_step(denoiser, x, s, t, denoised):
    """DPM-Solver++(2S) step (Lu et al. 2022b, Alg. 1, r = 1/2) from ``s`` to ``t > 0``:
    ``u = (sigma_r / s) x - expm1(-h/2) D_s``, ``x_t = (t / s) x - expm1(-h) D(u, sigma_r)``."""
    h = (s.log() - t.log()).to(torch.float64)
    s_mid = s.to(torch.float64) * torch.exp(-0.5 * h)
    u = (s_mid / s).to(x.dtype) * x - torch.expm1(-0.5 * h).to(x.dtype) * denoised
    d_mid = denoiser(u, _sigma_batch(s_mid, x))
    return (t / s).to(x.dtype) * x - torch.expm1(-h).to(x.dtype) * d_mid


@register("dpmpp_2s", schedule="karras", calls_per_step=2, final_step_calls=1)
def dpmpp_2s(denoiser, x, sigmas, *, noise=None, on_step=None):
    """DPM-Solver++(2S), Lu et al. 2022b ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models"), singlestep data-prediction second order; last step to 0 returns D."""
    return dpmpp_2s_ancestral(denoiser, x, sigmas, noise=noise, on_step=on_step, eta=0.0)


@register("dpmpp_2s_ancestral", stochastic=True, calls_per_step=2, final_step_calls=1)
def dpmpp_2s_ancestral(denoiser, x, sigmas, *, noise=None, on_step=None, eta: float = 1.0):
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``): a 2S step to
    ``sigma_down``, then per-row fresh noise of std ``sigma_up`` (see ``ancestral_step``)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _sigma_batch(s, x))
        down, up = ancestral_step(s, s_next, eta)
        # deterministic part: 2S step to sigma_down (Euler/denoise if it is 0)
        x = denoised if down == 0 else _dpmpp_2s_step(denoiser, x, s, down, denoised)
        # stochastic part: fresh per-row noise
        if up > 0:
            x = x + noise(x) * up.to(x.dtype)
        report(on_step, i, sigmas, x, denoised)
    return x


__all__ = ["heun", "dpm_2", "dpm_solver", "lu_orders", "dpmpp_2s", "dpmpp_2s_ancestral"]
