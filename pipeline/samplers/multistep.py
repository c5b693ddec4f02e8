"""Linear multistep solvers and the two multistep cores they share.

* ``ei_multistep``: exponential integrators in data-prediction form over lambda = -log(sigma)
  (DPM-Solver++ multistep, UniPC; optional UniC corrector and SDE noise). One step is
  ``x_{i+1} = a x_i + sum_j w_j D_{i-j}`` with float64 weights from a ``weights`` function.
* ``eps_multistep``: Adams-type methods on the ODE ``dx/dsigma = eps = (x - D) / sigma``
  (LMS, DEIS, PLMS, iPNDM). One step is ``x_{i+1} = x_i + sum_j c_j eps_{i-j}``.

History lists are newest first. Final-step policy: with ``lower_order_final`` the order at
step i is at most the number of steps left (so the last step is first order); a step of an
exponential integrator to sigma = 0 always returns the data prediction (its h is infinite).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ParameterError
from .registry import register
from .basic import _sigma_batch, report

Weights = Callable[..., tuple[float, Sequence[float]]]


def _combine(a: float, x: torch.Tensor, weights: Sequence[float], terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``a x + sum_j w_j terms_j`` with float64 coefficients cast once, at the end."""
    out = x * float(a)
    for w, t in zip(weights, terms):
        out = out + float(w) * t
    return out


def _order_at(i: int, n: int, order: int, lower_order_final: bool) -> int:
    """Warm-up (order <= steps taken) and, optionally, lower order on the last steps."""
    return min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)


def ei_multistep(denoiser, x, sigmas, *, weights: Weights, order: int, noise=None, on_step=None,
                 eta: float = 0.0, corrector: Weights | None = None, lower_order_final: bool = True):
    """Multistep exponential integrator in data-prediction form (Lu et al. 2022, DPM-Solver++ sec. 4).

    With h = lambda_{i+1} - lambda_i the exact solution is
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i + sigma_{i+1} int e^lambda D dlambda``; ``weights(lam_next,
    lams, eta) -> (a, w)`` approximates the integral from the k newest data predictions. With
    ``eta > 0`` (SDE-DPM-Solver++) fresh noise of std ``sigma_{i+1} sqrt(1 - e^{-2 eta h})`` is added.
    ``corrector`` (UniC, Zhao et al. 2023) re-estimates x_i from x_{i-1} once D_i is known, reusing
    that model call, so it never costs an evaluation (and is never applied after the last step).
    """
    if corrector is not None and eta:
        raise ParameterError("corrector", "the UniC corrector is defined for the ODE only (eta=0)")
    lam = -sigmas.to(torch.float64).log()
    n, ds, x_prev, k = len(sigmas) - 1, [], None, 0
    for i in range(n):
        denoised = denoiser(x, _sigma_batch(sigmas[i], x))
        if corrector is not None and x_prev is not None:
            # UniC: correct x_i with D_i evaluated at the predicted x_i (no extra call)
            a, w = corrector(float(lam[i]), [float(lam[i - 1 - j]) for j in range(k)])
            x = _combine(a, x_prev, w, [denoised, *ds[:k]])
        ds = [denoised, *ds[:order]]
        k, x_prev = _order_at(i, n, order, lower_order_final), x
        if sigmas[i + 1] == 0:
            # last step to sigma 0: the solution is the data prediction (h is infinite)
            x = denoised
        else:
            # predictor: a x_i + sum_j w_j D_{i-j} from the k newest data predictions
            a, w = weights(float(lam[i + 1]), [float(lam[i - j]) for j in range(k)], eta)
            x = _combine(a, x, w, ds[:k])
            if eta:
                h = float(lam[i + 1] - lam[i])
                x = x + noise(x) * float(sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)))
        report(on_step, i, sigmas, x, denoised)
    return x


def eps_multistep(denoiser, x, sigmas, *, coeffs: Callable[[Sequence[float], float], Sequence[float]],
                  order: int, on_step=None, lower_order_final: bool = False, start: int = 0,
                  history: Sequence[torch.Tensor] = ()):
    """Adams-type step on ``dx/dsigma = eps``: ``x_{i+1} = x_i + sum_j c_j eps_{i-j}``.

    ``coeffs(sig_hist, sigma_next)`` gives the float64 weights for the newest-first history of
    noise levels. ``start``/``history`` let a caller hand over after its own warm-up steps.
    """
    n, eps = len(sigmas) - 1, list(history)
    for i in range(start, n):
        denoised = denoiser(x, _sigma_batch(sigmas[i], x))
        # eps_i = (x_i - D_i) / sigma_i, the ODE's derivative in sigma
        eps = [(x - denoised) / sigmas[i].to(x.dtype), *eps[:order - 1]]
        k = _order_at(i, n, order, lower_order_final)
        sig_hist = [float(sigmas[i - j]) for j in range(k)]
        x = _combine(1.0, x, coeffs(sig_hist, float(sigmas[i + 1])), eps[:k])
        report(on_step, i, sigmas, x, denoised)
    return x


