"""Nesting on a rise, read back from a run that nested always: what ``calibrate(nesting="rise")`` would have
returned on the same problems, from the figures ``bench/solver_plans.py --nest always`` recorded.

This is in sample: the rule was read off these results (``bench/results/nested/``); its out-of-sample check
is ``bench/solver_plans.py --nest rise`` on the ``guard*`` problems. Per problem the NFEs are walked lowest
first, as a family is calibrated. At each NFE the check of ``rises`` is redone from the recorded validation
means: it fires when the lower plan's validation mean is below every candidate's but the nested ones (with
400 validation rows or more ``choose`` takes the lowest mean; 2048 calibration noises give about 410). If it
does not fire, the plan is the one the same calibration returns without its nested candidates
(``unnested``); if it fires, the plan the run chose with them, which is what the rule returns only when the
lower plan it nests is the run's own lower plan. A cell where it is not is reported as unknown (none is, on
the committed run). A cell with the baseline as its plan has no candidate's validation mean: unknown too.

    python bench/nest_retro.py [--results bench/results/nested/solver_plans.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from solver_plans import best, rises

DEFAULT = Path(__file__).parent / "results" / "nested" / "solver_plans.json"


def walk(res: dict) -> dict:
    """The plans ``nesting="rise"`` returns for one problem: per NFE the test mean, whether the check fired,
    and the paired difference against the plan without nesting (``None`` where the figures cannot tell)."""
    cells, out = res["plan"], {}
    nfes = sorted(cells, key=int)
    first = cells[nfes[0]]
    lower = {"hash": first["hash"], "validation": first["validation"]}   # the rule's plan at the NFE below
    for a, b in zip(nfes, nfes[1:]):
        c, u = cells[b], cells[b]["unnested"]
        v_unnested = c["candidates"].get(u["chosen"], {}).get("mean")
        if v_unnested is None or lower is None:
            out[b], lower = None, None
            continue
        fired = lower["validation"] < v_unnested
        if not fired:
            out[b] = {"fired": False, "mean": u["mean"], "difference": 0.0, "standard_error": 0.0}
            lower = {"hash": u["hash"], "validation": v_unnested}
        elif lower["hash"] == cells[a]["hash"]:
            out[b] = {"fired": True, "mean": c["mean"], "difference": u["difference"],
                      "standard_error": u["standard_error"]}
            lower = {"hash": c["hash"], "validation": c["validation"]}
        else:
            out[b], lower = None, None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=DEFAULT)
    args = ap.parse_args()
    results = json.loads(args.results.read_text())
    print(f"# Nesting on a rise, read back from `{args.results}` (in sample)\n")
    print("Per cell: test mean of the rule's plan (`*`: the check fired) / with nesting always / without nesting.\n")
    totals = {"cells": 0, "unknown": 0, "fired": 0, "worse": 0, "better": 0, "over": {"rise": 0, "without": 0},
              "rises": {"rise": 0, "always": 0, "without": 0}}
    print("| problem | NFE | rise | always | without | difference rise - without (SE) |\n|---|---|---|---|---|---|")
    for name, res in results.items():
        cells, walked = res["plan"], walk(res)
        nfes = sorted(cells, key=int)
        rule = {nfes[0]: cells[nfes[0]]}
        for n in nfes[1:]:
            w, c, u = walked.get(n), cells[n], cells[n]["unnested"]
            totals["cells"] += 1
            if w is None:
                totals["unknown"] += 1
                print(f"| {name} | {n} | unknown | {c['mean']:.4f} | {u['mean']:.4f} | |")
                continue
            rule[n] = w
            diff, se = w["difference"], w["standard_error"]
            totals["fired"] += w["fired"]
            totals["worse"] += diff > 2 * se > 0
            totals["better"] += diff < -2 * se < 0
            limit = 0.5 * best(res["diffusers"][n])[1]["mean"]
            totals["over"]["rise"] += w["mean"] > limit
            totals["over"]["without"] += u["mean"] > limit
            print(f"| {name} | {n} | {w['mean']:.4f}{'*' if w['fired'] else ''} | {c['mean']:.4f} | {u['mean']:.4f} | "
                  f"{diff:+.4f} ({se:.4f}) |")
        if len(rule) == len(nfes):
            totals["rises"]["rise"] += len(rises(rule))
            totals["rises"]["always"] += len(rises(cells))
            totals["rises"]["without"] += len(rises(cells, "unnested"))
    t = totals
    print(f"\n{len(results)} problems, {t['cells']} cells with a lower plan ({t['unknown']} unknown): the check fired "
          f"in {t['fired']}; rising steps {t['rises']['rise']} on a rise, {t['rises']['always']} always, "
          f"{t['rises']['without']} without; significantly worse than without in {t['worse']} cells, better in "
          f"{t['better']}; cells over 0.5x diffusers' best {t['over']['rise']} on a rise, {t['over']['without']} "
          f"without.")


if __name__ == "__main__":
    main()
