"""The solver a calibrated plan runs: a multistep exponential integrator with per-step parameters.

``plan_multistep`` is DPM-Solver++(2M), Taylor-consistent DPM-Solver++(3M), or UniPC (UniP-2 with
the UniC-2 corrector, bh2) in data-prediction form, each extended by calibrated per-step numbers:
an evaluation-time shift (the network is called at ``sigma * exp(shift)``) and gains on the first
and second differences of the data predictions. All coefficients are torch float64 functions of
the grid, so the calibrator backpropagates through them to the grid itself.
"""
from __future__ import annotations

import torch

from .basic import _sigma_batch, report

BASES = ("dpmpp_2m", "dpmpp_3m", "unipc")     # the methods a plan's per-step parameters can extend


def direction(hist, s, s_next, h_last, g1=0.0, g2=0.0, order: int = 2):
    """The data estimate ``d`` a DPM-Solver++ step integrates, from the newest-first data predictions
    ``hist``: ``D_0 + (1/(2r) + g1)(D_0 - D_1) + g2 (D_1 - D_2)`` (order 2; order 1: ``D_0`` plus the
    gains), with r = h_last / h; a step to sigma = 0 gets no 1/(2r) term."""
    d = hist[0]
    if len(hist) > 1:
        # the 2M term 1/(2r) = h / (2 h_last) (steps to sigma > 0) plus the gain on the first difference
        two_m = 0.5 * (s.log() - s_next.log()) / h_last if order == 2 and s_next > 0 else 0.0
        d = d + torch.as_tensor(g1 + two_m).to(hist[0].dtype) * (hist[0] - hist[1])
    if len(hist) > 2:
        # the gain on the second difference
        d = d + torch.as_tensor(g2).to(hist[0].dtype) * (hist[1] - hist[2])
    return d


