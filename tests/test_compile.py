"""``model.compile``: static shapes (micro-batches padded to at most four sizes), compiled and warmed
up in the generator's constructor, outside every row timeout; the same images as without compile.

The backend is ``aot_eager`` (Dynamo tracing and AOT autograd, no code generation) or ``eager``, so
the tests need no C compiler and stay fast; the shapes, guards and warm-up are those of inductor."""
import json

import pytest
import torch._dynamo.utils as dynamo_utils

from conftest import job_config
from pipeline.job import run_job
from pipeline.request import requests_table, resolver_for
from pipeline.worker import Generator

pytestmark = pytest.mark.timeout(600)
COMPILE = {"model.compile": "true", "model.compile_backend": "aot_eager", "model.threads": 1}


def rows(cfg, n: int, seed0: int = 300):
    resolve = resolver_for(cfg)
    return [resolve({"key": f"r{i}", "prompt": f"digit {i % 10}", "seed": seed0 + i, "nfe": 4}, i, i)[0]
            for i in range(n)]


def test_padded_sizes_are_few_and_hold_every_micro_batch(tmp_path):
    cfg = job_config(tmp_path, None, **{"manifest.template": "digit", "ray.batch_size": 12, **COMPILE})
    gen = Generator.__new__(Generator)          # the sizing rule alone, without loading or compiling
    gen.cfg = cfg
    sizes = {n: gen.padded_size(n) for n in range(1, 13)}
    assert set(sizes.values()) == {12, 6, 3, 1} and all(b >= n for n, b in sizes.items())
    # after an out-of-memory halving (micro-batches of at most 5 rows) they still pad to compiled sizes
    assert {gen.padded_size(n) for n in range(1, 6)} == {6, 3, 1}


def test_warm_up_compiles_every_size_before_any_row_and_images_match_eager(tmp_path):
    cfg = job_config(tmp_path, None, **{"manifest.template": "digit", "ray.batch_size": 8, **COMPILE})
    gen = Generator(cfg)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert gen.warmup_s > 0 and graphs >= 4     # sizes 8, 4, 2, 1 compiled in the constructor
    reqs = rows(cfg, 13)
    out = gen.images(requests_table(reqs))      # micro-batches of 8 and 5 (padded to 8)
    assert out["error"].to_pylist() == [None] * 13
    for n in (1, 3):                            # partial batches, padded to 1 and 4
        gen.generate(reqs[:n])
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs      # no shape compiled after warm-up
    eager = Generator(job_config(tmp_path, None, **{"manifest.template": "digit", "ray.batch_size": 8}))
    assert eager.images(requests_table(reqs))["image"].to_pylist() == out["image"].to_pylist()


def test_a_compile_slower_than_the_row_timeout_times_no_row_out(ray_session, tmp_path, write_jsonl):
    """The fault drill makes the warm-up last twice the row timeout; the job still has no failed row
    (a timed-out row would also have restarted the actor)."""
    manifest = write_jsonl([{"prompt": f"digit {i % 10}", "seed": i} for i in range(20)])
    cfg = job_config(tmp_path, manifest, **{"errors.row_timeout_s": 10.0, "errors.max_errors": 0,
                                            "model.hook": "pipeline.faults:FaultDrill", **COMPILE,
                                            "model.compile_backend": "eager"})
    summary = run_job(cfg)
    assert summary.images == 20 and summary.errors == 0
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert success["config"]["model"]["compile"] is True


def test_compiled_feature_cache_warms_up_both_branches_and_matches_eager(tmp_path):
    cache = {"manifest.template": "digit", "ray.batch_size": 2, "model.cache": "deepcache", "model.cache_interval": 2}
    gen = Generator(job_config(tmp_path, None, **cache, **COMPILE))
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    reqs = rows(gen.cfg, 3)
    out = gen.images(requests_table(reqs))                 # micro-batches of 2 and 1 rows, full and shallow calls
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    eager = Generator(job_config(tmp_path, None, **cache))
    assert eager.images(requests_table(reqs))["image"].to_pylist() == out["image"].to_pylist()
