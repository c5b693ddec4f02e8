"""How ``method="auto"`` was chosen: candidate (method, grid) pairs on a family of random exact problems.

Every problem is a random Gaussian mixture (``pipeline.analytic``: 1-48 modes, 2-512 dimensions,
spread 0.3-3, per-dimension stds from 0.02 to 1), unguided or with classifier-free guidance
(scale 1.5-9), seen through one of three noise schedules: the Stable Diffusion discrete VP range
(sigma 0.0292-14.61), EDM (0.002-80) and rectified flow (shift 1 or 3, from sigma = inf). Each
candidate's error (mean per-sample RMS against a 1000-call reference) is divided by the error of
the reference solver at the same NFE: DPM-Solver++(2M) on Karras sigmas (VP/EDM), on the shifted
flow grid diffusers uses for flow models (``flow_uniform``) for flow. A candidate may replace the
reference only if it is never worse on any problem, in every cell (NFE, guided or not) of its schedule
kind; the script lists, per cell, each candidate's geometric-mean and worst ratio. The problems use
seeds 1000 and up (``--first-seed``); the benchmarks (``bench/solver_plans.py``) use other problems.

    python bench/auto_rule.py [--problems 24] [--samples 256] [--kinds vp edm flow] [--unguided]
    python bench/auto_rule.py --render bench/results/auto_rule.json     # the tables again, from saved rows
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from pipeline.analytic import GaussianMixture, mixture_denoiser, per_sample_rms
from pipeline.samplers import sample
from pipeline.samplers.calibrate import run_teacher

NFES = (5, 6, 7, 8, 10, 12, 15, 20)
KINDS = {"vp": (0.0292, 14.6146), "edm": (0.002, 80.0), "flow": (0.003, math.inf)}
REFERENCE = {"vp": ("dpmpp_2m", "karras", {}), "edm": ("dpmpp_2m", "karras", {}),
             "flow": ("dpmpp_2m", "flow_uniform", {})}
CANDIDATES = {
    "sigma": [("dpmpp_2m", "karras", {}), ("dpmpp_2m", "exponential", {}), ("dpmpp_2m", "kl_optimal", {}),
              ("unipc", "karras", {}), ("unipc", "exponential", {}), ("dpmpp_3m", "karras", {}),
              ("deis", "karras", {}), ("ipndm", "karras", {}), ("dpmpp_2m", "polyexponential", {"rho": 2.0}),
              ("unipc", "polyexponential", {"rho": 2.0})],
    "flow": [("dpmpp_2m", "flow_uniform", {}), ("unipc", "flow_uniform", {}), ("dpmpp_3m", "flow_uniform", {}),
             ("deis", "flow_uniform", {}), ("dpmpp_2m", "flow", {}), ("unipc", "flow", {})],
}
OUT = Path(__file__).parent / "results"


def random_problem(seed: int, unguided: bool = False) -> tuple[GaussianMixture, dict]:
    """One member of the rule-selection family (seed >= 1000)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    dim, modes = pick([2, 8, 32, 128, 512]), pick([1, 3, 6, 12, 24, 48])
    spread, lo = pick([0.3, 1.0, 2.0, 3.0]), pick([0.02, 0.05, 0.1, 0.3])
    guidance = 1.0 if unguided else pick([1.0, 1.0, 1.5, 3.0, 5.0, 9.0])
    classes = min(modes, pick([2, 4])) if guidance != 1.0 and modes > 1 else 1
    guidance = guidance if classes > 1 else 1.0
    desc = {"seed": seed, "dim": dim, "modes": modes, "spread": spread, "std": [lo, 3 * lo + 0.1],
            "guidance": guidance, "classes": classes}
    return GaussianMixture(modes, dim, seed=seed, spread=spread, std=(lo, 3 * lo + 0.1), classes=classes), desc


def run(den, noise, kind: str, nfe: int, method: str, grid: str, options: dict, shift: float) -> torch.Tensor:
    sigma_min, sigma_max = KINDS[kind]
    extra = {"schedule_options": {"shift": shift}} if kind == "flow" else {}
    if grid == "polyexponential":
        extra = {"schedule_options": {"rho": options["rho"]}}
        options = {}
    return sample(den, noise, method=method, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, schedule=grid,
                  **extra, **options)


