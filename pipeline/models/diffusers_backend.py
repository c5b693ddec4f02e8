"""Backend for diffusers pipelines (``model.kind: diffusers``); the only module importing diffusers.

A pipeline folder (or hub id) is loaded with ``DiffusionPipeline.from_pretrained`` (safetensors
only) and exposed to the generator as three parts, so the project's own samplers drive it:

* conditioning: the pipeline's own ``encode_prompt`` (negative prompts per row, SDXL pooled
  embeddings, SD3 joint + pooled embeddings, Flux pooled embeddings, PixArt attention masks,
  DiT class labels parsed from the prompt) returned as kwargs dicts for the network;
* a denoiser in EDM variables: ``pipeline.denoisers.adapt`` over the network, with the
  prediction type and noise schedule read from ``pipeline.scheduler.config`` (flow shift and
  Flux's resolution-dependent shift included);
* decoding: the VAE with ``scaling_factor``/``shift_factor`` in the dtype diffusers' own pipeline of
  the family decodes in (``decode_dtype``), chosen once at load, so no weight changes dtype per batch;
  optional tiling/slicing.

Prompts longer than a text encoder's maximum are truncated by the tokenizer; a warning names
the prompt. The DiT pipeline applies guidance to the first 3 latent channels only; this
backend guides all channels, as every other family does.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..denoisers import Flow, active_feature_cache, adapt, conditioned, schedule_from_diffusers_config
from ..errors import ConfigError
from .base import DiffusionModel, RequestError

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- folder / hub layout (no weights)
def _offline(local_files_only: bool) -> bool:
    return local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def locate(path: str, local_files_only: bool = False) -> Path | None:
    """The local folder holding ``path``: the folder itself, or the hub id's cached snapshot.

    Returns None for a hub id that is not cached while downloads are allowed (the actor will
    download it). Raises ``FileNotFoundError`` naming the path when it cannot exist.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} has no model_index.json: not a diffusers pipeline folder")
        return p
    if not HUB_ID.match(path) or p.exists():
        raise FileNotFoundError(f"{path} does not exist (not a folder, and not a hub id like 'org/name')")
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(path, "model_index.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if _offline(local_files_only):
        raise FileNotFoundError(f"{path} is not in the local Hugging Face cache and downloads are off "
                                "(HF_HUB_OFFLINE / model.local_files_only)")
    return None


def _read_json(folder: Path, *parts: str) -> dict:
    f = folder.joinpath(*parts)
    return json.loads(f.read_text()) if f.is_file() else {}


def describe(folder: Path) -> dict:
    """What the driver can know from config files alone: pipeline class, pixel multiple, labels."""
    index = _read_json(folder, "model_index.json")
    name = index.get("_class_name", "?")
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(f"unsupported pipeline class {name!r}; supported: {sorted(FAMILIES)}")
    vae = _read_json(folder, "vae", "config.json")
    net = _read_json(folder, family.net_name, "config.json")
    vsf = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    labels = family.label_table(index.get("id2label")) if family is DiT else None
    schedule, _ = schedule_from_diffusers_config(_read_json(folder, "scheduler", "scheduler_config.json"))
    return {"class": name, "multiple": vsf * family.patch(net), "labels": labels, "schedule_kind": schedule.kind,
            "snapshot": folder.name if folder.parent.name == "snapshots" else None}


# ---------------------------------------------------------------- the backend
class DiffusersModel(DiffusionModel):
    """A diffusers pipeline as conditioning + EDM denoiser + decoder; one subclass per family.

    Subclasses set ``net_name`` (the pipeline's denoising network) and implement
    ``encode``/``call_net``; ``patch`` is the network's extra spatial factor over the VAE's.
    """
    net_name = "unet"
    layout: dict | None = None          # set on the class ``for_config`` returns (driver checks)
    feature_cache = False               # model.cache=deepcache: the network has a deep/shallow split (UNets)
    honours_force_upcast = False        # the family's diffusers pipeline decodes an fp16 VAE in float32 when
                                        # its config says so (``force_upcast``): SDXL's does, the others do not
    PROBE_LATENT = 32                   # side of the latent decoded at load to measure fp16 overflow

    def __init__(self, pipe, cfg):
        self.pipe, self.cfg = pipe, cfg
        self.dtype = getattr(torch, cfg.dtype)
        self.device = _device(cfg.device)
        pipe.to(self.device)
        for part in pipe.components.values():        # frozen: calibration needs gradients by the input only
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False)
        self.vae = pipe.vae
        dtype, why = self.decode_dtype()
        if dtype != self.vae.dtype:                  # once, at load: never a cast per batch
            log.info("the VAE decodes in %s (its weights were %s): %s", dtype, self.vae.dtype, why)
            self.vae.to(dtype)
        if self.device.type == "cuda":              # TF32 matmuls, as diffusers' speed-up guide recommends
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if cfg.vae_tiling:
            self.vae.enable_tiling()
        if cfg.vae_slicing:
            self.vae.enable_slicing()
        self.net = getattr(pipe, self.net_name)
        if cfg.channels_last:
            for module in (self.net, self.vae):
                module.to(memory_format=torch.channels_last)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.schedule, self.prediction = self.read_schedule(dict(pipe.scheduler.config))
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max
        self._model_fn = adapt(self._net_call, self.schedule, self.prediction)
        self.model_id = f"{type(pipe).__name__}:{cfg.path}"
        self.guidance_in_model = False
        self._constants: dict = {}
        self.use_savings(cfg)

    def compile(self, mode: str, backend: str) -> None:
        """diffusers' speed-up recipe: fused QKV projections, then the denoiser and the VAE decoder
        compiled with static shapes (channels_last is ``model.channels_last``)."""
        for module in (self.net, self.vae):
            if hasattr(module, "fuse_qkv_projections"):
                module.fuse_qkv_projections()
        super().compile(mode, backend)
        self.vae.decode = torch.compile(self.vae.decode, mode=mode, backend=backend, dynamic=False)
        if self.cache_interval:
            self._shallow = torch.compile(self._shallow, mode=mode, backend=backend, dynamic=False)

    # ---- loading and driver checks
    @classmethod
    def load(cls, cfg) -> "DiffusersModel":
        """``DiffusionPipeline.from_pretrained`` (safetensors only), then the family's subclass."""
        from diffusers import DiffusionPipeline
        if not cfg.path:
            raise ConfigError("model.path", "set a diffusers pipeline folder or hub id for model.kind=diffusers")
        folder = locate(cfg.path, cfg.local_files_only)
        layout = describe(folder) if folder else None
        extra = {}
        index = _read_json(folder, "model_index.json") if folder else {}
        for part in ("safety_checker", "feature_extractor", "image_encoder"):
            if part in index:
                extra[part] = None              # never load unused parts (the safety checker is 1.2 GB)
        pipe = DiffusionPipeline.from_pretrained(
            str(folder or cfg.path), dtype=getattr(torch, cfg.dtype), use_safetensors=True,
            variant=cfg.variant, local_files_only=_offline(cfg.local_files_only), **extra)
        family = FAMILIES.get(type(pipe).__name__)
        if family is None:
            raise ConfigError("model.path", f"unsupported pipeline class {type(pipe).__name__!r}; "
                             f"supported: {sorted(FAMILIES)}")
        model = family(pipe, cfg)
        model.layout = layout
        if folder is not None and folder.parent.name == "snapshots":
            model.model_id += f"@{folder.name}"          # the hub revision a cached snapshot holds
        pipe.set_progress_bar_config(disable=True)
        return model

    @classmethod
    def for_config(cls, cfg) -> type["DiffusersModel"]:
        """This class with the folder's layout attached, so ``check_request`` knows the model.

        Reads config files only (no weights); raises ``ConfigError`` naming ``model.path`` for a
        missing path or an unsupported pipeline class.
        """
        if not cfg.path:
            raise ConfigError("model.path", "set a diffusers pipeline folder or hub id for model.kind=diffusers")
        try:
            folder = locate(cfg.path, cfg.local_files_only)
            layout = describe(folder) if folder else None
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError("model.path", str(e)) from None
        kind = (layout or {}).get("schedule_kind", "ve")
        family = FAMILIES.get((layout or {}).get("class"))
        if cfg.cache and family is not None and not family.feature_cache:
            raise ConfigError("model.cache", f"{layout['class']} has no UNet to split into deep and shallow "
                                             f"branches; {cfg.cache} runs on SD and SDXL pipelines (and the built-in model)")
        return type(cls.__name__, (cls,), {"layout": layout, "schedule_kind": kind})

    @classmethod
    def model_id_for(cls, cfg) -> str:
        """``PipelineClass:path``, plus ``@revision`` for a cached hub snapshot (as ``load`` sets it)."""
        layout = cls.for_config(cfg).layout or {}
        mid = f"{layout.get('class', '?')}:{cfg.path}"
        return mid + (f"@{layout['snapshot']}" if layout.get("snapshot") else "")

    @classmethod
    def check_request(cls, prompt, negative_prompt, height, width) -> None:
        """Sizes must be multiples of the VAE factor times the patch size (8 when the model is unknown)."""
        layout = cls.layout or {}
        multiple = layout.get("multiple", 8)
        for name, side in (("height", height), ("width", width)):
            if side < multiple or side % multiple:
                raise RequestError(name, f"{layout.get('class', 'this model')} needs a positive multiple of "
                                         f"{multiple} pixels, got {side}")
        if layout.get("labels") is not None:
            for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
                try:
                    DiT.parse_label(text, layout["labels"])
                except ValueError as e:
                    raise RequestError(name, str(e)) from None

    # ---- the schedule
    @staticmethod
    def read_schedule(config: dict):
        return schedule_from_diffusers_config(config)

    def grid_options(self, grid: str | None, height: int, width: int) -> dict:
        """Flow grids follow the model's flow shift at this size (its sigma_max over an unshifted one's)."""
        if self.schedule.kind != "flow" or grid not in ("flow", "flow_uniform"):
            return {}
        return {"shift": self.sigma_range(height, width)[1] / Flow(shift=1.0).sigma_max}

    # ---- the generator's interface
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.vae.config.latent_channels, height // f, width // f)

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        return self._model_fn(x, sigma.to(x.device), cond)

    def _net_call(self, x_net: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Run the network in its own dtype; learned-variance outputs keep the mean channels."""
        out = self.call_net(x_net.to(self.dtype), t.to(x_net.device), cond)
        return out[:, : x_net.shape[1]] if out.shape[1] == 2 * x_net.shape[1] else out

    def call_net(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def on_device(self, key: tuple, make):
        """A constant of the network's inputs (size conditions, time ids) made once per ``key`` and kept
        on the device, so the sampling loop copies nothing from the host per model call."""
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    @torch.inference_mode()
    def decode_dtype(self) -> tuple[torch.dtype, str]:
        """(dtype, why) the VAE decodes in, chosen once at load: the one diffusers' own pipeline of this
        family uses by default (the VAE's own; SDXL: float32 for an fp16 VAE whose config sets
        ``force_upcast``), and float32 for an fp16 VAE whose decoder is measured to overflow (a fixed
        random latent, decoded in fp16 at load, comes out with NaN/Inf)."""
        vae = self.vae
        if vae.dtype != torch.float16:
            return vae.dtype, "its own dtype"
        if self.honours_force_upcast and vae.config.get("force_upcast", False):
            return torch.float32, f"force_upcast, as {type(self.pipe).__name__} does"
        side = self.PROBE_LATENT
        probe = torch.randn(1, vae.config.latent_channels, side, side,
                            generator=torch.Generator().manual_seed(0)).to(self.device, vae.dtype)
        if not torch.isfinite(vae.decode(probe / vae.config.scaling_factor, return_dict=False)[0]).all():
            return torch.float32, "a probe latent overflowed the fp16 decoder"
        return vae.dtype, "its own dtype"

    @torch.inference_mode()
    def decode_float(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean latents -> images ``[B, H, W, 3]`` in [0, 1] (float32), as diffusers' ``output_type='np'``.

        The VAE runs in its own dtype (``decode_dtype`` set it at load), on latents cast to it."""
        cfg = self.vae.config
        latents = x0 / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        if self.cfg.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        image = self.vae.decode(latents.to(device=self.device, dtype=self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    def images(self, x0: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.decode_float(x0).permute(0, 3, 1, 2)

    def decode(self, x0: torch.Tensor, height: int, width: int) -> np.ndarray:
        return (self.decode_float(x0) * 255).round().to(torch.uint8).cpu().numpy()

    # ---- helpers for subclasses
    def warn_truncation(self, tokenizer, texts: Sequence[str], max_length: int | None = None) -> None:
        """Log a warning for each text longer than ``tokenizer`` takes (it gets truncated)."""
        limit = max_length or tokenizer.model_max_length
        for text in set(texts):
            n = len(tokenizer(text, truncation=False).input_ids)
            if n > limit:
                log.warning("prompt truncated to %d tokens (it has %d) by %s: %.60r", limit, n,
                            type(tokenizer).__name__, text)

    @staticmethod
    def patch(net_config: dict) -> int:
        return int(net_config.get("patch_size") or 1)

    def seq_len(self, default: int) -> int:
        return self.cfg.max_sequence_length or default


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- families
class SD(DiffusersModel):
    """Stable Diffusion 1.x/2.x: CLIP hidden states -> UNet (eps or v prediction, VP discrete)."""
    feature_cache = True

    def encode(self, prompts, negative_prompts):
        self.warn_truncation(self.pipe.tokenizer, list(prompts) + list(negative_prompts))
        pe, ne = self.pipe.encode_prompt(list(prompts), self.device, 1, True, negative_prompt=list(negative_prompts))
        return {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne}

    def call_net(self, x, t, cond):
        return self.run_unet(x, t, **cond)

    def run_unet(self, x, t, **inputs):
        """The UNet; under a feature cache (``model.cache=deepcache``) its full or its shallow branch."""
        cache = active_feature_cache()
        if cache is None:
            return self.net(x, t, return_dict=False, **inputs)[0]
        return cache.run(x.shape[0], lambda: self._full(x, t, inputs), lambda deep: self._shallow(x, t, deep, **inputs))

    def _full(self, x, t, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x, t, return_dict=False, **inputs)[0]
        return out, self._last_up.kept[0]

    def enable_cache(self, method: str, interval: int) -> None:
        """DeepCache (Ma et al. 2024) on the UNet, split at its outermost level: the deep feature is the
        input of the last up block (``KeepsInput`` keeps it at every full call); ``shallow_unet`` is the rest."""
        c = self.net.config
        if c.class_embed_type is not None or c.addition_embed_type not in (None, "text_time"):
            raise ConfigError("model.cache", f"{method}: UNets with class or {c.addition_embed_type!r} "
                                             "embeddings are not supported")
        last = self.net.up_blocks[-1]        # another model object on the same pipeline may have wrapped it
        self._last_up = self.net.up_blocks[-1] = last if isinstance(last, KeepsInput) else KeepsInput(last)
        self._shallow = functools.partial(shallow_unet, self.net)
        self.cache_interval = interval


class KeepsInput(torch.nn.Module):
    """A UNet's last up block that keeps the hidden states it is given (DeepCache's deep feature) in
    ``kept[0]``: a module of its own rather than a hook, which Dynamo does not guard on, so compiled code
    of a UNet without it is never reused for one with it."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block, self.kept = block, [None]
        self.has_cross_attention = getattr(block, "has_cross_attention", False)

    @property
    def resnets(self):                       # the UNet's forward counts its skip inputs by these
        return self.block.resnets

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        self.kept[0] = hidden_states
        return self.block(hidden_states=hidden_states, **kwargs)


def shallow_unet(unet, sample: torch.Tensor, timestep: torch.Tensor, deep: torch.Tensor, encoder_hidden_states,
                 added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """DeepCache's shallow branch of a ``UNet2DConditionModel``: the time (and SDXL's added) embedding,
    ``conv_in`` and the first down block for their skip connections, then the last up block on ``deep``
    (its input at the last full call) and the output head; the deeper blocks do not run. With ``deep``
    from the same input this is the full UNet's output (tested)."""
    added = added_cond_kwargs or {}
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    emb = emb if aug is None else emb + aug
    emb = emb if unet.time_embed_act is None else unet.time_embed_act(emb)
    text = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    h = unet.conv_in(sample)
    _, res = first(hidden_states=h, temb=emb, **_cross(first, text))
    skips = ((h,) + tuple(res))[:len(last.resnets)]          # the last up block's skip inputs, outermost first
    h = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, **_cross(last, text))
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def _cross(block, text) -> dict:
    return {"encoder_hidden_states": text} if getattr(block, "has_cross_attention", False) else {}


class SDXL(SD):
    """SDXL: two CLIP encoders, pooled embeddings and size/crop time ids as added conditions.

    An empty negative prompt gives zero embeddings where the model asks for it
    (``force_zeros_for_empty_prompt``), as the diffusers pipeline does by default.
    """
    honours_force_upcast = True

    def encode(self, prompts, negative_prompts):
        p, negs = self.pipe, list(negative_prompts)
        self.warn_truncation(p.tokenizer, list(prompts) + negs)
        pe, ne, pp, npool = p.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=True, negative_prompt=negs)
        if p.config.get("force_zeros_for_empty_prompt", True):
            empty = torch.tensor([n == "" for n in negs], device=ne.device)
            ne = torch.where(empty[:, None, None], torch.zeros_like(ne), ne)
            npool = torch.where(empty[:, None], torch.zeros_like(npool), npool)
        return ({"encoder_hidden_states": pe, "text_embeds": pp},
                {"encoder_hidden_states": ne, "text_embeds": npool})

    def call_net(self, x, t, cond):
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        proj = self.pipe.text_encoder_2.config.projection_dim
        ids = self.on_device(("time_ids", h, w, x.dtype, x.device), lambda: self.pipe._get_add_time_ids(
            (h, w), (0, 0), (h, w), dtype=x.dtype, text_encoder_projection_dim=proj).to(x.device))
        added = {"text_embeds": cond["text_embeds"], "time_ids": ids.repeat(x.shape[0], 1)}
        return self.run_unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added)


