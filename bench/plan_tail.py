"""How many calibration rows a plan needs: its rare mode flips, scored on many held-out samples.

A few-step sampler sends about 1% of the samples of these problems to another mode than the reference,
and those few samples dominate the mean error. A plan's validation split has to see them to choose
well: with 512 calibration noises (60/20/20 split) validation has about 102 rows, so it sees about one.
For one problem (default ``mix128-sd``, where ``bench/solver_plans.py`` at 512 rows found the plan's
error rising from NFE 8 to 10), plans are calibrated with the default settings on 512 and on 2048 noises
(``CAL_SEED`` of ``solver_plans.py``) and scored on 4096 held-out noises from other seeds against a
1000-call reference: mean and median error, ``far`` samples (error above half the data's standard
deviation), ``auto`` and the best diffusers scheduler configuration (lowest mean on these same samples,
which favours diffusers) beside them, and the paired differences, with their standard errors, between the
NFEs at equal rows, between the row counts at equal NFE, and between diffusers' best and the plan.

With ``--nest rise`` (or ``always``) each NFE's plan nests the plan of the NFE before it, as
``jobs.calibrate`` calibrates a family of nfes (``calibrate.nest``), so the chain the benchmark's ``--nest``
runs built is rescored on more samples.

    python bench/plan_tail.py [--problem mix128-sd] [--nfe 8 10] [--cal-samples 512 2048] [--test-samples 4096]
                              [--nest rise]

Writes bench/results/plan_tail.md and .json (other problems: plan_tail-<problem>.md and .json; with
``--per-base``: plan_tail-<problem>-per-base.md and .json; with ``--nest``: ...-nest-<mode>).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from pipeline.analytic import per_sample_rms
from pipeline.samplers.calibrators import paired_difference
from solver_plans import CAL_SEED, MIXTURES, OUT, TEST_SEED, calibrate_plan, diffusers_errors, problems, stats

TAIL_SEED = TEST_SEED + 7      # not the 512 test noises of solver_plans.py, not the calibration noises


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean of the per-sample difference b - a and its standard error."""
    mean, se = paired_difference(b, a)
    return {"mean": mean, "se": se}


def run(problem: str, nfes: list[int], cal_sizes: list[int], n_test: int, per_base: list[str],
        nest: str | None = None) -> dict:
    [(_, p)] = problems([problem])
    test = p.noise(TAIL_SEED, n_test)
    t0 = time.time()
    ref, far = p.reference(test), 0.5 * p.gmm.data_std()
    print(f"[{problem}] reference for {n_test} samples: {time.time() - t0:.0f} s", flush=True)
    errors, out = {}, {"problem": problem, "test_samples": n_test, "far_threshold": far, "cells": [], "paired": []}
    lower: dict = {}                   # rows -> the plan of the last nfe, which the next one nests with --nest
    for nfe in nfes:
        errors["auto", nfe] = per_sample_rms(p.library(test, "auto", nfe), ref)
        errors["diffusers", nfe], label = best_diffusers(p, test, ref, nfe)
        out.setdefault("diffusers_best", {})[nfe] = {"config": label, **stats(errors["diffusers", nfe], far)}
        for rows in cal_sizes:
            t0 = time.time()
            plan = calibrate_plan(p, nfe, p.noise(CAL_SEED, rows), lower=lower.get(rows) if nest else None,
                                  nesting=nest or "rise")
            seconds, lower[rows] = time.time() - t0, plan
            errors[rows, nfe] = e = per_sample_rms(p.library(test, plan, nfe), ref)
            cell = {"rows": rows, "nfe": nfe, **stats(e, far), "auto": stats(errors["auto", nfe], far),
                    "diffusers_best": out["diffusers_best"][nfe], "ratio": float(e.mean() / errors["diffusers", nfe].mean()),
                    "chosen": plan.calibration["chosen"], "accepted": plan.calibration["accepted"], "hash": plan.hash,
                    "seconds": seconds}
            out["cells"].append(cell)
            print(f"[{problem}] {rows} rows, nfe {nfe}: mean {cell['mean']:.5f} far {cell['far']} | auto "
                  f"{cell['auto']['mean']:.5f} far {cell['auto']['far']} | {cell['ratio']:.2f}x diffusers' best | {cell['chosen']} | {seconds:.0f} s",
                  flush=True)
    if per_base:
        out["per_base"] = [base_cell(p, nfe, rows, base, test, ref, far) for nfe in nfes for rows in cal_sizes
                           for base in per_base]
    for rows in cal_sizes:
        for a, b in zip(nfes, nfes[1:]):
            out["paired"].append({"what": f"{rows} rows: NFE {a} -> {b}", **paired(errors[rows, a], errors[rows, b])})
    for nfe in nfes:
        for a, b in zip(cal_sizes, cal_sizes[1:]):
            out["paired"].append({"what": f"NFE {nfe}: {a} -> {b} rows", **paired(errors[a, nfe], errors[b, nfe])})
        for rows in cal_sizes:
            out["paired"].append({"what": f"NFE {nfe}: diffusers' best -> plan on {rows} rows",
                                  **paired(errors["diffusers", nfe], errors[rows, nfe])})
    return out


