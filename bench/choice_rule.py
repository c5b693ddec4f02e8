"""Which rule should choose a calibration's plan among its candidates: every rule on every cell, offline.

A calibration builds candidates (the DP grid and the refined plan on each base) and a choice rule picks
one on the validation rows; the gate then checks it against the baseline on the held-out rows. A rule
read off the few cells where ``pick`` (the rule until 2026-12-07) went wrong is an in-sample result, so here each cell is
calibrated once with ``calibrate(..., diagnostics=True)``, which returns every candidate with its
per-sample validation and held-out errors, every candidate is scored on test noises it never saw
(seeds ``RULE_SEED``+, against a 1000-call reference), and each rule in ``RULES`` is applied to the same
candidates, gate included. A rule's result in a cell is the test error of the plan it would have
returned; ``oracle`` is the lowest test error of any candidate (what no rule can beat).

Problems come in three groups, named in the results: ``seen``, the problems on which the mean rule was
proposed (README, "Which candidate the validation split should pick"); ``benchmark``, the other
problems of ``bench/solver_plans.py``; ``new``, mixtures defined here, never calibrated before this
script ran, which no rule was developed on.

The decision, fixed before the first full run (2026-12-07): the lowest validation mean replaces ``pick``
for validation splits of 400 rows or more if, over the ``benchmark`` and ``new`` cells (``unseen`` in the
summary), it is significantly better (two standard errors of the paired test difference) in more cells
than it is significantly worse, its geometric-mean ratio to diffusers' best is no higher, and no more
cells exceed 0.5x. Otherwise ``pick`` stays. The run met all three, and ``choose`` in
``pipeline/samplers/calibrate.py`` is that rule; the rules here are applied to the candidates directly, so
the script scores ``pick`` whatever the calibrator now uses.

    python bench/choice_rule.py [--problems check24-sd ...] [--nfe 5 6 8 10] [--cal-samples 2048]
                                [--test-samples 2048] [--threads 2] [--render]

Writes bench/results/choice_rule/<problem>.json per problem, and bench/results/choice_rule.md from all
of them.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from pipeline.analytic import per_sample_rms
from pipeline.samplers import CalibrationSpec, calibrate
from pipeline.samplers.calibrate import gate
from pipeline.samplers.calibrators import lowest_mean, paired_difference, pick, trimmed_mean
from plan_tail import best_diffusers
from solver_plans import CAL_SEED, MIXTURES, OUT, TEST_SEED, problems, stats

RULE_SEED = TEST_SEED + 13     # not solver_plans' test noises, not plan_tail's, not the calibration noises
NEW_MIXTURES = {   # defined for this script, before any rule was scored on them (same fields as MIXTURES)
    "new32": (10, (32,), 1.5, (0.05, 0.5), 301),
    "new96": (16, (96,), 2.0, (0.1, 0.7), 302),
    "new3x8x8": (4, (3, 8, 8), 0.8, (0.03, 0.3), 303),
}
SEEN = ("mix16-sd", "check3x16x16-sd", "mix3x32x32-sd")
RUN = ("mix16", "mix128", "check24", "check64", *NEW_MIXTURES)   # the default: the problems of the committed run


def lowest_trimmed(errors: dict[str, torch.Tensor], trim: float) -> str:
    return min(errors, key=lambda k: trimmed_mean(errors[k], trim))


RULES = {"pick": pick, "lowest mean": lambda errors, trim: lowest_mean(errors), "lowest trimmed mean": lowest_trimmed}


def group_of(name: str) -> str:
    return "seen" if name in SEEN else "new" if name.rsplit("-", 1)[0] in NEW_MIXTURES else "benchmark"


def run(name: str, p, nfes: list[int], cal_rows: int, n_test: int) -> dict:
    test = p.noise(RULE_SEED, n_test)
    t0 = time.time()
    ref, far = p.reference(test), 0.5 * p.gmm.data_std()
    print(f"[{name}] reference for {n_test} samples: {time.time() - t0:.0f} s", flush=True)
    out = {"problem": name, "group": group_of(name), "cal_samples": cal_rows, "test_samples": n_test,
           "far_threshold": far, "cells": {}}
    for nfe in nfes:
        d_err, d_label = best_diffusers(p, test, ref, nfe)
        t0 = time.time()
        spec = CalibrationSpec(nfe=nfe, sigma_min=p.sigma_min, sigma_max=p.sigma_max, noise_schedule=p.schedule_kind,
                               grid_options=p.grid_options)
        result = calibrate(spec, p.denoiser(), p.start(p.noise(CAL_SEED, cal_rows)), progress=lambda m: None,
                           diagnostics=True)
        seconds = time.time() - t0
        test_e = {n: per_sample_rms(p.library(test, r.plan, nfe), ref) for n, r in result.candidates.items()}
        cell = {"seconds": seconds, "chosen": result.figures.chosen, "diffusers_best": {"config": d_label, **stats(d_err, far)},
                "candidates": {n: {"validation_mean": float(r.validation.mean()),
                                   "validation_trimmed": trimmed_mean(r.validation, spec.trim),
                                   "held_out_mean": float(r.held_out.mean()), "test": stats(test_e[n], far)}
                               for n, r in result.candidates.items()},
                "validation_rows": len(result.candidates["baseline"].validation), "rules": {}}
        val = {n: r.validation for n, r in result.candidates.items() if n != "baseline"}
        for rule, choose in RULES.items():
            picked = choose(val, spec.trim)
            accepted, _ = gate(result.candidates[picked].held_out, result.candidates["baseline"].held_out, spec.trim)
            kept = picked if accepted else "baseline"
            cell["rules"][rule] = {"picked": picked, "kept": kept, "mean": float(test_e[kept].mean())}
        before = test_e[cell["rules"]["pick"]["kept"]]
        for rule in RULES:
            mean, se = paired_difference(test_e[cell["rules"][rule]["kept"]], before)
            cell["rules"][rule]["vs_pick"] = {"mean": mean, "se": se}
        oracle = min(test_e, key=lambda n: float(test_e[n].mean()))
        cell["rules"]["oracle"] = {"picked": oracle, "kept": oracle, "mean": float(test_e[oracle].mean())}
        cell["diffusers_mean"] = float(d_err.mean())
        out["cells"][nfe] = cell
        r = cell["rules"]
        print(f"[{name}] nfe {nfe}: " + " | ".join(f"{k} {v['kept']} {v['mean']:.5f}" for k, v in r.items())
              + f" | diffusers {cell['diffusers_mean']:.5f} | {seconds:.0f} s", flush=True)
    return out


def markdown(results: list[dict], command: str) -> str:
    rules = [*RULES, "oracle"]
    lines = ["# Choice rules for a calibration's candidates", "",
             f"`{command}`: each cell calibrated once with the default settings (every candidate kept), every "
             f"candidate scored on test noises from seeds {RULE_SEED}+ against a 1000-call reference; each rule "
             f"picks on the validation rows, then the gate checks its pick against the baseline on the held-out "
             f"rows. Cells: plan mean error / diffusers' best mean error on the same test noises (lower is better). "
             f"{platform.machine()}, 2-core CPU VM.", "",
             "| group | problem | NFE | validation rows | " + " | ".join(rules) + " | lowest mean - pick (SE) |",
             "|---|---|---|---|" + "---|" * (len(rules) + 1)]
    ratios: dict = {r: {} for r in rules}
    for res in results:
        for nfe, c in sorted(res["cells"].items(), key=lambda kv: int(kv[0])):
            for r in rules:
                ratios[r][res["group"], res["problem"], int(nfe)] = c["rules"][r]["mean"] / c["diffusers_mean"]
            picks = " | ".join(f"{ratios[r][res['group'], res['problem'], int(nfe)]:.2f} ({short(c['rules'][r]['kept'])})"
                               for r in rules)
            d = c["rules"]["lowest mean"]["vs_pick"]
            lines.append(f"| {res['group']} | {res['problem']} | {nfe} | {c['validation_rows']} | {picks} | "
                         f"{d['mean']:+.5f} ({d['se']:.5f}){verdict(d)} |")
    lines += ["", "## Summary per group", "",
              "| group | cells | rule | cells over 0.5x | median ratio | geometric mean ratio | worse than `pick` "
              "by 2 SE | better than `pick` by 2 SE |", "|---|---|---|---|---|---|---|---|"]
    for group in ("seen", "benchmark", "new", "unseen", "all"):     # unseen: benchmark and new, what decides
        keys = [k for k in ratios["oracle"] if group == "all" or k[0] == group or (group == "unseen" and k[0] != "seen")]
        if not keys:
            continue
        for r in rules:
            vals = [ratios[r][k] for k in keys]
            worse = better = ""
            if r in RULES and r != "pick":
                diffs = [cell(results, k)["rules"][r]["vs_pick"] for k in keys]
                worse = str(sum(d["mean"] > 2 * d["se"] for d in diffs))
                better = str(sum(d["mean"] < -2 * d["se"] for d in diffs))
            lines.append(f"| {group} | {len(keys)} | {r} | {sum(v > 0.5 for v in vals)} | {statistics.median(vals):.2f} | "
                         f"{math.exp(statistics.fmean(math.log(v) for v in vals)):.2f} | {worse} | {better} |")
    lines += ["", "Candidate names: `2M`, `3M`, `UniPC` = the refined plan on that base (`/dp`: the DP grid "
              "unrefined); `base` = the gate kept the baseline (`auto`'s method and grid)."]
    return "\n".join(lines) + "\n"


def short(name: str) -> str:
    base = {"dpmpp_2m": "2M", "dpmpp_3m": "3M", "unipc": "UniPC"}
    if name == "baseline":
        return "base"
    b, how = name.split("/")
    return base.get(b, b) + ("" if how == "grad" else "/dp")


def verdict(d: dict) -> str:
    return " worse" if d["mean"] > 2 * d["se"] else " better" if d["mean"] < -2 * d["se"] else ""


def cell(results: list[dict], key: tuple) -> dict:
    group, problem, nfe = key
    res = next(r for r in results if r["problem"] == problem)
    return res["cells"][str(nfe)]          # (json keys)


def main() -> None:
    all_names = [f"{m}-{k}" for m in (*MIXTURES, *NEW_MIXTURES) for k in ("sd", "flow")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=[n for n in all_names if n.rsplit("-", 1)[0] in RUN],
                    choices=all_names, help="default: the 14 problems of the committed run (check3x16x16, "
                                            "mix3x32x32 and the problems added later were not run)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    ap.add_argument("--cal-samples", type=int, default=2048)
    ap.add_argument("--test-samples", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 to run two problem lists side by side)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the stored .json files")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    store = args.out / "choice_rule"
    store.mkdir(parents=True, exist_ok=True)
    MIXTURES.update(NEW_MIXTURES)          # so that solver_plans.problems() builds the new ones too
    for name, p in problems([] if args.render else args.problems):
        res = run(name, p, sorted(args.nfe), args.cal_samples, args.test_samples)
        res["command"] = " ".join(["python bench/choice_rule.py", *sys.argv[1:]])
        (store / f"{name}.json").write_text(json.dumps(res, indent=1))
    results = [json.loads(f.read_text()) for f in sorted(store.glob("*.json"))]
    order = {"seen": 0, "benchmark": 1, "new": 2}
    results.sort(key=lambda r: (order[r["group"]], r["problem"]))
    md = markdown(results, "python bench/choice_rule.py")
    (args.out / "choice_rule.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
