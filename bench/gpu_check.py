"""The GPU check (``bench/gpu_check.sh`` runs it): correctness and images/s of full-size random-weight
SD-1.5 (512 px) and SDXL-size (1024 px) pipelines on one GPU, ours vs diffusers' own pipeline, and a
Ray job against the bare in-process loop. Prints one Markdown table.

Built from configs (no model hub); speed does not depend on weight values. Per model:

- checks: fp16 and bf16 images finite; a row's image in a batch of 4 within one level (uint8) of the
  same row alone; ours (Euler on the scheduler's own sigmas) equal to the diffusers pipeline's
  ``__call__`` in fp32 (max abs difference, [0, 1] images);
- speed: images/s, ours (``model.compile``: fused QKV, static shapes, CUDA graphs) vs diffusers'
  pipeline (fp16, SDPA, ``torch.compile`` of the UNet and VAE decoder as in diffusers' speed-up
  guide), DPM-Solver++(2M) at NFE 8 and 20, batch sizes ``--batches``;
- a Ray job (``jobs.generate`` on the SD-1.5 pipeline saved to disk) of ``--job-images`` images:
  images/s against the bare in-process Generator on the same rows, and the GPU's busy fraction
  (``nvidia-smi`` utilisation sampled every 0.2 s over the job's middle 80%).

    bash bench/gpu_check.sh                 # on a GPU machine (installs what is missing)
    python bench/gpu_check.py --smoke       # the same code on CPU with tiny pipelines (tests/CI)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusers_throughput as dt  # noqa: E402
from pipeline.models import tiny  # noqa: E402


def build_sdxl_size():
    """An SDXL-sized pipeline (UNet about 2.6B parameters, CLIP-L + CLIP-G-sized encoders, 1024 px VAE)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok, tok2 = tiny.clip_tokenizer(), tiny.clip_tokenizer()

    def clip(cls, hidden, layers, heads, **kw):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw))
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip(CLIPTextModel, 768, 12, 12), tokenizer=tok,
        text_encoder_2=clip(CLIPTextModelWithProjection, 1280, 32, 20, projection_dim=1280), tokenizer_2=tok2,
        unet=unet, scheduler=tiny._vp_scheduler(), force_zeros_for_empty_prompt=True)


MODELS = {  # name: (builder, image side, smoke builder, smoke side)
    "sd15": (dt.build_sd15, 512, tiny.build_sd, 32),
    "sdxl": (build_sdxl_size, 1024, tiny.build_sdxl, 32),
}


def build(name: str, args):
    builder, size, small, small_size = MODELS[name]
    torch.manual_seed(0)
    with torch.device(args.device):              # random init straight on the device
        pipe = small() if args.smoke else builder()
    pipe.set_progress_bar_config(disable=True)
    return pipe, small_size if args.smoke else size


def checks(name: str, args) -> list[str]:
    """Finite in fp16/bf16, batch-independent within one level, equal to diffusers' pipeline in fp32."""
    pipe, size = build(name, args)
    prompts, nfe = [dt.PROMPTS[i % 4] for i in range(4)], 4
    model = dt.backend(pipe, args.device, "float32")
    pipe.scheduler.set_timesteps(nfe)
    grid = pipe.scheduler.sigmas.clone()
    noise, _ = dt.start_noise(model, 1, size)
    with torch.inference_mode():
        ours = dt.ours(model, prompts[:1], [""], 5.0, nfe, size, method="euler", schedule=grid,
                       decode=lambda x0: model.decode_float(x0).cpu().numpy())
        theirs = pipe(prompts[0], negative_prompt=None, guidance_scale=5.0, num_inference_steps=nfe, height=size,
                      width=size, latents=noise.to(args.device), output_type="np").images
    rows = [f"| {name} | fp32 ours vs diffusers `__call__` (Euler, same sigmas) | max abs diff "
            f"{np.abs(theirs - ours).max():.2e} |"]
    for dtype in ("float16", "bfloat16") if args.device != "cpu" else ("bfloat16",):
        model = dt.backend(pipe, args.device, dtype)
        with torch.inference_mode():
            batch = dt.ours(model, prompts, [""] * 4, 5.0, nfe, size)
            alone = dt.ours(model, prompts[:1], [""], 5.0, nfe, size)
        diff = int(np.abs(batch[0].astype(int) - alone[0].astype(int)).max())
        finite = "finite" if np.isfinite(batch.astype(float)).all() and batch.std() > 0 else "NOT finite / blank"
        rows.append(f"| {name} | {dtype}: images {finite}; row 0 batch of 4 vs alone | {diff} level(s) |")
        pipe.to(dtype=torch.float32)
    return rows


