"""A plan family across guidance scales: does a row between two calibrated scales do better with the
nearest entry than with ``auto``? (The evidence behind ``calibrate.guidance_rule``.)

The built-in model and a plan family for it (default: the shipped one), on 400 test rows whose seeds
(3,000,000+) neither calibration (1,000,000+) nor the default job (0+) uses. For each guidance scale
of ``--guidance`` (calibrated ones and ones between and beyond them): the per-sample RMS error against
a 200-call reference of ``auto``'s rule (DPM-Solver++(2M) on Karras sigmas), of the family's exact
entry where there is one, and of the nearest entry (the ``nearest`` rule: only inside the calibrated
range); and the reference classifier's accuracy on the digits.

    python bench/plan_family.py [--family builtin:digits-nfe10.plan.json] [--rows 400] [--rewrite]

Writes bench/results/plan_family.md and .json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.analytic import per_sample_rms
from pipeline.config import load_config, plan_url
from pipeline.models import digits_train
from pipeline.request import resolver_for
from pipeline.samplers import PlanFamily, sample
from pipeline.samplers.calibrate import run_teacher
from pipeline.worker import Generator

OUT = Path(__file__).parent / "results"
TEST_SEED = 3_000_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="builtin:digits-nfe10.plan.json")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0])
    ap.add_argument("--out", type=Path, default=OUT / "plan_family")
    ap.add_argument("--rewrite", action="store_true",
                    help="rewrite the .md from the .json of an earlier run (no sampling)")
    args = ap.parse_args()
    if args.rewrite:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.rows = saved["rows"]
        return write(args, PlanFamily.from_json(plan_url(args.family)), saved["results"], saved["seconds"])
    torch.set_num_threads(2)
    family = PlanFamily.from_json(plan_url(args.family))
    nfe = family.entries[0].nfe
    exact = PlanFamily.of(family.entries, guidance_rule="exact")  # the family's own rule may be either
    nearest = PlanFamily.of(family.entries, guidance_rule="nearest")
    cfg = load_config(None, ["manifest.template=x", f"sampler.nfe={nfe}", "ray.batch_size=200", "model.threads=2"])
    gen, resolve, clf = Generator(cfg), resolver_for(cfg), digits_train.reference_classifier()
    lo, hi = gen.model.sigma_min, gen.model.sigma_max
    labels = np.arange(args.rows) % 10
    t0, results = time.time(), []
    for g in args.guidance:
        rows = [resolve({"prompt": f"digit {d}", "seed": TEST_SEED + i, "guidance_scale": g}, i, i)[0]
                for i, d in enumerate(labels)]
        den, (noise, _) = gen.denoiser(rows), gen.noise([r.seed for r in rows], 32, 32)
        with torch.no_grad():
            ref = run_teacher(den, noise, lo, hi, nfe=200, candidates=2).target

            def score(x: torch.Tensor) -> dict:
                acc = float((clf.predict(digits_train.to_digits_features(gen.model.decode(x, 32, 32))) == labels).mean())
                return {"error": float(per_sample_rms(x, ref).mean()), "accuracy": acc}
            cell = {"guidance": g, "auto": score(sample(den, noise, method="dpmpp_2m", nfe=nfe, sigma_min=lo,
                                                        sigma_max=hi, schedule="karras"))}
            for name, rule in (("exact", exact), ("nearest", nearest)):
                plan, _ = rule.find(nfe, g, 32, 32, any_size=True)
                if plan is not None:
                    cell[name] = {**score(sample(den, noise, method=plan, nfe=nfe, sigma_min=lo, sigma_max=hi)),
                                  "entry_guidance": plan.guidance_scale}
        results.append(cell)
        print(json.dumps(cell), flush=True)
    write(args, family, results, time.time() - t0)


def write(args, family: PlanFamily, results: list[dict], seconds: float) -> None:
    scales = ", ".join(f"{e.guidance_scale:g}" for e in family.entries)
    md = [f"# Plan family across guidance scales: {args.family} (entries at {scales}, nfe {family.entries[0].nfe})",
          "", f"{args.rows} test rows (seeds {TEST_SEED}+), error against a 200-call reference; {platform.machine()}, "
          f"2-core CPU VM, {seconds:.0f} s.", "",
          "| guidance | auto error / accuracy | exact entry | nearest entry (its scale) | nearest / auto |",
          "|---|---|---|---|---|"]
    for c in results:
        a = c["auto"]
        ex = f"{c['exact']['error']:.4f} / {c['exact']['accuracy']:.1%}" if "exact" in c else "none"
        ne = (f"{c['nearest']['error']:.4f} / {c['nearest']['accuracy']:.1%} ({c['nearest']['entry_guidance']:g})"
              if "nearest" in c else "none (outside the range: auto)")
        ratio = f"{c['nearest']['error'] / a['error']:.2f}" if "nearest" in c else ""
        md.append(f"| {c['guidance']:g} | {a['error']:.4f} / {a['accuracy']:.1%} | {ex} | {ne} | {ratio} |")
    between = [c for c in results if "nearest" in c and "exact" not in c]
    worse = [c["guidance"] for c in between if c["nearest"]["error"] >= c["auto"]["error"]]
    md += ["", f"Between calibrated scales the nearest entry beats auto at {len(between) - len(worse)} of "
               f"{len(between)} scales" + (f"; not at {worse}" if worse else "") + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"family": family.hash, "rows": args.rows, "seconds": seconds,
                                                         "results": results}, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
