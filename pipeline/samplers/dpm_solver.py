"""DPM-Solver++ family (data prediction, exponential integrators in log-sigma time)."""
from __future__ import annotations

import torch

from . import register
from .basic import _sigma_batch


@register("dpmpp_2m")
def dpmpp_2m(denoiser, x, sigmas, *, noise=None, on_step=None):
    """DPM-Solver++(2M), Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling...", Alg. 2.

    With t = -log(sigma) and h = t_{i+1} - t_i the update is
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h) D_i`` where ``D_i`` is the second-order
    multistep estimate ``(1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``, ``r = h_{i-1} / h``. The first
    step and the final step to sigma = 0 are first order. Coefficients are float64.
    """
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma_batch(sigmas[i], x))
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            # final step: the ODE solution at sigma 0 is the denoised estimate
            x = denoised
        else:
            h = torch.log(s) - torch.log(s_next)
            d = denoised
            if old_denoised is not None:
                # second-order multistep correction from the previous data prediction
                r = h_last / h
                d = (1 + 1 / (2 * r)).to(x.dtype) * denoised - (1 / (2 * r)).to(x.dtype) * old_denoised
            # exponential-integrator step in data-prediction form
            x = (s_next / s).to(x.dtype) * x - torch.expm1(-h).to(x.dtype) * d
            h_last = h
        old_denoised = denoised
        if on_step:
            on_step(i, x, denoised)
    return x