def lagrange_integrals(nodes: Sequence[float], lo: float, hi: float, log_basis: bool = False) -> list[float]:
    """``int_lo^hi L_j(u(s)) ds`` for the Lagrange basis L_j over ``nodes``, in float64.

    ``u(s) = s`` gives k-diffusion's LMS weights (exact polynomial integral); ``u(s) = log s`` gives
    DEIS's weights as in diffusers (``ds = e^u du``: 12-point Gauss-Legendre in u, or, for a step to
    ``hi = 0``, the antiderivative ``e^u sum_m (-1)^m p^(m)(u)``, which vanishes at u = -inf).
    """
    u = np.log(nodes) if log_basis else np.asarray(nodes, dtype=np.float64)
    out = []
    for j in range(len(u)):
        others = np.delete(u, j)
        p = np.polynomial.Polynomial.fromroots(others) / np.prod(u[j] - others) if len(others) else \
            np.polynomial.Polynomial([1.0])
        if not log_basis:
            out.append(float(p.integ()(hi) - p.integ()(lo)))
        elif hi > 0:
            # int p(u) e^u du over [log lo, log hi]: Gauss-Legendre, exact to rounding for these short steps
            t, gw = np.polynomial.legendre.leggauss(12)
            a, b = math.log(lo), math.log(hi)
            uu = (b - a) / 2 * t + (a + b) / 2
            out.append(float((b - a) / 2 * (gw * p(uu) * np.exp(uu)).sum()))
        else:
            # to sigma 0 (u = -inf): the antiderivative e^u sum_m (-1)^m p^(m)(u) vanishes there
            q, total, sign, ul = p, 0.0, 1.0, math.log(lo)
            for _ in range(len(u)):
                total, q, sign = total + sign * q(ul), q.deriv(), -sign
            out.append(-lo * total)
    return out


@register("lms")
def lms(denoiser, x, sigmas, *, noise=None, on_step=None, order: int = 4, lower_order_final: bool = False):
    """Linear multistep (Adams-Bashforth with variable steps) in sigma, k-diffusion's ``sample_lms``.

    Karras et al. 2022 (EDM) ODE ``dx/dsigma = (x - D)/sigma``; eps is extrapolated by the Lagrange
    polynomial in sigma through the last ``order`` points and integrated exactly over the step.
    Like k-diffusion and diffusers' LMSDiscreteScheduler the last step keeps full order unless
    ``lower_order_final``.
    """
    return eps_multistep(denoiser, x, sigmas, order=order, on_step=on_step, lower_order_final=lower_order_final,
                         coeffs=lambda hist, s_next: lagrange_integrals(hist, hist[0], s_next))


AB = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _fixed_ab(hist: Sequence[float], s_next: float) -> list[float]:
    """Constant-step Adams-Bashforth weights times the step ``sigma_{i+1} - sigma_i``."""
    return [(s_next - hist[0]) * c for c in AB[len(hist) - 1]]


@register("ipndm")
def ipndm(denoiser, x, sigmas, *, noise=None, on_step=None, order: int = 4, lower_order_final: bool = False):
    """Improved PNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
    sec. 4 / App.): Adams-Bashforth on eps with constant-step coefficients (orders 1-4) and
    lower-order warm-up instead of PNDM's Runge-Kutta start; ComfyUI's ``sample_ipndm``.
    Step ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_j AB_j eps_{i-j}``.
    """
    if not 1 <= order <= 4:
        raise ParameterError("order", f"ipndm supports orders 1-4, got {order}")
    return eps_multistep(denoiser, x, sigmas, order=order, on_step=on_step, lower_order_final=lower_order_final,
                         coeffs=_fixed_ab)


def plms(denoiser, x, sigmas, *, noise=None, on_step=None, lower_order_final: bool = False):
    """PLMS, the linear-multistep half of PNDM (Liu et al. 2022, "Pseudo Numerical Methods for
    Diffusion Models on Manifolds", eq. 12), as diffusers' PNDMScheduler with ``skip_prk_steps``.

    The first step is a pseudo-Heun step (eps at x_0 and at its Euler prediction x_1', averaged,
    one extra model call); then 4th-order Adams-Bashforth with constant-step coefficients and
    lower-order start (AB2, AB3). Uses ``steps + 1`` model calls.
    """
    if len(sigmas) < 3:
        return eps_multistep(denoiser, x, sigmas, order=1, on_step=on_step, coeffs=_fixed_ab)
    s0, s1 = sigmas[0].to(x.dtype), sigmas[1].to(x.dtype)
    # pseudo-Heun warm-up: eps at x_0, Euler to x_1', eps there, step from x_0 with the mean
    e0 = (x - denoiser(x, _sigma_batch(sigmas[0], x))) / s0
    x_pred = x + (s1 - s0) * e0
    e1 = (x_pred - denoiser(x_pred, _sigma_batch(sigmas[1], x))) / s1
    x = x + (s1 - s0) * (e0 + e1) / 2
    # Adams-Bashforth from step 1 on, with eps_0 in the history (e1 at x_1' is discarded)
    return eps_multistep(denoiser, x, sigmas, order=4, on_step=on_step, lower_order_final=lower_order_final,
                         coeffs=lambda hist, s_next: _fixed_ab(hist, s_next), start=1, history=[e0])


def _plms_calls(steps: int, ends_at_zero: bool, options: dict) -> int:
    """PLMS spends one extra call on its pseudo-Heun first step (none on a one-step grid)."""
    return steps + 1 if steps >= 2 else steps


register("plms", counter=_plms_calls)(plms)
register("pndm", counter=_plms_calls)(plms)
