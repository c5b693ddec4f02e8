"""Exact test problems for samplers: Gaussian mixtures, whose denoiser is closed-form.

For data drawn from a mixture of diagonal Gaussians, ``E[x0 | x0 + sigma * eps = x]`` is a
posterior-weighted sum of per-component Wiener filters, so the probability-flow ODE can be
solved to any accuracy and a sampler's error measured exactly. Classes (disjoint sets of
components) give a conditional denoiser too, and with it exact classifier-free guidance:
``D_u + s (D_c - D_u)``. Used by the benchmarks (``bench/``) and the tests; the samplers and
calibrators never know they are looking at one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


class GaussianMixture:
    """A mixture of ``components`` diagonal Gaussians in ``dim`` dimensions (float64).

    Means are ``spread * N(0, 1)``, per-dimension stds uniform in ``std``, weights a softmax of
    N(0, 1) logits; all drawn from ``seed``. Component ``k`` belongs to class ``k % classes``.
    """

    def __init__(self, components: int, dim: int, seed: int = 0, spread: float = 1.0,
                 std: tuple[float, float] = (0.05, 0.5), classes: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.classes = dim, classes
        self.logw = torch.log_softmax(torch.randn(components, generator=g, dtype=torch.float64), 0)
        self.mu = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        lo, hi = std
        self.var = (lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64)) ** 2
        self.label = torch.arange(components) % classes

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x] for ``x = x0 + sigma eps`` (``x`` of any shape ``[B, ...]`` with ``dim`` values per
        row); with ``label`` ``[B]`` the posterior is restricted to that class's components."""
        shape, x = x.shape, x.reshape(x.shape[0], -1).to(torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
        var = self.var[None] + s ** 2                                          # [B, K, d]
        diff = x[:, None, :] - self.mu[None]
        logp = self.logw[None] - 0.5 * (diff ** 2 / var + var.log()).sum(-1)   # [B, K]
        if label is not None:
            logp = logp.masked_fill(self.label[None] != label.reshape(-1, 1), -math.inf)
        r = torch.softmax(logp, dim=1)
        return (r[..., None] * (self.mu[None] + self.var[None] / var * diff)).sum(1).reshape(shape)

    def data_std(self) -> float:
        """The data's RMS standard deviation per dimension."""
        w = self.logw.exp()[:, None]
        mean = (w * self.mu).sum(0)
        second = (w * (self.var + self.mu ** 2)).sum(0)
        return float((second - mean ** 2).mean().sqrt())


@dataclass
class Guided:
    """Classifier-free guidance on a mixture: ``D_u + scale (D_c - D_u)`` for per-row class ``label``."""
    gmm: GaussianMixture
    label: torch.Tensor
    scale: float = 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = self.gmm.denoise(x, sigma, self.label)
        if self.scale == 1.0:
            return cond
        uncond = self.gmm.denoise(x, sigma)
        return uncond + self.scale * (cond - uncond)

    def subset(self, idx: torch.Tensor) -> "Guided":
        """The same guidance for a subset of the rows (calibration minibatches)."""
        return Guided(self.gmm, self.label[idx], self.scale)


def mixture_denoiser(gmm: GaussianMixture, labels: Sequence[int] | torch.Tensor | None = None,
                     guidance: float = 1.0):
    """The exact (unconditional, or per-row class with guidance) denoiser of a mixture."""
    if labels is None:
        return lambda x, sigma: gmm.denoise(x, sigma)
    return Guided(gmm, torch.as_tensor(labels, dtype=torch.long), guidance)


def per_sample_rms(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[B]``: each sample's root-mean-square error against the reference, in float64."""
    return (x.to(torch.float64) - reference.to(torch.float64)).pow(2).flatten(1).mean(1).sqrt()
