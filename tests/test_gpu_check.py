"""``bash bench/gpu_check.sh --smoke``: every stage of the GPU check on CPU with tiny pipelines, through the
same script the GPU machine runs (stage processes, time caps, logs, the summary). Its figures mean nothing."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

STAGES = ("checks", "eager", "savings", "job", "compiled", "compile_cache")


def smoke(tmp_path, stages, *extra, budget=800):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "disabled", "BUDGET_S": str(budget),
           "STAGES": " ".join(f"{s}:240" for s in stages)}           # generous caps: CI machines are shared
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", *extra], env=env,
                          capture_output=True, text=True, timeout=budget + 50)


@pytest.mark.timeout(900)
def test_the_gpu_check_runs_every_stage_in_smoke_mode(tmp_path):
    done = smoke(tmp_path, STAGES, "--models", "sd15")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")]
    assert set(STAGES) <= set(rows), summary
    for word in ("failed", "stopped at", "not run", "NOT finite", "CHANGED"):
        assert word not in summary, summary
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == [f"{i:02d}-{s}.log" for i, s in enumerate(STAGES, 1)]
    assert len(list(tmp_path.iterdir())) <= 8                          # what a device call brings back


@pytest.mark.timeout(400)
def test_the_calibrate_stage_measures_a_calibration_and_projects_the_full_setting(tmp_path):
    """Issue 18's stage, run alone as its device call does: ``jobs.calibrate`` on the (tiny) SD-1.5 pipeline
    in bfloat16, the GPU's dtype for it; its measured seconds beside its own projection, and the full
    setting projected at 300 steps per base and at the cuts."""
    done = smoke(tmp_path, ["calibrate"], "--calibrate-dtype", "bfloat16", budget=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|")[1:-1] for line in (tmp_path / "summary.md").read_text().splitlines()
            if line.startswith("| calibrate ")]
    assert [r[1].strip() for r in rows] == ["sd15 32px bfloat16"] * 3, rows
    probe, run, full = (r[3] for r in rows)
    assert re.search(r"forward [\d.]+ rows/s; with backward .* [\d.]+ rows/s \([\d.]+x\)", probe), probe
    measured, projected = (float(v) for v in re.search(r"\*\*(\d+) s\*\* against (\d+) s projected", run).groups())
    assert measured <= 10 * projected + 5 and projected <= 10 * measured + 5, run      # the probe's projection holds
    assert re.search(r"^[\d,]+ evaluations \(teacher 144, dp \d+, refine \d+, validation \d+\)", run.strip()), run
    steps = [int(n) for n in re.findall(r"(\d+) steps per base: [\d,]+ evaluations, ~\d+ min", full)]
    assert steps == [300, 90, 30], full


def test_calibration_cost_takes_the_double_counted_forward_pass_off_older_probes(tmp_path):
    """Probes recorded before 2026-12-07 added a plain forward call to a refinement call's time (which already
    holds the call, its recompute and the backward); ``--render`` takes it off them, and only them."""
    import json

    records = json.loads((REPO / "bench" / "results" / "calibration_cost.json").read_text())

    def render(recs: list) -> tuple[str, list]:
        (tmp_path / "cc.json").write_text(json.dumps(recs))
        done = subprocess.run([sys.executable, str(REPO / "bench" / "calibration_cost.py"), "--render", "--out",
                               str(tmp_path / "cc")], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stderr
        return (tmp_path / "cc.md").read_text(), json.loads((tmp_path / "cc.json").read_text())
    md, old = render(records)
    probe = old[0]["projection"]["probe"]
    assert probe["counted_forward_twice"] and "counted one forward pass too many" in md
    assert f"backward / forward {(probe['forward_backward_s'] - probe['forward_s']) / probe['forward_s']:.1f}x" in md
    for r in records:
        del r["projection"]["probe"]["counted_forward_twice"]       # as a probe made since would be read
    md, new = render(records)
    assert "counted one forward pass too many" not in md
    assert all(n["gpu"]["seconds"] > o["gpu"]["seconds"] and n["full"]["seconds"] > o["full"]["seconds"]
               for n, o in zip(new, old))
