"""Inference-time search on the built-in model: reward and accuracy against total model calls.

For guidance 1 and 3, on ``--images`` prompts "digit 0".."digit 9" with seeds no calibration or
default choice ever saw (``--seed``, default 200000 + i), it runs

* ``none`` (the job's ``auto`` sampler, DPM-Solver++(2M)) at NFE 5, 10, 20, 40, 80, 160;
* ``best_of_n``, ``fk`` and ``svdd`` at NFE 5 and 10 per particle with 2, 4, 8 and 16 particles
  (total model calls = NFE x particles, up to 160), each with its default options and sampler
  (``auto``: DPM-Solver++(2M) for best_of_n, ancestral Euler for fk and svdd), and best_of_n on
  ancestral Euler too (``best_of_n/ea``), so the search methods are also compared on one sampler;

and reports, per cell, the ``digits`` reward of the kept images (mean, and the shortfall 1 - mean
with its standard error) and the share of images the *reference* classifier (an SVM fitted on the
real digits, independent of the reward's CNN) reads as the prompted digit.

    python bench/search_scaling.py [--images 200] [--out bench/results/search_scaling]
    python bench/search_scaling.py --smoke        # a few images, two cells: checks the script runs

Writes ``OUT.json`` (every cell), ``OUT.md`` (the tables and the targets) and ``OUT.png``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.models import digits_train
from pipeline.request import requests_table, resolver_for
from pipeline.rewards import load_reward
from pipeline.worker import Generator

# label -> (search method, sampler; None = the request default, auto)
VARIANTS = {"best_of_n": ("best_of_n", None), "best_of_n/ea": ("best_of_n", "euler_ancestral"),
            "fk": ("fk", None), "fk_log": ("fk_log", None), "svdd": ("svdd", None)}


def run_cell(gen, resolve, clf, reward, args, guidance: float, nfe: int, method: str, particles: int,
             extra: dict | None = None) -> dict:
    """One cell: ``args.images`` prompts from ``args.seed`` with ``method`` (a ``VARIANTS`` label or
    ``none``); ``extra`` request fields (e.g. another sampler) override the variant's."""
    n = args.images
    kind, sampler = VARIANTS.get(method, ("none", None))
    search = {"method": "none"} if kind == "none" else {"method": kind, "particles": particles, "reward": "digits"}
    fields = {"nfe": nfe, "guidance_scale": guidance, "search": search, **({"sampler": sampler} if sampler else {}),
              **(extra or {})}
    reqs = [r for i in range(n) for r in resolve({"prompt": f"digit {i % 10}", "seed": args.seed + i, **fields}, i, i)]
    t0 = time.perf_counter()
    out = gen(requests_table(reqs)).to_pylist()
    seconds = time.perf_counter() - t0
    bad = [r["error"] for r in out if r["error"]]
    if bad:
        raise RuntimeError(f"{len(bad)} rows failed: {bad[0]}")
    px = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(r["pixels_shape"]) for r in out])
    labels = np.arange(n) % 10
    images = torch.from_numpy(px).float()[:, None].expand(-1, 3, -1, -1) / 255
    scores = reward(images, [f"digit {d}" for d in labels]).double().numpy()
    acc = float((clf.predict(digits_train.to_digits_features(px)) == labels).mean())
    return {"guidance": guidance, "method": method, "nfe": nfe, "particles": particles, "calls": nfe * particles,
            "sampler": out[0]["sampler"], "reward": float(scores.mean()), "shortfall": float(1 - scores.mean()),
            "shortfall_se": float(scores.std(ddof=1) / np.sqrt(n)), "accuracy": acc, "seconds": round(seconds, 2)}


def cells(smoke: bool) -> list[tuple[str, int, int]]:
    if smoke:
        return [("none", 5, 1), ("fk", 5, 2)]
    out = [("none", nfe, 1) for nfe in (5, 10, 20, 40, 80, 160)]
    return out + [(m, nfe, p) for m in VARIANTS for nfe in (5, 10) for p in (2, 4, 8, 16) if nfe * p <= 160]


