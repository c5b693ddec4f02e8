"""DPM-Solver++ family (data prediction, exponential integrators in log-sigma time)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import ParameterError
from .registry import register
from .multistep import ei_multistep
from .planned import plan_multistep


@register("dpmpp_2m")
def dpmpp_2m(denoiser, x, sigmas, *, noise=None, on_step=None):
    """DPM-Solver++(2M), Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling...", Alg. 2.

    With t = -log(sigma) and h = t_{i+1} - t_i the update is
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h) D_i`` where ``D_i`` is the second-order
    multistep estimate ``(1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``, ``r = h_{i-1} / h``. The first
    step and the final step to sigma = 0 are first order. Coefficients are float64. It is the
    calibrated plans' solver with no calibration (``pipeline.samplers.plan.plan_multistep``).
    """
    return plan_multistep(denoiser, x, sigmas, on_step=on_step)


def dpmpp_weights(lam_next: float, lams: list[float], eta: float = 0.0, solver_type: str = "heun",
                  third: str = "reference"):
    """Float64 weights ``(a, w)`` of one DPM-Solver++ multistep step, ``x' = a x + sum_j w_j D_{i-j}``.

    Lu et al. 2022, Alg. 2 and App. B (3M); with ``eta`` the SDE variant (``h_eta = (1 + eta) h``,
    k-diffusion's ``sample_dpmpp_{2,3}m_sde``). ``lams`` are the k newest lambdas, newest first.
    Second order: ``D0 + c (D0 - D1)/r`` with c = phi_2 ('heun') or -expm1(-h)/2 ('midpoint');
    third order: ``D0 + phi_2 d1 - c phi_3 d2`` from the two divided differences, where
    ``d2 ~ h^2 D''/2``. The Taylor term of the exact integral needs c = 2 (``third='taylor'``,
    third order); the reference code of Lu et al., diffusers and k-diffusion use c = 1
    (``third='reference'``), which is exact only for D linear in lambda, i.e. second order.
    """
    h = lam_next - lams[0]
    he = (1 + eta) * h
    w = np.zeros(len(lams))
    w[0] = -math.expm1(-he)
    phi_2 = math.expm1(-he) / he + 1
    if len(lams) == 2:
        r = (lams[0] - lams[1]) / h
        c = {"heun": phi_2, "midpoint": -0.5 * math.expm1(-he)}[solver_type]
        w += c / r * np.array([1.0, -1.0])
    elif len(lams) == 3:
        r0, r1 = (lams[0] - lams[1]) / h, (lams[1] - lams[2]) / h
        d1_0, d1_1 = np.array([1 / r0, -1 / r0, 0.0]), np.array([0.0, 1 / r1, -1 / r1])
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        w += phi_2 * d1 - {"taylor": 2.0, "reference": 1.0}[third] * (phi_2 / he - 0.5) * d2
    return math.exp(-he), w.tolist()


def _check(order: int, solver_type: str, third: str = "reference") -> None:
    if third not in ("taylor", "reference"):
        raise ParameterError("third", f"expected 'taylor' or 'reference', got {third!r}")
    if order not in (1, 2, 3):
        raise ParameterError("order", f"DPM-Solver++ multistep supports orders 1, 2, 3, got {order}")
    if solver_type not in ("heun", "midpoint"):
        raise ParameterError("solver_type", f"expected 'heun' or 'midpoint', got {solver_type!r}")


@register("dpmpp_3m")
def dpmpp_3m(denoiser, x, sigmas, *, noise=None, on_step=None, order: int = 3, solver_type: str = "heun",
             third: str = "reference", lower_order_final: bool = True):
    """DPM-Solver++(3M), Lu et al. 2022, App. B: third-order multistep exponential integrator on D.

    Warm-up with orders 1 and 2 (``solver_type`` picks the second-order form: 'heun' as
    k-diffusion, 'midpoint' as diffusers); with ``lower_order_final`` the last two steps use
    orders 2 and 1 (the step to sigma 0 returns D). ``third='reference'`` (default) is the weight of
    k-diffusion/diffusers, measured second order but more accurate below ~40 NFE on the mixture
    test problem; ``third='taylor'`` is the consistent third-order weight (see ``dpmpp_weights``).
    """
    _check(order, solver_type, third)
    return ei_multistep(denoiser, x, sigmas, order=order, on_step=on_step, lower_order_final=lower_order_final,
                        weights=lambda lam_next, lams, eta: dpmpp_weights(lam_next, lams, 0.0, solver_type, third))


@register("dpmpp_2m_sde", stochastic=True, steerable=True)
def dpmpp_2m_sde(denoiser, x, sigmas, *, noise=None, on_step=None, eta: float = 1.0, solver_type: str = "midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++, eq. for ``h_eta = (1 + eta) h``):
    ``x' = (sigma'/sigma) e^{-eta h} x - expm1(-h_eta) D0 + c (D0 - D1)/r + sigma' sqrt(1 - e^{-2 eta h}) z``.

    k-diffusion's ``sample_dpmpp_2m_sde``; z comes from the per-row ``noise`` source; the first step
    is first order and the step to sigma 0 returns D. eta=0 is the ODE solver (midpoint = dpmpp_2m).
    """
    _check(2, solver_type)
    return ei_multistep(denoiser, x, sigmas, order=2, noise=noise, on_step=on_step, eta=eta,
                        weights=lambda lam_next, lams, e: dpmpp_weights(lam_next, lams, e, solver_type))


@register("dpmpp_3m_sde", stochastic=True, steerable=True)
def dpmpp_3m_sde(denoiser, x, sigmas, *, noise=None, on_step=None, eta: float = 1.0, third: str = "reference"):
    """DPM-Solver++(3M) SDE, k-diffusion's ``sample_dpmpp_3m_sde``: the 3M weights with
    ``h_eta = (1 + eta) h`` plus per-row noise ``sigma' sqrt(1 - e^{-2 eta h}) z``; orders 1, 2
    ('heun' form), 3, and D at the step to sigma 0; ``third`` as in ``dpmpp_3m``.
    """
    _check(3, "heun", third)
    return ei_multistep(denoiser, x, sigmas, order=3, noise=noise, on_step=on_step, eta=eta, lower_order_final=False,
                        weights=lambda lam_next, lams, e: dpmpp_weights(lam_next, lams, e, "heun", third))
