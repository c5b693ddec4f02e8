"""Sigma grids: decreasing 1-D float64 tensors of noise levels that end at 0.

All grids live in EDM/VE variables (``x = x0 + sigma * eps``). A grid for ``n`` steps
has ``n + 1`` entries: ``n`` noise levels from ``sigma_max`` down to ``sigma_min`` and a
final 0, so a sampler that takes one model call per step spends exactly ``n`` calls.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Grid = Callable[..., torch.Tensor]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 ("Elucidating the Design Space...", eq. 5): uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log(sigma), i.e. uniform in log-SNR (the DPM-Solver paper's "logSNR" grid)."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polyexponential grid: log(sigma) on a rho-warped ramp (rho=1 is `exponential`)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


GRIDS: dict[str, Grid] = {
    "karras": karras,
    "exponential": exponential,
    "logsnr_uniform": exponential,
    "polyexponential": polyexponential,
}


def get_sigmas(schedule: str | torch.Tensor, n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Build the grid named ``schedule`` for ``n`` steps, or check an explicit grid.

    An explicit grid must be a decreasing 1-D tensor; a trailing 0 is appended if missing.
    """
    if isinstance(schedule, torch.Tensor):
        sigmas = schedule.detach().to(torch.float64).flatten()
        if sigmas.numel() < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError("schedule: an explicit sigma grid must be a strictly decreasing 1-D tensor "
                             f"with at least 2 entries, got {schedule.tolist()}")
        return sigmas if float(sigmas[-1]) == 0.0 else _append_zero(sigmas)
    if schedule not in GRIDS:
        raise ValueError(f"schedule: unknown grid {schedule!r}; allowed: {sorted(GRIDS)} or a 1-D tensor")
    return GRIDS[schedule](n, sigma_min, sigma_max)
