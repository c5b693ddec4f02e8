"""What a plan is worth when the time budget cuts its refinement: fewer gradient steps per base.

Most of a full calibration's cost is refinement: 3 bases x 300 gradient steps, each a forward and a
backward pass through the unrolled solver. ``bench/calibration_cost.py`` projects the full setting for
SD-1.5 at 512 px, nfe 8, 256 rows to about 85 minutes on one H200 (not measured: no GPU was lent), about
90 steps per base into 30 minutes and 30 steps into 13 (``--full-iterations``). ``calibrate.time_budget_s``
cuts refinement at the best validated iterate, giving each base an equal share of the time left, which
is what a cap of ``iterations`` steps per base does without depending on the load of the machine.

So per problem and NFE this script calibrates, on the same 2048 calibration noises (``CAL_SEED`` of
``solver_plans.py``) with the default settings but the cap, a plan at every ``--levels`` value (0: the DP
grid alone, no refinement, ``calibrators=("dp",)``; N: at most N refinement steps per base), scores each on
``--test-samples`` other noises against a 1000-call reference, beside the best diffusers configuration on
those same samples (lowest mean, which favours diffusers), and the paired difference of each level
against the last (the full setting). It changes no default: it measures what the cut costs.

    python bench/refine_budget.py --problems guard32-sd guard80-flow [--levels 0 30 90 300] [--test-samples 1024]
    python bench/refine_budget.py --render        # the .md from every problem's .json under --out

A level ``tN`` calibrates with the default 300 steps per base under a real ``time_budget_s``: the seconds
the ``--budget-from`` run (by default the committed one) took on the same cell at level N, so what a budget
does, steps and schedule, is measured rather than stood in for by a cap. ``--keep-errors`` keeps each
cell's per-sample test errors, and ``--paired-with DIR`` sets each cell beside the same cell of another such
run, paired (the same noises):

    python bench/refine_budget.py --problems mix16-sd --levels t90 --keep-errors --out DIR [--paired-with OTHER]

Writes bench/results/refine_budget/<problem>.json (one per problem, so lists can run side by side) and
refine_budget.md (another ``--out`` folder: its own .md beside it). With ``--bases`` only those bases are
calibrated, and ``--compare DIR`` sets this run's last level beside level ``--compare-level`` of the run in
DIR (same noises): three bases at 90 steps each against two at 135, for one.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from pipeline.analytic import per_sample_rms
from pipeline.samplers.planned import BASES
from plan_tail import best_diffusers, paired
from solver_plans import CAL_SEED, MIXTURES, OUT, TEST_SEED, calibrate_plan, problems, stats

BUDGET_SEED = TEST_SEED + 11    # neither solver_plans.py's test noises, nor plan_tail.py's, nor calibration's


def level_options(level: int | str, bases: tuple[str, ...] | None = None, budget_s: float | None = None) -> dict:
    """``CalibrationSpec`` fields for a level: 0 is the DP grid alone, N at most N steps per base, ``tN`` the
    default 300 steps under a ``time_budget_s`` of ``budget_s``; ``bases`` the bases calibrated (None: all)."""
    if isinstance(level, str):
        cut = {"time_budget_s": budget_s}
    else:
        cut = {"calibrators": ("dp",)} if level == 0 else {"iterations": level}
    return cut | ({"bases": bases} if bases else {})


def parse_level(text: str) -> int | str:
    """``N`` (steps per base, N >= 0) or ``tN`` (the time the ``--budget-from`` run's level N took, as a budget)."""
    body = text[1:] if text.startswith("t") else text
    if not body.isdigit():
        raise argparse.ArgumentTypeError(f"a level is N or tN with N >= 0, got {text!r}")
    return text if text.startswith("t") else int(text)


def load_run(folder: Path) -> list[dict]:
    """Every problem's results of the run under ``folder`` (an ``--out`` folder)."""
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]


def budget_seconds(source: Path, cells: list[dict], nfe: int, level: str) -> float:
    """The seconds the run's ``cells`` (read from ``source``) took at ``nfe`` with ``level[1:]`` steps per
    base: the budget of level ``tN``."""
    found = [c["seconds"] for c in cells if c["nfe"] == nfe and c["level"] == int(level[1:])]
    if not found:
        raise SystemExit(f"{source} has no level {level[1:]} at nfe {nfe} for the budget {level}")
    return found[0]


