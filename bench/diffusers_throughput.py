"""Images/s of our generator path vs the diffusers pipeline's own ``__call__``, same model and budget.

Both sides get the same pipeline object (random weights: speed does not depend on weight
values), the same prompts, batch size, guidance and NFE, and the same initial noise; ours
runs conditioning -> ``cfg`` denoiser -> ``sample(dpmpp_2m)`` -> VAE decode exactly as
``pipeline.worker.Generator`` does, diffusers runs ``pipe(...)`` with
DPMSolverMultistepScheduler (DPM-Solver++(2M)). Image encoding (PNG) is left out on both sides.

    python bench/diffusers_throughput.py --quick                  # tiny pipelines + SD-1.5 UNet, 1 run
    python bench/diffusers_throughput.py --model sd15 --nfe 20 --batch 4 --repeats 3
    python bench/diffusers_throughput.py --model sd15 --device cuda --dtype float16 --compile \\
        --batch-scan 1,4,8,16,32                                  # on a GPU

``--model``: ``sd15`` (an SD-1.5-sized UNet, 860M parameters, CLIP-L-sized text encoder and
the SD VAE, built from configs) or a tiny family from ``pipeline.models.tiny``, or ``tiny``
for all of them. The table is printed as Markdown.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models import diffusers_backend, tiny  # noqa: E402
from pipeline.samplers import sample  # noqa: E402
from pipeline.samplers.noise import initial_noise, row_generators  # noqa: E402

PROMPTS = ["a photo of a red fox in the snow", "a lighthouse at dusk, oil painting", "a bowl of ramen",
           "an astronaut riding a horse"]
TINY = ("sd", "sdxl", "sd3", "flux", "pixart", "dit")
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}      # the SD-1.5 UNet config (the rest are defaults)


def build_sd15():
    """An SD-1.5-sized StableDiffusionPipeline with random weights (UNet/VAE/CLIP-L configs)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tok = tiny.clip_tokenizer()
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=tiny._vp_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def backend(pipe, device, dtype, channels_last=False, **savings):
    """Our model object around an in-memory pipeline (what ``DiffusersModel.load`` builds); ``savings``:
    ``quantize``, ``cache``, ``cache_interval`` as in ``model.*``."""
    cfg = ModelConfig(kind="diffusers", path="<in memory>", device=device, dtype=dtype, channels_last=channels_last,
                      max_sequence_length=77, **savings)
    family = diffusers_backend.FAMILIES[type(pipe).__name__]
    if dtype != "float32":
        pipe.to(dtype=getattr(torch, dtype))
    return family(pipe, cfg)


def start_noise(model, n: int, size: int):
    """Rows 0..n-1's starting noise and generators (seeds 0..n-1), as the Generator draws them."""
    gens = row_generators(list(range(n)))
    return initial_noise(gens, model.latent_shape(size, size)), gens


def ours(model, prompts, negatives, g, nfe, size, method="dpmpp_2m", schedule=None, decode=None, **options):
    """The Generator's path for one micro-batch: uint8 images (``decode`` to get others, e.g. floats);
    ``options`` go to the guided denoiser (``interval``, ``rescale``, ...)."""
    noise, gens = start_noise(model, len(prompts), size)
    cond, uncond = model.encode(prompts, negatives)
    den = model.guided_denoiser(cond, uncond, torch.full((len(prompts),), g), **options)
    lo, hi = model.sigma_range(size, size)
    x0 = sample(den, noise.to(model.device), method=method, nfe=nfe, sigma_min=lo, sigma_max=hi, schedule=schedule,
                generator=gens)
    return decode(x0) if decode else model.decode(x0, size, size)


def theirs(pipe, family, prompts, negatives, g, nfe, size):
    from diffusers import DPMSolverMultistepScheduler
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and family not in ("sd3", "flux"):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    if family == "dit":
        labels = [int(p) if p.isdigit() else 1 for p in prompts]
        return pipe(class_labels=labels, guidance_scale=g, num_inference_steps=nfe, output_type="np").images
    kw = dict(guidance_scale=g, num_inference_steps=nfe, height=size, width=size, output_type="np")
    if family in ("sd3", "flux", "pixart"):
        kw["max_sequence_length"] = 77
    if family == "pixart":
        kw["use_resolution_binning"] = False
    if family != "flux":
        kw["negative_prompt"] = negatives
    return pipe(prompts, **kw).images


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_pair(fa, fb, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best (wall, process CPU) seconds of ``fa`` and ``fb``, each warmed up once, timed alternately.

    Alternating keeps a shared machine's load changes from favouring one side; CPU time
    (all threads of this process) is the figure to trust on a busy CPU box.
    """
    fa(), fb()
    best = {0: (float("inf"), float("inf")), 1: (float("inf"), float("inf"))}
    for _ in range(repeats):
        for i, fn in enumerate((fa, fb)):
            _sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best[0], best[1]


def run(name, args, batch):
    pipe = build_sd15() if name == "sd15" else tiny.BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    size = args.size if name == "sd15" else 32
    model = backend(pipe, args.device, args.dtype, args.channels_last)
    pipe.to(model.device)
    if args.compile:               # the same compiled network (and VAE decoder) for diffusers' own loop
        model.compile("default", "inductor")
        setattr(pipe, model.net_name, model.net)
    prompts = [("7" if name == "dit" else PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    negatives = [""] * batch
    with torch.inference_mode():
        (w_ours, c_ours), (w_theirs, c_theirs) = timed_pair(
            lambda: ours(model, prompts, negatives, args.guidance, args.nfe, size),
            lambda: theirs(pipe, name, prompts, negatives, args.guidance, args.nfe, size), args.repeats)
    return (f"| {name} | {size} | {args.device} {args.dtype}{' compile' if args.compile else ''} | {batch} | "
            f"{args.nfe} | {batch / w_ours:.4g} | {batch / w_theirs:.4g} | {w_theirs / w_ours:.2f}x | "
            f"{c_ours / batch:.4g} | {c_theirs / batch:.4g} | {c_theirs / c_ours:.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", help="sd15, tiny (every tiny family), one tiny family, or all")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--batch-scan", default=None, help="comma-separated batch sizes, e.g. 1,4,8,16")
    p.add_argument("--size", type=int, default=512, help="image side for sd15")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet/transformer (both sides)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="1 timed run, NFE 2, batch 1 for sd15")
    args = p.parse_args(argv)
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {"all": ["sd15", *TINY], "tiny": list(TINY)}.get(args.model, [args.model])
    batches = [int(b) for b in args.batch_scan.split(",")] if args.batch_scan else [args.batch]
    if args.quick:
        args.repeats, args.nfe = 1, 2
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {args.device} {args.dtype}, guidance {args.guidance}, best of {args.repeats}\n")
    print("| model | px | device | batch | NFE | ours img/s | diffusers img/s | speed-up (wall) "
          "| ours CPU s/img | diffusers CPU s/img | speed-up (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for b in ([1] if args.quick and name == "sd15" and not args.batch_scan else batches):
            print(run(name, args, b), flush=True)


if __name__ == "__main__":
    main()