def table(results: list[dict], guidance: float) -> list[str]:
    rows = [r for r in results if r["guidance"] == guidance]
    calls = sorted({r["calls"] for r in rows})
    lines = [(f"guidance {guidance:g}: 1 - mean digits reward (lower is better) / reference-classifier accuracy, "
              "by total model calls (NFE x particles)"), "",
             "| method | NFE/particle | " + " | ".join(map(str, calls)) + " |",
             "|---|---|" + "---|" * len(calls)]
    for method, nfe in dict.fromkeys((r["method"], r["nfe"] if r["method"] != "none" else 0) for r in rows):
        cell = {r["calls"]: r for r in rows if r["method"] == method and (method == "none" or r["nfe"] == nfe)}
        lines.append(f"| {method} | {nfe or 'all'} | " + " | ".join(
            f"{cell[c]['shortfall']:.1e} / {100 * cell[c]['accuracy']:.1f}%" if c in cell else "" for c in calls) + " |")
    return lines


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, checked on these (held-out) results."""
    lines, by = [], {(r["guidance"], r["method"], r["nfe"], r["particles"]): r for r in results}
    for (g, m, nfe, p), r in sorted(by.items()):
        if m != "fk" or p not in (4, 8) or (g, "svdd", nfe, p) not in by:
            continue
        steer = min(r["shortfall"], by[(g, "svdd", nfe, p)]["shortfall"])
        cmp = [f"{b} {by[(g, b, nfe, p)]['shortfall']:.2e} ({'beaten' if steer < by[(g, b, nfe, p)]['shortfall'] else 'NOT beaten'})"
               for b in ("best_of_n", "best_of_n/ea") if (g, b, nfe, p) in by]
        lines.append(f"- guidance {g:g}, NFE {nfe} x {p} particles, shortfall 1 - reward: fk {r['shortfall']:.2e}, "
                     f"svdd {by[(g, 'svdd', nfe, p)]['shortfall']:.2e}; " + ", ".join(cmp))
    versus = [(r, by[(g, "none", nfe, 1)]) for (g, m, nfe, p), r in sorted(by.items())
              if m != "none" and (g, "none", nfe, 1) in by]
    for r, plain in versus:
        if not r["reward"] > plain["reward"]:
            lines.append(f"- guidance {r['guidance']:g}: {r['method']} at NFE {r['nfe']} x {r['particles']} does NOT "
                         f"beat none at NFE {r['nfe']}")
    lines.append(f"- {sum(r['reward'] > plain['reward'] for r, plain in versus)} of {len(versus)} search cells "
                 "beat none at the same NFE per particle")
    r = by.get((1.0, "best_of_n", 10, 4)), by.get((1.0, "fk", 10, 4)), by.get((1.0, "svdd", 10, 4))
    plain = by.get((1.0, "none", 10, 1))
    if all(r) and plain:
        lines.append(f"- guidance 1, NFE 10, 4 particles: accuracy best_of_n {100 * r[0]['accuracy']:.1f}%, "
                     f"fk {100 * r[1]['accuracy']:.1f}%, svdd {100 * r[2]['accuracy']:.1f}% "
                     f"(none at NFE 10: {100 * plain['accuracy']:.1f}%)")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = sorted({r["guidance"] for r in results})
    fig, axes = plt.subplots(1, len(gs), figsize=(6 * len(gs), 4.5), squeeze=False)
    for ax, g in zip(axes[0], gs):
        rows = [r for r in results if r["guidance"] == g]
        for method, nfe in dict.fromkeys((r["method"], r["nfe"] if r["method"] != "none" else 0) for r in rows):
            pts = sorted((r["calls"], r["shortfall"], r["shortfall_se"]) for r in rows
                         if r["method"] == method and (method == "none" or r["nfe"] == nfe))
            x, y, e = zip(*pts)
            ax.errorbar(x, np.maximum(y, 1e-7), yerr=e, marker="o", capsize=2,
                        label=f"{method}" + (f" (NFE {nfe})" if nfe else ""), ls="--" if nfe == 5 else "-")
        ax.set(xscale="log", yscale="log", xlabel="model calls per image (NFE x particles)",
               ylabel="1 - mean digits reward", title=f"guidance {g:g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def setup(threads: int):
    """(Generator, resolver, reference classifier, digits reward, machine description) for the built-in model."""
    cfg = load_config(None, ["manifest.template=digit {d}", "manifest.values.d=[0,1,2,3,4,5,6,7,8,9]",
                             "ray.batch_size=128", f"model.threads={threads}"])
    machine = f"{platform.machine()} {platform.processor() or ''}, {threads} threads".replace(" ,", ",")
    return Generator(cfg), resolver_for(cfg), digits_train.reference_classifier(), load_reward("digits"), machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=200_000, help="first seed of the (held-out) test images")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/search_scaling")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--render", action="store_true", help="only re-render OUT.md and OUT.png from OUT.json")
    ap.add_argument("--only", nargs="+", metavar="METHOD",
                    help="rerun only these rows (e.g. fk) and replace them in OUT.json; the others are kept")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        saved = json.loads(out.with_suffix(".json").read_text())
        args.images, args.seed, args.guidance = saved["images"], saved["seed"], sorted({r["guidance"] for r in
                                                                                        saved["results"]})
        return report(saved["results"], args, out, saved["header"])
    if args.smoke:
        args.images, args.guidance = 4, args.guidance[:1]
    gen, resolve, clf, reward, machine = setup(args.threads)
    results, t0 = [], time.time()
    kept = []
    if args.only:
        saved = json.loads(out.with_suffix(".json").read_text())
        if (saved["images"], saved["seed"]) != (args.images, args.seed):
            raise SystemExit(f"--only: {out}.json has {saved['images']} images from seed {saved['seed']}")
        kept = [r for r in saved["results"] if r["method"] not in args.only]
    for g in args.guidance:
        for method, nfe, p in cells(args.smoke):
            if args.only and method not in args.only:
                continue
            r = run_cell(gen, resolve, clf, reward, args, g, nfe, method, p)
            results.append(r)
            print(f"g={g:g} {method:9s} nfe={nfe:3d} x {p:2d} = {r['calls']:3d} calls ({r['sampler']}): reward "
                  f"{r['reward']:.5f} (1-r {r['shortfall']:.2e} +- {r['shortfall_se']:.1e}), accuracy "
                  f"{100 * r['accuracy']:.1f}%, {r['seconds']:.1f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# search_scaling: {args.images} images per cell, seeds {args.seed}..{args.seed + args.images - 1}, "
              f"{machine}, {time.time() - t0:.0f} s" + (f" (rows {', '.join(args.only)} rerun)" if args.only else ""))
    order = {(m, nfe, p): i for i, (m, nfe, p) in enumerate(cells(args.smoke))}
    results = sorted(kept + results, key=lambda r: (r["guidance"], order[(r["method"], r["nfe"], r["particles"])]))
    out.with_suffix(".json").write_text(json.dumps({"images": args.images, "seed": args.seed, "machine": machine,
                                                    "header": header, "results": results}, indent=1) + "\n")
    report(results, args, out, header)


def report(results: list[dict], args, out: Path, header: str) -> None:
    md = [header, ""]
    for g in args.guidance:
        md += table(results, g) + [""]
    md += ["Targets:", *targets(results), ""]
    out.with_suffix(".md").write_text("\n".join(md))
    plot(results, out.with_suffix(".png"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
