import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, modest object store)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=400 * 1024 ** 2, include_dashboard=False,
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


def job_config(tmp_path, manifest_path=None, **overrides):
    """A small JobConfig for tests: the built-in model, tiny shards, a path under tmp_path."""
    from pipeline.config import load_config

    items = {"output.path": str(tmp_path / "out"), "output.rows_per_shard": 8,
             "defaults.height": 16, "defaults.width": 16, "ray.batch_size": 8, "ray.actors": 1,
             "ray.num_cpus_per_actor": 1, "output.contact_sheet": 16}
    if manifest_path:
        items["manifest.path"] = manifest_path
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])
