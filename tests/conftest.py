import json
import logging
import os
import socket
from pathlib import Path

import pytest

import torch

# Tiny tensors: torch's default thread pool costs far more than it saves on a 2-core box.
torch.set_num_threads(1)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray starts its workers at niceness 15, so any normal-priority CPU load on the box (another process of the
# CI machine, a busy thread of this one) takes almost all of a shared core from them: the Serve tests'
# 1.5-2 s deadlines then time out (seen in CI; reproduced with one `while True: pass` beside the suite).
# The suite's Ray workers (and the Ray clusters its subprocesses start) run at normal priority instead.
os.environ.setdefault("RAY_worker_niceness", "0")
REPO = Path(__file__).resolve().parents[1]
# A canary secret: tests search every output and log for it (it must never leak).
CANARY_SECRET = "canary-Secret-9f8e7d6c5b4a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The local S3 API server's address and fake credentials go into the environment before Ray
# starts, so Ray workers inherit them (as they would inherit real AWS_* variables).
S3_PORT = free_port()
os.environ.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY=CANARY_SECRET,
                  AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}")


class S3Server:
    """moto's standalone S3 API server on 127.0.0.1 (a real HTTP server, not an in-process mock)."""

    def __init__(self, port: int):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port, self.endpoint = port, f"http://127.0.0.1:{port}"
        self._cls, self.server = ThreadedMotoServer, None

    def start(self):
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()

    def fs(self):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server(S3_PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test: s3://<name>."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs = s3_server.fs()
    if not fs.exists(name):
        fs.mkdir(name)
    return name


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, modest object store)."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=400 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="manifest.jsonl"):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)
    return write


def job_overrides(tmp_path, manifest_path=None, **overrides) -> list[str]:
    """The ``key=value`` overrides of a small test job: the built-in model, tiny shards, a path under
    tmp_path (what ``job_config`` loads, and what a test passes to the CLI)."""
    items = {"output.path": str(tmp_path / "out"), "output.rows_per_shard": 8,
             "defaults.height": 16, "defaults.width": 16, "ray.batch_size": 8, "ray.actors": 1,
             "ray.num_cpus_per_actor": 1, "output.contact_sheet": 16}
    if manifest_path:
        items["manifest.path"] = manifest_path
    items.update(overrides)
    return [f"{k}={v}" for k, v in items.items()]


def job_config(tmp_path, manifest_path=None, **overrides):
    """A small JobConfig for tests (``job_overrides``)."""
    from pipeline.config import load_config

    return load_config(None, job_overrides(tmp_path, manifest_path, **overrides))


def chosen_by_rule(figures) -> bool:
    """Whether a calibration's figures are consistent with ``pipeline.samplers.calibrate.choose``: with
    ``SEEN_ROWS`` validation rows or more, the chosen candidate has the lowest validation mean; with fewer,
    ``pick``'s: the candidate with the lowest validation mean is never beaten on the trimmed mean by the
    chosen one's rivals, and every candidate with a lower trimmed error than the chosen one has a higher
    mean than the lowest (it was dropped as significantly worse)."""
    from pipeline.samplers.calibrate import SEEN_ROWS

    cands, means = figures.error["candidates"], figures.error["candidate_means"]
    lowest = min(means, key=means.get)
    if figures.samples["validation"] >= SEEN_ROWS:
        return figures.chosen == lowest
    return cands[figures.chosen] <= cands[lowest] and all(
        means[k] > means[lowest] for k in cands if cands[k] < cands[figures.chosen])
