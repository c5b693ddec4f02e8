"""The sampler registry: each method registers itself with ``@register(name, ...)``.

The lowest module of the package: method modules import ``register`` from here (never from the
package), so the package has no import loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FINAL_POLICIES = ("zero", "sigma_min")     # how a grid ends: at sigma 0 (clean estimate) or at sigma_min
Planner = Callable[[int, bool, dict], "tuple[int, dict]"]
Counter = Callable[[int, bool, dict], int]


@dataclass(frozen=True)
class Method:
    """A registered sampler and how it spends a budget of model calls.

    ``calls_per_step`` calls per grid step, ``final_step_calls`` (if set) on a last step to
    sigma = 0 (Heun-type methods finish with one Euler call). ``planner(nfe, ends_at_zero,
    options) -> (steps, extra_options)`` and ``counter(steps, ends_at_zero, options) -> calls``
    override the default accounting for methods with irregular budgets (mixed-order singlestep
    solvers, restart sampling). ``steerable``: one model call per step, and the state kept between
    steps is only ``x`` and the data predictions the denoiser returned, so a particle resampler
    (``pipeline.search.Steering``) may gather them in place between steps.
    """
    fn: Callable[..., torch.Tensor]
    schedule: str = "karras"          # the grid used when the caller passes schedule=None
    stochastic: bool = False
    calls_per_step: int = 1           # model calls per grid step (Heun-type methods: 2)
    final_step_calls: int | None = None
    planner: Planner | None = None
    counter: Counter | None = None
    steerable: bool = False

    def calls(self, steps: int, ends_at_zero: bool = True, options: dict | None = None) -> int:
        """Model calls this method makes on a grid of ``steps`` steps."""
        if self.counter is not None:
            return self.counter(steps, ends_at_zero, options or {})
        last = self.final_step_calls if (ends_at_zero and self.final_step_calls is not None) else self.calls_per_step
        return (steps - 1) * self.calls_per_step + last

    def plan(self, nfe: int, ends_at_zero: bool = True, options: dict | None = None) -> tuple[int, dict]:
        """(grid steps, extra method options) that spend at most ``nfe`` calls (as many as possible)."""
        if self.planner is not None:
            return self.planner(nfe, ends_at_zero, options or {})
        steps = 1
        while self.calls(steps + 1, ends_at_zero, options) <= nfe:
            steps += 1
        return steps, {}


SAMPLERS: dict[str, Method] = {}


def register(name: str, **spec) -> Callable:
    """Register the decorated sampler function under ``name`` (``spec``: the ``Method`` fields)."""
    def deco(fn: Callable) -> Callable:
        SAMPLERS[name] = Method(fn=fn, **spec)
        return fn
    return deco


class BudgetExceeded(RuntimeError):
    """A sampler called the denoiser more often than its budget of model calls."""
