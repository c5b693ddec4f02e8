"""Rewards for inference-time search: ``reward(images, prompts) -> scores``.

A reward takes a batch of images ``[B, 3, H, W]`` in [0, 1] (float, on the model's device) and
their prompts, and returns one finite score per image (``[B]``), higher is better. It is called
without gradients, on finished images and, by the steering methods, on the model's clean estimate
mid-trajectory. Rewards are named in ``search.reward``:

* ``digits``: the probability that an image shows the digit its prompt names, from a small CNN
  trained on scikit-learn's digits (``python -m jobs.train reward``; weights shipped in
  ``pipeline/models/weights/digits-reward.safetensors``). An unconditional prompt scores the
  classifier's confidence in its top class.
* ``clip``: CLIP's image-text cosine similarity (transformers ``CLIPModel``) from a local model
  folder, ``search.reward_options: {path: ...}``.
* ``"module:function"``: any importable callable with the signature above (``reward_options``, if
  any, are passed as keyword arguments on each call).

``load_reward`` builds one in a generator actor; ``check_reward`` checks a name on the driver
without loading weights; ``score`` calls one and checks what it returns.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import PipelineError
from .plugins import import_object

Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
WEIGHTS = Path(__file__).parent / "models" / "weights" / "digits-reward.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardError(PipelineError, RuntimeError, alias="reward"):
    """A reward that cannot be loaded, raised, or returned something other than one finite score per image."""


# ---------------------------------------------------------------- digits
def digits_reward(path: str | None = None, device: str | torch.device = "cpu") -> Reward:
    """The ``digits`` reward: p(prompted digit | image) from the shipped classifier."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models.digits import NULL_CLASS, DigitsClassifier, parse_label

    path = str(path or WEIGHTS)
    with safe_open(path, "pt") as f:
        width = int(json.loads(f.metadata()["config"])["width"])
    net = DigitsClassifier(width)
    net.load_state_dict(load_file(path))
    net = net.eval().requires_grad_(False).to(device)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        probs = net(DigitsClassifier.prepare(images.to(device))).softmax(-1)
        labels = torch.tensor([parse_label(p) for p in prompts], device=probs.device)
        top = probs.max(-1).values
        picked = probs.gather(1, labels.clamp(max=9)[:, None])[:, 0]
        return torch.where(labels == NULL_CLASS, top, picked)
    return reward


# ---------------------------------------------------------------- CLIP
def clip_reward(path: str | None = None, device: str | torch.device = "cpu") -> Reward:
    """The ``clip`` reward: cosine similarity of CLIP's image and text embeddings (Radford et al. 2021,
    "Learning Transferable Visual Models From Natural Language Supervision"), from a local folder
    holding a ``CLIPModel`` and its tokenizer. Images are resized (bicubic) to the model's size and
    normalised with CLIP's mean and std in torch, on the device."""
    from transformers import AutoTokenizer, CLIPModel

    if not path:
        raise RewardError("clip", "needs search.reward_options.path: a local folder with a CLIPModel and its tokenizer")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False).to(device)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    size = model.config.vision_config.image_size
    mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=device)[:, None, None]

    def features(out: Any) -> torch.Tensor:      # transformers 4 returns a tensor, 5 an output object
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        px = F.interpolate(images.float().to(device), size=(size, size), mode="bicubic", align_corners=False,
                           antialias=True).clamp(0, 1)
        text = tok(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
        img = features(model.get_image_features(pixel_values=(px - mean) / std))
        txt = features(model.get_text_features(**text))
        return F.cosine_similarity(img.float(), txt.float(), dim=-1)
    return reward


REWARDS: dict[str, Callable[..., Reward]] = {"digits": digits_reward, "clip": clip_reward}


# ---------------------------------------------------------------- loading and calling
def _import(name: str) -> Callable:
    try:
        fn = import_object(name)
    except ImportError as e:
        raise RewardError(name, str(e)) from None
    if not callable(fn):
        raise RewardError(name, "is not callable")
    return fn


def check_reward(name: str | None) -> None:
    """Raise ``RewardError`` unless ``name`` is a registered reward or an importable ``module:function``
    (checked on the driver, before anything starts; no weights are loaded)."""
    if not name:
        raise RewardError("search.reward", f"a search method needs a reward: one of {sorted(REWARDS)} "
                                           "or 'module:function'")
    if ":" in name:
        _import(name)
    elif name not in REWARDS:
        raise RewardError(name, f"unknown reward; allowed: {sorted(REWARDS)} or 'module:function'")


def load_reward(name: str, options: dict | None = None, device: str | torch.device = "cpu") -> Reward:
    """The reward ``name`` ready to call: a built-in one loaded with ``options`` on ``device``, or the
    imported ``module:function`` called with ``options`` as keywords."""
    check_reward(name)
    options = dict(options or {})
    if ":" in name:
        fn = _import(name)
        return (lambda images, prompts: fn(images, prompts, **options)) if options else fn
    try:
        return REWARDS[name](**options, device=device)
    except TypeError as e:
        raise RewardError(name, f"bad search.reward_options {sorted(options)} ({e})") from None


def score(reward: Reward, name: str, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Call ``reward`` on a batch; its scores as a float64 CPU tensor ``[B]``. A reward that raises or
    returns another shape raises ``RewardError``; NaN scores are returned for the caller to reject."""
    with torch.no_grad():
        try:
            out = reward(images, list(prompts))
        except Exception as e:  # noqa: BLE001 - a user's reward may raise anything; it becomes a row error
            raise RewardError(name, f"raised {type(e).__name__}: {e}") from None
    out = torch.as_tensor(out)
    if tuple(out.shape) != (images.shape[0],):
        raise RewardError(name, f"returned shape {tuple(out.shape)} for {images.shape[0]} images; "
                                f"a reward returns one score per image, shape ({images.shape[0]},)")
    return out.detach().to("cpu", torch.float64)
