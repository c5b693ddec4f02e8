"""The GPU check, one stage per call (``bench/gpu_check.sh`` runs the stages in order, each under its own
time cap, through the gpu-kit). Random-weight SD-1.5 (512 px) and SDXL-size (1024 px) pipelines built from
configs, no model hub: speed does not depend on weight values. Each stage prints Markdown table rows
``| stage | model | what | result |``.

Stages, most valuable first:

- ``checks``: ours equal to diffusers' ``__call__`` in fp32 (Euler on the scheduler's sigmas); fp16 and
  bf16 images finite and a row's image in a batch of 4 within one level of the same row alone; no VAE
  weight changes dtype or storage across a batch (issue 19, item 1).
- ``eager``: images/s ours vs diffusers' pipeline, eager fp16 (SDPA): SD-1.5 NFE 8 batch 1 and 16,
  SDXL NFE 8 batch 4.
- ``savings``: SD-1.5 NFE 8 batch 16, eager fp16: images/s and the mean level difference to the plain
  path for the guidance interval, ``model.cache=deepcache``, ``model.quantize=fp8`` and all three; the
  plain path at NFE 10 is the yardstick for the error.
- ``job``: the Ray job (``run_job``) against a bare in-process loop doing the same work (generate, then
  encode PNG and sidecars on the other CPUs, as the job's encode stage does) on the same CPU count; the
  job's images/s and GPU busy (``nvidia-smi``, every 0.2 s) between its first and last shard commits
  (the stats files' modification times), so Ray's start and the model's load do not count.
- ``compiled``: images/s ours vs diffusers with ``torch.compile`` (reduce-overhead), SD-1.5 NFE 8 batch 16.
- ``compile_cache``: an actor's warm-up cold vs loading ``model.compile_cache`` artifacts from a URL on a
  fresh inductor folder (``bench/compile_cache.py`` on the built-in model, two sizes, fresh processes).
- ``calibrate`` (issue 18, not in ``gpu_check.sh``'s default stages): ``python -m jobs.calibrate`` on the
  SD-1.5-sized pipeline at 512 px, nfe 8, through ``bench/calibration_cost.py``'s run, small settings:
  its probe's guided rows/s (forward, and forward with backward), the run's model evaluations and seconds
  measured against its own projection, the GPU's peak memory (``nvidia-smi``), and the full setting
  (256 rows, 3 bases x 300 steps, and the cuts a time budget makes) projected from this GPU's probe.

    bash bench/gpu_check.sh                        # every stage, on the GPU machine, through the gpu-kit
    python bench/gpu_check.py --stage eager --models sd15
    python bench/gpu_check.py --smoke --stage all  # CPU, tiny pipelines: checks the script itself
    STAGES="calibrate:420" bash bench/gpu_check.sh # issue 18's calibration cost on the GPU
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gc
import importlib.util
import io
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

SDXL_UNET = dict(  # the SDXL UNet config (about 2.6B parameters)
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
INTERVAL = (0.28, 5.42)        # the guidance interval Kynkaanniemi et al. 2024 use for SDXL


def build_sdxl_size():
    """An SDXL-sized pipeline (UNet about 2.6B parameters, CLIP-L + CLIP-G-sized encoders, 1024 px VAE)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok, tok2 = tiny.clip_tokenizer(), tiny.clip_tokenizer()

    def clip(cls, hidden, layers, heads, **kw):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip(CLIPTextModel, 768, 12, 12), tokenizer=tok,
        text_encoder_2=clip(CLIPTextModelWithProjection, 1280, 32, 20, projection_dim=1280), tokenizer_2=tok2,
        unet=UNet2DConditionModel(**SDXL_UNET), scheduler=tiny._vp_scheduler(), force_zeros_for_empty_prompt=True)


MODELS = {  # name: (builder, image side, smoke builder, smoke side)
    "sd15": (dt.build_sd15, 512, tiny.build_sd, 32),
    "sdxl": (build_sdxl_size, 1024, tiny.build_sdxl, 32),
}


def build(name: str, args, dtype: torch.dtype | None = None):
    """The pipeline, initialised straight on the device; its scheduler rebuilt on the CPU (under
    ``torch.device("cuda")`` its ``alphas_cumprod`` lands on the GPU and ``set_timesteps`` calls numpy on it)."""
    builder, size, small, small_size = MODELS[name]
    torch.manual_seed(0)
    with torch.device(args.device):              # random init straight on the device
        pipe = small() if args.smoke else builder()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, small_size if args.smoke else size


