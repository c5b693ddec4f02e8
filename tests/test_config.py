"""Config loading: YAML + dotlist over structured defaults; unknown keys and bad values are named."""
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, JobConfig, from_dict, load_config, to_dict
from conftest import REPO


def test_yaml_and_overrides_merge_over_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sampler:\n  method: euler\n  nfe: 7\nmanifest:\n  path: m.jsonl\n")
    cfg = load_config(p, ["sampler.nfe=12", "ray.batch_size=4"])
    assert isinstance(cfg, JobConfig)
    assert (cfg.sampler.method, cfg.sampler.nfe, cfg.ray.batch_size) == ("euler", 12, 4)
    assert cfg.output.image_format == "png"         # untouched default
    assert from_dict(to_dict(cfg)) == cfg            # what actors receive round-trips


@pytest.mark.parametrize("overrides, key", [
    (["sampler.nfee=3"], "nfee"),
    (["bogus=1"], "bogus"),
    (["sampler.nfe=ten"], "sampler.nfe"),
    (["sampler.method=magic"], "sampler.method"),
    (["sampler.schedule=magic"], "sampler.schedule"),
    (["sampler.schedule=trailing"], "sampler.schedule"),
    (["output.image_format=gif"], "output.image_format"),
    (["ray.batch_size=0"], "ray.batch_size"),
    (["ray.progress_interval_s=-1"], "ray.progress_interval_s"),
    (["errors.row_timeout_s=0"], "errors.row_timeout_s"),
    (["model.kind=nope"], "model.kind"),
    (["model.device=tpu"], "model.device"),
    (["manifest.path=null"], "manifest"),
    (["output.storage_retry_s=-1"], "output.storage_retry_s"),
])
def test_unknown_keys_and_bad_values_name_the_key(overrides, key):
    base = [] if overrides == ["manifest.path=null"] else ["manifest.path=m.jsonl"]
    with pytest.raises(ConfigError, match=key):
        load_config(None, base + overrides)


def test_a_yaml_key_read_as_a_boolean_suggests_quoting_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("manifest:\n  path: m.jsonl\nsearch:\n  reward: pipeline.faults:faulty_reward\n"
                 "  reward_options: {fault: raise, on: '3'}\n")
    with pytest.raises(ConfigError, match=r"Key True \(bool\) is incompatible.*quote the key \(e.g. 'on': ...\)"):
        load_config(p)
    p.write_text(p.read_text().replace("on: '3'", "'on': '3'"))
    assert load_config(p).search.reward_options == {"fault": "raise", "on": "3"}


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_rejects_bad_config_before_starting_ray(tmp_path):
    """Exit status 2 and a one-line message naming the key; no Ray, no output."""
    r = subprocess.run([sys.executable, "-m", "jobs.generate", "sampler.nfee=3", f"output.path={tmp_path}/o"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "nfee" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_rejects_options_the_method_does_not_take_before_starting_ray(tmp_path):
    """Job-level ``sampler.options`` are checked against the method's own signature on the driver."""
    r = subprocess.run([sys.executable, "-m", "jobs.generate", "sampler.method=dpmpp_2m", "sampler.options.eta=0.5",
                        f"output.path={tmp_path}/o"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "sampler.options" in r.stderr and "eta" in r.stderr and "Traceback" not in r.stderr
    assert "Started a local Ray instance" not in r.stderr and not (tmp_path / "o").exists()


def test_cuda_without_a_cuda_device_stops_before_ray_naming_the_key(tmp_path, monkeypatch):
    import torch
    import ray
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # as on every CPU machine
    monkeypatch.setattr(ray, "is_initialized", lambda: False)        # a driver that would start a local instance
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="model.device") as e:
        load_config(None, ["manifest.path=m.jsonl", "model.device=cuda:1"])
    assert e.value.key == "model.device" and "no CUDA device" in str(e.value)
    # joining a cluster, the GPUs are the workers': the driver does not judge them
    assert load_config(None, ["manifest.path=m.jsonl", "model.device=cuda", "ray.address=auto"]).model.device == "cuda"


def test_cli_rejects_a_bad_manifest_row_with_file_row_and_field(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"prompt": "digit 1"}\n{"prompt": "digit 2", "seed": "x"}\n')
    r = subprocess.run([sys.executable, "-m", "jobs.generate", f"manifest.path={m}", f"output.path={tmp_path}/o"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"{m}: row 1: field 'seed'" in r.stderr and "Traceback" not in r.stderr


def test_a_manifest_path_on_the_command_line_replaces_the_config_files_template(tmp_path):
    """sd15.yaml has a template; `manifest.path=...` on the command line must generate the user's rows
    (before, the template silently won and wrote the wrong prompts with exit status 0)."""
    cfg = load_config(REPO / "jobs/configs/models/sd15.yaml", ["manifest.path=prompts.jsonl", "model.kind=builtin",
                                                                "model.path=null", "model.dtype=float32"])
    assert cfg.manifest.path == "prompts.jsonl" and cfg.manifest.template is None and cfg.manifest.values == {}
    p = tmp_path / "c.yaml"                                            # and the other way round
    p.write_text("manifest:\n  path: m.jsonl\n")
    cfg = load_config(p, ["manifest.template=digit {d}", "manifest.values.d=[1,2]"])
    assert cfg.manifest.path is None and cfg.manifest.template == "digit {d}"
    with pytest.raises(ConfigError) as e:                              # both in one place: refused, naming both
        load_config(None, ["manifest.path=m.jsonl", "manifest.template=digit"])
    assert "manifest.path" in str(e.value) and "manifest.template" in str(e.value)


def test_the_documented_sd15_command_generates_the_users_rows(tmp_path, write_jsonl):
    """README's `python -m jobs.generate jobs/configs/models/sd15.yaml model.path=... manifest.path=prompts.jsonl`
    on a tiny SD pipeline: the one manifest row lands, keyed as the manifest says, not the template's 8."""
    from pipeline.models import tiny

    pipe = tmp_path / "sd"
    tiny.build("sd", pipe)
    manifest = write_jsonl([{"prompt": "a red fox", "seed": 3, "key": "fox"}])
    r = subprocess.run([sys.executable, "-m", "jobs.generate", "jobs/configs/models/sd15.yaml", f"model.path={pipe}",
                        f"manifest.path={manifest}", f"output.path={tmp_path}/o", "defaults.height=32",
                        "defaults.width=32", "model.dtype=float32", "sampler.nfe=2", "ray.num_cpus=2",
                        "ray.batch_size=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import pyarrow.parquet as pq
    assert pq.read_table(tmp_path / "o" / "parquet")["key"].to_pylist() == ["fox"]
