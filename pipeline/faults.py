"""Drills: model hooks that fail on request (``model.hook=pipeline.faults:FaultDrill``) or stand in for
a GPU model (``pipeline.faults:LatencyProxy``).

With the drill on, a row's ``_fault`` column (``raise``, ``nan``, ``blank``, ``oom``, ``hang``) makes
the model fail the way real models do (and with ``model.compile`` the warm-up outlasts the row
timeout), so the error handling can be rehearsed on a real cluster. The hook plugs in by its dotted
path like any other (``Generator`` loads ``model.hook``); no production module imports this one.

``faulty_reward`` is the same for search rewards: ``search.reward: pipeline.faults:faulty_reward``
with ``reward_options: {fault: raise | nan | shape, on: "3"}`` fails for the prompts naming that digit.
"""
from __future__ import annotations

import time
from typing import Any

import torch


class InjectedFault(RuntimeError):
    pass


_DIGITS_REWARD: list = []


def faulty_reward(images: torch.Tensor, prompts: list[str], fault: str = "raise", on: str = "3") -> torch.Tensor:
    """The ``digits`` reward, except when a prompt contains ``on``: then it raises (``raise``), scores
    that image NaN (``nan``) or returns one score too few (``shape``)."""
    from .rewards import digits_reward

    if not _DIGITS_REWARD:
        _DIGITS_REWARD.append(digits_reward(device=images.device))
    scores = _DIGITS_REWARD[0](images, prompts)
    hit = torch.tensor([on in p for p in prompts])
    if hit.any():
        if fault == "raise":
            raise InjectedFault(f"injected reward exception for prompt(s) containing {on!r}")
        if fault == "nan":
            return torch.where(hit.to(scores.device), torch.nan, scores)
        if fault == "shape":
            return scores[:-1]
    return scores


def inject_faults(model_fn, faults: list[str | None], hang_s: float):
    """Wrap ``model_fn`` so the rows of a micro-batch fail as their ``faults`` say."""
    def faulty(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        n = len(faults)
        if "raise" in faults:
            raise InjectedFault("injected model exception")
        if "oom" in faults and n > 1:
            raise RuntimeError("CUDA out of memory (injected)")
        if "hang" in faults:
            time.sleep(hang_s)
        out = model_fn(x, sigma, cond)
        rows = torch.tensor([f in ("nan", "blank") for f in faults] * (x.shape[0] // n), device=out.device)
        if rows.any():
            fill = torch.tensor([float("nan") if f == "nan" else -1.0 for f in faults] * (x.shape[0] // n),
                                device=out.device, dtype=out.dtype)
            out = torch.where(rows.reshape(-1, *[1] * (out.ndim - 1)), fill.reshape(-1, *[1] * (out.ndim - 1)), out)
        return out
    return faulty


class FaultDrill:
    """The drill hook: each micro-batch's model function wrapped by ``inject_faults`` from its rows'
    ``_fault`` column; with ``model.compile``, a warm-up slower than the row timeout."""

    def __init__(self, cfg):
        self.cfg = cfg

    def warm_up(self) -> None:
        """Drill for ``model.compile``: a compile slower than the row timeout (waits
        ``2 x errors.row_timeout_s`` first), which must not time any row out."""
        time.sleep(2 * self.cfg.errors.row_timeout_s)

    def wrap(self, model_fn, requests):
        faults = [r.extra.get("_fault") for r in requests]
        return inject_faults(model_fn, faults, hang_s=self.cfg.errors.row_timeout_s * 3)


class LatencyProxy:
    """A stand-in for a GPU model: every model call waits ``latency_ms`` with the GIL released (as a
    kernel launch and its synchronisation do) and returns a cheap function of ``x``, so the pipeline's
    own gaps around the model (the duty cycle) can be measured without a GPU
    (``model.hook_options: {latency_ms: 50}``; ``bench/scale.py --proxy-latency-ms``)."""

    def __init__(self, cfg, latency_ms: float = 50.0):
        self.latency_s = latency_ms / 1000

    def wrap(self, model_fn, requests):
        def proxy(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
            time.sleep(self.latency_s)
            return x.clamp(-1, 1) * 0.5
        return proxy
