"""Backend for the packaged digits model (``model.kind: builtin``)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..denoisers import active_feature_cache
from . import digits
from .base import DiffusionModel, RequestError

MAX_SIDE = 512


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class BuiltinDigits(DiffusionModel):
    """Class-conditional 16x16 digits; decoding resizes to the requested height/width."""

    def __init__(self, net: digits.DigitsNet, model_id: str, device: torch.device, dtype: torch.dtype):
        self.net = net.to(device=device, dtype=dtype).requires_grad_(False)   # frozen: calibration needs input grads only
        self.model_id, self.device, self.dtype = model_id, device, dtype
        self.sigma_min, self.sigma_max = net.cfg.sigma_min, net.cfg.sigma_max
        self.resolution = net.cfg.resolution
        self._denoise, self._split = net.denoise, net.denoise_split

    def compile(self, mode: str, backend: str) -> None:
        """The EDM-preconditioned denoiser compiled as one graph, network and preconditioning together
        (with ``model.cache``, its full and shallow branches)."""
        self._denoise = torch.compile(self.net.denoise, mode=mode, backend=backend, dynamic=False)
        if self.cache_interval:
            self._split = torch.compile(self.net.denoise_split, mode=mode, backend=backend, dynamic=False)

    def enable_cache(self, method: str, interval: int) -> None:
        """DeepCache on the U-Net: the 8x8 branch's output is the deep feature (``DigitsNet.forward_split``)."""
        self.cache_interval = interval

    fixed_latent = True       # always 16x16: decoding resizes

    @classmethod
    def model_id_for(cls, cfg) -> str:
        """``builtin-digits-<first 12 hex of the weights' SHA-256>``."""
        file = Path(cfg.path or digits.WEIGHTS_DIR)
        file = file / "digits.safetensors" if file.is_dir() else file
        return f"builtin-digits-{hashlib.sha256(file.read_bytes()).hexdigest()[:12]}"

    @classmethod
    def load(cls, cfg) -> "BuiltinDigits":
        model = cls(digits.load(cfg.path), cls.model_id_for(cfg), resolve_device(cfg.device), getattr(torch, cfg.dtype))
        model.use_savings(cfg)
        return model

    @classmethod
    def check_request(cls, prompt, negative_prompt, height, width) -> None:
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            try:
                digits.parse_label(text)
            except ValueError as e:
                raise RequestError(name, str(e)) from None
        for name, side in (("height", height), ("width", width)):
            if not 8 <= side <= MAX_SIDE:
                raise RequestError(name, f"the built-in model renders 8..{MAX_SIDE} pixels, got {side}")

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str]):
        def labels(texts):
            return torch.tensor([digits.parse_label(t) for t in texts], dtype=torch.long, device=self.device)
        return labels(prompts), labels(negative_prompts)

    def model_fn(self, x, sigma, cond):
        xm, sigma = x.to(self.dtype), sigma.to(self.device)
        cache = active_feature_cache()
        if cache is None:
            return self._denoise(xm, sigma, cond).to(x.dtype)
        return cache.run(x.shape[0], lambda: self._split(xm, sigma, cond),
                         lambda deep: self._split(xm, sigma, cond, deep)[0]).to(x.dtype)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (1, self.resolution, self.resolution)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, height: int, width: int) -> np.ndarray:
        img = ((x0.float().clamp(-1, 1) + 1) * 127.5)
        if (height, width) != tuple(img.shape[-2:]):
            img = F.interpolate(img, size=(height, width), mode="bilinear", align_corners=False)
        return img.round().clamp(0, 255).to(torch.uint8)[:, 0].cpu().numpy()