def half(args) -> str:
    return "float32" if args.device == "cpu" else "float16"


def row(stage: str, model: str, what: str, result: str) -> str:
    line = f"| {stage} | {model} | {what} | {result} |"
    print(line, flush=True)
    return line


def weights(module) -> dict:
    return {n: (p.dtype, p.data_ptr()) for n, p in module.named_parameters()}


# ---------------------------------------------------------------- correctness
def checks(args) -> list[str]:
    """fp32 ours == diffusers; half precision finite and batch-independent; no VAE weight cast per batch."""
    rows = []
    for name in args.models:
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
        rows.append(row("checks", name, "fp32 ours vs diffusers `__call__` (Euler, same sigmas)",
                        f"max abs diff {np.abs(theirs - ours).max():.2e}"))
        for dtype in ("float16", "bfloat16") if args.device != "cpu" else ("bfloat16",):
            rows.append(half_precision_row(name, pipe, args, dtype, prompts, nfe, size))
    return rows


def half_precision_row(name, pipe, args, dtype, prompts, nfe, size) -> str:
    pipe.to(dtype=getattr(torch, dtype))
    model = dt.backend(pipe, args.device, dtype)
    before = weights(model.vae)
    with torch.inference_mode():
        batch = dt.ours(model, prompts, [""] * 4, 5.0, nfe, size)
        alone = dt.ours(model, prompts[:1], [""], 5.0, nfe, size)
    kept = "kept" if weights(model.vae) == before else "CHANGED"
    diff = int(np.abs(batch[0].astype(int) - alone[0].astype(int)).max())
    finite = "finite" if np.isfinite(batch.astype(float)).all() and batch.std() > 0 else "NOT finite / blank"
    line = row("checks", name, f"{dtype}: images; row 0 batch of 4 vs alone; VAE weights across batches",
               f"{finite}; {diff} level(s); decoded in {str(model.vae.dtype).replace('torch.', '')}, weights {kept}")
    pipe.to(dtype=torch.float32)
    return line


# ---------------------------------------------------------------- speed
def speed_rows(stage, name, args, model, pipe, size, cases) -> list[str]:
    rows = []
    for nfe, batch in cases:
        prompts = [dt.PROMPTS[i % 4] for i in range(batch)]
        with torch.inference_mode():
            (w_ours, _), (w_theirs, _) = dt.timed_pair(
                lambda: dt.ours(model, prompts, [""] * batch, 7.5, nfe, size),
                lambda: dt.theirs(pipe, "sdxl" if name == "sdxl" else "sd", prompts, [""] * batch, 7.5, nfe, size),
                args.repeats)
        rows.append(row(stage, f"{name} {size}px {model.dtype}".replace("torch.", ""), f"NFE {nfe}, batch {batch}",
                        f"ours {batch / w_ours:.3g} img/s, diffusers {batch / w_theirs:.3g} img/s: "
                        f"**{w_theirs / w_ours:.2f}x**"))
    return rows


def eager(args) -> list[str]:
    rows = []
    for name in args.models:
        pipe, size = build(name, args, getattr(torch, half(args)))
        model = dt.backend(pipe, args.device, half(args))
        cases = [(8, 1), (8, 16)] if name == "sd15" else [(8, 4)]
        rows += speed_rows("eager", name, args, model, pipe, size, [(2, 2)] if args.smoke else cases)
    return rows


def compiled(args) -> list[str]:
    """Ours (``model.compile``: fused QKV, static shapes, CUDA graphs) vs diffusers with the same compiled
    UNet and VAE decoder, as its speed-up guide does."""
    pipe, size = build("sd15", args, getattr(torch, half(args)))
    model = dt.backend(pipe, args.device, half(args), channels_last=True)
    model.compile("default" if args.device == "cpu" else "reduce-overhead", args.backend)
    setattr(pipe, model.net_name, model.net)
    return speed_rows("compiled", "sd15", args, model, pipe, size, [(2, 2)] if args.smoke else [(8, 16)])


