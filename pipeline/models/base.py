"""The interface every model backend offers the generator: conditioning, a denoiser, decoding."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, RequestError  # noqa: F401  (RequestError: the error models raise; re-exported)


def float_images(pixels: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``uint8`` images ``[B, H, W]`` or ``[B, H, W, 3]`` -> float ``[B, C, H, W]`` in [0, 1] on ``device``."""
    px = torch.from_numpy(np.ascontiguousarray(pixels)).to(device, torch.float32) / 255
    return px[:, None] if px.ndim == 3 else px.permute(0, 3, 1, 2)


class DiffusionModel:
    """What the generator needs from a model; backends subclass this.

    ``model_fn(x, sigma, cond)`` is a denoiser in EDM variables (``x = x0 + sigma * eps``,
    returns ``x0_hat``) for conditioning ``cond`` as returned by ``encode``. Guidance is a
    wrapper around it (``pipeline.denoisers.cfg``), never part of the backend.
    """

    model_id: str = "model"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    schedule = None   # the model's NoiseSchedule (pipeline.denoisers), for grids on its time axis
    schedule_kind = "ve"      # ve | vp_discrete | vp_continuous | flow: what `auto` picks a solver for
    fixed_latent = False      # True: the sample shape does not follow the image size (plans fit any size)
    cache_interval: int | None = None   # model.cache=deepcache: the full network every Nth call (None: off)
    quantized: str | None = None        # model.quantize: the network's Linear layers in this format (None: off)
    guidance_interval: tuple[float, float] | None = None   # model.guidance_interval: guided only in [lo, hi]

    @classmethod
    def model_id_for(cls, cfg) -> str:
        """The ``model_id`` a ``ModelConfig`` will load, known on the driver without the weights."""
        raise NotImplementedError

    def grid_options(self, grid: str | None, height: int, width: int) -> dict:
        """The model's own parameters of a named grid at this size (a flow model's shift); ``{}`` if none."""
        return {}

    @classmethod
    def check_request(cls, prompt: str | None, negative_prompt: str | None, height: int, width: int) -> None:
        """Raise ``RequestError`` naming the field if this model cannot serve the request.

        Runs on the driver before any model is loaded, so it must not need weights.
        """

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> tuple[Any, Any]:
        raise NotImplementedError

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def decode(self, x0: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Clean latents -> ``uint8`` images ``[B, H, W]`` (grey) or ``[B, H, W, 3]`` (RGB)."""
        raise NotImplementedError

    def images(self, x0: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Clean latents -> float images ``[B, C, H, W]`` in [0, 1] on the device, for rewards
        (``pipeline.search``); by default the decoded ``uint8`` pixels scaled."""
        return float_images(self.decode(x0, height, width), self.device)

    def guided_denoiser(self, cond: Any, uncond: Any, scale: torch.Tensor, model_fn=None, feature_cache: bool = True,
                        **options):
        """Default guidance: classifier-free, cond + uncond in one batched call (Flux-dev overrides it).
        ``options`` go to ``pipeline.denoisers.cfg`` (``interval``, ``rescale``, ``threshold``);
        ``feature_cache=False`` runs the full network at every call even under ``model.cache`` (for search
        methods that resample particles: a resampled particle would keep another one's deep feature)."""
        from ..denoisers import cfg
        fn = model_fn or self.model_fn
        if self.guidance_interval is not None:
            options.setdefault("interval", self.guidance_interval)
        return cfg(self.cached(fn) if feature_cache else fn, cond, uncond, scale, **options)

    def cached(self, model_fn):
        """``model_fn`` under a fresh feature cache when ``model.cache`` is on (one per guided denoiser,
        i.e. per micro-batch), else itself."""
        from ..denoisers import feature_cached
        return feature_cached(model_fn, self.cache_interval) if self.cache_interval else model_fn

    # ---- opt-in savings (pipeline.models.savings)
    @property
    def savings(self) -> dict:
        """The opt-in, training-free savings this model runs with, for each image's metadata: ``{}`` when
        none is on, else e.g. ``{"cache": {"method": "deepcache", "interval": 3}, "quantize": "fp8"}``."""
        out: dict = {}
        if self.cache_interval:
            out["cache"] = {"method": "deepcache", "interval": self.cache_interval}
        if self.quantized:
            out["quantize"] = self.quantized
        if self.guidance_interval is not None:
            out["guidance_interval"] = list(self.guidance_interval)
        return out

    def use_savings(self, cfg) -> None:
        """Turn on, at load, the savings a ``ModelConfig`` names: FP8 Linear layers in the network
        (``model.quantize``) and feature caching (``model.cache``); ``ConfigError`` naming the key where
        this model or machine cannot."""
        from .savings import quantize
        if cfg.quantize:
            quantize(self.net, cfg.quantize, self.device)
            self.quantized = cfg.quantize
        if cfg.cache:
            self.enable_cache(cfg.cache, cfg.cache_interval)
        if cfg.guidance_interval is not None:
            self.guidance_interval = tuple(float(v) for v in cfg.guidance_interval)

    def enable_cache(self, method: str, interval: int) -> None:
        """Feature caching (``model.cache``): backends whose network has a deep/shallow split override this."""
        raise ConfigError("model.cache", f"{self.model_id} has no deep/shallow network split for {method!r}")

    def compile(self, mode: str, backend: str) -> None:
        """``torch.compile`` the network with static shapes (``dynamic=False``): the generator pads
        micro-batches to a few fixed sizes and compiles each once, before any row."""
        self.net = torch.compile(self.net, mode=mode, backend=backend, dynamic=False)

    def sigma_range(self, height: int, width: int) -> tuple[float, float]:
        """Sampling grid end points at this resolution (resolution-dependent flow shift overrides it)."""
        return self.sigma_min, self.sigma_max
