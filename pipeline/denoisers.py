"""Denoiser wrappers: guidance and friends wrap a ``denoiser(x, sigma) -> x0_hat``.

Model-type adapters (eps/v/flow prediction, VP schedules) belong here too, so samplers
never branch on what a model predicts.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, or dicts / tuples of tensors."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def conditioned(model_fn: ModelFn, cond: Any) -> Denoiser:
    """A plain conditional denoiser (no guidance)."""
    return lambda x, sigma: model_fn(x, sigma, cond)


def cfg(model_fn: ModelFn, cond: Any, uncond: Any, scale: torch.Tensor) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + s (c - u)`` with a per-row scale.

    Conditional and unconditional halves run as one batched call. Both halves are always
    computed, even where a row's scale is 1, so a row's result never depends on its batch.
    """
    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(cond, uncond))
        c, u = out.chunk(2)
        s = scale.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return u + s * (c - u)
    return denoiser
