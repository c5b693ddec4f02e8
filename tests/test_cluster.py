"""Fault tolerance on real multi-node Ray clusters (ray.cluster_utils.Cluster) and driver restarts.

Each scenario runs in its own process with its own Ray cluster; the dataset it leaves must
hold every manifest key exactly once and be byte-identical to an undisturbed run's.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.job import run_job
from conftest import REPO, job_config

pytestmark = pytest.mark.timeout(900)
N = 40


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for d in ("shards", "parquet", "stats")
            for p in sorted((out / d).glob("*"))}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    p = tmp_path_factory.mktemp("m") / "m.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"digit {i % 10}", "key": f"k{i:03d}", "seed": i}) + "\n"
                         for i in range(N)))
    return p


@pytest.fixture(scope="module")
def reference(ray_session, manifest, tmp_path_factory):
    """The undisturbed run's files (same shard layout and image settings as the fault runs)."""
    tmp = tmp_path_factory.mktemp("ref")
    run_job(job_config(tmp, str(manifest), **{"output.rows_per_shard": 4, "output.contact_sheet": 0,
                                              "sampler.nfe": 4}))
    return files(tmp / "out")


def keys(out: Path) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")),
                                                 shardshuffle=False)]


def run_script(mode, out, manifest):
    r = subprocess.run([sys.executable, "tests/scripts/cluster_faults.py", mode, str(out), str(manifest)],
                       cwd=REPO, capture_output=True, text=True, timeout=800,
                       env={**os.environ, "RAY_ADDRESS": ""})
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("mode", ["node_loss", "actor_kill"])
def test_faults_mid_job_still_give_every_key_exactly_once(mode, manifest, reference, tmp_path):
    result = run_script(mode, tmp_path / "out", manifest)
    assert result["faults"] and not result["alive"] and not result["error"], result
    # the fault hit generator actors: a removed node that hosted one, or actors killed in 3 rounds
    assert all("pid(s) [" in f and "pid(s) []" not in f for f in result["faults"]), result["faults"]
    assert len(result["faults"]) == (1 if mode == "node_loss" else 3), result["faults"]
    assert result["images"] == N
    assert keys(tmp_path / "out") == [f"k{i:03d}" for i in range(N)]
    assert files(tmp_path / "out") == reference


def test_a_killed_driver_resumes_to_a_byte_identical_dataset(manifest, reference, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.generate", f"manifest.path={manifest}", f"output.path={out}",
            "output.rows_per_shard=4", "defaults.height=16", "defaults.width=16", "ray.batch_size=1",
            "ray.actors=1", "ray.num_cpus=2", "output.contact_sheet=0", "sampler.nfe=4"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "stats").glob("*.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)                    # the driver (and its local Ray) die mid-job
    proc.wait(timeout=60)
    committed = len(list((out / "stats").glob("*.json")))
    assert 2 <= committed < N // 4
    assert not (out / "_SUCCESS").exists()
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already committed and skipped" in r.stdout
    assert files(out) == reference and (out / "_SUCCESS").exists()