def speed(name: str, args) -> list[str]:
    """Images/s, ours (compiled, static shapes) vs diffusers (compiled as its guide says), same pipeline."""
    pipe, size = build(name, args)
    dtype = "float32" if args.device == "cpu" else "float16"
    model = dt.backend(pipe, args.device, dtype, channels_last=True)
    mode = "default" if args.device == "cpu" else "reduce-overhead"
    if args.compile:
        model.compile(mode, args.backend)               # also compiles the shared VAE decoder
        setattr(pipe, model.net_name, model.net)
    rows = []
    for nfe in args.nfe:
        for batch in args.batches:
            prompts = [dt.PROMPTS[i % 4] for i in range(batch)]
            with torch.inference_mode():
                (w_ours, _), (w_theirs, _) = dt.timed_pair(
                    lambda: dt.ours(model, prompts, [""] * batch, 7.5, nfe, size),
                    lambda: dt.theirs(pipe, "sdxl" if name == "sdxl" else "sd", prompts, [""] * batch, 7.5, nfe,
                                      size), args.repeats)
            rows.append(f"| {name} {size}px {dtype}{' compile' if args.compile else ''} | NFE {nfe}, batch {batch} "
                        f"| ours {batch / w_ours:.3g} img/s, diffusers {batch / w_theirs:.3g} img/s: "
                        f"**{w_theirs / w_ours:.2f}x** |")
            print(rows[-1], flush=True)
    return rows


class GpuBusy:
    """``nvidia-smi`` utilisation sampled every 0.2 s in a thread (nothing on a machine without it)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append((time.time(), float(out[0])))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def busy(self, t0: float, t1: float) -> float | None:
        """Mean utilisation over the middle 80% of [t0, t1], as a fraction."""
        lo, hi = t0 + 0.1 * (t1 - t0), t1 - 0.1 * (t1 - t0)
        mid = [u for t, u in self.samples if lo <= t <= hi]
        return sum(mid) / len(mid) / 100 if mid else None


def ray_job(args) -> list[str]:
    """``run_job`` on the saved SD-1.5 pipeline vs the bare in-process Generator on the same rows."""
    from pipeline.config import load_config
    from pipeline.job import run_job
    from pipeline.request import requests_table, resolver_for
    from pipeline.worker import Generator

    pipe, size = build("sd15", args)
    folder = Path(tempfile.mkdtemp()) / "sd15"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    manifest = folder.parent / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": dt.PROMPTS[i % 4], "seed": i}) + "\n"
                                for i in range(args.job_images)))
    gpu = args.device != "cpu"
    batch = 32 if gpu else 4
    overrides = [
        "model.kind=diffusers", f"model.path={folder}", f"model.device={args.device}",
        f"model.dtype={'float16' if gpu else 'float32'}", "model.local_files_only=true",
        f"model.compile={str(args.compile).lower()}", f"model.compile_backend={args.backend}",
        f"manifest.path={manifest}", "sampler.nfe=8", f"defaults.height={size}", f"defaults.width={size}",
        "defaults.guidance_scale=7.5", f"ray.batch_size={batch}", f"output.rows_per_shard={batch * 2}",
        f"output.path={folder.parent / 'out'}", "output.contact_sheet=0", "ray.progress_interval_s=0",
        f"ray.num_gpus_per_actor={1 if gpu else 0}", "ray.actors=1", "ray.num_cpus_per_actor=1",
    ]
    cfg = load_config(None, overrides)
    resolve = resolver_for(cfg)
    reqs = [resolve({"prompt": dt.PROMPTS[i % 4], "seed": i}, i, i)[0] for i in range(args.job_images)]
    gen = Generator(cfg)                                  # the bare loop: same rows, same batches, no Ray
    t = time.time()
    for i in range(0, len(reqs), batch):
        gen.images(requests_table(reqs[i:i + batch]))
    bare = len(reqs) / (time.time() - t)
    del gen
    if gpu:
        torch.cuda.empty_cache()
    with GpuBusy() as busy:
        t0 = time.time()
        summary = run_job(cfg)
        t1 = time.time()
    frac = busy.busy(t0, t1)
    # steady state: the images of every shard after the first, over the time between the first and last commit
    tars = sorted((folder.parent / "out" / "shards").glob("*.tar"), key=lambda f: f.stat().st_mtime)
    span = tars[-1].stat().st_mtime - tars[0].stat().st_mtime
    steady = (summary.images - batch * 2) / span if len(tars) > 1 and span > 0 else float("nan")
    return [f"| sd15 Ray job | {summary.images} images, NFE 8, batch {batch} | steady {steady:.3g} img/s vs bare loop "
            f"{bare:.3g} img/s: **{steady / bare:.2f}x** ({summary.images_per_s:.3g} img/s with Ray and model "
            f"start-up); GPU busy {'n/a' if frac is None else f'{frac:.0%}'} |"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny pipelines, one size: checks the script itself")
    p.add_argument("--device", default=None)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--nfe", type=int, nargs="+", default=[8, 20])
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch-size scan (default 1 4 16)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--job-images", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["checks", "speed", "job"])
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.nfe, args.batches, args.repeats, args.backend = [2], args.batches or [2], 1, "eager"
        args.job_images = args.job_images or 8
    args.batches = args.batches or [1, 4, 16]
    args.job_images = args.job_images or 256
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    t = time.time()
    rows = []
    for model in args.models:
        if "checks" not in args.skip:
            rows += checks(model, args)
        if "speed" not in args.skip:
            rows += speed(model, args)
    if "job" not in args.skip:
        rows += ray_job(args)
    print(f"\n# GPU check: {name}, torch {torch.__version__}, {time.time() - t:.0f} s\n")
    print("| model | what | result |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