def run(name: str, nfes: list[int], levels: list, n_test: int, cal_samples: int,
        bases: tuple[str, ...] | None = None, budget_from: Path | None = None, keep_errors: bool = False) -> dict:
    [(_, p)] = problems([name])
    test, cal = p.noise(BUDGET_SEED, n_test), p.noise(CAL_SEED, cal_samples)
    ref, far = p.reference(test), 0.5 * p.gmm.data_std()
    out = {"problem": name, "test_samples": n_test, "cal_samples": cal_samples, "far_threshold": far,
           "levels": levels, "bases": list(bases or BASES), "cells": []}
    source = budget_from / f"{name}.json" if any(isinstance(lv, str) for lv in levels) else None
    budget_cells = json.loads(source.read_text())["cells"] if source else []
    for nfe in nfes:
        diff_err, label = best_diffusers(p, test, ref, nfe)
        errors = {}
        for level in levels:
            budget = budget_seconds(source, budget_cells, nfe, level) if isinstance(level, str) else None
            t0 = time.time()
            plan = calibrate_plan(p, nfe, cal, **level_options(level, bases, budget))
            seconds, f = time.time() - t0, plan.calibration
            errors[level] = e = per_sample_rms(p.library(test, plan, nfe), ref)
            cell = {"nfe": nfe, "level": level, **stats(e, far), "ratio": float(e.mean() / diff_err.mean()),
                    "diffusers_best": {"config": label, **stats(diff_err, far)}, "chosen": f["chosen"],
                    "accepted": f["accepted"], "iterations": f.get("iterations", {}),
                    "evaluations": f["model_evaluations"], "seconds": round(seconds, 1)}
            if budget is not None:
                cell["budget_s"] = budget
            if keep_errors:
                cell["errors"] = [float(f"{v:.6g}") for v in e.tolist()]
            out["cells"].append(cell)
            print(f"[{name}] nfe {nfe}, level {level}: mean {cell['mean']:.5f} far {cell['far']} | {cell['ratio']:.2f}x "
                  f"diffusers' best ({label}) | {f['chosen']} | {f['model_evaluations']['total']:,} evals | "
                  f"{seconds:.0f} s", flush=True)
        for cell in out["cells"]:
            if cell["nfe"] == nfe:       # against the last level (the full setting); negative: the cut is better
                cell["against_full"] = paired(errors[levels[-1]], errors[cell["level"]])
    return out


def markdown(results: list[dict], command: str) -> str:
    levels = results[0]["levels"]
    n_test = {r["test_samples"] for r in results}
    lines = ["# Plans when the time budget cuts refinement", "",
             f"`{command}`; {platform.machine()}, 2-core CPU VM; calibration on {results[0]['cal_samples']} noises "
             f"(default settings but the cap or budget), scored on {', '.join(map(str, sorted(n_test)))} other noises (seeds "
             f"{BUDGET_SEED}+) against a 1000-call reference. Level 0: the DP grid alone; N: at most N refinement "
             "steps per base; tN: the default steps under a `time_budget_s` of the seconds the `--budget-from` run's "
             "level N took on the same cell. Ratio = plan mean / the best diffusers configuration's mean on the same samples; "
             f"difference = paired per-sample difference against level {levels[-1]} (SE in brackets; positive: the "
             "cut plan is worse).", "",
             "| problem | NFE | diffusers' best (far) | " + " | ".join(f"level {lv}: ratio (far)" for lv in levels)
             + " | " + " | ".join(f"{lv} - {levels[-1]}" for lv in levels[:-1]) + " | evaluations at each level |",
             "|---|---|---|" + "---|" * (2 * len(levels))]
    for r in results:
        for nfe in sorted({c["nfe"] for c in r["cells"]}):
            cells = {c["level"]: c for c in r["cells"] if c["nfe"] == nfe}
            d = next(iter(cells.values()))["diffusers_best"]
            lines.append(f"| {r['problem']} | {nfe} | {d['mean']:.5f} ({d['far']}) | "
                         + " | ".join(f"{cells[lv]['ratio']:.2f} ({cells[lv]['far']})" for lv in levels) + " | "
                         + " | ".join(f"{cells[lv]['against_full']['mean']:+.5f} ({cells[lv]['against_full']['se']:.5f})"
                                      for lv in levels[:-1]) + " | "
                         + " / ".join(f"{cells[lv]['evaluations']['total'] / 1e3:.0f}k" for lv in levels) + " |")
    lines += ["", "## Summary", ""] + summary(results)
    return "\n".join(lines) + "\n"


