"""Per-row noise for stochastic samplers, so a row's image never depends on its batch."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ParameterError


class NoiseSource:
    """Draws standard-normal noise shaped like a batch.

    With one ``torch.Generator`` per row, row ``i`` of every draw comes from generator ``i``
    only, so it is identical whatever else shares the batch. Draws happen on the CPU in
    float32 and are then moved, so the same seed gives the same noise on any device.
    """

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator] | None = None):
        self.generators = generators

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        gens = self.generators
        if gens is None or isinstance(gens, torch.Generator):
            out = torch.randn(like.shape, generator=gens, dtype=torch.float32)
        else:
            if len(gens) != like.shape[0]:
                raise ParameterError("generator", f"got {len(gens)} per-row generators for a batch of {like.shape[0]}")
            out = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in gens])
        return out.to(device=like.device, dtype=like.dtype)


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded from the row's seed."""
    return [torch.Generator().manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]


def initial_noise(gens: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """The starting noise of each row: the first draw from that row's generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens])
