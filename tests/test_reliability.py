"""Object storage, bad rows, error budgets, timeouts, storage outages, secrets, hostile keys.

S3 is moto's standalone server on 127.0.0.1 (real HTTP, started by a fixture); Ray is the
session's local instance; faults are injected through the `_fault` column of the manifest
(`model.hook=pipeline.faults:FaultDrill`), the way a broken model would fail.
"""
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.job import run_job
from pipeline.manifest import ManifestError
from pipeline.sinks import ErrorBudgetExceeded
from pipeline.errors import StorageUnavailable
from pipeline.storage import StorageError
from conftest import CANARY_SECRET, job_config, job_overrides

pytestmark = pytest.mark.timeout(600)


def tar_keys(out: Path) -> list[str]:
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]


def shard_files(fs, root: str) -> dict[str, bytes]:
    return {p[len(root) + 1:]: fs.cat_file(p) for d in ("shards", "parquet", "stats")
            for p in sorted(fs.glob(f"{root}/{d}/*"))}


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for d in ("shards", "parquet", "stats")
            for p in sorted((out / d).glob("*"))}


def rows(n, faults=None, bad=None):
    """n manifest rows; faults {index: kind}; bad {index: overrides that fail validation}."""
    out = []
    for i in range(n):
        r = {"prompt": f"digit {i % 10}", "key": f"r{i:03d}", "seed": 500 + i}
        if faults and i in faults:
            r["_fault"] = faults[i]
        if bad and i in bad:
            r.update(bad[i])
        out.append(r)
    return out