class SD3(DiffusersModel):
    """SD3/SD3.5: CLIP-L + CLIP-G + T5 joint embeddings, pooled projections; flow model with t*1000 input."""
    net_name = "transformer"

    def encode(self, prompts, negative_prompts):
        p = self.pipe
        self.warn_truncation(p.tokenizer, list(prompts) + list(negative_prompts))
        pe, ne, pp, npool = p.encode_prompt(list(prompts), None, None, device=self.device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=True,
                                            negative_prompt=list(negative_prompts),
                                            max_sequence_length=self.seq_len(256))
        return ({"encoder_hidden_states": pe, "pooled_projections": pp},
                {"encoder_hidden_states": ne, "pooled_projections": npool})

    def call_net(self, x, t, cond):
        return self.net(hidden_states=x, timestep=t * 1000, return_dict=False, **cond)[0]


class Flux(DiffusersModel):
    """Flux: CLIP pooled + T5 embeddings, 2x2-packed latents with positional ids, flow input t.

    Guidance-distilled checkpoints (``guidance_embeds``, Flux-dev) take the row's
    ``guidance_scale`` as the guidance embedding in one branch (``guided_denoiser``);
    the negative prompt is not used then. Other checkpoints get two-branch classifier-free guidance.
    The flow shift is resolution-dependent (``use_dynamic_shifting``): see ``sigma_range``.
    """
    net_name = "transformer"

    def __init__(self, pipe, cfg):
        super().__init__(pipe, cfg)
        self.guidance_in_model = bool(pipe.transformer.config.get("guidance_embeds", False))
        h = w = pipe.default_sample_size * self.vae_scale_factor
        self.sigma_min, self.sigma_max = self.sigma_range(h, w)

    @staticmethod
    def patch(net_config: dict) -> int:
        return 2                                  # latents are packed in 2x2 patches

    def sigma_range(self, height, width):
        c = self.pipe.scheduler.config
        if not c.get("use_dynamic_shifting"):
            return self.schedule.sigma_min, self.schedule.sigma_max
        seq = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (c.get("max_image_seq_len", 4096)
                                                                        - c.get("base_image_seq_len", 256))
        mu = c.get("base_shift", 0.5) + slope * (seq - c.get("base_image_seq_len", 256))
        grid = Flow(shift=math.exp(mu))           # exponential time shift with exponent 1 = flow shift e^mu
        return grid.sigma_min, grid.sigma_max

    def encode(self, prompts, negative_prompts):
        p, n = self.pipe, self.seq_len(512)
        texts = list(prompts) + list(negative_prompts)
        self.warn_truncation(p.tokenizer, texts)
        self.warn_truncation(p.tokenizer_2, texts, n)
        pe, pp, _ = p.encode_prompt(texts, texts, device=self.device, max_sequence_length=n)
        b = len(prompts)
        return ({"encoder_hidden_states": pe[:b], "pooled_projections": pp[:b]},
                {"encoder_hidden_states": pe[b:], "pooled_projections": pp[b:]})

    def guided_denoiser(self, cond, uncond, scale, model_fn=None, feature_cache=True, **options):
        """Guidance-distilled: one conditional branch with ``scale`` as the guidance embedding."""
        if not self.guidance_in_model:
            return super().guided_denoiser(cond, uncond, scale, model_fn, feature_cache, **options)
        return conditioned(model_fn or self.model_fn, {**cond, "guidance": scale.to(torch.float32)})

    def call_net(self, x, t, cond):
        b, c, h, w = x.shape
        p = self.pipe
        packed = p._pack_latents(x, b, c, h, w)
        img_ids = self.on_device(("img_ids", h, w, x.dtype, x.device),
                                 lambda: p._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype))
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = cond["guidance"].to(x.device, torch.float32) if self.guidance_in_model else None
        out = self.net(hidden_states=packed, timestep=t.to(x.dtype), guidance=guidance,
                       pooled_projections=cond["pooled_projections"],
                       encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=txt_ids, img_ids=img_ids,
                       return_dict=False)[0]
        f = self.vae_scale_factor
        return p._unpack_latents(out, h * f, w * f, f)