# ---------------------------------------------------------------- opt-in savings
def timed_images(fn, repeats: int) -> tuple[float, np.ndarray]:
    """(best seconds of ``fn``, its images), warmed up once."""
    images, best = fn(), float("inf")
    for _ in range(repeats):
        dt._sync()
        t = time.perf_counter()
        fn()
        dt._sync()
        best = min(best, time.perf_counter() - t)
    return best, images


def savings(args) -> list[str]:
    """Each opt-in saving on and off: images/s and the mean level difference to the plain path."""
    pipe, size = build("sd15", args, getattr(torch, half(args)))
    prompts = [dt.PROMPTS[i % 4] for i in range(2 if args.smoke else 16)]
    made: dict = {}

    def fp8_model():                 # one FP8 UNet (quantized in place), shared by the last two cases
        if "fp8" not in made:
            from pipeline.models.savings import quantize
            model = dt.backend(pipe, args.device, half(args))
            quantize(model.net, "fp8", model.device, emulate=args.smoke)
            made["fp8"] = model      # only once quantized: "all three" never runs an unquantized UNet
        return made["fp8"]

    def all_three():
        fp8_model().enable_cache("deepcache", 3)
        return made["fp8"]
    plain, nfe = dt.backend(pipe, args.device, half(args)), 2 if args.smoke else 8
    cases = [("plain", lambda: plain, {}), (f"plain at NFE {nfe + 2} (yardstick)", lambda: plain, {"nfe": nfe + 2}),
             (f"guidance interval {INTERVAL}", lambda: plain, {"interval": INTERVAL}),
             ("deepcache, interval 3", lambda: dt.backend(pipe, args.device, half(args), cache="deepcache"), {}),
             ("fp8" + (" (emulated)" if args.smoke else ""), fp8_model, {}), ("all three", all_three, {"interval": INTERVAL})]
    rows, base, skipped = [], None, []
    if importlib.util.find_spec("torchao") is None:    # FP8 needs the [gpu] extra; say so instead of failing
        cases = cases[:-2]
        skipped.append(row("savings", f"sd15 {size}px {half(args)}", "fp8; all three",
                           "skipped: torchao is not installed (pip install torchao, or this project's [gpu] extra)"))
    for what, make, opts in cases:
        label = f"{what}, NFE {opts.get('nfe', nfe)}, batch {len(prompts)}"
        try:
            model = make()
            run = lambda: dt.ours(model, prompts, [""] * len(prompts), 7.5, opts.get("nfe", nfe), size,  # noqa: E731
                                  interval=opts.get("interval"))
            t, images = timed_images(run, args.repeats)
        except Exception as e:  # noqa: BLE001 - a refused option (no FP8 on this GPU) is a result, not a failure
            rows.append(row("savings", f"sd15 {size}px {half(args)}", label, f"not run: {type(e).__name__}: {e}"))
            continue
        base = (t, images) if base is None else base
        err = float(np.abs(images.astype(int) - base[1].astype(int)).mean())
        rows.append(row("savings", f"sd15 {size}px {half(args)}", label,
                        f"{len(prompts) / t:.3g} img/s (**{base[0] / t:.2f}x**); {err:.2f} levels from plain"))
    return rows + skipped


# ---------------------------------------------------------------- the Ray job vs the same work without Ray
class GpuBusy:
    """``nvidia-smi`` utilisation and memory used sampled every 0.2 s in a thread (nothing on a machine
    without it)."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []      # (time, utilisation %, memory used MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split(",")
                self.samples.append((time.time(), float(out[0]), float(out[1])))
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
        """Mean utilisation over [t0, t1], as a fraction."""
        inside = [u for t, u, _ in self.samples if t0 <= t <= t1]
        return sum(inside) / len(inside) / 100 if inside else None

    def peak_mib(self) -> float | None:
        """The most GPU memory in use (MiB, every process) in any sample."""
        return max((m for _, _, m in self.samples), default=None)


def bare_loop(cfg, reqs, batch: int, cpus: int) -> float:
    """The job's work without Ray: the Generator on this thread, each batch's encoding (``encode_block``)
    on ``cpus - 1`` threads behind it, as the job's encode stage runs beside its model actor; images/s
    after the model's load."""
    from pipeline.request import requests_table
    from pipeline.worker import Generator, encode_block
    gen = Generator(cfg)
    o = cfg.output
    t = time.time()
    with cf.ThreadPoolExecutor(max_workers=max(1, cpus - 1)) as pool:
        futures = [pool.submit(encode_block, gen(requests_table(reqs[i:i + batch])), o.image_format, o.quality)
                   for i in range(0, len(reqs), batch)]
        images = sum(f.result().num_rows for f in futures)
    return images / (time.time() - t)


