"""The sampler library: ``sample()`` and a registry of training-free solvers by name.

Conventions (k-diffusion's): a denoiser is ``denoiser(x, sigma) -> x0_hat`` with
``x = x0 + sigma * eps`` and ``sigma`` a ``[B]`` tensor. A sampler is a pure function
``(denoiser, x, sigmas, *, noise, on_step, **options) -> x0`` over a decreasing grid
that ends at 0. Model-specific details (prediction type, VP scaling, guidance) live in
denoiser wrappers (``pipeline.denoisers``), never in a sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..schedules import GRIDS, get_sigmas
from .noise import NoiseSource


@dataclass(frozen=True)
class Method:
    fn: Callable[..., torch.Tensor]
    schedule: str = "karras"          # the grid used when the caller passes schedule=None
    stochastic: bool = False
    calls_per_step: int = 1           # model calls per grid step (Heun-type methods: 2)

    def steps_for(self, nfe: int) -> int:
        """Grid steps that fit a budget of ``nfe`` model calls (never more calls than nfe)."""
        return max(1, nfe // self.calls_per_step)


SAMPLERS: dict[str, Method] = {}


def register(name: str, **spec) -> Callable:
    def deco(fn: Callable) -> Callable:
        SAMPLERS[name] = Method(fn=fn, **spec)
        return fn
    return deco


class BudgetExceeded(RuntimeError):
    pass


def _count_calls(denoiser: Callable, budget: int) -> Callable:
    calls = 0

    def counted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > budget:
            raise BudgetExceeded(f"sampler called the denoiser more than nfe={budget} times")
        return denoiser(x, sigma)
    return counted


def sample(denoiser: Callable, noise: torch.Tensor, method: str = "dpmpp_2m", nfe: int = 10,
           sigma_min: float = 0.0292, sigma_max: float = 14.6146,
           schedule: str | torch.Tensor | None = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           **options) -> torch.Tensor:
    """Draw samples: scale standard-normal ``noise`` to ``sigma_max`` and integrate to sigma 0.

    ``nfe`` is a budget of denoiser calls (one call = one batched evaluation); a method that
    cannot spend it exactly uses fewer. ``generator`` (one per row, or one for the batch)
    feeds stochastic methods so their output is reproducible per row. ``options`` go to the
    method (e.g. ``eta`` for DDIM).
    """
    method = "dpmpp_2m" if method == "auto" else method
    if method not in SAMPLERS:
        raise ValueError(f"method: unknown sampler {method!r}; allowed: {sorted(SAMPLERS)} or 'auto'")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe: must be an integer >= 1, got {nfe!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min/sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    spec = SAMPLERS[method]
    sigmas = get_sigmas(spec.schedule if schedule is None else schedule,
                        spec.steps_for(nfe), sigma_min, sigma_max)
    if (len(sigmas) - 1) * spec.calls_per_step > nfe:
        raise ValueError(f"schedule: the grid has {len(sigmas) - 1} steps, more than nfe={nfe} allows "
                         f"for {method!r} ({spec.calls_per_step} call(s) per step)")
    x = noise * sigmas[0].to(noise.dtype)
    return spec.fn(_count_calls(denoiser, nfe), x, sigmas, noise=NoiseSource(generator),
                   on_step=on_step, **options)


__all__ = ["sample", "SAMPLERS", "GRIDS", "register", "NoiseSource", "BudgetExceeded"]

def _register_all() -> None:
    """Import every module of this package: each registers its methods with ``@register``."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_register_all()
