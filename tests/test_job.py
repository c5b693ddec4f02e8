"""End-to-end batch jobs on a real local Ray instance; outputs read back with webdataset and pyarrow."""
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import webdataset as wds
from PIL import Image

from pipeline.job import OutputConflict, run_job
from pipeline.models import digits_train
from conftest import REPO, job_config

pytestmark = pytest.mark.timeout(600)
MANIFEST = REPO / "jobs" / "manifests" / "digits.jsonl"


def manifest_keys():
    keys = []
    for line in MANIFEST.read_text().splitlines():
        r = json.loads(line)
        n = r.get("num_images", 1)
        keys += [r["key"]] if n == 1 else [f"{r['key']}_{j}" for j in range(n)]
    return keys


def read_webdataset(out: Path):
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False))


def shard_bytes(out: Path):
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for d in ("shards", "parquet", "stats") for p in sorted((out / d).glob("*"))}


def test_default_manifest_end_to_end(ray_session, tmp_path):
    cfg = job_config(tmp_path, str(MANIFEST), **{"output.rows_per_shard": 50, "defaults.height": 32,
                                                "defaults.width": 32, "ray.batch_size": 32})
    summary = run_job(cfg)
    out = tmp_path / "out"
    keys = manifest_keys()
    assert summary.images == len(keys) == 124 and summary.shards == 3
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]

    samples = read_webdataset(out)
    assert [s["__key__"] for s in samples] == keys             # every key once, in manifest order
    first = samples[0]
    meta = json.loads(first["json"])
    assert first["txt"].decode() == meta["prompt"] == "digit 0"
    assert meta["seed"] == 1000 and meta["sampler"] == "dpmpp_2m" and meta["nfe"] == 10
    assert meta["label"] == 0 and meta["source"] == "default-manifest"     # extra columns carried
    assert meta["model_id"].startswith("builtin-digits-")
    assert Image.open(io.BytesIO(first["png"])).size == (32, 32)
    euler = [json.loads(s["json"]) for s in samples if json.loads(s["json"])["sampler"] == "euler"]
    assert euler and all(m["nfe"] == 12 for m in euler)

    table = pads.dataset(str(out / "parquet"), format="parquet").to_table().sort_by("row")
    assert table["key"].to_pylist() == keys
    assert table["image"].to_pylist() == [s["png"] for s in samples]   # same bytes in both formats
    assert {"seed", "prompt", "guidance_scale", "nfe", "sampler", "model_id", "extra"} <= set(table.column_names)

    success = json.loads((out / "_SUCCESS").read_text())
    assert success["images"] == 124 and [s["rows"] for s in success["shards"]] == [50, 50, 24]
    assert success["config"]["sampler"]["method"] == "auto" and success["plan_hash"] is None
    assert (out / "config.yaml").exists() and (out / "contact_sheet.png").exists()
    assert not (out / "_tmp").exists()                        # no empty staging folder left behind
    assert Image.open(out / "contact_sheet.png").size[0] > 0

    # the images are the digits the manifest asked for
    images = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in samples])
    labels = np.array([json.loads(s["json"])["label"] for s in samples])
    accuracy = (digits_train.reference_classifier().predict(digits_train.to_digits_features(images)) == labels).mean()
    assert accuracy >= 0.9


def test_images_do_not_depend_on_batch_size(ray_session, tmp_path, write_jsonl):
    """Byte-identical shards (tar, parquet, stats) at batch sizes 1, 3 and 8, stochastic sampler included."""
    rows = [{"prompt": f"digit {i % 10}", "sampler": ["dpmpp_2m", "euler_ancestral", "ddim"][i % 3],
             "nfe": 4 + i % 3, "guidance_scale": 1.0 + i % 4} for i in range(14)]
    path = write_jsonl(rows)
    outputs = []
    for bs in (1, 3, 8):
        run_job(job_config(tmp_path, path, **{"ray.batch_size": bs, "output.path": str(tmp_path / f"bs{bs}")}))
        outputs.append(shard_bytes(tmp_path / f"bs{bs}"))
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1] == outputs[2]


def test_rerun_resumes_and_other_configs_are_refused(ray_session, tmp_path, write_jsonl):
    path = write_jsonl([{"prompt": str(i % 10)} for i in range(20)])
    cfg = job_config(tmp_path, path)
    first = run_job(cfg)
    out = tmp_path / "out"
    before = shard_bytes(out)
    assert first.generated_shards == 3

    # an interrupted run: one shard never committed
    for rel in ("shards/shard-000001.tar", "parquet/shard-000001.parquet", "stats/shard-000001.json"):
        (out / rel).unlink()
    again = run_job(cfg)
    assert again.generated_shards == 1 and again.images == 20
    assert shard_bytes(out) == before

    with pytest.raises(OutputConflict, match="different config"):
        run_job(job_config(tmp_path, path, **{"sampler.nfe": 5}))
    over = run_job(job_config(tmp_path, path, **{"sampler.nfe": 5, "output.overwrite": True}))
    assert over.generated_shards == 3 and shard_bytes(out) != before


