"""EDM stochastic sampling (Karras et al. 2022, Alg. 2) with per-row noise."""
from __future__ import annotations

import math

from .registry import register
from .basic import report
from .singlestep import _eps


@register("edm", stochastic=True, calls_per_step=2, final_step_calls=1)
def edm(denoiser, x, sigmas, *, noise=None, on_step=None, S_churn: float = 0.0, S_tmin: float = 0.0,
        S_tmax: float = float("inf"), S_noise: float = 1.0):
    """Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 2.

    Per step: for ``S_tmin <= sigma <= S_tmax`` raise the level to ``sigma_hat = sigma (1 + gamma)``,
    ``gamma = min(S_churn / N, sqrt(2) - 1)``, by adding per-row noise of std
    ``S_noise sqrt(sigma_hat^2 - sigma^2)``; then a Heun step from sigma_hat to the next level
    (Euler on the last step to 0). ``S_churn = 0`` is the deterministic Heun sampler (Alg. 1).
    """
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_tmin <= float(s) <= S_tmax else 0.0
        s_hat = s * (1 + gamma)
        # churn: increase the noise level with fresh per-row noise
        if gamma > 0:
            x = x + noise(x) * (S_noise * (s_hat ** 2 - s ** 2).sqrt()).to(x.dtype)
        # Euler step from sigma_hat
        denoised, d = _eps(denoiser, x, s_hat)
        x_next = x + d * (s_next - s_hat).to(x.dtype)
        # second-order (trapezoidal) correction unless the step ends at 0
        if s_next > 0:
            _, d2 = _eps(denoiser, x_next, s_next)
            x_next = x + (d + d2) * ((s_next - s_hat) / 2).to(x.dtype)
        x = x_next
        report(on_step, i, sigmas, x, denoised)
    return x