def job_config(args, folder: Path, size: int, batch: int, cpus: int):
    from pipeline.config import load_config
    gpu = args.device != "cpu"
    manifest = folder.parent / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": dt.PROMPTS[i % 4], "seed": i}) + "\n"
                                for i in range(args.job_images)))
    return load_config(None, [
        "model.kind=diffusers", f"model.path={folder}", f"model.device={args.device}", f"model.dtype={half(args)}",
        "model.local_files_only=true", f"manifest.path={manifest}", f"sampler.nfe={args.job_nfe}",
        f"defaults.height={size}", f"defaults.width={size}", "defaults.guidance_scale=7.5", f"ray.batch_size={batch}",
        f"output.rows_per_shard={batch * 2}", f"output.path={folder.parent / 'out'}", "output.contact_sheet=0",
        "ray.progress_interval_s=0", f"ray.num_gpus_per_actor={1 if gpu else 0}", "ray.actors=1",
        "ray.num_cpus_per_actor=1", f"ray.num_cpus={cpus}"])


def ray_job(args) -> list[str]:
    """``run_job`` on the saved SD-1.5 pipeline vs ``bare_loop`` on the same rows and CPUs."""
    from pipeline.job import run_job
    from pipeline.request import resolver_for
    pipe, size = build("sd15", args, getattr(torch, half(args)))
    size = min(size, args.job_size)
    folder = Path(tempfile.mkdtemp()) / "sd15"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    cpus, batch = min(os.cpu_count() or 2, 16), 4 if args.smoke else 32
    cfg = job_config(args, folder, size, batch, cpus)
    resolve = resolver_for(cfg)
    reqs = [resolve({"prompt": dt.PROMPTS[i % 4], "seed": i}, i, i)[0] for i in range(args.job_images)]
    bare = bare_loop(cfg, reqs, batch, cpus)
    gc.collect()
    if args.device != "cpu":
        torch.cuda.empty_cache()
    with GpuBusy() as gpu:
        summary = run_job(cfg)
    commits = sorted(f.stat().st_mtime for f in (folder.parent / "out" / "stats").glob("*.json"))
    span = commits[-1] - commits[0] if len(commits) > 1 else float("nan")
    steady = (summary.images - batch * 2) / span if span > 0 else float("nan")
    busy = gpu.busy(commits[0], commits[-1]) if len(commits) > 1 else None
    return [row("job", f"sd15 {size}px {half(args)}", f"{summary.images} images, NFE {args.job_nfe}, batch {batch}, "
                f"{cpus} CPUs", f"between first and last shard commits {steady:.3g} img/s vs same-work bare loop "
                f"{bare:.3g} img/s: **{steady / bare:.2f}x**; GPU busy {'n/a' if busy is None else f'{busy:.0%}'} "
                f"({summary.images_per_s:.3g} img/s with Ray and model start-up)")]


# ---------------------------------------------------------------- compile once, not once per actor
def compile_cache(args) -> list[str]:
    """``bench/compile_cache.py`` on this device: the built-in model's warm-up cold and with the cache."""
    import compile_cache as bench
    out = Path(tempfile.mkdtemp()) / "compile_cache.md"
    runs = ["--batch-size", "1", "--backend", "eager"] if args.smoke else ["--batch-size", "2"]
    with contextlib.redirect_stdout(io.StringIO()):       # its table comes back as this stage's rows
        bench.main([*runs, "--runs", "first", "next", "--out", str(out), "--extra", f"model.device={args.device}"])
    return [row("compile_cache", "builtin digits", line.split("|")[1].strip(), "|".join(line.split("|")[2:-1]).strip())
            for line in out.read_text().splitlines() if line.startswith("| ") and "warm-up" not in line]