def test_template_job_with_webp_and_parquet_only(ray_session, tmp_path):
    cfg = job_config(tmp_path, None, **{"manifest.template": "'digit {d}'", "manifest.values": "{d: [1, 4, 7]}",
                                        "manifest.count": 4, "output.image_format": "webp",
                                        "output.webdataset": False})
    summary = run_job(cfg)
    out = tmp_path / "out"
    assert summary.images == 12 and not (out / "shards").exists()
    table = pads.dataset(str(out / "parquet"), format="parquet").to_table().sort_by("row")
    assert table["prompt"].to_pylist()[:3] == ["digit 1", "digit 4", "digit 7"]
    img = Image.open(io.BytesIO(table["image"][0].as_py()))
    assert img.format == "WEBP" and img.size == (16, 16)


def test_the_whole_actor_pool_starts_on_a_small_cluster(ray_session, tmp_path, write_jsonl):
    """Two 0.75-CPU actors on the 2-CPU session: Ray Data's own upscaling would stop at one."""
    from ray._private.state import actors

    def generators():
        return {a for a, info in actors().items() if "MapBatches(Generator)" in info["ActorClassName"]}

    before = generators()
    rows = [{"prompt": f"digit {i % 10}", "key": f"k{i:02d}"} for i in range(32)]
    summary = run_job(job_config(tmp_path, write_jsonl(rows), **{"ray.actors": 2, "ray.num_cpus_per_actor": 0.75}))
    assert summary.images == 32 and len(generators() - before) == 2


def test_progress_is_logged_while_the_job_runs_and_at_its_end(ray_session, tmp_path, write_jsonl, caplog):
    rows = [{"prompt": f"digit {i % 10}", "key": f"k{i:02d}"} for i in range(40)]
    with caplog.at_level(logging.INFO, logger="pipeline.job"):
        run_job(job_config(tmp_path, write_jsonl(rows), **{"ray.progress_interval_s": 0.2}))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) >= 2, lines
    assert re.match(r"progress: 5/5 shards committed, 40 images, 0 failed rows, 400 model calls \(nfe x particles\), "
                    r"[\d.]+ images/s, model busy \d+% of actor time, ETA 0:00:00$",
                    lines[-1]), lines[-1]
    done = [int(re.match(r"progress: (\d+)/5", ln).group(1)) for ln in lines]
    assert done == sorted(done)


def test_resume_ignores_settings_that_change_no_byte_but_refuses_an_edited_manifest(ray_session, tmp_path,
                                                                                   write_jsonl):
    path = write_jsonl([{"prompt": str(i % 10)} for i in range(20)])
    out = tmp_path / "out"
    run_job(job_config(tmp_path, path))
    before = shard_bytes(out)
    (out / "stats" / "shard-000001.json").unlink()                      # an interrupted run
    again = run_job(job_config(tmp_path, path, **{"output.path": f"{out}/", "name": "renamed",
                                                  "errors.max_errors": 3, "ray.batch_size": 3}))
    assert again.generated_shards == 1 and shard_bytes(out) == before

    (out / "stats" / "shard-000001.json").unlink()
    write_jsonl([{"prompt": str(i % 7)} for i in range(20)])            # the same file, edited in place
    with pytest.raises(OutputConflict, match=r"changed: manifest_content\)"):
        run_job(job_config(tmp_path, path))


def test_an_output_without_committed_shards_takes_a_corrected_config(ray_session, tmp_path, write_jsonl):
    from pipeline.manifest import ManifestError

    with pytest.raises(ManifestError, match="not found"):
        run_job(job_config(tmp_path, str(tmp_path / "typo.jsonl")))     # fails after config.json is written
    assert (tmp_path / "out" / "config.json").exists()
    summary = run_job(job_config(tmp_path, write_jsonl([{"prompt": "3"}] * 4)))
    assert summary.images == 4


def test_the_duty_cycle_of_a_fixed_latency_model_is_recorded(ray_session, tmp_path, write_jsonl):
    """A stand-in model whose every call takes 30 ms (the GIL released, as a GPU kernel's wait): the
    time inside model calls is at least the calls' latency, at most the actors' time, and the progress
    line, the summary and _SUCCESS report it; the stats files (byte-identical on reruns) do not."""
    rows = [{"prompt": f"digit {i % 10}", "key": f"k{i:02d}"} for i in range(24)]
    summary = run_job(job_config(tmp_path, write_jsonl(rows), **{
        "model.hook": "pipeline.faults:LatencyProxy", "model.hook_options.latency_ms": 30, "sampler.nfe": 4,
        "sampler.method": "euler", "errors.reject_blank": "false", "output.rows_per_shard": 12, "ray.batch_size": 6}))
    t = json.loads((tmp_path / "out" / "_SUCCESS").read_text())["timing"]
    calls = 24 // 6 * 4                                          # micro-batches x nfe
    assert t["model_busy_s"] >= 0.95 * calls * 0.03 and t["model_busy_s"] <= t["actor_wall_s"]
    assert 0 < t["duty_cycle"] <= 1.0 and summary.duty_cycle == t["duty_cycle"]
    assert [s["shard"] for s in t["shards"]] == [0, 1] and "model busy" in str(summary)
    stats = json.loads((tmp_path / "out" / "stats" / "shard-000000.json").read_text())
    assert not {"model_busy_s", "actor_wall_s"} & set(stats)
    import pyarrow.parquet as pq
    assert "model_busy_s" not in pq.read_table(tmp_path / "out" / "parquet").column_names
