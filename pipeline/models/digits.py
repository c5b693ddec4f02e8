"""The built-in model: a small class-conditional EDM diffusion model of handwritten digits.

Trained by ``python -m jobs.train`` (``pipeline.models.digits_train``) on scikit-learn's 8x8
digits (1,797 images that ship inside scikit-learn), upsampled to 16x16, with 10% label
dropout so classifier-free guidance works. This module is what generation needs: the
network, prompt parsing and loading the weights. The network is preconditioned as in Karras et al. 2022 (EDM), so it is a
denoiser ``D(x, sigma, label) -> x0_hat`` with no adapter. Prompts select the class:
``"7"``, ``"digit 7"``, ``"a handwritten seven"``; an empty prompt is unconditional.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import echo

WEIGHTS_DIR = Path(__file__).parent / "weights"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "no label" token used for unconditional / CFG
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_RE = re.compile(r"(?<![0-9])([0-9])(?![0-9])|\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)


@dataclass
class DigitsNetConfig:
    """The network's shape and its EDM noise range (stored in the weights file's metadata)."""
    resolution: int = 16            # the model's own image size (decoding resizes)
    channels: int = 32              # base width of the U-Net
    emb_dim: int = 128              # noise-level and label embedding size
    sigma_data: float = 0.5         # EDM preconditioning: the data's standard deviation
    sigma_min: float = 0.002        # the sampling range
    sigma_max: float = 80.0


def parse_label(prompt: str | None) -> int:
    """Map a prompt to a class: the one digit ("7") or number word ("seven") it names.

    An empty or missing prompt means unconditional. Raises ``ValueError`` when the prompt
    names no digit or several different ones.
    """
    if prompt is None or not prompt.strip():
        return NULL_CLASS
    found = {int(m.group(1)) if m.group(1) else _WORDS.index(m.group(2).lower())
             for m in _DIGIT_RE.finditer(prompt)}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(f"the built-in digits model needs a prompt naming one digit 0-9 "
                         f"(e.g. 'digit 7' or 'seven'), but {echo(prompt)} names {what}")
    return found.pop()


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class DigitsNet(nn.Module):
    """A two-level U-Net (16x16 -> 8x8 -> 4x4) with FiLM conditioning on noise level and label."""

    def __init__(self, cfg: DigitsNetConfig = DigitsNetConfig()):
        super().__init__()
        self.cfg = cfg
        c, e = cfg.channels, cfg.emb_dim
        self.register_buffer("freqs", torch.randn(e // 2, generator=torch.Generator().manual_seed(0)) * 4,
                             persistent=False)
        self.noise_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, e)
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.down1, self.pool1 = ResBlock(c, c, e), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.down2, self.pool2 = ResBlock(2 * c, 2 * c, e), nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ResBlock(2 * c, 2 * c, e), ResBlock(2 * c, 2 * c, e)
        self.up2 = ResBlock(4 * c, 2 * c, e)
        self.up1 = ResBlock(3 * c, c, e)
        self.norm_out, self.conv_out = nn.GroupNorm(8, c), nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.forward_split(x_in, c_noise, label)[0]

    def forward_split(self, x_in: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor,
                      deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, deep feature): the deep feature is the 8x8 branch's output (``up2``), which the last
        up block upsamples. Given ``deep`` (DeepCache, ``pipeline.denoisers.FeatureCache``), only the
        shallow branch runs: ``conv_in``, ``down1``, ``up1`` and the output head."""
        f = c_noise[:, None].float() * self.freqs[None] * 2 * math.pi
        emb = self.noise_mlp(torch.cat([f.cos(), f.sin()], dim=1)) + self.label_emb(label)
        emb = F.silu(emb)
        h1 = self.down1(self.conv_in(x_in), emb)
        if deep is None:
            h2 = self.down2(self.pool1(h1), emb)
            h = self.mid2(self.mid1(self.pool2(h2), emb), emb)
            deep = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1), emb)
        h = self.up1(torch.cat([F.interpolate(deep, scale_factor=2.0, mode="nearest"), h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h))), deep

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """EDM-preconditioned denoiser: ``x0_hat = c_skip x + c_out F(c_in x, c_noise, label)``."""
        return self.denoise_split(x, sigma, label)[0]

    def denoise_split(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor,
                      deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``denoise`` through ``forward_split``: (x0_hat, deep feature)."""
        sd = self.cfg.sigma_data
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        out, deep = self.forward_split(c_in * x, sigma.log().to(x.dtype) / 4, label, deep)
        return c_skip * x + c_out * out, deep


class DigitsClassifier(nn.Module):
    """The ``digits`` reward's network (``pipeline.rewards``): a small CNN over 16x16 grey digits in
    [-1, 1], the built-in model's own image space (trained by ``digits_train.train_reward_classifier``)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> the classifier's input: grey, 16x16, in [-1, 1]."""
        grey = images.float().mean(dim=1, keepdim=True)
        if grey.shape[-2:] != (16, 16):
            grey = F.interpolate(grey, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        return grey * 2 - 1


def load(path: str | Path | None = None) -> DigitsNet:
    """Load weights from a folder or a ``.safetensors`` file (default: the packaged weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path) if path else WEIGHTS_DIR
    file = p / "digits.safetensors" if p.is_dir() else p
    if not file.exists():
        raise FileNotFoundError(f"model.path: no digits weights at {file} (train them with `python -m jobs.train`)")
    with safe_open(str(file), "pt") as f:
        cfg = DigitsNetConfig(**json.loads(f.metadata()["config"]))
    net = DigitsNet(cfg)
    net.load_state_dict(load_file(str(file)))
    return net.eval()
