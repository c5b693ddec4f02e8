"""The built-in model: a small class-conditional EDM diffusion model of handwritten digits.

Trained by ``python -m jobs.train`` on scikit-learn's 8x8 digits (1,797 images that ship
inside scikit-learn), upsampled to 16x16, with 10% label dropout so classifier-free
guidance works. The network is preconditioned as in Karras et al. 2022 (EDM), so it is a
denoiser ``D(x, sigma, label) -> x0_hat`` with no adapter. Prompts select the class:
``"7"``, ``"digit 7"``, ``"a handwritten seven"``; an empty prompt is unconditional.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "no label" token used for unconditional / CFG
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_RE = re.compile(r"(?<![0-9])([0-9])(?![0-9])|\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)


@dataclass
class DigitsNetConfig:
    resolution: int = 16
    channels: int = 32
    emb_dim: int = 128
    sigma_data: float = 0.5
    sigma_min: float = 0.002
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
                         f"(e.g. 'digit 7' or 'seven'), but {prompt!r} names {what}")
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
        f = c_noise[:, None].float() * self.freqs[None] * 2 * math.pi
        emb = self.noise_mlp(torch.cat([f.cos(), f.sin()], dim=1)) + self.label_emb(label)
        emb = F.silu(emb)
        h1 = self.down1(self.conv_in(x_in), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid2(self.mid1(self.pool2(h2), emb), emb)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """EDM-preconditioned denoiser: ``x0_hat = c_skip x + c_out F(c_in x, c_noise, label)``."""
        sd = self.cfg.sigma_data
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        return c_skip * x + c_out * self(c_in * x, sigma.log().to(x.dtype) / 4, label)


def load_digits_data(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``[N, 1, R, R]`` floats in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x * 2 - 1, torch.tensor(d.target, dtype=torch.long)


def save(net: DigitsNet, out_dir: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(tensors, str(out_dir / "digits.safetensors"), metadata={"config": json.dumps(asdict(net.cfg))})
    (out_dir / "digits.json").write_text(json.dumps({"config": asdict(net.cfg), **meta}, indent=2, sort_keys=True) + "\n")


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


def train(net_cfg: DigitsNetConfig, *, steps: int, batch_size: int, lr: float, label_dropout: float,
          p_mean: float, p_std: float, ema_decay: float, seed: int, threads: int | None = None,
          log_every: int = 500) -> tuple[DigitsNet, dict]:
    """EDM training (Karras et al. 2022, sec. 5): log-normal sigmas, loss weight (s^2+sd^2)/(s*sd)^2."""
    import copy
    import logging
    import time

    log = logging.getLogger("pipeline.train")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data, labels = load_digits_data(net_cfg.resolution)
    net = DigitsNet(net_cfg)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    sd, t0, losses = net_cfg.sigma_data, time.time(), []
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < label_dropout] = NULL_CLASS
        sigma = (torch.randn(batch_size, generator=g) * p_std + p_mean).exp()
        x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g)
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        loss = (weight[:, None, None, None] * (net.denoise(x, sigma, y) - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            log.info("step %d/%d  loss %.4f  %.1fs", step + 1, steps, float(np.mean(losses[-log_every:])),
                     time.time() - t0)
    meta = {"steps": steps, "batch_size": batch_size, "lr": lr, "label_dropout": label_dropout,
            "p_mean": p_mean, "p_std": p_std, "ema_decay": ema_decay, "seed": seed,
            "final_loss": float(np.mean(losses[-200:])), "train_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__}
    return ema, meta


def reference_classifier():
    """An SVM fitted on the real 8x8 digits (never on generated images), for quality checks."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(d.data, d.target)


def to_digits_features(images: np.ndarray) -> np.ndarray:
    """``uint8`` images ``[N, H, W]`` -> the classifier's 64 features (8x8 box-averaged, 0..16)."""
    from PIL import Image

    small = [np.asarray(Image.fromarray(im).resize((8, 8), Image.BOX), dtype=np.float64) for im in images]
    return np.stack(small).reshape(len(images), 64) / 255.0 * 16.0
