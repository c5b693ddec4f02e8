"""Tiny random-weight diffusers pipelines of every supported family, built from configs.

For tests and smoke runs without a model hub: ``build(family, folder)`` creates a pipeline
with a small UNet/transformer, a small VAE and small CLIP/T5 text encoders (tokenizers from
a 46-character vocabulary), and ``save_pretrained``s it as safetensors into ``folder``, where
``model.kind: diffusers, model.path: <folder>`` loads it through the same code path as a
real model. ``python -m pipeline.models.tiny FAMILY FOLDER`` does the same from a shell.

Weights are random (seeded), so images are noise-like; the structure (conditioning
tensors, schedules, latent packing, VAE factors) is that of the real family.
"""
from __future__ import annotations

import json
import string
import sys
import tempfile
from pathlib import Path

import torch

CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-")
MAX_LEN = 77                      # tokenizer model_max_length (the real CLIP length)
FAMILIES = ("sd", "sd_v", "sdxl", "sd3", "flux", "pixart", "dit")
DIT_LABELS = {i: name for i, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven",
                                                  "eight", "nine"])}


def clip_tokenizer():
    """A CLIP BPE tokenizer over single characters (no merges), max length 77."""
    from transformers import CLIPTokenizer
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=MAX_LEN)


def t5_tokenizer():
    """A T5 unigram tokenizer over single characters, max length 77."""
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in CHARS]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = MAX_LEN
    return tok


def clip_encoder(tok, hidden: int = 32, projection: int | None = None):
    """A 2-layer CLIP text encoder; with ``projection`` the ``WithProjection`` variant (pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LEN,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_encoder(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels: int = 4, flow: bool = False):
    """A 2-level KL autoencoder (vae_scale_factor 2); ``flow``: SD3/Flux style (shift, no quant convs)."""
    from diffusers import AutoencoderKL
    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                 use_post_quant_conv=False) if flow else dict(scaling_factor=0.18215)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra).eval()


def _vp_scheduler(prediction: str = "epsilon"):
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type=prediction, timestep_spacing="linspace")


def build_sd(prediction: str = "epsilon"):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return StableDiffusionPipeline(vae=vae(), text_encoder=clip_encoder(tok), tokenizer=tok, unet=unet,
                                   scheduler=_vp_scheduler(prediction), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_sdxl():
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=(2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=(1, 1))
    return StableDiffusionXLPipeline(vae=vae(), text_encoder=clip_encoder(tok), tokenizer=tok,
                                     text_encoder_2=clip_encoder(tok2, projection=32), tokenizer_2=tok2,
                                     unet=unet, scheduler=_vp_scheduler(), force_zeros_for_empty_prompt=True)


def build_sd3():
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                               joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=32)
    return StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(flow=True),
        text_encoder=clip_encoder(tok, projection=32), tokenizer=tok,
        text_encoder_2=clip_encoder(tok2, projection=32), tokenizer_2=tok2,
        text_encoder_3=t5_encoder(tok3, d_model=64), tokenizer_3=tok3)


def build_flux():
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=tr, scheduler=sched, vae=vae(flow=True), text_encoder=clip_encoder(tok),
                        tokenizer=tok, text_encoder_2=t5_encoder(tok2, d_model=32), tokenizer_2=tok2)


def build_pixart():
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    tok = t5_tokenizer()
    tr = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                  num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
                                  out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                  norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, d_model=32), vae=vae(), transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())


def build_dit():
    from diffusers import (
        DiTPipeline,
        DiTTransformer2DModel,
        DPMSolverMultistepScheduler,
    )
    tr = DiTTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                               num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    return DiTPipeline(transformer=tr, vae=vae(), scheduler=DPMSolverMultistepScheduler(), id2label=DIT_LABELS)


def build_clip(folder: str | Path, seed: int = 0) -> str:
    """A tiny random-weight ``CLIPModel`` (32x32 images, 2-layer towers) and its character tokenizer,
    saved into ``folder`` as the ``clip`` search reward loads it (``search.reward_options.path``)."""
    from transformers import CLIPConfig, CLIPModel
    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=MAX_LEN, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


BUILDERS = {"sd": build_sd, "sd_v": lambda: build_sd("v_prediction"), "sdxl": build_sdxl, "sd3": build_sd3,
            "flux": build_flux, "pixart": build_pixart, "dit": build_dit}


def build(family: str, folder: str | Path, seed: int = 0):
    """Build the tiny pipeline of ``family`` with seeded random weights and save it to ``folder``."""
    if family not in BUILDERS:
        raise ValueError(f"family: unknown tiny family {family!r}; allowed: {list(BUILDERS)}")
    torch.manual_seed(seed)
    pipe = BUILDERS[family]()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if family == "dit":      # like the hub's DiT folders: the class names live in model_index.json
        index = Path(folder) / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "id2label": DIT_LABELS}, indent=2))
    return pipe


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python -m pipeline.models.tiny FAMILY FOLDER   (FAMILY: {', '.join(FAMILIES)})")
    build(sys.argv[1], sys.argv[2])
    print(f"wrote a tiny {sys.argv[1]} pipeline to {sys.argv[2]}")
