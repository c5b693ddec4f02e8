"""``jobs.calibrate`` end to end on the built-in model, then the plan in ``jobs.generate`` and in Serve;
every image's metadata says what ran and reproduces it; bad input stops before any work (exit 2)."""
import base64
import json
import socket
from pathlib import Path

import httpx
import pytest
import webdataset as wds

from conftest import chosen_by_rule, job_config
from pipeline.errors import RequestError
from pipeline.job import run_job
from pipeline.samplers import PlanFamily, SolverPlan
from pipeline.samplers.calibrate import CalibrationFigures

pytestmark = pytest.mark.timeout(600)
TINY = ["manifest.template='digit {d}'", "manifest.count=4", "manifest.seed=5000", "sampler.nfe=6",
        "defaults.guidance_scale=2.0", "defaults.height=16", "defaults.width=16", "calibrate.teacher_nfe=40",
        "calibrate.candidates=16", "calibrate.dp_samples=12", "calibrate.iterations=6", "calibrate.batch_size=8",
        "ray.batch_size=16", "ray.actors=1", "ray.num_cpus_per_actor=1", "model.threads=1",
        "calibrate.guidance_scales=null", "calibrate.guidance_rule=exact", "calibrate.time_budget_s=null"]   # not calibrate_digits.yaml's


def calibrate_cli(*args: str) -> int:
    from jobs.calibrate import main
    return main(list(args))