class PixArt(DiffusersModel):
    """PixArt-alpha/sigma: T5 embeddings with attention masks; learned-variance DiT (mean kept)."""
    net_name = "transformer"

    def encode(self, prompts, negative_prompts):
        p = self.pipe
        n = self.seq_len(300 if type(p).__name__ == "PixArtSigmaPipeline" else 120)
        self.warn_truncation(p.tokenizer, list(prompts) + list(negative_prompts), n)
        pe, pm, ne, nm = p.encode_prompt(list(prompts), True, negative_prompt=list(negative_prompts),
                                         device=self.device, clean_caption=False, max_sequence_length=n)
        return ({"encoder_hidden_states": pe, "encoder_attention_mask": pm},
                {"encoder_hidden_states": ne, "encoder_attention_mask": nm})

    def call_net(self, x, t, cond):
        added = {"resolution": None, "aspect_ratio": None}
        if self.net.config.sample_size == 128:    # PixArt-alpha 1024: size conditions
            h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
            res, ratio = self.on_device(("size", h, w, x.dtype, x.device), lambda: (
                torch.tensor([[h, w]], dtype=x.dtype, device=x.device),
                torch.tensor([[h / w]], dtype=x.dtype, device=x.device)))
            added = {"resolution": res.repeat(x.shape[0], 1), "aspect_ratio": ratio.repeat(x.shape[0], 1)}
        return self.net(x, encoder_hidden_states=cond["encoder_hidden_states"],
                        encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                        added_cond_kwargs=added, return_dict=False)[0]


