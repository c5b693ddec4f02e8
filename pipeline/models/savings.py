"""Opt-in, training-free savings of a model (each off by default, each named in ``model.savings``):

* ``model.quantize=fp8``: the network's Linear layers in FP8 through torchao (dynamic per-row scaled
  float8 activations and weights, ``Float8DynamicActivationFloat8WeightConfig``), on GPUs with FP8
  tensor cores (compute capability 8.9 or later: Ada, Hopper, Blackwell); refused elsewhere, naming
  the key and the reason.
* ``model.cache=deepcache``: the deep features of a UNet reused between full network calls (the
  schedule is ``pipeline.denoisers.FeatureCache``; each backend supplies its deep/shallow split).
"""
from __future__ import annotations

import importlib.util

import torch

from ..errors import ConfigError

QUANTIZE = ("fp8",)
CACHES = ("deepcache",)
FP8_CAPABILITY = (8, 9)


def fp8_refusal(device: torch.device | str) -> str | None:
    """Why FP8 Linear layers cannot run on ``device``, or None when they can: no CUDA device, a GPU older
    than compute capability 8.9, or torchao not installed."""
    device, need = torch.device(device), "needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or later)"
    if device.type != "cuda":
        return f"{need}; the model runs on {device}"
    if not torch.cuda.is_available():
        return f"{need}; torch sees no CUDA device here"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_CAPABILITY:
        return (f"needs compute capability >= 8.9 (Ada, Hopper or later); {torch.cuda.get_device_name(device)} "
                f"has {major}.{minor}")
    if importlib.util.find_spec("torchao") is None:
        return "needs torchao (pip install torchao, or this project's [gpu] extra)"
    return None


def fp8_layer(module: torch.nn.Module, name: str = "") -> bool:
    """The layers FP8 takes: Linear layers whose sides are multiples of 16 (FP8 GEMMs' alignment)."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize(net: torch.nn.Module, method: str, device: torch.device | str, emulate: bool = False) -> int:
    """``model.quantize``: swap ``net``'s Linear layers (``fp8_layer``) for torchao's FP8 ones, in place;
    returns how many. ``emulate``: FP8's numerics only, through torchao's fake quantization (QAT
    ``prepare``), which runs anywhere: for measuring its error on a CPU, never for speed.

    Raises ``ConfigError`` naming ``model.quantize`` for an unknown method or hardware without FP8."""
    if method not in QUANTIZE:
        raise ConfigError("model.quantize", f"unknown method {method!r}; allowed: {list(QUANTIZE)}")
    reason = None if emulate else fp8_refusal(device)
    if reason:
        raise ConfigError("model.quantize", f"fp8 {reason}")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if emulate:
        from torchao.quantization.qat import QATConfig
        config = QATConfig(config, step="prepare")
    count = sum(fp8_layer(m) for m in net.modules())
    quantize_(net, config, filter_fn=fp8_layer)
    return count


def check_savings(cfg, local: bool) -> None:
    """Driver-side checks of ``model.quantize``, ``model.cache`` and ``model.cache_interval`` (a
    ``ModelConfig``); ``local``: the job runs on this machine, so FP8's hardware is checked here too."""
    if cfg.quantize is not None:
        if cfg.quantize not in QUANTIZE:
            raise ConfigError("model.quantize", f"unknown method {cfg.quantize!r}; allowed: {list(QUANTIZE)}")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        reason = fp8_refusal(device) if local or cfg.device == "cpu" else None
        if reason:
            raise ConfigError("model.quantize", f"fp8 {reason}")
    if cfg.cache not in (None, *CACHES):
        raise ConfigError("model.cache", f"unknown method {cfg.cache!r}; allowed: {list(CACHES)}")
    if cfg.cache_interval < 1:
        raise ConfigError("model.cache_interval", f"must be >= 1, got {cfg.cache_interval}")
