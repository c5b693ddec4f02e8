"""What calibrating a solver plan costs at real model sizes: model evaluations, wall time, peak memory.

Builds the SD-1.5-sized pipeline of ``bench/diffusers_throughput.py`` (UNet 860M parameters, random
weights: cost does not depend on weight values) and, with ``--models sd15 sdxl``, the SDXL-sized one
of ``bench/gpu_check.py``, saves each once under ``--cache``, then runs ``python -m jobs.calibrate``
on it at a reduced resolution, in a fresh process per run, sampling the resident memory of the whole
process tree (driver, Ray Train workers) once a second. Each run reports the calibrator's own
projection (from its timed probe batch) beside what it measured, and the projection of the full
setting (``--full-rows`` rows, teacher 120 calls, 3 bases, 300 iterations) from the same probe, and on a
GPU at each of ``--full-iterations`` refinement steps per base (what a time budget leaves of the 300;
``bench/refine_budget.py`` measures what such a cut costs in error).

    python bench/calibration_cost.py                          # SD-1.5-sized, 64 px, nfe 8, small settings
    python bench/calibration_cost.py --rows 24 48 --nfe 8     # memory vs rows (bounded: rows in chunks)

Writes bench/results/calibration_cost.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scale import MemorySampler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL_ITERATIONS = 300      # refinement steps per base of the full setting (calibrate.iterations' default)
OUT = REPO / "bench" / "results" / "calibration_cost"
PROMPTS = ["a photo of a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "an astronaut riding a horse",
           "a watercolor of a city street", "a macro photo of a beetle"]


def build(name: str, folder: Path) -> Path:
    """The pipeline saved under ``folder`` (built once)."""
    if (folder / "model_index.json").exists():
        return folder
    if name == "sd15":
        from diffusers_throughput import build_sd15
        pipe = build_sd15()
    else:
        from gpu_check import build_sdxl_size
        pipe = build_sdxl_size()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def run(model: Path, px: int, rows: int, nfe: int, a: argparse.Namespace, out: Path) -> dict:
    """One ``jobs.calibrate`` run in a fresh process tree, memory sampled (``a.set``: more overrides, last)."""
    args = [sys.executable, "-m", "jobs.calibrate", "model.kind=diffusers", f"model.path={model}",
            "model.local_files_only=true", f"defaults.height={px}", f"defaults.width={px}", f"sampler.nfe={nfe}",
            "defaults.guidance_scale=7.5", "manifest.template='{p}'",
            f"manifest.values={{p: {json.dumps(PROMPTS)}}}", f"manifest.count={-(-rows // len(PROMPTS))}",
            f"manifest.limit={rows}", f"calibrate.teacher_nfe={a.teacher_nfe}", f"calibrate.candidates={a.candidates}",
            f"calibrate.dp_samples={min(a.dp_samples, rows)}", f"calibrate.iterations={a.iterations}",
            f"calibrate.batch_size={a.batch_size}", f"calibrate.bases=[{','.join(a.bases)}]",
            # one entry at guidance 7.5, not the digits family's scales (the default config's)
            "calibrate.guidance_scales=null", "calibrate.guidance_rule=exact",
            f"calibrate.out={out}/plan.json", f"output.path={out}", "calibrate.workers=1", "ray.num_cpus=2",
            f"ray.num_cpus_per_actor={a.cpus}", f"ray.batch_size={a.chunk}", "--overwrite"]
    args += [f"calibrate.time_budget_s={a.time_budget_s or 'null'}", *a.set]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    sampler = MemorySampler()
    sampler.start()
    t0 = time.time()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    seconds, mem = time.time() - t0, sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.calibrate failed:\n{proc.stderr[-4000:]}")
    family = json.loads((out / "plan.json").read_text())
    plan = family["entries"][0]
    f = plan["calibration"]
    return {"rows": rows, "px": px, "nfe": nfe, "wall_s": round(seconds, 1), "calibration_s": f["seconds"]["total"],
            "evaluations": f["model_evaluations"], "projection": f["projection"], "peak_rss_mib": job_peak(mem),
            "memory": mem, "accepted": f["accepted"], "chosen": f["chosen"],
            "held_out": {"baseline": f["error"]["baseline"]["held_out"], "plan": f["error"]["plan"]["held_out"]}}


def job_peak(mem: dict) -> float:
    """Peak resident MiB of the ``jobs.calibrate`` process tree (its driver, Ray's processes, the Ray Train
    worker holding the model): the sum of each part's peak, so an upper bound. The bench's own process is
    left out; it holds the model it built when the cache was empty."""
    return mem["all"]["workers"] + mem["all"]["ray_system"]


def probe_backward(probe: dict) -> float:
    """Seconds of a refinement call on the probe batch: the call, its recompute and the backward pass. Probes
    made before 2026-12-07 (``counted_forward_twice``) added one more forward pass to it, which made the
    projections 24-29% high at 64 px; their forward is taken off here."""
    return probe["forward_backward_s"] - (probe["forward_s"] if probe.get("counted_forward_twice") else 0.0)


def full_projection(r: dict, a: argparse.Namespace, gpu: bool = False, iterations: int = FULL_ITERATIONS) -> dict:
    """The full setting projected from the run's probe (calls scale with rows past the probe batch); with
    ``gpu``, at ``--gpu-rows-per-s`` guided model calls per second instead (a measured inference rate, not
    this run's), backward costing what it costs relative to forward in this run's probe; ``iterations``
    refinement steps per base (300, the default, or fewer, as a time budget cuts them)."""
    probe = r["projection"]["probe"]
    per_row_fwd, per_row_back = probe["forward_s"] / probe["rows"], probe_backward(probe) / probe["rows"]
    if gpu:
        per_row_fwd, per_row_back = 1 / a.gpu_rows_per_s, per_row_back / per_row_fwd / a.gpu_rows_per_s
    n, nfe, val = a.full_rows, r["nfe"], round(0.2 * a.full_rows)
    teacher, dp = n * 120, 64 * (nfe * 40)
    refine_rows = 3 * iterations * 32 * nfe
    validation = (3 * (iterations // 25 + 2) + 1) * val * nfe + 3 * val * nfe
    seconds = (teacher + dp + validation) * per_row_fwd + refine_rows * per_row_back
    return {"rows": n, "iterations": iterations, "evaluations": teacher + dp + 2 * refine_rows + validation,
            "seconds": round(seconds)}


def projections(r: dict, a: argparse.Namespace) -> None:
    """The run's full-setting projections: on this CPU and on the GPU, and on the GPU at each of
    ``--full-iterations`` (refinement cut as a time budget would cut it)."""
    r["full"], r["gpu"] = full_projection(r, a), full_projection(r, a, gpu=True)
    r["gpu_cut"] = [full_projection(r, a, gpu=True, iterations=i) for i in a.full_iterations if i != FULL_ITERATIONS]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sd15"], choices=["sd15", "sdxl"])
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--rows", type=int, nargs="+", default=[24])
    ap.add_argument("--nfe", type=int, default=8)
    ap.add_argument("--teacher-nfe", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--dp-samples", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bases", nargs="+", default=["unipc"])
    ap.add_argument("--chunk", type=int, default=8, help="rows per model call (ray.batch_size)")
    ap.add_argument("--cpus", type=float, default=2.0)
    ap.add_argument("--time-budget-s", type=float)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more jobs.calibrate overrides, after the script's own (e.g. model.device=cuda)")
    ap.add_argument("--full-rows", type=int, default=256)
    ap.add_argument("--gpu-rows-per-s", type=float, default=192.0,
                    help="guided model calls (rows) per second at 512 px on the GPU to project for: 192 = 24 img/s "
                         "x nfe 8, compiled SD-1.5 on one H200 (issue 18's figure)")
    ap.add_argument("--full-iterations", type=int, nargs="+", default=[FULL_ITERATIONS, 90, 30],
                    help="refinement steps per base to project the GPU time at (300: the default setting; fewer: "
                         "what a time budget leaves, bench/refine_budget.py)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/raydiffusion-bench-models"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json (projections anew)")
    ap.add_argument("--append", action="store_true",
                    help="keep the .json's earlier runs (same settings), replacing those of the same model and rows")
    return ap


def main() -> None:
    a = parser().parse_args()
    earlier = json.loads(a.out.with_suffix(".json").read_text()) if (a.render or a.append) else []
    if a.render:
        for r in earlier:
            projections(r, a)
            r["peak_rss_mib"] = job_peak(r["memory"])
        return write(earlier, a)
    results = [r for r in earlier if (r["model"], r["rows"]) not in {(m, n) for m in a.models for n in a.rows}]
    for name in a.models:
        model = build(name, a.cache / name)
        for rows in a.rows:
            r = {"model": name, "command": " ".join(["python bench/calibration_cost.py", *sys.argv[1:]]),
                 **run(model, a.px, rows, a.nfe, a, a.cache / f"run-{name}-{rows}")}
            projections(r, a)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "memory"}), flush=True)
    write(results, a)


def write(results: list[dict], a: argparse.Namespace) -> None:
    commands = ", then ".join(dict.fromkeys(f"`{r.get('command', 'python bench/calibration_cost.py')}`" for r in results))
    md = ["# Calibration cost at model size", "",
          f"{commands}; {platform.machine()}, 2-core CPU VM, "
          f"{a.cpus:g} CPU for the one Ray Train worker; teacher {a.teacher_nfe} calls, {a.candidates} candidates, "
          f"{a.iterations} iterations on bases {', '.join(a.bases)}, {a.batch_size} rows per step, guidance 7.5.", "",
          "| model | px | nfe | rows | model evaluations (teacher / dp / refine / eval) | projected s | measured s "
          "(calibration / job) | peak RSS (job's tree) | worker with the model | held-out: baseline / plan | full setting projected |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    if any(r["projection"]["probe"].get("counted_forward_twice") for r in results):
        md[2:2] = ["`projected s` is the job's own projection before the work. Runs before 2026-12-07 counted one "
                   "forward pass too many per refinement call in it; the full-setting projections below take that "
                   "pass off (`probe_backward`).", ""]
    for r in results:
        e, f = r["evaluations"], r["full"]
        md.append(f"| {r['model']} | {r['px']} | {r['nfe']} | {r['rows']} | {e['total']:,} ({e.get('teacher', 0):,} / "
                  f"{e.get('dp', 0):,} / {e.get('refine', 0):,} / {e.get('evaluation', 0):,}) | "
                  f"{r['projection']['seconds']:.0f} | {r['calibration_s']:.0f} / {r['wall_s']:.0f} | "
                  f"{r['peak_rss_mib']:,.0f} MiB | {r['memory']['all']['workers']:,.0f} MiB | {r['held_out']['baseline']:.4g} / {r['held_out']['plan']:.4g}"
                  f"{'' if r['accepted'] else ' (baseline kept)'} | {f['rows']} rows: {f['evaluations']:,} evals, "
                  f"~{f['seconds'] / 3600:.1f} h |")
    md += ["", f"Full setting: {a.full_rows} rows, teacher 120 calls, dp on 64 rows x 40 candidates, 3 bases x "
               f"{FULL_ITERATIONS} iterations of 32 rows, validation every 25. Projected on a GPU at {a.gpu_rows_per_s:g} guided rows/s "
               "(forward; backward at this run's measured backward/forward ratio), 512 px: not measured."]
    md += [f"- {r['model']}, nfe {r['nfe']}, probe of the {r['rows']}-row run: {r['gpu']['evaluations']:,} evaluations, ~{r['gpu']['seconds'] / 60:.0f} min "
           f"(backward / forward {probe_backward(r['projection']['probe']) / r['projection']['probe']['forward_s']:.1f}x)"
           + "".join(f"; {c['iterations']} steps per base: {c['evaluations']:,}, ~{c['seconds'] / 60:.0f} min"
                     for c in r.get("gpu_cut", []))
           for r in results if r["model"] == "sd15"]     # the GPU rate is SD-1.5's; no measured one for SDXL
    md += [f"- {r['model']}: no GPU projection (no measured GPU rate for it); its CPU probe's forward is "
           f"{r['projection']['probe']['forward_s'] / sd15['projection']['probe']['forward_s']:.1f}x SD-1.5's at {r['px']} px"
           for r in results for sd15 in results[:1] if r["model"] != "sd15" and sd15["model"] == "sd15"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