def test_job_to_s3_reads_back_and_matches_a_local_run(ray_session, s3_server, s3_bucket, tmp_path, write_jsonl):
    fs = s3_server.fs()
    fs.pipe_file(f"{s3_bucket}/in/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows(20)).encode())
    s3 = job_config(tmp_path, f"s3://{s3_bucket}/in/manifest.jsonl", **{"output.path": f"s3://{s3_bucket}/out"})
    summary = run_job(s3)
    assert summary.images == 20 and summary.url == f"s3://{s3_bucket}/out"
    fs.invalidate_cache()
    assert fs.exists(f"{s3_bucket}/out/_SUCCESS") and fs.exists(f"{s3_bucket}/out/contact_sheet.png")
    table = pads.dataset(f"{s3_bucket}/out/parquet", filesystem=fs, format="parquet").to_table().sort_by("row")
    assert table["key"].to_pylist() == [f"r{i:03d}" for i in range(20)]
    local = job_config(tmp_path, write_jsonl(rows(20)), **{"output.path": str(tmp_path / "local")})
    run_job(local)
    assert shard_files(fs, f"{s3_bucket}/out") == local_files(tmp_path / "local")
    assert not fs.glob(f"{s3_bucket}/out/_tmp/*")


def test_bad_rows_go_to_the_errors_table_and_the_job_goes_on(ray_session, tmp_path, write_jsonl):
    faults = {3: "raise", 7: "nan", 11: "blank", 13: "raise", 17: "oom"}
    bad = {5: {"seed": "abc"}, 9: {"prompt": "a cat"}}
    cfg = job_config(tmp_path, write_jsonl(rows(24, faults, bad)),
                     **{"model.hook": "pipeline.faults:FaultDrill", "errors.max_errors": 10})
    summary = run_job(cfg)
    out = tmp_path / "out"
    failed = {3, 7, 11, 13}
    assert summary.images == 24 - len(bad) - len(failed) and summary.errors == 6
    keys = tar_keys(out)
    # every good key exactly once, the oom row recovered by halving the batch
    assert keys == [f"r{i:03d}" for i in range(24) if i not in failed and i not in bad]
    assert "r017" in keys

    gen_errors = pads.dataset([str(p) for p in sorted((out / "_errors").glob("shard-*.parquet"))],
                              format="parquet").to_table().to_pylist()
    by_key = {e["key"]: e for e in gen_errors}
    assert set(by_key) == {f"r{i:03d}" for i in failed}
    assert "InjectedFault" in by_key["r003"]["error"] and "NaN" in by_key["r007"]["error"]
    assert "blank" in by_key["r011"]["error"]
    assert all(e["stage"] == "generate" and e["prompt"] for e in gen_errors)

    validation = pq.read_table(out / "_errors" / "validation.parquet").to_pylist()
    assert [(v["source_row"], v["stage"]) for v in validation] == [(5, "validate"), (9, "validate")]
    assert "field 'seed'" in validation[0]["error"] and "field 'prompt'" in validation[1]["error"]

    success = json.loads((out / "_SUCCESS").read_text())
    assert success["errors"] == {"generation": 4, "validation": 2}

    # the errors table is a manifest: feed it back (faults off) and the rows generate
    errors_file = tmp_path / "retry.parquet"
    pq.write_table(pads.dataset([str(p) for p in (out / "_errors").glob("shard-*.parquet")],
                                format="parquet").to_table(), errors_file)
    retry = run_job(job_config(tmp_path, str(errors_file), **{"output.path": str(tmp_path / "retry")}))
    assert retry.images == 4 and retry.errors == 0
    assert sorted(tar_keys(tmp_path / "retry")) == sorted(by_key)


def test_error_budget_stops_the_job_with_a_clear_message(ray_session, tmp_path, write_jsonl):
    cfg = job_config(tmp_path, write_jsonl(rows(16, {1: "raise", 2: "raise", 9: "raise"})),
                     **{"model.hook": "pipeline.faults:FaultDrill", "errors.max_errors": 1})
    with pytest.raises(ErrorBudgetExceeded, match=r"error budget of 1.*_errors"):
        run_job(cfg)


def test_a_bad_row_over_the_budget_names_file_row_and_field(tmp_path, write_jsonl):
    path = write_jsonl(rows(5, bad={2: {"guidance_scale": "high"}}))
    with pytest.raises(ManifestError, match=rf"{path}: row 2: field 'guidance_scale'.*error budget of 0"):
        run_job(job_config(tmp_path, path))


def test_a_hanging_row_times_out_instead_of_stalling_the_job(ray_session, tmp_path, write_jsonl):
    cfg = job_config(tmp_path, write_jsonl(rows(12, {4: "hang"})),
                     **{"model.hook": "pipeline.faults:FaultDrill", "errors.max_errors": 10, "errors.row_timeout_s": 3,
                        "ray.batch_size": 1})
    t0 = time.time()
    summary = run_job(cfg)
    assert time.time() - t0 < 120
    assert summary.images == 11 and summary.errors == 1
    err = pq.read_table(tmp_path / "out" / "_errors" / "shard-000000.parquet").to_pylist()
    assert [(e["key"], e["stage"]) for e in err] == [("r004", "timeout")]


OUTAGE = {"output.rows_per_shard": 4, "ray.batch_size": 1, "ray.max_retries": 0}   # no Ray task retries


def start_mid_job(target, fs, bucket: str) -> tuple[threading.Thread, int]:
    """Run ``target`` in a thread until the job has committed its first shard; (thread, shards committed)."""
    job = threading.Thread(target=target, daemon=True)
    job.start()
    deadline = time.time() + 120
    while time.time() < deadline and not fs.glob(f"{bucket}/out/stats/*.json"):
        fs.invalidate_cache()
        time.sleep(0.2)
    return job, len(fs.glob(f"{bucket}/out/stats/*.json"))


def test_a_60_s_s3_outage_mid_job_is_ridden_out_by_storage_retries(ray_session, s3_server, s3_bucket, tmp_path,
                                                                     write_jsonl):
    """With Ray's task retries off, only the storage layer's own retries (botocore's, then the
    output.storage_retry_s budget, 180 s by default) can carry the job through the outage."""
    path = write_jsonl(rows(48))
    cfg = job_config(tmp_path, path, **{"output.path": f"s3://{s3_bucket}/out", **OUTAGE})
    fs, result = s3_server.fs(), {}
    job, committed = start_mid_job(lambda: result.setdefault("summary", run_job(cfg)), fs, s3_bucket)
    s3_server.stop()                      # the store goes away mid-job ...
    time.sleep(60)
    in_flight = job.is_alive()            # it cannot finish (shards, stats, _SUCCESS) without the store
    s3_server.start()                     # ... and comes back
    job.join(timeout=300)
    assert committed < 12 and in_flight, "the outage did not hit the job mid-way"
    assert not job.is_alive() and result["summary"].images == 48
    run_job(job_config(tmp_path, path, **{"output.path": str(tmp_path / "ref"), "output.rows_per_shard": 4}))
    fs.invalidate_cache()
    assert shard_files(fs, f"{s3_bucket}/out") == local_files(tmp_path / "ref")      # nothing missing or doubled


def test_an_outage_longer_than_the_retry_budget_ends_in_a_typed_error_and_a_rerun_resumes(
        ray_session, s3_server, s3_bucket, tmp_path, write_jsonl, capfd):
    """The CLI (in this process, on the test's Ray, with jobs/configs/digits.yaml) exits 1 with one
    paragraph naming the URL, the operation and the attempts, within the budget; the rerun (default
    budget: not a new config) finishes the same bytes."""
    from jobs.generate import main

    path, url, budget = write_jsonl(rows(48)), f"s3://{s3_bucket}/out", 5
    argv = job_overrides(tmp_path, path, **{"output.path": url, **OUTAGE, "output.storage_retry_s": budget})
    fs, result = s3_server.fs(), {}
    job, committed = start_mid_job(lambda: result.setdefault("rc", main(argv)), fs, s3_bucket)
    s3_server.stop()
    stopped = time.monotonic()
    job.join(timeout=120)
    gave_up = time.monotonic() - stopped
    s3_server.start()
    assert committed < 12 and result.get("rc") == 1, result
    assert gave_up < budget + 30, gave_up              # the budget, one attempt's own botocore retries, teardown
    err = capfd.readouterr().err
    [message] = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert message.startswith(f"error: {url}/") and "failed after" in message and "attempt(s)" in message
    assert "EndpointConnectionError" in message and "rerun the same command" in message
    assert "Traceback" not in err and "SystemException" not in err
    assert main(job_overrides(tmp_path, path, **{"output.path": url, **OUTAGE})) == 0
    assert "were already committed and skipped" in capfd.readouterr().out          # it resumed
    ref = job_overrides(tmp_path, path, **{"output.path": str(tmp_path / "ref"), "output.rows_per_shard": 4})
    assert main(ref) == 0
    fs.invalidate_cache()
    assert shard_files(fs, f"{s3_bucket}/out") == local_files(tmp_path / "ref")


def test_unwritable_output_fails_fast_naming_the_url(tmp_path, write_jsonl):
    path = write_jsonl(rows(2))
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/out") as e:
        run_job(job_config(tmp_path, path, **{"output.path": "s3://no-such-bucket-here/out"}))
    assert CANARY_SECRET not in str(e.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        run_job(job_config(tmp_path, path, **{"output.path": str(tmp_path / "a_file" / "out")}))


def test_the_canary_secret_never_reaches_outputs_or_logs(ray_session, s3_server, s3_bucket, tmp_path, write_jsonl,
                                                         capfd):
    cfg = job_config(tmp_path, write_jsonl(rows(6, bad={2: {"seed": "x"}})),
                     **{"output.path": f"s3://{s3_bucket}/out", "errors.max_errors": 5})
    run_job(cfg)
    fs = s3_server.fs()
    objects = fs.find(f"{s3_bucket}/out")
    assert len(objects) >= 8
    for obj in objects:
        assert CANARY_SECRET.encode() not in fs.cat_file(obj), obj
    captured = capfd.readouterr()
    assert CANARY_SECRET not in captured.out + captured.err
    import ray
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for f in logs.rglob("*"):
        if f.is_file() and f.stat().st_size < 50 * 1024 ** 2:
            assert CANARY_SECRET.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("key", ["../../etc/passwd", "/abs/path", "a/b", "a\\b", "..", "a\x00b", "a.b", "", " x"])
def test_hostile_keys_are_refused_and_nothing_is_written_outside(tmp_path, write_jsonl, key):
    path = write_jsonl([{"prompt": "digit 1", "key": "fine"}, {"prompt": "digit 2", "key": key}])
    before = set((tmp_path.parent).iterdir())
    with pytest.raises(ManifestError, match="field 'key'"):
        run_job(job_config(tmp_path, path))
    assert set((tmp_path.parent).iterdir()) == before
    assert not list(tmp_path.glob("**/passwd")) and not Path("/abs/path").exists()


def test_many_small_reads_keep_order_across_chunks_and_a_missing_one_fails(s3_server, s3_bucket):
    from pipeline.storage import OutputDir

    out = OutputDir(f"s3://{s3_bucket}/many")
    for i in range(7):
        out.publish(f"stats/s{i}.json", json.dumps({"i": i}).encode())
    rels = [f"stats/s{i}.json" for i in (6, 0, 5, 1, 4, 2, 3)]
    assert [d["i"] for d in out.read_json_many(rels, chunk=3)] == [6, 0, 5, 1, 4, 2, 3]
    with pytest.raises(FileNotFoundError):
        out.read_json_many(rels + ["stats/missing.json"], chunk=3)


def test_an_oom_retry_runs_after_the_failed_call_has_released_its_memory(tmp_path, write_jsonl, monkeypatch):
    """What the failed call held (its frames, e.g. activations on the GPU) must be gone before
    the halved batches run, or `empty_cache` frees nothing and every half fails again."""
    import weakref

    from pipeline.worker import Generator

    class Activations:
        pass

    held, alive_at_retry = [], []

    def generate(rows):
        alive_at_retry.extend(ref() is not None for ref in held)
        activations = Activations()                       # referenced only by this frame
        held.append(weakref.ref(activations))
        raise RuntimeError("CUDA out of memory (test)")

    gen = Generator(job_config(tmp_path, write_jsonl(rows(4))))
    monkeypatch.setattr(gen.runner, "generate", generate)
    results = gen.runner.run([None] * 4)
    assert [r.stage for r in results] == ["generate"] * 4 and gen.runner.batch_size == 1
    assert len(held) == 7 and alive_at_retry and not any(alive_at_retry)


@pytest.mark.parametrize("error, retried", [
    (StorageUnavailable("s3://b/out/stats/shard-000001.json", "write failed after 9 attempt(s) over 181.0 s; "
                        "last error: EndpointConnectionError: Could not connect (SlowDown) (503)",
                        operation="write", attempts=9), False),     # the storage budget is spent: no second one
    (ConnectionResetError("reset"), False),                         # storage faults are retried where they happen
    (ErrorBudgetExceeded("out/_errors/", "503 rows failed, more than the error budget of 500"), False),
    (RuntimeError("shard-000503: got 999 rows, expected 1000"), False),
    (FileNotFoundError("no such bucket"), False),
    (RuntimeError("ray.exceptions.ObjectLostError: the object was lost with its node"), True),
    (RuntimeError("ray.exceptions.NodeDiedError: node 1f2e died"), True),
])
def test_ray_data_retries_lost_nodes_not_storage_errors(error, retried):
    from ray._common.retry import format_exception, matches_error

    from pipeline.job import TRANSIENT_ERRORS

    text = format_exception(error, include_cause=True)
    assert any(matches_error(p, text) for p in TRANSIENT_ERRORS) == retried


def first_shard(tmp_path, write_jsonl, manifest_rows, **overrides):
    """A Generator, the job's plan and its shard 0 resolved, for ``manifest_rows`` under ``overrides``."""
    from pipeline.manifest import plan
    from pipeline.request import resolver_for
    from pipeline.storage import OutputDir
    from pipeline.worker import Generator

    cfg = job_config(tmp_path, write_jsonl(manifest_rows), **overrides)
    check = resolver_for(cfg)
    p = plan(cfg, OutputDir(cfg.output.path), check)
    return Generator(cfg), p, p.read_shard(0, check)


def test_a_retried_shard_without_failures_drops_an_earlier_attempts_errors_file(tmp_path, write_jsonl):
    """Attempt 1 fails a row (a timeout, a real OOM) and dies before its commit marker; the retry
    generates every row: the key must not be both in the dataset and in the errors table."""
    from pipeline.sinks import ShardSink, SinkSettings

    def attempt(faults):
        gen, p, block = first_shard(tmp_path, write_jsonl, rows(8, faults=faults),
                                    **{"model.hook": "pipeline.faults:FaultDrill"})
        return ShardSink(gen.cfg.output.path, p, SinkSettings()).write_shard(0, gen.images(block))

    out = tmp_path / "out"
    assert attempt({3: "raise"}).errors == 1 and (out / "_errors" / "shard-000000.parquet").exists()
    (out / "stats" / "shard-000000.json").unlink()                   # died before committing
    assert attempt({}).errors == 0
    assert not (out / "_errors" / "shard-000000.parquet").exists()
    assert tar_keys(out) == [f"r{i:03d}" for i in range(8)]


def test_a_resumed_job_counts_the_failures_already_committed(ray_session, tmp_path, write_jsonl):
    path = write_jsonl(rows(16, faults={1: "raise", 2: "raise"}))
    cfg = {"model.hook": "pipeline.faults:FaultDrill", "errors.max_errors": 5}
    assert run_job(job_config(tmp_path, path, **cfg)).errors == 2
    out = tmp_path / "out"
    (out / "stats" / "shard-000001.json").unlink()                      # shard 1 left to do
    with pytest.raises(ErrorBudgetExceeded, match="2 rows have already failed, more than the error budget of 1"):
        run_job(job_config(tmp_path, path, **{**cfg, "errors.max_errors": 1}))
    assert not (out / "stats" / "shard-000001.json").exists()           # refused before generating


def test_the_next_micro_batch_is_prepared_and_the_last_finished_while_one_samples(tmp_path, write_jsonl):
    """The sampling thread only samples: micro-batch i+1's prepare and i-1's finish (each made 60 ms
    slow here) run on the other thread while micro-batch i samples (4 calls of 50 ms), so the next
    sampling starts right after the last, and the images are those of each row generated alone."""
    gen, _, block = first_shard(tmp_path, write_jsonl, rows(8), **{
        "ray.batch_size": 2, "sampler.nfe": 4, "model.hook": "pipeline.faults:LatencyProxy",
        "model.hook_options.latency_ms": 50, "errors.reject_blank": False})
    spans: dict[tuple[str, int], tuple[str, float, float]] = {}
    stages = []
    for name, fn in zip(("prepare", "sample", "finish"), gen.runner.stages):
        def timed(arg, fn=fn, name=name):
            t = time.monotonic()
            if name != "sample":
                time.sleep(0.06)
            out = fn(arg)
            key = arg[0].key if name == "prepare" else arg.first.key
            spans[name, int(key[1:]) // 2] = (threading.current_thread().name, t, time.monotonic())
            return out
        stages.append(timed)
    gen.runner.stages = tuple(stages)
    together = gen.images(block)
    assert sorted(spans) == sorted((n, i) for n in ("prepare", "sample", "finish") for i in range(4))
    sampling = {spans["sample", i][0] for i in range(4)}
    assert len(sampling) == 1 and not {spans[n, i][0] for n in ("prepare", "finish") for i in range(4)} & sampling
    gaps = [spans["sample", i + 1][1] - spans["sample", i][2] for i in range(3)]
    assert max(gaps) < 0.05, gaps          # one 60 ms stage between two samplings would show here
    gen.runner.stages = None                                           # one micro-batch after another
    alone = pa.concat_tables([gen.images(block.slice(i, 1)) for i in range(8)])
    assert together["image"].to_pylist() == alone["image"].to_pylist()


def test_a_micro_batch_whose_prepare_fails_runs_again_alone_and_only_its_bad_row_fails(
        tmp_path, write_jsonl, monkeypatch):
    gen, _, block = first_shard(tmp_path, write_jsonl, rows(6), **{"ray.batch_size": 2})
    prepare = gen.runner.stages[0]

    def failing(requests):
        if any(r.key == "r003" for r in requests):
            raise RuntimeError("the text encoder failed on r003")
        return prepare(requests)
    monkeypatch.setattr(gen.runner, "stages", (failing, *gen.runner.stages[1:]))
    monkeypatch.setattr(gen, "prepare", failing)          # the micro-batch's rerun goes through generate
    out = gen.images(block)
    errors = out["error"].to_pylist()
    assert [e is not None for e in errors] == [False, False, False, True, False, False]
    assert "r003" in errors[3]
    assert out["image"].to_pylist()[2] is not None
