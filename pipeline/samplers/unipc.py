"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the UniP-p predictor and the UniC corrector, data-prediction form, in the
exponential-integrator core ``multistep.ei_multistep``.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ParameterError
from .registry import register
from .dpm_solver import dpmpp_weights
from .multistep import ei_multistep

VARIANTS = ("bh1", "bh2")


def _system(h: float, rks: list[float], variant: str):
    """UniPC's linear system (paper eq. 8 / Alg. 2-3) for the ratios ``rks`` (last one is 1).

    Returns ``h phi_1 = expm1(-h)``, ``B(h)`` (bh1: -h, bh2: expm1(-h)) and ``R``, ``b`` with
    ``R[p, k] = r_k^p`` and ``b[p] = h phi_{p+2}(h) (p+1)! / B(h)`` (float64).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    big_b = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, fact, b = h_phi_1 / hh - 1, 1, []
    for p in range(1, len(rks) + 1):
        b.append(h_phi_k * fact / big_b)
        fact *= p + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return h_phi_1, big_b, np.vander(np.asarray(rks), increasing=True).T, np.asarray(b)


def unip_weights(lam_next: float, lams: list[float], variant: str = "bh2"):
    """UniP-k predictor: ``x' = e^{-h} x - h phi_1 D0 - B(h) sum_k rho_k (D_k - D0)/r_k``.

    ``r_k = (lambda_{i-k} - lambda_i)/h``; rho solves the (k-1)x(k-1) system, rho = 1/2 at k = 2.
    """
    h = lam_next - lams[0]
    rks = [(lk - lams[0]) / h for lk in lams[1:]] + [1.0]
    h_phi_1, big_b, R, b = _system(h, rks, variant)
    w = np.zeros(len(lams))
    w[0] = -h_phi_1
    if len(lams) > 1:
        rhos = np.array([0.5]) if len(lams) == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        r = np.asarray(rks[:-1])
        w[1:] -= big_b * rhos / r
        w[0] += big_b * (rhos / r).sum()
    return math.exp(-h), w.tolist()


def unic_weights(lam_t: float, lams: list[float], variant: str = "bh2"):
    """UniC-k corrector from x_{i-1}: weights over ``[D_i, D_{i-1}, ..., D_{i-k}]``.

    ``x_i^c = e^{-h} x_{i-1} - h phi_1 D_{i-1} - B(h) (sum_k rho_k (D_{i-1-k} - D_{i-1})/r_k +
    rho_k (D_i - D_{i-1}))`` with rho solving the full kxk system (1/2 for k = 1).
    """
    h = lam_t - lams[0]
    rks = [(lk - lams[0]) / h for lk in lams[1:]] + [1.0]
    h_phi_1, big_b, R, b = _system(h, rks, variant)
    rhos = np.array([0.5]) if len(lams) == 1 else np.linalg.solve(R, b)
    r = np.asarray(rks[:-1])
    w = np.zeros(len(lams) + 1)
    w[0] = -big_b * rhos[-1]
    w[1] = -h_phi_1 + big_b * ((rhos[:-1] / r).sum() + rhos[-1])
    w[2:] = -big_b * rhos[:-1] / r
    return math.exp(-h), w.tolist()


def _check(order: int, variant: str, max_order: int = 3) -> None:
    if not 1 <= order <= max_order:
        raise ParameterError("order", f"supported orders are 1-{max_order}, got {order}")
    if variant not in VARIANTS:
        raise ParameterError("variant", f"expected one of {VARIANTS}, got {variant!r}")


@register("unipc")
def unipc(denoiser, x, sigmas, *, noise=None, on_step=None, order: int = 2, variant: str = "bh2",
          corrector: bool = True, lower_order_final: bool = True):
    """UniPC-p (Zhao et al. 2023, Alg. 2/3, data prediction): UniP-p predictor plus UniC-p corrector.

    UniC reuses the model call at the predicted point, so UniPC spends one call per step and
    reaches order p+1; after the last step there is no corrector. Orders warm up 1, 2, ...; with
    ``lower_order_final`` step i uses order <= steps left (as diffusers' UniPCMultistepScheduler).
    Order 2 (default, as diffusers) is the more accurate below ~12 NFE, order 3 above.
    """
    _check(order, variant)
    return ei_multistep(denoiser, x, sigmas, order=order, on_step=on_step, lower_order_final=lower_order_final,
                        weights=lambda lam_next, lams, eta: unip_weights(lam_next, lams, variant),
                        corrector=(lambda lam_t, lams: unic_weights(lam_t, lams, variant)) if corrector else None)


PREDICTORS = {"dpmpp_2m": (2, "midpoint"), "dpmpp_3m": (3, "heun")}


@register("unic")
def unic(denoiser, x, sigmas, *, noise=None, on_step=None, predictor: str = "dpmpp_2m", variant: str = "bh2",
         lower_order_final: bool = True):
    """The UniC corrector (Zhao et al. 2023, sec. 3.1) on another multistep predictor (DPM-Solver++
    2M/3M, ``predictor``): order +1 at no extra model call, never after the last step.
    (UniP-2 with bh2 is DPM-Solver++(2M), so ``predictor='dpmpp_2m'`` equals ``unipc`` order 2.)
    """
    if predictor not in PREDICTORS:
        raise ParameterError("predictor", f"expected one of {sorted(PREDICTORS)}, got {predictor!r}")
    order, solver_type = PREDICTORS[predictor]
    _check(order, variant)
    return ei_multistep(denoiser, x, sigmas, order=order, on_step=on_step, lower_order_final=lower_order_final,
                        weights=lambda lam_next, lams, eta: dpmpp_weights(lam_next, lams, 0.0, solver_type),
                        corrector=lambda lam_t, lams: unic_weights(lam_t, lams, variant))