def matched(results: list[dict], other: list[dict], key, mine=lambda c: True, theirs=lambda c: True) -> list:
    """(problem, cell, other's cell) for each cell of ``results`` passing ``mine`` whose ``key(problem, cell)``
    a cell of ``other`` passing ``theirs`` has too."""
    index = {key(r["problem"], c): c for r in other for c in r["cells"] if theirs(c)}
    return [(r["problem"], c, index[k]) for r in results for c in r["cells"]
            if mine(c) and (k := key(r["problem"], c)) in index]


def compare(results: list[dict], other: list[dict], level: int) -> list[str]:
    """This run's last level against ``other``'s ``level`` (another run's, on the same test noises): per
    cell the two ratios to diffusers' best, and the cells where each is the lower by more than 10%."""
    mine_level = results[0]["levels"][-1]
    pairs = matched(results, other, lambda p, c: (p, c["nfe"]), lambda c: c["level"] == mine_level,
                    lambda c: c["level"] == level)
    if not pairs:
        return []
    lower = sum(c["ratio"] < 0.9 * o["ratio"] for _, c, o in pairs)
    higher = sum(c["ratio"] > 1.1 * o["ratio"] for _, c, o in pairs)
    over = sum(o["ratio"] > 0.5 for _, _, o in pairs)
    out = ["", f"## Against {level} steps per base on {', '.join(other[0].get('bases', BASES))}", "",
           f"Same calibration and test noises; {len(pairs)} cells. This run ({mine_level} steps on "
           f"{', '.join(results[0].get('bases', BASES))}) has the lower ratio by more than 10% in {lower} cells, the higher in "
           f"{higher}; cells over 0.5x: {sum(c['ratio'] > 0.5 for _, c, _ in pairs)} here, {over} there. Not paired: "
           "the other run's per-sample errors are not kept.", "",
           "| problem | NFE | this run: ratio (far), chosen | other: ratio (far), chosen |", "|---|---|---|---|"]
    out += [f"| {p} | {c['nfe']} | {c['ratio']:.2f} ({c['far']}), {c['chosen']} | {o['ratio']:.2f} ({o['far']}), "
            f"{o['chosen']} |" for p, c, o in pairs]
    return out


def paired_with(results: list[dict], other: list[dict], label: str) -> list[str]:
    """Each cell of this run against the same cell (problem, NFE, level) of ``other``, a run on the same
    noises with ``--keep-errors`` as this one: the paired per-sample difference (this - other) and its
    standard error; the cells where either is lower by two standard errors."""
    kept = lambda c: "errors" in c                                           # noqa: E731
    pairs = matched(results, other, lambda p, c: (p, c["nfe"], c["level"]), kept, kept)
    if not pairs:
        return []
    diffs = [paired(torch.tensor(o["errors"]), torch.tensor(c["errors"])) for _, c, o in pairs]
    lower = sum(d["mean"] < -2 * d["se"] for d in diffs)
    higher = sum(d["mean"] > 2 * d["se"] for d in diffs)

    def medians(side: int) -> str:
        return " / ".join(f"{statistics.median(x[side]['ratio'] for x in pairs if x[1]['nfe'] == nfe):.2f}"
                          for nfe in sorted({c["nfe"] for _, c, _ in pairs}))

    def steps(c: dict) -> str:
        return "/".join(str(v) for v in c["iterations"].values()) or "0"
    out = ["", f"## Paired against {label}", "",
           f"Same calibration and test noises; {len(pairs)} cells. This run is lower by two standard errors of the "
           f"paired per-sample difference in {lower} cells, higher in {higher}; cells over 0.5x: "
           f"{sum(c['ratio'] > 0.5 for _, c, _ in pairs)} here, {sum(o['ratio'] > 0.5 for _, _, o in pairs)} there; "
           f"median ratio per NFE {medians(1)} here, {medians(2)} there.", "",
           "| problem | NFE | level | this run: ratio (far), chosen, steps per base | other: ratio (far), chosen, "
           "steps per base | this - other (SE) |", "|---|---|---|---|---|---|"]
    out += [f"| {p} | {c['nfe']} | {c['level']} | {c['ratio']:.2f} ({c['far']}), {c['chosen']}, {steps(c)} | "
            f"{o['ratio']:.2f} ({o['far']}), {o['chosen']}, {steps(o)} | {d['mean']:+.5f} ({d['se']:.5f}) |"
            for (p, c, o), d in zip(pairs, diffs)]
    return out


