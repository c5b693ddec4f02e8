"""Training and evaluating the built-in digits model: the data, the EDM training loop, saving the
weights, and the reference classifier that checks generated digits (``python -m jobs.train``)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .digits import NULL_CLASS, DigitsNet, DigitsNetConfig


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


def train_reward_classifier(*, steps: int = 3000, batch_size: int = 128, lr: float = 3e-3, width: int = 16,
                            holdout: float = 0.2, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train the ``digits`` reward's CNN (``pipeline.rewards.DigitsClassifier``) on scikit-learn's digits.

    The images are those the built-in model learned from (16x16 in [-1, 1]); each batch is
    augmented with shifts of up to one pixel, contrast changes and a little Gaussian noise, so the
    classifier reads generated digits too. ``holdout`` of the images (a seeded split) are never
    trained on and give the reported accuracy. Deterministic for a seed and thread count.
    """
    from .digits import DigitsClassifier

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data, labels = load_digits_data(16)
    perm = torch.randperm(len(data), generator=g)
    n_test = int(holdout * len(data))
    test, train_idx = perm[:n_test], perm[n_test:]
    net = DigitsClassifier(width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (batch_size,), generator=g)]
        x = F.pad(data[idx], (1, 1, 1, 1), value=-1.0)
        dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
        x = x[..., dy:dy + 16, dx:dx + 16]
        contrast = 0.7 + 0.3 * torch.rand(batch_size, 1, 1, 1, generator=g)
        x = ((x + 1) * contrast - 1 + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(data[test]).argmax(-1) == labels[test]).float().mean().item()
    meta = {"width": width, "steps": steps, "batch_size": batch_size, "lr": lr, "holdout": holdout, "seed": seed,
            "holdout_images": n_test, "holdout_accuracy": round(accuracy, 4), "torch": torch.__version__}
    return net, meta


def save_reward_classifier(net: torch.nn.Module, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps({"width": meta["width"]})})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