# ---------------------------------------------------------------- what calibrating a plan costs (issue 18)
def calibration(args) -> list[str]:
    """``bench/calibration_cost.py``'s ``jobs.calibrate`` run on the saved SD-1.5 pipeline on this device,
    and the full setting projected from its probe."""
    import calibration_cost as cc
    dtype = args.calibrate_dtype or ("float32" if args.device == "cpu" else "bfloat16")
    pipe, size = build("sd15", args, getattr(torch, dtype))
    folder = Path(tempfile.mkdtemp()) / "sd15"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    gc.collect()
    gpu = args.device != "cpu"
    if gpu:
        torch.cuda.empty_cache()
    small = ["--rows", "12", "--teacher-nfe", "12", "--candidates", "10", "--dp-samples", "4", "--iterations", "2",
             "--batch-size", "4", "--chunk", "4"]
    settings = small if args.smoke else [
        "--rows", str(args.calibrate_rows), "--teacher-nfe", "32", "--candidates", "12", "--dp-samples", "16",
        "--iterations", "20", "--batch-size", "16", "--chunk", "16"]
    a = cc.parser().parse_args([*settings, "--nfe", "8", "--set", f"model.device={args.device}", f"model.dtype={dtype}",
                                f"ray.num_gpus_per_actor={1 if gpu else 0}", "ray.num_cpus_per_actor=1"])
    with GpuBusy() as busy:
        r = cc.run(folder, size, a.rows[0], a.nfe, a, folder.parent / "calibrate")
    cc.projections(r, a)
    probe, e, label = r["projection"]["probe"], r["evaluations"], f"sd15 {size}px {dtype}"
    full = [r["full"], *(cc.full_projection(r, a, iterations=i) for i in a.full_iterations if i != cc.FULL_ITERATIONS)]
    peak = busy.peak_mib()
    return [
        row("calibrate", label, f"probe: a guided model call on {probe['rows']} rows",
            f"forward {probe['rows'] / probe['forward_s']:.4g} rows/s; with backward (and the checkpoint's recompute) "
            f"{probe['rows'] / probe['forward_backward_s']:.4g} rows/s "
            f"({probe['forward_backward_s'] / probe['forward_s']:.1f}x)"),
        row("calibrate", label, f"jobs.calibrate nfe {a.nfe}, {a.rows[0]} rows, teacher {a.teacher_nfe} calls, "
            f"{a.candidates} candidates, {a.iterations} steps of {a.batch_size} rows on {', '.join(a.bases)}",
            f"{e['total']:,} evaluations (teacher {e.get('teacher', 0):,}, dp {e.get('dp', 0):,}, refine "
            f"{e.get('refine', 0):,}, validation {e.get('evaluation', 0):,}): **{r['calibration_s']:.0f} s** against "
            f"{r['projection']['seconds']:.0f} s projected before the work; job {r['wall_s']:.0f} s with Ray and the "
            f"load; GPU memory peak {'n/a' if peak is None else f'{peak:,.0f} MiB'}; host RSS "
            f"{r['peak_rss_mib']:,.0f} MiB; {'plan accepted' if r['accepted'] else 'baseline kept (random weights)'}"),
        row("calibrate", label, f"full setting projected from this probe: {a.full_rows} rows, teacher 120 calls, "
            "3 bases", "; ".join(f"{f['iterations']} steps per base: {f['evaluations']:,} evaluations, "
                                 f"~{f['seconds'] / 60:.0f} min" for f in full))]


STAGES = {"checks": checks, "eager": eager, "savings": savings, "job": ray_job, "compiled": compiled,
          "compile_cache": compile_cache, "calibrate": calibration}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", default=["all"], choices=["all", *STAGES])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny pipelines, tiny sizes: checks the script itself")
    p.add_argument("--device", default=None)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled stage")
    p.add_argument("--job-images", type=int, default=1024)
    p.add_argument("--job-size", type=int, default=512, help="image side of the job stage")
    p.add_argument("--job-nfe", type=int, default=4)
    p.add_argument("--calibrate-rows", type=int, default=64, help="rows of the calibrate stage's run")
    p.add_argument("--calibrate-dtype", choices=["float16", "bfloat16", "float32"],
                   help="the calibrate stage's model dtype (default: bfloat16 on a GPU, fp16's speed on Hopper with "
                        "fp32's exponent range for the backward pass through the UNet; float32 on the CPU)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.device, args.repeats, args.backend, args.job_images = "cpu", 1, "eager", 16
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"# GPU check on {name}, torch {torch.__version__}{', smoke' if args.smoke else ''}", flush=True)
    for stage in STAGES if "all" in args.stage else args.stage:
        t = time.time()
        STAGES[stage](args)
        print(f"# {stage}: {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