def base_cell(p, nfe: int, rows: int, base: str, test: torch.Tensor, ref: torch.Tensor, far: float) -> dict:
    """The plan calibrated on one base alone (what the full calibration's candidate of that base is: each
    base is refined from the same DP grid with its own seeded minibatches): its validation mean and
    trimmed mean, the two figures step 5 chooses on, beside its mean error on the test samples."""
    plan = calibrate_plan(p, nfe, p.noise(CAL_SEED, rows), bases=(base,))
    c = plan.calibration
    cell = {"nfe": nfe, "rows": rows, "base": base, "chosen": c["chosen"], "accepted": c["accepted"],
            "validation_mean": c["error"]["candidate_means"][c["chosen"]],
            "validation_trimmed": c["error"]["candidates"][c["chosen"]],
            **stats(per_sample_rms(p.library(test, plan, nfe), ref), far)}
    print(f"[{p.name}] {rows} rows, nfe {nfe}, {c['chosen']} alone: validation mean {cell['validation_mean']:.5f} "
          f"trimmed {cell['validation_trimmed']:.5f} | test mean {cell['mean']:.5f} far {cell['far']}", flush=True)
    return cell


def best_diffusers(p, test: torch.Tensor, ref: torch.Tensor, nfe: int) -> tuple[torch.Tensor, str]:
    """Per-sample errors of the diffusers configuration with the lowest mean error at ``nfe``, and its label."""
    scored = diffusers_errors(p, test, ref, nfe)
    label = min(scored, key=lambda k: float(scored[k].mean()))
    return scored[label], label


def markdown(res: dict) -> str:
    lines = ["# Calibration rows and a plan's rare mode flips", "",
             f"`{res.get('command', 'python bench/plan_tail.py --problem ' + res['problem'])}`: plans calibrated with the default settings, "
             f"scored on {res['test_samples']} held-out samples (seeds {TAIL_SEED}+) against a 1000-call reference; "
             f"`far` = error above {res['far_threshold']:.3f} (half the data's standard deviation); "
             f"{platform.machine()}, 2-core CPU VM.", "",
             "| calibration rows | NFE | plan mean | median | far | `auto` mean | `auto` far | diffusers' best mean "
             "(config) | far | plan / best | chosen | calibration s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        lines.append(f"| {c['rows']} | {c['nfe']} | {c['mean']:.5f} | {c['median']:.5f} | {c['far']} | "
                     f"{c['auto']['mean']:.5f} | {c['auto']['far']} | {best(c)} | {ratio(c)} | {c['chosen']}"
                     f"{'' if c['accepted'] else ' (gate: baseline)'} | {c['seconds']:.0f} |")
    lines += ["", "Paired per-sample differences (later minus earlier; negative: the error falls):", "",
              "| comparison | mean difference | standard error |", "|---|---|---|"]
    lines += [f"| {d['what']} | {d['mean']:+.5f} | {d['se']:.5f} |" for d in res["paired"]]
    if res.get("per_base"):
        lines += ["", "Each base calibrated alone (`--per-base`): the validation figures step 5 of the calibrator "
                  "chooses on, and the test error:", "",
                  "| calibration rows | NFE | candidate | validation mean | validation trimmed mean | test mean | "
                  "test median | test far |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['rows']} | {c['nfe']} | {c['chosen']} | {c['validation_mean']:.5f} | "
                  f"{c['validation_trimmed']:.5f} | {c['mean']:.5f} | {c['median']:.5f} | {c['far']} |"
                  for c in res["per_base"]]
    return "\n".join(lines) + "\n"


def best(c: dict) -> str:
    d = c.get("diffusers_best")         # absent in results written before diffusers' best was scored
    return f"{d['mean']:.5f} ({d['config']}) | {d['far']}" if d else "not scored | "


def ratio(c: dict) -> str:
    return f"{c['ratio']:.2f}x" if "ratio" in c else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default="mix128-sd", choices=[f"{m}-{k}" for m in MIXTURES for k in ("sd", "flow")])
    ap.add_argument("--nfe", type=int, nargs="+", default=[8, 10])
    ap.add_argument("--cal-samples", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--test-samples", type=int, default=4096)
    ap.add_argument("--per-base", nargs="*", default=[], metavar="BASE",
                    help="also calibrate each of these bases alone (dpmpp_2m dpmpp_3m unipc) and score it")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 to run two problems side by side)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--nest", choices=["always", "rise"],
                    help="each NFE's plan nests the one of the NFE before it, as jobs.calibrate does for a family "
                         "(rise: its default); give every NFE of the chain, lowest first (default: each NFE alone)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    res = run(args.problem, sorted(args.nfe), sorted(args.cal_samples), args.test_samples, args.per_base, args.nest)
    res["command"] = " ".join(["python bench/plan_tail.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "plan_tail" if args.problem == "mix128-sd" else f"plan_tail-{args.problem}"
    stem += "-per-base" if args.per_base else ""
    stem += f"-nest-{args.nest}" if args.nest else ""
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
