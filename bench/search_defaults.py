"""The calibration behind two defaults of ``pipeline.search``, on seeds the benchmark never reports.

``bench/search_scaling.py`` reports on seeds 200000+; the defaults it runs with were chosen here,
on seeds 5000-5199 (``--seed``), 4 particles, the built-in model, guidance 1 and 3:

1. the sampler ``auto`` resolves to under fk/svdd (``search.STEERED_AUTO``): DPM-Solver++(2M) SDE
   (eta 1 and 0.5) against ancestral Euler, at NFE 4 and 10;
2. fk's resampling scheme (``search.RESAMPLING``): multinomial draws against systematic
   resampling, on the sampler chosen in 1, at NFE 5 and 10.

Figure: the digits reward's shortfall 1 - mean reward of the kept images (lower is better).

    python bench/search_defaults.py [--images 200] [--out bench/results/search_defaults]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pipeline.search as search  # noqa: E402
from search_scaling import run_cell, setup  # noqa: E402

SAMPLERS = (("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"eta": 0.5}), ("euler_ancestral", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/search_defaults")
    args = ap.parse_args()
    gen, resolve, clf, reward, machine = setup(args.threads)
    t0, rows = time.time(), []

    def cell(study: str, label: str, g: float, nfe: int, method: str, extra: dict | None = None) -> None:
        r = run_cell(gen, resolve, clf, reward, args, g, nfe, method, 4, extra)
        rows.append({"study": study, "label": label, **r})
        print(f"{study}: g={g:g} nfe={nfe} {method} {label}: 1-r {r['shortfall']:.2e}", flush=True)

    for g in (1.0, 3.0):
        for nfe in (4, 10):
            for sampler, options in SAMPLERS:
                label = sampler + "".join(f" {k}={v}" for k, v in options.items())
                for method in ("fk", "svdd"):
                    cell("sampler", label, g, nfe, method, {"sampler": sampler, "sampler_options": options})
    default = search.RESAMPLING
    try:
        for scheme in ("multinomial", "systematic"):
            search.RESAMPLING = scheme
            for g in (1.0, 3.0):
                for nfe in (5, 10):
                    cell("resampling", scheme, g, nfe, "fk")
    finally:
        search.RESAMPLING = default
    md = [f"# search_defaults: {args.images} images per cell, seeds {args.seed}..{args.seed + args.images - 1}, "
          f"4 particles, {machine}, {time.time() - t0:.0f} s", ""]
    for study, what in (("sampler", "sampler under fk/svdd"), ("resampling", "fk's resampling scheme")):
        cols = sorted({(r["guidance"], r["nfe"]) for r in rows if r["study"] == study})
        md += [f"{what}: 1 - mean digits reward", "",
               "| choice | method | " + " | ".join(f"g{g:g} NFE {n}" for g, n in cols) + " |",
               "|---|---|" + "---|" * len(cols)]
        for label, method in dict.fromkeys((r["label"], r["method"]) for r in rows if r["study"] == study):
            by = {(r["guidance"], r["nfe"]): r for r in rows if (r["study"], r["label"], r["method"]) ==
                  (study, label, method)}
            md.append(f"| {label} | {method} | " + " | ".join(f"{by[c]['shortfall']:.1e}" for c in cols) + " |")
        md.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps({"images": args.images, "seed": args.seed, "machine": machine,
                                                    "results": rows}, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
