"""GPU jobs start and run: Ray is told the machine has a GPU (``ray.num_gpus=1``) and the actors ask
for one, or for a fraction each, while the model itself runs on the CPU (``model.device=cpu``).
Each run is its own process with its own Ray instance, as a user's would be."""
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import webdataset as wds

from conftest import REPO, free_port

pytestmark = pytest.mark.timeout(600)
GPU = ["ray.num_cpus=2", "ray.num_gpus=1", "model.device=cpu", "model.threads=1", "ray.num_cpus_per_actor=0.5"]


def env():
    return {**os.environ, "RAY_ADDRESS": "", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


@pytest.mark.parametrize("per_actor, actors", [(1, 1), (0.5, 2)])
def test_a_job_on_gpu_actors_completes(tmp_path, write_jsonl, per_actor, actors):
    manifest = write_jsonl([{"prompt": f"digit {i % 10}", "key": f"k{i:02d}"} for i in range(12)])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "jobs.generate", f"manifest.path={manifest}", f"output.path={out}",
                        f"ray.num_gpus_per_actor={per_actor}", "output.rows_per_shard=4", "sampler.nfe=4",
                        "defaults.height=16", "defaults.width=16", *GPU],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")),
                                                 shardshuffle=False)]
    assert keys == [f"k{i:02d}" for i in range(12)]
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["config"]["ray"]["num_gpus_per_actor"] == per_actor
    assert f"generator pool: {actors} actor(s) x (0.5 CPU, {per_actor:g} GPU)" in r.stderr


def test_serve_on_a_gpu_replica_answers(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", f"serve.port={port}", "ray.num_gpus_per_actor=0.5",
                             "defaults.height=16", "defaults.width=16", *GPU],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # Serve's proxy accepts connections before the application's routes reach it (404 then), and /readyz
        # says 503 until the replica's generator answers: wait for 200, as a load balancer would
        deadline, ready = time.time() + 240, None
        while time.time() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(2)
        assert ready is not None and ready.status_code == 200, ready.text if ready is not None else "no answer"
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "digit 4", "seed": 3, "nfe": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["images"][0]["metadata"]["nfe"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
