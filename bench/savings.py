"""The error of each opt-in, training-free saving (``model.cache``, ``model.quantize``, the guidance
interval) against the plain path, on what a CPU can run, and what each saves, counted.

Sections (each prints a Markdown table; all go to ``bench/results/savings.md``):

1. **Built-in digits model** (trained): for ``--n`` images (prompts 0-9, guidance ``--guidance``,
   DPM-Solver++(2M) at ``--nfe``): the hidden SVM's accuracy (``digits_train.reference_classifier``),
   the mean absolute difference in uint8 levels (32x32 images) to the plain path at the same NFE and to
   a 100-step plain reference, and the model rows and deep-branch calls each image costs. The plain
   path at NFE+2 is the yardstick: an option whose error stays below the plain path's own NFE-to-NFE+2
   change costs less than two more steps would.
2. **Tiny random-weight SD pipeline** (``pipeline.models.tiny``): the same differences (no accuracy:
   its images are noise-like).
3. **Analytic Gaussian mixture** (``pipeline.analytic``, exact guided denoiser): the guidance interval's
   RMS distance to the exact solution of the plain guided ODE, and the share of samples that land in
   the requested class.
4. **Counted FLOPs** (``torch.utils.flop_counter`` on the meta device, no weights): SD-1.5 (512 px) and
   SDXL (1024 px) UNets, full call vs DeepCache's shallow branch, and the model rows the guidance
   interval leaves on the SD sigma grid. Counted, not timed: GPU speed is measured by ``gpu_check.sh``.

FP8 runs through torchao's fake quantization here (``savings.quantize(..., emulate=True)``): FP8's
numerics, not its speed (FP8 kernels need CUDA compute capability 8.9).

    python bench/savings.py                     # about 15 minutes on a shared 2-core VM
    python bench/savings.py --n 200 --skip flops
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.denoisers import cfg as guided  # noqa: E402
from pipeline.models import digits_train, load_model, savings, tiny  # noqa: E402
from pipeline.samplers import sample  # noqa: E402
from pipeline.samplers.noise import initial_noise, row_generators  # noqa: E402

INTERVALS = {"interval (0.28, 5.42]": (0.28, 5.42), "interval (0.28, 2.9]": (0.28, 2.9)}   # the paper's SDXL / EDM2
SD_INTERVAL = INTERVALS["interval (0.28, 5.42]"]


class Counted:
    """A model function that counts the rows (images x guidance halves) it is called with."""

    def __init__(self, fn):
        self.fn, self.rows = fn, 0

    def __call__(self, x, sigma, cond):
        self.rows += x.shape[0]
        return self.fn(x, sigma, cond)


def run(model, prompts, seeds, scale, nfe, side, interval=None, method="dpmpp_2m"):
    """One batch through the Generator's path (conditioning, guided denoiser, sampler, decode): uint8
    images, model rows and deep-branch calls per image."""
    gens = row_generators(seeds)
    noise = initial_noise(gens, model.latent_shape(side, side)).to(model.device)
    cond, uncond = model.encode(prompts, [""] * len(prompts))
    counted = Counted(model.model_fn)
    fn = model.cached(counted)
    den = guided(fn, cond, uncond, torch.full((len(prompts),), scale), interval=interval)
    lo, hi = model.sigma_range(side, side)
    with torch.inference_mode():
        x0 = sample(den, noise, method=method, nfe=nfe, sigma_min=lo, sigma_max=hi, generator=gens,
                    model_schedule=model.schedule)
        images = model.decode(x0, side, side)
    cache = getattr(fn, "cache", None)
    deep = cache.full_calls if cache else nfe
    return images, counted.rows / len(prompts), deep


def levels(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def variants(load):
    """(name, model, interval) of every option, each on a freshly loaded model where it changes the model."""
    out = [("plain", load(), None)]
    out += [(name, out[0][1], iv) for name, iv in INTERVALS.items()]
    for n in (2, 3):
        out.append((f"deepcache, interval {n}", load(cache="deepcache", cache_interval=n), None))
    if importlib.util.find_spec("torchao"):           # pip install torchao (the project's [gpu] extra)
        m = load()
        savings.quantize(m.net, "fp8", "cpu", emulate=True)
        out.append(("fp8 Linear (emulated)", m, None))
    return out + [("plain at NFE+2 (yardstick)", out[0][1], None)]


def compare(load, prompts, seeds, scale, nfe, clf=None) -> list[dict]:
    """Each variant's images against the plain path's at ``nfe`` and a 100-step plain reference."""
    ref, _, _ = run(load(), prompts, seeds, scale, 100, 32)
    rows, plain = [], None
    for name, model, iv in variants(load):
        steps = nfe + 2 if name.startswith("plain at") else nfe
        images, per_image, deep = run(model, prompts, seeds, scale, steps, 32, interval=iv)
        plain = images if plain is None else plain
        row = {"name": name.replace("NFE+2", f"NFE {steps}"), "vs_plain": levels(images, plain),
               "vs_ref": levels(images, ref), "rows": per_image, "deep": deep}
        if clf is not None:
            want = np.arange(len(prompts)) % 10
            row["accuracy"] = float((clf.predict(digits_train.to_digits_features(images)) == want).mean())
        rows.append(row)
    return rows


def table(rows: list[dict], accuracy: bool) -> list[str]:
    head = "| option | " + ("accuracy | " if accuracy else "") + "vs plain, same NFE | vs 100-step plain | " \
           "model rows / image | deep-branch calls / image |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f}% | " if accuracy else ""
        lines.append(f"| {r['name']} | {acc}{r['vs_plain']:.2f} | {r['vs_ref']:.2f} | {r['rows']:.0f} | {r['deep']:.0f} |")
    return lines


def digits_section(args) -> list[str]:
    load = lambda **kw: load_model(ModelConfig(device="cpu", **kw))  # noqa: E731
    prompts = [f"digit {i % 10}" for i in range(args.n)]
    rows = compare(load, prompts, [10_000 + i for i in range(args.n)], args.guidance, args.nfe,
                   digits_train.reference_classifier())
    return [f"## Built-in digits model: {args.n} images, guidance {args.guidance:g}, DPM-Solver++(2M) at NFE "
            f"{args.nfe}, 32x32 (mean absolute difference in uint8 levels)\n"] + table(rows, True)


def tiny_section(args) -> list[str]:
    folder = Path(tempfile.mkdtemp()) / "tiny_sd"
    tiny.build("sd", folder)
    load = lambda **kw: load_model(ModelConfig(kind="diffusers", path=str(folder), device="cpu", **kw))  # noqa: E731
    prompts = [("a red cube", "a cat", "a lighthouse", "a bowl of soup")[i % 4] for i in range(8)]
    rows = compare(load, prompts, list(range(8)), 7.5, args.nfe)
    return [f"## Tiny random-weight SD pipeline: 8 images, guidance 7.5, DPM-Solver++(2M) at NFE {args.nfe}, "
            "32x32 (levels; random weights, noise-like images)\n"] + table(rows, False)


def gmm_section(args) -> list[str]:
    """The guidance interval on an exact guided denoiser: RMS to the plain guided ODE's solution."""
    from pipeline.analytic import GaussianMixture, per_sample_rms
    gmm = GaussianMixture(components=12, dim=8, seed=0, classes=4)

    def model_fn(x, sigma, label):                  # label -1: unconditional
        out, has = gmm.denoise(x, sigma), label >= 0
        out[has] = gmm.denoise(x[has], sigma[has], label[has])
        return out

    def solve(nfe, interval=None):
        labels = torch.arange(args.n) % 4
        counted = Counted(model_fn)
        den = guided(counted, labels, torch.full_like(labels, -1), args.guidance, interval=interval)
        noise = torch.randn(args.n, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return sample(den, noise, method="dpmpp_2m", nfe=nfe, sigma_min=0.002, sigma_max=80.0), counted.rows / args.n

    def in_class(x):
        logp = gmm.logw[None] - 0.5 * ((x[:, None] - gmm.mu[None]) ** 2 / gmm.var[None] + gmm.var[None].log()).sum(-1)
        return float((gmm.label[logp.argmax(1)] == torch.arange(args.n) % 4).double().mean())
    ref, _ = solve(500)
    lines = [f"## Gaussian mixture (12 components, 8 dims, 4 classes; exact guided denoiser): {args.n} samples, "
             f"guidance {args.guidance:g}, DPM-Solver++(2M) at NFE {args.nfe}\n",
             "| option | RMS to the exact plain guided solution | in the requested class | model rows / sample |",
             "|---|---|---|---|"]
    for name, nfe, iv in [("plain", args.nfe, None), *[(k, args.nfe, v) for k, v in INTERVALS.items()],
                          (f"plain at NFE {args.nfe + 2} (yardstick)", args.nfe + 2, None)]:
        x, rows = solve(nfe, iv)
        lines.append(f"| {name} | {float(per_sample_rms(x, ref).mean()):.4f} | {100 * in_class(x):.1f}% | {rows:.0f} |")
    return lines


def flops_section(args) -> list[str]:
    """UNet FLOPs per image at NFE 8 with guidance (two rows per call), counted on the meta device."""
    import diffusers_throughput as dt
    import gpu_check
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.denoisers import VPDiscrete
    from pipeline.models.diffusers_backend import shallow_unet
    from pipeline.schedules import karras
    vp = VPDiscrete(torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0))
    grid = karras(8, vp.sigma_min, vp.sigma_max)
    inside = int(((grid >= SD_INTERVAL[0]) & (grid <= SD_INTERVAL[1])).sum())
    lines = [f"## Counted UNet FLOPs per image, NFE 8 with guidance (random init on the meta device)\n",
             "| UNet | full call | shallow branch | deepcache 2 | deepcache 3 | interval (0.28, 5.42] (rows) |",
             "|---|---|---|---|---|---|"]
    for name, kwargs, side, ctx, added in [("SD-1.5, 512 px", dt.SD15_UNET, 64, 768, None),
                                           ("SDXL, 1024 px", gpu_check.SDXL_UNET, 128, 2048, "sdxl")]:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**kwargs)
            x, t, text = torch.empty(1, 4, side, side), torch.empty(1), torch.empty(1, 77, ctx)
            extra = {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)} if added else None
        kept = {}
        unet.up_blocks[-1].register_forward_pre_hook(lambda m, a, k: kept.update(f=k["hidden_states"]), with_kwargs=True)
        with FlopCounterMode(display=False) as full:
            unet(x, t, encoder_hidden_states=text, added_cond_kwargs=extra)
        with FlopCounterMode(display=False) as shallow:
            shallow_unet(unet, x, t, kept["f"], text, extra)
        f, s = full.get_total_flops(), shallow.get_total_flops()
        per = lambda n: 2 * (-(-8 // n) * f + (8 - -(-8 // n)) * s)       # noqa: E731
        plain = 2 * 8 * f
        lines.append(f"| {name} | {f / 1e12:.2f} TFLOP | {s / 1e12:.2f} TFLOP ({s / f:.0%}) | {plain / per(2):.2f}x fewer "
                     f"| {plain / per(3):.2f}x fewer | {16 / (inside * 2 + 8 - inside):.2f}x fewer ({inside * 2 + 8 - inside} "
                     f"of 16 rows) |")
    return lines


SECTIONS = {"digits": digits_section, "tiny": tiny_section, "gmm": gmm_section, "flops": flops_section}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="images (digits) / samples (mixture)")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "savings.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    t0 = time.time()
    out = ["# Opt-in savings: error against the plain path, and what they save\n",
           f"`python bench/savings.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}` on "
           f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n"]
    for name, section in SECTIONS.items():
        if name not in args.skip:
            out += section(args) + [""]
    text = "\n".join(out) + f"\n({time.time() - t0:.0f} s)\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