def third_order(h: torch.Tensor, h0: torch.Tensor, h1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(3M)'s coefficients on ``D_0 - D_1`` and ``D_1 - D_2`` for the step ``h`` after steps
    ``h0``, ``h1`` (Lu et al. 2022, Alg. 2's third-order update with its Taylor weights): with
    ``D1 ~ h D'`` and ``D2 ~ h^2 D''/2`` from the three data predictions, the exponential integral of
    ``D0 + u D' + u^2/2 D''`` gives the data estimate ``D_0 + c_d1 D1 + c_d2 D2`` with phi_1 = expm1(-h),
    ``c_d1 = -(phi_1/h + 1)/phi_1`` and ``c_d2 = 2 ((phi_1 + h)/h^2 - 1/2)/phi_1`` (the reference code
    weights D2 at half this, ``dpmpp_3m``'s ``third="reference"``)."""
    r0, r1 = h0 / h, h1 / h
    phi1 = torch.expm1(-h)
    c_d1, c_d2 = -(phi1 / h + 1) / phi1, 2 * ((phi1 + h) / h ** 2 - 0.5) / phi1
    c1 = c_d1 * (1 / r0 + 1 / (r0 + r1)) + c_d2 / (r0 * (r0 + r1))
    c2 = -c_d1 * r0 / ((r0 + r1) * r1) - c_d2 / (r1 * (r0 + r1))
    return c1, c2


def ei_step(x, d, s, s_next):
    """The exponential-integrator step in data-prediction form; to sigma = 0 it returns ``d``."""
    if s_next == 0:
        return d
    return (s_next / s).to(x.dtype) * x - torch.expm1(s_next.log() - s.log()).to(x.dtype) * d


def unic(x_prev, hist, lams, lam_t):
    """The UniC corrector (Zhao et al. 2023, bh2) of the step from ``x_prev`` at ``lams[0]`` to ``lam_t``,
    once ``D_t = hist[0]`` is known: ``x_t = e^{-h} x_prev - h phi_1 D_prev - B(h) sum_k rho_k dD_k``
    with the newest-first history ``hist = [D_t, D_prev, D_prev2, ...]`` and ``lams`` the lambdas of
    ``D_prev, D_prev2, ...`` (order ``len(lams)``, 1 or 2)."""
    h = lam_t - lams[0]
    h_phi_1 = torch.expm1(-h)
    big_b, b1 = h_phi_1, (h_phi_1 / -h - 1) / h_phi_1
    if len(lams) == 1:
        rhos = [torch.full_like(h, 0.5)]
    else:
        r1 = (lams[1] - lams[0]) / h
        b2 = ((h_phi_1 / -h - 1) / -h - 0.5) * 2 / h_phi_1
        rho1 = (b2 - b1) / (r1 - 1)         # the 2x2 system [[1, 1], [r1, 1]] rho = [b1, b2]
        rhos = [rho1, b1 - rho1]
    dt = x_prev.dtype
    out = torch.exp(-h).to(dt) * x_prev + (-h_phi_1).to(dt) * hist[1] - (big_b * rhos[-1]).to(dt) * (hist[0] - hist[1])
    if len(lams) > 1:
        out = out - (big_b * rhos[0] / r1).to(dt) * (hist[2] - hist[1])
    return out


def plan_multistep(denoiser, x, sigmas, *, shifts=None, gains=None, order: int = 2, beta: float = 1.0,
                   base: str = "dpmpp_2m", on_step=None):
    """DPM-Solver++(2M) / (3M) or UniPC with calibrated per-step parameters (Lu et al. 2022, Alg. 2;
    Zhao et al. 2023, extended).

    With t = -log(sigma), h_i = t_{i+1} - t_i and r_i = h_{i-1} / h_i, step i evaluates
    ``D_i = denoiser(x_i, sigma_i * exp(shift_i))`` (a decoupled evaluation time, as the time
    shifts of LD3-style calibration) and moves along the exponential integrator
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h_i) d_i`` with
    ``d_i = D_i + (c_i1 + g_i1)(D_i - D_{i-1}) + (c_i2 + g_i2)(D_{i-1} - D_{i-2})``: ``c`` are the base
    method's own coefficients (2M: ``c1 = 1/(2 r_i)``, ``c2 = 0``; 3M: ``third_order``; both warm up from
    first order), the gains zero-sum corrections (an S4S-style coefficient search that keeps a constant
    D integrated exactly). The step to sigma = 0 returns ``d_i`` without the base terms. ``unipc``:
    the 2M predictor (UniP-2 with bh2 is 2M) followed, once each new D is known, by the UniC corrector
    of the state it was evaluated at (``unic``, no extra call; never after the last step).
    ``order=1`` drops the 2M term (DDIM); ``beta < 1`` is Polyak heavy-ball momentum on ``d``
    (Wizadwongsa et al. 2023, ``v = (1 - beta) v + beta d``). With all shifts and gains zero and
    beta = 1, ``dpmpp_2m`` is exactly DPM-Solver++(2M) on ``sigmas``. Works on tensors that require
    grad (the calibrator backpropagates through it).
    """
    n = len(sigmas) - 1
    shifts = torch.zeros(n, dtype=torch.float64) if shifts is None else torch.as_tensor(shifts, dtype=torch.float64)
    gains = torch.zeros(n, 2, dtype=torch.float64) if gains is None else torch.as_tensor(gains, dtype=torch.float64)
    hist, h_last, v, prev = [], None, None, None
    sig = sigmas.to(torch.float64)
    lam = -torch.where(sig > 0, sig, torch.ones_like(sig)).log()      # lambda; a final 0 never enters a step
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        # model call at the (shifted) evaluation level
        denoised = denoiser(x, _sigma_batch(s * torch.exp(shifts[i]), x))
        hist = [denoised, *hist[:2]]
        if base == "unipc" and prev is not None:
            # UniC: correct the state D_i was evaluated at, from the previous state (no extra call)
            x = unic(prev[0], hist, prev[1], lam[i])
        if base == "dpmpp_2m":
            d = direction(hist, s, s_next, h_last, gains[i, 0], gains[i, 1], order)
        else:
            d = _direction(base, hist, lam, i, s_next, gains[i])
        v = d if v is None or beta == 1 else (1 - beta) * v + beta * d
        prev = (x, [lam[i - j] for j in range(min(2, i + 1))]) if base == "unipc" else None
        x = ei_step(x, v, s, s_next)
        h_last = s.log() - s_next.log() if s_next > 0 else None
        report(on_step, i, sigmas, x, denoised)
    return x


def _direction(base: str, hist, lam, i: int, s_next, gain) -> torch.Tensor:
    """``d_i`` of the 3M or UniPC base (see ``plan_multistep``) with the step's gains."""
    c1 = c2 = torch.zeros((), dtype=torch.float64)
    if s_next > 0 and len(hist) > 1:
        h = lam[i + 1] - lam[i]
        if base == "dpmpp_3m" and len(hist) > 2:
            c1, c2 = third_order(h, lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2])
        else:                                   # 2M (UniP-2 with bh2), and 3M's second step
            c1 = 0.5 * h / (lam[i] - lam[i - 1])
    d = hist[0]
    if len(hist) > 1:
        d = d + (c1 + gain[0]).to(d.dtype) * (hist[0] - hist[1])
    if len(hist) > 2:
        d = d + (c2 + gain[1]).to(d.dtype) * (hist[1] - hist[2])
    return d
