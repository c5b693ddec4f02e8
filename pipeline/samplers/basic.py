"""First-order samplers: Euler (= deterministic DDIM) and DDIM with eta (= Euler ancestral at eta=1)."""
from __future__ import annotations

import torch

from .registry import register


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a CPU scalar tensor) as a ``[B]`` tensor on ``x``'s device. Made there by a fill, not
    copied from the host, so a GPU sampling loop never waits on a transfer; a sigma that carries a
    gradient (calibration) is moved as it is."""
    if sigma.requires_grad:
        return sigma.to(x.dtype).expand(x.shape[0]).to(x.device)
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def report(on_step, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
    """Call ``on_step`` (if any) after step ``i``, k-diffusion style: one dict with ``i``, ``sigma``,
    ``sigma_next``, ``x`` (the state after the step) and ``denoised`` (the model's estimate at sigma)."""
    if on_step is not None:
        on_step({"i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x, "denoised": denoised})


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step into a deterministic part to ``sigma_down`` and fresh noise of size ``sigma_up``.

    With ``sigma_up = eta * sigma_to * sqrt(1 - sigma_to^2 / sigma_from^2)`` this is exactly DDIM's
    sigma_t(eta) (Song et al. 2021, eq. 16) written in variance-exploding variables.
    """
    if eta == 0 or sigma_to == 0:
        return sigma_to, sigma_to.new_zeros(())
    up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2).sqrt())
    return (sigma_to ** 2 - up ** 2).sqrt(), up


@register("euler")
def euler(denoiser, x, sigmas, *, noise=None, on_step=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

    Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
    Alg. 1 without the Heun correction; identical to deterministic DDIM (Song et al. 2021).
    """
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma_batch(sigmas[i], x))
        # x_{i+1} = x0_hat + (sigma_{i+1} / sigma_i) (x_i - x0_hat): the Euler step written in ratio form
        x = denoised + (sigmas[i + 1] / sigmas[i]).to(x.dtype) * (x - denoised)
        report(on_step, i, sigmas, x, denoised)
    return x


@register("ddim", steerable=True)
def ddim(denoiser, x, sigmas, *, noise=None, on_step=None, eta: float = 0.0):
    """DDIM, Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12, in EDM variables.

    Each step moves deterministically to ``sigma_down`` and adds ``sigma_up`` fresh noise
    (see ``ancestral_step``); eta=0 is the deterministic DDIM/Euler ODE step, eta=1 is
    DDPM-like ancestral sampling.
    """
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma_batch(sigmas[i], x))
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        # deterministic part: the DDIM step to sigma_down
        x = denoised + (down / sigmas[i]).to(x.dtype) * (x - denoised)
        # stochastic part: per-row fresh noise at level sigma_up
        if up > 0:
            x = x + noise(x) * up.to(x.dtype)
        report(on_step, i, sigmas, x, denoised)
    return x


@register("euler_ancestral", stochastic=True, steerable=True)
def euler_ancestral(denoiser, x, sigmas, *, noise=None, on_step=None, eta: float = 1.0):
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``): DDIM with eta=1 by default."""
    return ddim(denoiser, x, sigmas, noise=noise, on_step=on_step, eta=eta)