class DiT(DiffusersModel):
    """DiT: class-conditional; a prompt is a class id (``"207"``) or a label (``"golden retriever"``).

    An empty prompt (and the usual empty negative prompt) is the null class.
    """
    net_name = "transformer"

    @staticmethod
    def label_table(id2label: dict | None) -> dict[str, int]:
        """Lower-cased label -> class id; each id2label value may list synonyms separated by commas."""
        table = {}
        for k, v in (id2label or {}).items():
            for name in str(v).split(","):
                table[name.strip().lower()] = int(k)
        return table

    @staticmethod
    def parse_label(text: str | None, table: dict[str, int], num_classes: int = 1000) -> int | None:
        """The class id a prompt names; None = unconditional (empty prompt)."""
        s = (text or "").strip()
        if not s:
            return None
        if s.isdigit():
            if int(s) >= num_classes:
                raise ValueError(f"class id {s} out of range 0..{num_classes - 1}")
            return int(s)
        if s.lower() not in table:
            known = ", ".join(sorted(table)[:8])
            raise ValueError(f"unknown class label {s!r}; use a class id or a label such as: {known}")
        return table[s.lower()]

    def labels(self, texts) -> torch.Tensor:
        n = self.net.config.num_embeds_ada_norm
        table = self.label_table(self.pipe.id2label if hasattr(self.pipe, "id2label") else None) \
            if not getattr(self.pipe, "labels", None) else {k.lower(): v for k, v in self.pipe.labels.items()}
        ids = [self.parse_label(t, table, n) for t in texts]
        return torch.tensor([n if i is None else i for i in ids], device=self.device)

    def encode(self, prompts, negative_prompts):
        return {"class_labels": self.labels(prompts)}, {"class_labels": self.labels(negative_prompts)}

    def call_net(self, x, t, cond):
        return self.net(x, timestep=t, class_labels=cond["class_labels"], return_dict=False)[0]


FAMILIES: dict[str, type[DiffusersModel]] = {
    "StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL, "StableDiffusion3Pipeline": SD3,
    "FluxPipeline": Flux, "PixArtAlphaPipeline": PixArt, "PixArtSigmaPipeline": PixArt, "DiTPipeline": DiT,
}