def summary(results: list[dict]) -> list[str]:
    """Per level: cells over 0.5x, the median ratio per NFE, cells significantly worse or better than the full
    setting (two standard errors), and the share of the full setting's refinement evaluations."""
    levels, cells = results[0]["levels"], [c for r in results for c in r["cells"]]
    full_refine = sum(c["evaluations"].get("refine", 0) for c in cells if c["level"] == levels[-1])
    out = []
    for lv in levels:
        mine = [c for c in cells if c["level"] == lv]
        over = sum(c["ratio"] > 0.5 for c in mine)
        medians = [f"{statistics.median(c['ratio'] for c in mine if c['nfe'] == nfe):.2f}"
                   for nfe in sorted({c["nfe"] for c in mine})]
        line = (f"- level {lv}: {len(mine) - over} of {len(mine)} cells at most 0.5x; median ratio per NFE "
                f"{' / '.join(medians)}; refinement evaluations "
                f"{sum(c['evaluations'].get('refine', 0) for c in mine) / max(1, full_refine):.0%} of level {levels[-1]}'s")
        if lv != levels[-1]:
            worse = sum(c["against_full"]["mean"] > 2 * c["against_full"]["se"] for c in mine)
            better = sum(c["against_full"]["mean"] < -2 * c["against_full"]["se"] for c in mine)
            line += f"; significantly worse than level {levels[-1]} in {worse} cells, better in {better}"
        out.append(line)
    return out


def main() -> None:
    names = [f"{m}-{k}" for m in MIXTURES for k in ("sd", "flow")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=[], choices=names)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    ap.add_argument("--levels", type=parse_level, nargs="+", default=[0, 30, 90, 300],
                    help="refinement steps per base at most (0: the DP grid alone), or tN: the default steps under "
                         "a time_budget_s of the seconds --budget-from's level N took on the same cell; the last "
                         "is the reference")
    ap.add_argument("--budget-from", type=Path, default=OUT / "refine_budget",
                    help="the run (an --out folder) whose seconds per cell are the budgets of the tN levels")
    ap.add_argument("--keep-errors", action="store_true", help="keep each cell's per-sample test errors in the .json")
    ap.add_argument("--paired-with", type=Path,
                    help="another --keep-errors run's --out folder (same noises): the paired difference per cell")
    ap.add_argument("--test-samples", type=int, default=1024)
    ap.add_argument("--cal-samples", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 to run two problem lists side by side)")
    ap.add_argument("--out", type=Path, default=OUT / "refine_budget")
    ap.add_argument("--bases", nargs="+", choices=BASES, help="the bases calibrated (default: all)")
    ap.add_argument("--compare", type=Path, help="another run's --out folder, to set this run's last level beside")
    ap.add_argument("--compare-level", type=int, default=90, help="the level of --compare's run to compare with")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the problems' .json")
    a = ap.parse_args()
    if not a.render and not a.problems:
        ap.error("give --problems (or --render)")
    steps = [lv for lv in a.levels if isinstance(lv, int)]
    if steps != sorted(set(steps)) or len(set(a.levels)) != len(a.levels):
        ap.error(f"--levels: the step levels must be increasing, and no level twice, got {a.levels}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/refine_budget.py", *sys.argv[1:]])
    for name in [] if a.render else a.problems:
        res = {**run(name, a.nfe, a.levels, a.test_samples, a.cal_samples, tuple(a.bases or ()), a.budget_from,
                     a.keep_errors), "command": command}
        (a.out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    results = load_run(a.out)
    if not results:
        sys.exit(f"no results under {a.out}")
    commands = "`, then `".join(dict.fromkeys(r["command"] for r in results))
    md = markdown(results, commands)
    if a.compare:
        md += "\n".join(compare(results, load_run(a.compare), a.compare_level)) + "\n"
    if a.paired_with:
        md += "\n".join(paired_with(results, load_run(a.paired_with), str(a.paired_with))) + "\n"
    a.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