def label(c: tuple) -> str:
    return f"{c[0]}/{c[1]}" + (f"(rho={c[2]['rho']})" if c[2] else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--margin", type=float, default=1.0, help="max ratio a candidate may reach on any problem")
    ap.add_argument("--out", type=Path, default=OUT / "auto_rule.md")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--unguided", action="store_true", help="only unguided problems")
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--render", type=Path, help="print the tables of a saved .json and exit")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(saved["header"], saved["rows"]))
        print(args.render.with_suffix(".md").read_text())
        return
    torch.set_num_threads(2)
    t0 = time.time()
    rows = []        # (kind, guided, nfe, candidate label, ratio)
    for p in range(args.problems):
        gmm, desc = random_problem(args.first_seed + p, args.unguided)
        noise = torch.randn(args.samples, gmm.dim, generator=torch.Generator().manual_seed(10_000 + p),
                            dtype=torch.float64)
        labels = torch.arange(args.samples) % gmm.classes
        den = mixture_denoiser(gmm, labels if gmm.classes > 1 else None, desc["guidance"])
        for kind in args.kinds:
            sigma_min, sigma_max = KINDS[kind]
            shift = 3.0 if p % 2 == 0 else 1.0
            start = noise if kind != "vp" else noise * math.sqrt(1 + sigma_max ** 2) / sigma_max
            ref = run_teacher(den, start, sigma_min, sigma_max, nfe=1000, candidates=2).target
            cands = CANDIDATES["flow" if kind == "flow" else "sigma"]
            for nfe in NFES:
                base = float(per_sample_rms(run(den, start, kind, nfe, *REFERENCE[kind], shift), ref).mean())
                for c in cands:
                    try:
                        err = float(per_sample_rms(run(den, start, kind, nfe, *c, shift), ref).mean())
                    except ValueError:
                        continue
                    ratio = err / base if base > 0 else 1.0
                    rows.append((kind, desc["guidance"] > 1, nfe, label(c), ratio if math.isfinite(ratio) else 99.0))
        print(f"problem {p}: {desc} done ({time.time() - t0:.0f} s)", flush=True)
    header = (f"`python bench/auto_rule.py --problems {args.problems} --samples {args.samples} --kinds "
              f"{' '.join(args.kinds)}{' --unguided' if args.unguided else ''} --first-seed {args.first_seed}`: "
              f"{args.problems} random mixtures (seeds {args.first_seed}-{args.first_seed + args.problems - 1}), "
              f"{args.samples} samples each, {platform.machine()}, 2-core CPU VM, {time.time() - t0:.0f} s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=0))
    args.out.write_text(render(header, rows))
    print(args.out.read_text())


def render(header: str, rows: list) -> str:
    """Per (kind, guided, NFE): each candidate's geometric-mean and worst ratio; which are never worse."""
    cells: dict = {}
    for kind, guided, nfe, lab, ratio in rows:
        cells.setdefault((kind, guided, nfe), {}).setdefault(lab, []).append(ratio)
    lines = ["# `auto` rule selection", "", header + " Ratio = candidate error / reference error (DPM++(2M) "
             "on Karras sigmas; flow: DPM++(2M) on flow_uniform) at the same NFE; gmean = geometric mean over "
             "problems, max = worst problem.", ""]
    never_worse: dict = {}
    for (kind, guided, nfe), cands in sorted(cells.items()):
        stats = {lab: (math.exp(sum(math.log(r) for r in rs) / len(rs)), max(rs)) for lab, rs in cands.items()}
        for lab, (_, worst) in stats.items():
            never_worse.setdefault(kind, {}).setdefault(lab, True)
            never_worse[kind][lab] &= worst <= 1.0
        top = sorted(stats.items(), key=lambda kv: kv[1][0])[:4]
        lines.append(f"- {kind}, {'guided' if guided else 'unguided'}, NFE {nfe}: "
                     + ", ".join(f"{lab} gmean {g:.2f} max {m:.2f}" for lab, (g, m) in top))
    lines += ["", "Never worse than the reference on every problem and NFE of this family:", ""]
    for kind, labs in never_worse.items():
        lines.append(f"- {kind}: " + (", ".join(sorted(lab for lab, ok in labs.items() if ok)) or "none"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
