"""``bash bench/gpu_check.sh --smoke``: every stage of the GPU check on CPU with tiny pipelines, through the
same script the GPU machine runs (stage processes, time caps, logs, the summary). Its figures mean nothing."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

STAGES = ("checks", "eager", "savings", "job", "compiled", "compile_cache")


@pytest.mark.timeout(900)
def test_the_gpu_check_runs_every_stage_in_smoke_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "disabled", "BUDGET_S": "800",
           "STAGES": " ".join(f"{s}:240" for s in STAGES)}           # generous caps: CI machines are shared
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--models", "sd15"], env=env,
                          capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")]
    assert set(STAGES) <= set(rows), summary
    for word in ("failed", "stopped at", "not run", "NOT finite", "CHANGED"):
        assert word not in summary, summary
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == [f"{i:02d}-{s}.log" for i, s in enumerate(STAGES, 1)]
    assert len(list(tmp_path.iterdir())) <= 8                          # what a device call brings back