def sidecars(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return [json.loads(s["json"]) for s in wds.WebDataset(shards, shardshuffle=False)]


def images(out: Path) -> dict[str, bytes]:
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return {s["__key__"]: s["png"] for s in wds.WebDataset(shards, shardshuffle=False)}


@pytest.fixture(scope="module")
def plan_file(ray_session, tmp_path_factory):
    """A family of two entries (guidance 1 and 3, nfe 6, 16x16) from ``jobs.calibrate``."""
    tmp = tmp_path_factory.mktemp("calibrate")
    url = str(tmp / "plans" / "digits-nfe6.json")
    assert calibrate_cli(*TINY, "calibrate.guidance_scales=[1.0,3.0]", f"calibrate.out={url}",
                         f"output.path={tmp}/out") == 0
    return url


def test_calibrate_writes_a_family_for_this_model_and_requests(plan_file):
    family = PlanFamily.from_json(plan_file)
    assert [e.guidance_scale for e in family.entries] == [1.0, 3.0] and family.guidance_rule == "exact"
    for plan in family.entries:
        assert plan.model.id.startswith("builtin-digits-") and plan.model.schedule == "ve"
        assert (plan.nfe, plan.resolution, plan.latent_shape) == (6, (16, 16), (1, 16, 16))
        f = CalibrationFigures.from_dict(plan.calibration)
        assert f.samples == {"calibration": 24, "validation": 8, "held_out": 8}
        assert f.model_evaluations["teacher"] == 40 * 40 and f.model_evaluations["dp"] > 0
        assert f.error["plan"]["held_out"] <= f.error["baseline"]["held_out"]
        assert set(f.error["candidates"]) == {f"{b}/{k}" for b in ("dpmpp_2m", "dpmpp_3m", "unipc") for k in ("dp", "grad")}
        assert f.projection["model_evaluations"]["teacher"] == 40 * 40 and f.projection["seconds"] > 0
        if f.accepted:                  # the plan is the candidate the rule (choose) takes on the validation rows
            assert chosen_by_rule(f) and plan.base in f.chosen


@pytest.mark.parametrize("nest", ["always", "rise", "never"])
def test_a_family_of_nfes_nests_each_entry_in_the_one_below(ray_session, tmp_path, nest):
    """``calibrate.nfes``: entries are calibrated lowest nfe first (the family keeps the listed order), and
    an entry's candidates include the plan of the next lower nfe with steps inserted, and that start
    refined: never (``calibrate.nest=never``), always (``always``), or where no other candidate beats the
    lower plan on the validation rows (``rise``, the default, so not given: the nfe-6 entry's ``nest``
    stage counts that check, 4 calls a row, and the insertion where it fires)."""
    url = str(tmp_path / "plan.json")
    option = [f"calibrate.nest={nest}"] if nest != "rise" else []
    assert calibrate_cli(*TINY, "calibrate.nfes=[6,4]", *option, f"calibrate.out={url}",
                         f"output.path={tmp_path}/out") == 0
    family = PlanFamily.from_json(url)
    assert [e.nfe for e in family.entries] == [6, 4]
    six, four = (CalibrationFigures.from_dict(e.calibration) for e in family.entries)
    base, means = family.entries[1].base, six.error["candidate_means"]
    assert not any("nested" in name for name in four.error["candidate_means"])
    assert "nest" not in four.model_evaluations
    nested = {f"{base}/nested 4", f"{base}/nested 4+grad"} <= set(means)
    if nest == "never":
        assert not any("nested" in name for name in means) and "nest" not in six.model_evaluations
        return
    assert nested or (nest == "rise" and not any("nested" in name for name in means))
    check = 4 * six.samples["validation"] if nest == "rise" else 0
    assert six.model_evaluations["nest"] > check if nested else six.model_evaluations["nest"] == check


def test_the_summary_table_and_the_projection_are_printed(ray_session, tmp_path, capsys, caplog):
    url = str(tmp_path / "p.json")
    assert calibrate_cli(*TINY, "calibrate.calibrators=[dp]", f"calibrate.out={url}",
                         f"output.path={tmp_path}/out") == 0
    printed = capsys.readouterr()
    assert "validation rows (0.2 of" in caplog.text and "rare mode flips" in caplog.text   # too few rows: said
    assert f"written to {url}" in printed.out and "| entry | plan | accepted |" in printed.out
    assert "model evaluations" in printed.out
    assert PlanFamily.from_json(url).entries[0].calibration["iterations"] == {}


def test_generate_and_serve_use_the_family_and_record_the_entry(plan_file, ray_session, tmp_path, write_jsonl):
    family = PlanFamily.from_json(plan_file)
    g1, g3 = family.entries
    rows = [{"prompt": f"digit {i}", "seed": 77 + i, "key": f"p{i}", "guidance_scale": 1.0 + 2 * (i % 2)}
            for i in range(4)] + \
           [{"prompt": "digit 8", "seed": 9, "key": "other_nfe", "nfe": 8, "guidance_scale": 1.0},   # no entry: auto
            {"prompt": "digit 8", "seed": 9, "key": "other_g", "guidance_scale": 2.0}]
    cfg = job_config(tmp_path, write_jsonl(rows), **{"sampler.plan": plan_file, "sampler.nfe": 6})
    run_job(cfg)
    out = tmp_path / "out"
    meta = {m["key"]: m for m in sidecars(out)}
    assert [meta[f"p{i}"]["plan"] for i in range(4)] == [g1.hash, g3.hash, g1.hash, g3.hash]
    assert all(meta[f"p{i}"]["sampler"] == "plan" for i in range(4))
    assert meta["other_nfe"]["sampler"] == "dpmpp_2m" and meta["other_nfe"]["schedule"] == "karras"
    assert meta["other_g"]["plan"] is None                     # between the entries, exact rule: auto
    assert json.loads((out / "_SUCCESS").read_text())["plan_hash"] == family.hash
    assert json.loads((out / "config.json").read_text())["fingerprint"]["plan_hash"] == family.hash

    # Serve takes the same family and gives the same bytes for the same request
    from ray import serve

    from pipeline.serve import app_from_config, load_serve_config
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scfg = load_serve_config(None, [f"sampler.plan={plan_file}", "sampler.nfe=6", "defaults.height=16",
                                    "defaults.width=16", "ray.num_cpus_per_actor=0.25", "model.threads=1"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_from_config(scfg), name="planned", route_prefix="/planned")
        listed = httpx.get(f"http://127.0.0.1:{port}/planned/v1/models", timeout=60).json()["models"][0]["plan"]
        assert listed["hash"] == family.hash and [e["hash"] for e in listed["entries"]] == [g1.hash, g3.hash]
        r = httpx.post(f"http://127.0.0.1:{port}/planned/generate",
                       json={"prompt": "digit 2", "seed": 79, "guidance_scale": 1.0}, timeout=60)
        assert r.status_code == 200, r.text
        entry = r.json()["images"][0]
        assert entry["metadata"]["sampler"] == "plan" and entry["metadata"]["plan"] == g1.hash
        assert base64.b64decode(entry["image_base64"]) == images(out)["p2"]
        bad = httpx.post(f"http://127.0.0.1:{port}/planned/generate",
                         json={"prompt": "digit 2", "sampler": "plan", "nfe": 8}, timeout=60)
        assert bad.status_code == 422 and bad.json()["field"] == "sampler" and "nfe=8" in bad.json()["detail"]
    finally:
        serve.shutdown()


def test_a_row_between_entries_takes_the_nearest_under_the_nearest_rule(plan_file):
    from pipeline.config import load_config
    from pipeline.request import resolver_for

    g1, g3 = PlanFamily.from_json(plan_file).entries
    nearest = str(Path(plan_file).with_name("nearest.json"))
    PlanFamily.of([g1, g3], guidance_rule="nearest").to_json(nearest)
    resolve = resolver_for(load_config(None, ["manifest.template=x", "sampler.nfe=6", f"sampler.plan={nearest}",
                                              "defaults.height=16", "defaults.width=16"]))
    pick = {g: resolve({"prompt": "digit 1", "guidance_scale": g})[0].sampler.plan for g in (1.0, 1.9, 2.0, 2.1, 3.0, 4.0)}
    assert pick == {1.0: g1.hash, 1.9: g1.hash, 2.0: g1.hash, 2.1: g3.hash, 3.0: g3.hash, 4.0: None}
    # the built-in model's latent does not follow the image size: its plans serve every size
    assert resolve({"prompt": "1", "guidance_scale": 1.0, "height": 32, "width": 32})[0].sampler.plan == g1.hash
    with pytest.raises(RequestError, match="does not serve this request"):     # an entry for another scale
        resolve({"prompt": "1", "guidance_scale": 1.0, "plan": g3.hash})


def test_an_image_is_reproduced_from_its_own_metadata(plan_file, ray_session, tmp_path, write_jsonl):
    """Each sidecar fed back as a manifest row gives the same image, byte for byte."""
    rows = [{"prompt": "digit 1", "seed": 1, "key": "auto"},
            {"prompt": "digit 2", "seed": 2, "key": "ddim", "sampler": "ddim", "sampler_options": {"eta": 0.7}},
            {"prompt": "digit 3", "seed": 3, "key": "grid", "sampler": "unipc", "schedule": "exponential", "nfe": 7},
            {"prompt": "digit 4", "seed": 4, "key": "restart", "sampler": "restart", "nfe": 9,
             "sampler_options": {"inner": "euler", "K": 2}},
            {"prompt": "digit 5", "seed": 5, "key": "final", "sampler": "euler", "final": "sigma_min"},
            {"prompt": "digit 6", "seed": 6, "key": "ancestral", "sampler": "euler_ancestral", "guidance_scale": 3.5},
            {"prompt": "digit 7", "seed": 7, "key": "multi", "num_images": 2, "negative_prompt": "digit 1"},
            {"prompt": "digit 8", "seed": 8, "key": "fk", "search": {"method": "fk", "particles": 3, "reward": "digits"}},
            {"prompt": "digit 9", "seed": 9, "key": "svdd", "search": {"method": "svdd", "particles": 2, "reward": "digits",
                                                                        "options": {"lambda": 20}}},
            {"prompt": "digit 0", "seed": 0, "key": "best", "search": {"method": "best_of_n", "reward": "digits"}}]
    rows += [{"prompt": "digit 3", "seed": 33, "key": "g3", "guidance_scale": 3.0}]      # the other entry
    first = job_config(tmp_path, write_jsonl(rows), **{"sampler.plan": plan_file, "sampler.nfe": 6,
                                                      "defaults.guidance_scale": 1.0, "output.path": str(tmp_path / "a")})
    run_job(first)
    metas = sidecars(tmp_path / "a")
    assert {m["sampler"] for m in metas} >= {"plan", "ddim", "unipc", "restart", "euler", "euler_ancestral"}
    assert {m["search"]["method"] for m in metas if m["search"]} == {"fk", "svdd", "best_of_n"}
    fed_back = write_jsonl(metas, name="from_metadata.jsonl")
    assert len({m["plan"] for m in metas if m["plan"]}) == 2
    run_job(job_config(tmp_path, fed_back, **{"sampler.plan": plan_file, "sampler.nfe": 6,
                                              "defaults.guidance_scale": 1.0, "output.path": str(tmp_path / "b")}))
    assert images(tmp_path / "b") == images(tmp_path / "a")


@pytest.mark.parametrize("args, exit_code, words", [
    (["sampler.nfe=1"], 2, ["sampler.nfe", "nfe >= 2"]),
    (["calibrate.holdout=1.5"], 2, ["calibrate.holdout"]),
    (["calibrate.calibrators=[magic]"], 2, ["calibrate.calibrators"]),
    (["calibrate.guidance_scales=[]"], 2, ["calibrate.guidance_scales", "empty list"]),
    (["calibrate.bases=[dpmpp_4m]"], 2, ["calibrate.bases"]),
    (["calibrate.nest=sometimes"], 2, ["calibrate.nest", "expected never, rise or always"]),
    (["calibrate.time_budget_s=0.001"], 2, ["calibrate.time_budget_s", "the final checks and nesting alone"]),
    (["calibrate.time_budget_s=0.001", "calibrate.nfes=[6,4]"], 2,
     ["calibrate.time_budget_s", "nesting alone", "(nfe 4, guidance 2, 16x16: ", "; nfe 6, guidance 2, 16x16: ",
      "the budget of 0.001 s leaves after the probes"]),
    (["calibrate.nfes=[6,8,6]"], 2, ["calibrate.nfes", "6 more than once"]),
    (["calibrate.guidance_scales=[1,1.0]"], 2, ["calibrate.guidance_scales", "1.0 more than once"]),
    (["calibrate.candidates=4"], 2, ["calibrate.candidates", "6 steps", "raise calibrate.candidates to 6"]),
    (["manifest.values={d: [1, 2]}", "manifest.count=2"], 2, ["need at least 8"]),
])
def test_calibrate_bad_input_exits_2_naming_the_key(ray_session, tmp_path, capsys, args, exit_code, words):
    assert calibrate_cli(*TINY, *args, f"calibrate.out={tmp_path}/p.json", f"output.path={tmp_path}/o") == exit_code
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "p.json").exists()


def test_an_existing_plan_is_not_replaced_without_overwrite(ray_session, tmp_path, capsys):
    url = tmp_path / "p.json"
    url.write_text("precious")
    assert calibrate_cli(*TINY, f"calibrate.out={url}", f"output.path={tmp_path}/o") == 2
    assert "already exists" in capsys.readouterr().err and url.read_text() == "precious"


def test_generate_refuses_missing_or_foreign_plans(plan_file, tmp_path, capsys, write_jsonl):
    from jobs.generate import main

    manifest = write_jsonl([{"prompt": "1"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    base = [f"manifest.path={manifest}", f"output.path={out}", "sampler.nfe=6"]
    assert main(base + [f"sampler.plan={tmp_path}/missing.json"]) == 2
    assert "sampler.plan" in (err := capsys.readouterr().err) and "missing.json: solver plan not found" in err

    doc = json.loads(Path(plan_file).read_text())["entries"][0]
    foreign = SolverPlan.model_validate({**doc, "model": {**doc["model"], "id": "builtin-digits-000000000000"},
                                         "hash": ""}).sealed()
    foreign.to_json(str(tmp_path / "foreign.json"))
    assert main(base + [f"sampler.plan={tmp_path}/foreign.json"]) == 2
    assert "builtin-digits-000000000000" in (err := capsys.readouterr().err) and "this job runs" in err
    assert main(base[:2] + ["sampler.nfe=8", "sampler.method=plan", f"sampler.plan={plan_file}"]) == 2
    assert "nfe=6" in (err := capsys.readouterr().err) and "sampler.nfe=8" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_with_auto_a_plan_for_another_nfe_is_left_to_the_rows_that_fit_it(plan_file, caplog):
    from pipeline.config import load_config
    from pipeline.request import resolver_for

    with caplog.at_level("WARNING", logger="pipeline.config"):
        cfg = load_config(None, ["manifest.template=x", "sampler.nfe=8", f"sampler.plan={plan_file}",
                                 "defaults.height=16", "defaults.width=16", "defaults.guidance_scale=1.0"])
    assert "calibrated for nfe=6, but sampler.nfe=8" in caplog.text and "auto's rule" in caplog.text
    resolve = resolver_for(cfg)
    assert resolve({"prompt": "digit 1"})[0].sampler.method == "dpmpp_2m"            # nfe 8: auto's rule
    assert resolve({"prompt": "digit 1", "nfe": 6})[0].sampler.plan == PlanFamily.from_json(plan_file).entries[0].hash


def test_the_workers_calibrate_the_full_network_and_sum_on_the_cpu_beside_nccl(tmp_path):
    """The Ray Train workers get no feature cache (DeepCache would reuse deep features across the teacher's,
    the DP's and the gradients' unrelated calls), no plan and no search; GPU workers get gloo for the
    calibrator's CPU sums beside NCCL (NCCL alone cannot reduce a CPU tensor)."""
    from dataclasses import replace

    from pipeline.calibration import train_backend, worker_config
    from pipeline.config import load_config

    cfg = load_config(None, ["manifest.template=x", "model.cache=deepcache"])
    cfg = replace(cfg, sampler=replace(cfg.sampler, plan=f"{tmp_path}/p.json"),
                  search=replace(cfg.search, method="best_of_n"))
    w = worker_config(cfg)
    assert cfg.model.cache == "deepcache" and w.model.cache is None
    assert w.sampler.plan is None and w.search.method == "none"
    assert train_backend(False) == "gloo"
    assert dict(part.split(":") for part in train_backend(True).split(",")) == {"cpu": "gloo", "cuda": "nccl"}


def test_two_workers_calibrate_the_same_plan_as_one(ray_session, tmp_path):
    """Data-parallel calibration on Ray Train: 2 workers (each a share of the rows, gradients and sums
    all-reduced; under a time budget too loose to cut anything, whose decisions every worker takes alike)
    give the plan 1 worker gives, to float tolerance (the built-in model runs in float32,
    whose convolutions differ in the last bits with the batch; on a float64 problem the plans agree to
    1e-14, tests/test_solver_plans.py)."""
    import numpy as np

    plans = {}
    for w in (1, 2):
        url = str(tmp_path / f"w{w}.json")
        assert calibrate_cli(*TINY, f"calibrate.workers={w}", "ray.num_cpus_per_actor=0.5", "calibrate.bases=[unipc]",
                             "calibrate.time_budget_s=3600", f"calibrate.out={url}", f"output.path={tmp_path}/o{w}") == 0
        plans[w] = PlanFamily.from_json(url).entries[0]
    assert plans[1].base == plans[2].base and plans[2].calibration["workers"] == 2
    for field in ("sigmas", "shifts", "gains"):
        a, b = np.array(getattr(plans[1], field), float), np.array(getattr(plans[2], field), float)
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-7), field
    e1, e2 = (CalibrationFigures.from_dict(p.calibration).error["plan"] for p in (plans[1], plans[2]))
    assert e1 == pytest.approx(e2, rel=1e-4)


def test_budget_share_gives_each_entry_its_fixed_seconds_and_the_same_fraction_of_its_refinement():
    from pipeline.calibration import budget_share
    from pipeline.samplers.calibrate import Cost

    a, b = Cost(teacher_dp=10, other=2, refine=30), Cost(teacher_dp=20, other=4, refine=90)
    assert (a.fixed, b.fixed) == (12, 24)
    assert budget_share(96, [a, b]) == pytest.approx(12 + 15)         # 60 s over 120 s of refinement: half each
    assert budget_share(96 - 27, [b]) == pytest.approx(24 + 45)       # the next one, the first on time
    assert budget_share(500, [a, b]) == pytest.approx(12 + 464 * 30 / 120)   # more than enough: shared alike
    assert budget_share(30, [a, b]) == 12          # an earlier overrun: fixed seconds only, the first entry first
    assert budget_share(5, [a, b]) == 5            # less than its fixed seconds: its calibration refuses it
    assert budget_share(-3, [a]) == 0
    none = Cost(teacher_dp=10, other=0, refine=0)
    assert budget_share(50, [none, none]) == 10 + 15                  # no refinement: equal parts


def test_a_budget_overrun_keeps_the_entries_done_and_leaves_out_the_ones_it_no_longer_covers():
    """An entry that runs far past its share (here the clock jumps by the whole budget while the nfe-4
    entry runs, as a stalled GPU would make it) leaves too little for the next ones' teacher, DP and final
    checks: they are left out before their work (the nfe-8 entry costed again, nesting nfe 4 in place of
    the nfe 6 left out), and the entry done is kept."""
    import time

    from jobs.calibrate import DEFAULT_CONFIG
    from pipeline.calibration import calibrate_family, entries, worker_config
    from pipeline.config import load_config
    from pipeline.samplers.calibrators import Group
    from pipeline.worker import Generator

    cfg = load_config(str(DEFAULT_CONFIG), [*TINY, "calibrate.nfes=[6,4,8]", "calibrate.time_budget_s=600", "calibrate.bases=[unipc]"])
    reads = []

    def clock() -> float:       # the job's start, after the probes, the nfe-4 entry's share, the nfe-6 entry's
        reads.append(time.time())
        return reads[-1] + (600 if len(reads) > 3 else 0)
    plans, refused = calibrate_family(Generator(worker_config(cfg)), entries(cfg), Group(), clock)
    assert len(reads) == 5 and list(plans) == [1] and plans[1].nfe == 4
    assert CalibrationFigures.from_dict(plans[1].calibration).accepted
    assert [(r["entry"], r["nfe"], r["size"]) for r in refused] == [("nfe 6, guidance 2, 16x16", 6, [16, 16]),
                                                                    ("nfe 8, guidance 2, 16x16", 8, [16, 16])]
    assert "[nfe 6, guidance 2, 16x16] the teacher, the DP, the final checks and nesting alone" in refused[0]["reason"]


def test_the_job_writes_the_entries_done_and_exits_1_naming_those_left_out(plan_file, ray_session, tmp_path,
                                                                           monkeypatch, capsys, caplog):
    """The driver's side of a budget that ran out (the workers' side is the test above): the entries done
    are written, the summary marks the others, and the exit status is 1 with one paragraph naming them."""
    import pipeline.calibration as job

    family = PlanFamily.from_json(plan_file)                 # nfe 6, guidance 1 and 3: the entries done
    left_out = [{"entry": f"nfe 8, guidance {g}, 16x16", "nfe": 8, "guidance_scale": float(g), "size": [16, 16],
                 "reason": f"[nfe 8, guidance {g}, 16x16] the teacher, the DP, ... alone take ..."} for g in (1, 3)]
    monkeypatch.setattr(job, "_train", lambda cfg, work, *args: (
        family, left_out if [(e.nfe, e.guidance_scale) for e in work] == [(6, 1), (6, 3), (8, 1), (8, 3)] else []))
    url = tmp_path / "p.json"
    assert calibrate_cli(*TINY, "calibrate.nfes=[6,8]", "calibrate.guidance_scales=[1,3]", "calibrate.time_budget_s=100",
                         f"calibrate.out={url}", f"output.path={tmp_path}/o") == 1
    err = capsys.readouterr().err
    assert "error: calibrate.time_budget_s: the budget of 100 s ran out before 2 of 4 entries (nfe 8, guidance 1, " \
           "16x16; nfe 8, guidance 3, 16x16)" in err and f"the other 2 are written to {url}" in err
    assert "run auto's rule" in err and "rerun with --overwrite" in err          # the family's rule is exact
    assert PlanFamily.from_json(str(url)).hash == family.hash
    assert "| nfe 8, guidance 3, 16x16 | NOT CALIBRATED (time budget) |" in caplog.text


def test_the_shipped_family_is_the_default_jobs_and_beats_its_baseline_on_unseen_seeds():
    """``jobs/configs/digits.yaml`` runs the shipped plan family (guidance 1 to 4, nearest rule) for
    the rows it fits (others fall back to DPM++(2M)/karras), and on seeds it was not calibrated on each
    accepted entry is more accurate than that baseline."""
    import torch

    from conftest import REPO
    from pipeline.analytic import per_sample_rms
    from pipeline.config import load_config
    from pipeline.request import resolver_for
    from pipeline.samplers import sample
    from pipeline.samplers.calibrate import run_teacher
    from pipeline.worker import Generator

    cfg = load_config(str(REPO / "jobs" / "configs" / "digits.yaml"), ["model.threads=2", "ray.batch_size=40"])
    gen, resolve = Generator(cfg), resolver_for(cfg)
    family = gen.plans
    assert [e.guidance_scale for e in family.entries] == [1.0, 2.0, 3.0, 4.0] and family.guidance_rule == "nearest"
    assert all(e.nfe == cfg.sampler.nfe and e.model.id == gen.model.model_id for e in family.entries)  # these weights
    by_scale = {e.guidance_scale: e for e in family.entries}
    other = resolve({"prompt": "digit 3", "seed": 1, "guidance_scale": 6.0})[0].to_row()     # outside [1, 4]
    assert (other["sampler"], other["schedule"], other["plan"]) == ("dpmpp_2m", "karras", None)
    between = resolve({"prompt": "digit 3", "seed": 1, "guidance_scale": 2.4})[0]
    assert (between.sampler.method, between.sampler.plan) == ("plan", by_scale[2.0].hash)

    lo, hi = gen.model.sigma_min, gen.model.sigma_max
    for g, plan in by_scale.items():
        rows = [resolve({"prompt": f"digit {i % 10}", "seed": 7_000_000 + i, "guidance_scale": g}, i, i)[0]
                for i in range(40)]
        assert {(r.sampler.method, r.sampler.plan) for r in rows} == {("plan", plan.hash)}
        den, (noise, _) = gen.denoiser(rows), gen.noise([r.seed for r in rows], 32, 32)
        with torch.no_grad():
            ref = run_teacher(den, noise, lo, hi, nfe=150, candidates=2).target
            planned = sample(den, noise, method=plan, nfe=10, sigma_min=lo, sigma_max=hi)
            base = sample(den, noise, method="dpmpp_2m", nfe=10, sigma_min=lo, sigma_max=hi, schedule="karras")
        plan_err, base_err = per_sample_rms(planned, ref).mean(), per_sample_rms(base, ref).mean()
        accepted = CalibrationFigures.from_dict(plan.calibration).accepted     # else the plan is the baseline
        assert plan_err < (0.5 if accepted else 1.0 + 1e-9) * base_err, (g, float(plan_err), float(base_err))
