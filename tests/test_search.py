"""Inference-time search: particles, rewards, fk/svdd steering, budgets and their errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.errors import RequestError
from pipeline.request import requests_table, resolver_for
from pipeline.rewards import RewardError, check_reward, load_reward, score
from pipeline.search import SEARCH_METHODS, SearchSpec, Steering, particle_seeds

REPO = Path(__file__).resolve().parents[1]
JOB = ["manifest.template=digit {d}", "manifest.values.d=[0,1,2,3,4,5,6,7,8,9]", "manifest.count=1", "defaults.guidance_scale=1.0", "model.threads=1"]


@pytest.fixture(scope="module")
def gen_and_resolve():
    from pipeline.worker import Generator

    cfg = load_config(None, JOB + ["ray.batch_size=12"])
    return Generator(cfg), resolver_for(cfg)


def run_rows(gen, resolve, rows, **fields):
    reqs = [r for i, row in enumerate(rows) for r in resolve({**fields, **row}, first_row=i)]
    return gen(requests_table(reqs)).to_pylist()


def spec(method: str, particles: int = 4, **options) -> SearchSpec:
    """A resolved search of ``method`` with these options (defaults filled in)."""
    return SearchSpec(method=method, particles=particles, reward="digits",
                      options=SEARCH_METHODS[method].options(options))


def pixels(row) -> np.ndarray:
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["pixels_shape"])


# ---------------------------------------------------------------- steering mechanics
def test_resampling_keeps_groups_apart_and_gathers_the_sampler_state():
    """Two rows x 4 particles: every slot ends up holding a particle of its own row, and the sampler's
    x and the data predictions it kept are gathered by the same ancestors."""
    groups = [0] * 4 + [1] * 4
    # each particle's value: row * 100 + particle; rewards: row 0 prefers particle 2, row 1 particle 0
    x = torch.tensor([g * 100.0 + p for g in (0, 1) for p in range(4)])[:, None]
    rewards = torch.tensor([0.0, 0.1, 5.0, 0.2, 5.0, 0.0, 0.1, 0.2], dtype=torch.float64)
    for method, lam in (("svdd", None), ("fk", 50.0)):
        options = {"resample_every": 1, "lambda": lam} if method == "fk" else {}
        st = Steering(lambda x, s: x.clone(), groups, spec(method, **options), lambda d: rewards, {0: 1, 1: 2}, calls=10)
        xs = x.clone()
        kept = st(xs, torch.ones(8))                              # call 0: a resampling step
        assert torch.equal(kept, xs)                              # the returned estimate follows x
        assert ((xs[:, 0] // 100) == torch.tensor(groups)).all(), xs[:, 0]     # no slot changed rows
        assert set(xs[:4, 0].tolist()) == {2.0} and set(xs[4:, 0].tolist()) == {100.0}
        # the next call gathers what the sampler kept from the first (its multistep history) too
        hist = kept
        rewards2 = torch.tensor([0.0, 0.0, 0.0, 9.0, 0.0, 9.0, 0.0, 0.0], dtype=torch.float64)
        st.scorer = lambda d, r=rewards2: r
        xs2 = torch.arange(8.0)[:, None] + torch.tensor(groups)[:, None] * 100
        st(xs2, torch.ones(8))
        assert ((xs2[:, 0] // 100) == torch.tensor(groups)).all()
        assert torch.equal(hist, torch.tensor([2.0] * 4 + [100.0] * 4)[:, None])   # same value: all copies


@pytest.mark.parametrize("method", ["ddim", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_collapsing_onto_one_particle_continues_its_exact_trajectory(method):
    """Every steerable sampler with its noise off (eta=0): gathering all particles onto particle 0
    mid-way gives exactly particle 0's own trajectory, so x and the multistep history were both
    gathered (a missed history tensor would change the later steps)."""
    from pipeline.samplers import SAMPLERS, sample

    assert SAMPLERS[method].steerable
    torch.manual_seed(0)
    means = torch.randn(4, 3)

    def den(x, s):        # the exact denoiser of a 4-point data set
        w = torch.softmax(-((x[:, None] - means[None]) ** 2).sum(-1) / (2 * s[:, None] ** 2), 1)
        return w @ means
    noise, gens = torch.randn(4, 3), lambda: [torch.Generator().manual_seed(i) for i in range(4)]
    kw = dict(method=method, nfe=8, sigma_min=0.01, sigma_max=10, eta=0.0)
    alone = sample(den, noise, generator=gens(), **kw)
    st = Steering(den, [0] * 4, spec("svdd"), lambda d: torch.tensor([3.0, 0, 0, 0], dtype=torch.float64),
                  {0: 1}, calls=8)
    st.at = lambda step: step == 4
    out = sample(st, noise, generator=gens(), **kw)
    assert torch.equal(out, alone[:1].expand(4, -1)) and (alone - alone[:1]).abs().max() > 0.1


def test_fk_skips_resampling_when_weights_are_even_and_never_resamples_at_the_last_call():
    st = Steering(lambda x, s: x.clone(), [0, 0, 0], spec("fk", 3, resample_every=1), lambda d:
                  torch.zeros(3, dtype=torch.float64), {0: 0}, calls=3)
    x = torch.arange(3.0)[:, None]
    for _ in range(3):
        st(x, torch.ones(3))
    assert st.resamples == 0 and torch.equal(x[:, 0], torch.arange(3.0))
    assert [st.at(i) for i in range(3)] == [True, True, False]


def test_systematic_resampling_keeps_each_particle_floor_or_ceil_of_n_w_times():
    from pipeline.search import resample

    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        w = torch.softmax(torch.randn(7, generator=g, dtype=torch.float64) * 3, 0)
        counts = torch.bincount(resample(w, g), minlength=7).double()
        assert ((counts >= (7 * w).floor()) & (counts <= (7 * w).ceil())).all(), (w, counts)
    even = torch.full((4,), 0.25, dtype=torch.float64)
    assert resample(even, g).tolist() == [0, 1, 2, 3]         # even weights: every particle kept once, in place


def test_particle_seeds_start_with_the_rows_own_seed_and_differ():
    seeds = particle_seeds(1234, 6)
    assert seeds[0] == 1234 and len(set(seeds)) == 6 and seeds == particle_seeds(1234, 6)
    assert particle_seeds(1235, 6)[1:] != seeds[1:]


# ---------------------------------------------------------------- the generator
@pytest.mark.parametrize("method", ["best_of_n", "fk", "svdd"])
def test_a_row_is_byte_identical_at_batch_sizes_1_and_3(gen_and_resolve, method):
    gen, resolve = gen_and_resolve
    rows = [{"prompt": "digit 3", "seed": 11}, {"prompt": "seven", "seed": 12}, {"prompt": "0", "seed": 13}]
    search = {"method": method, "particles": 4, "reward": "digits"}
    together = run_rows(gen, resolve, rows, nfe=6, search=search)
    gen.runner.batch_size = 4                                 # 4 model rows: one image (4 particles) per batch
    try:
        alone = [run_rows(gen, resolve, [r], nfe=6, search=search)[0] for r in rows[::-1]][::-1]
    finally:
        gen.runner.batch_size = 12
    for a, b in zip(together, alone):
        assert a["error"] is None and a["pixels"] == b["pixels"], method
        assert a["search_rewards"] == pytest.approx(b["search_rewards"], abs=1e-6)
        assert a["search_particle"] == b["search_particle"] and len(a["search_rewards"]) == 4
        assert a["search_reward"] == max(a["search_rewards"])


def test_best_of_n_keeps_the_best_particle_and_particle_0_is_the_plain_image(gen_and_resolve):
    gen, resolve = gen_and_resolve
    rows = [{"prompt": str(d), "seed": 100 + d} for d in range(10)]
    plain = run_rows(gen, resolve, rows, nfe=4)
    best = run_rows(gen, resolve, rows, nfe=4, search={"method": "best_of_n", "particles": 4, "reward": "digits"})
    reward = load_reward("digits")
    imgs = torch.from_numpy(np.stack([pixels(r) for r in plain])).float()[:, None].expand(-1, 3, -1, -1) / 255
    plain_scores = score(reward, "digits", imgs, [r["prompt"] for r in rows])
    for p, b, s in zip(plain, best, plain_scores.tolist()):
        assert b["search_rewards"][0] == pytest.approx(s, abs=1e-6)          # particle 0 = the plain image
        assert b["search_reward"] >= s - 1e-9
        if b["search_particle"] == 0:
            assert b["pixels"] == p["pixels"]
    assert sum(b["search_particle"] != 0 for b in best) >= 1


def test_steering_methods_raise_the_reward_over_the_plain_sampler(gen_and_resolve):
    """On 20 seeds at 4 NFE (where the plain sampler misses some digits) fk and svdd with 4 particles
    score higher on average than their sampler without search."""
    gen, resolve = gen_and_resolve
    rows = [{"prompt": str(d % 10), "seed": 500 + d} for d in range(20)]
    base = run_rows(gen, resolve, rows, nfe=4, sampler="euler_ancestral", search={"method": "best_of_n", "particles": 1,
                                                                              "reward": "digits"})
    base_mean = np.mean([r["search_reward"] for r in base])
    for method in ("fk", "svdd"):
        out = run_rows(gen, resolve, rows, nfe=4, search={"method": method, "particles": 4, "reward": "digits"})
        assert all(r["sampler"] == "euler_ancestral" for r in out)              # auto's stochastic form
        assert np.mean([r["search_reward"] for r in out]) > base_mean, method


@pytest.mark.parametrize("fault", ["raise", "nan", "shape"])
def test_a_failing_reward_is_a_per_row_error(gen_and_resolve, fault):
    gen, resolve = gen_and_resolve
    rows = [{"prompt": "digit 3", "seed": 1}, {"prompt": "digit 5", "seed": 2}, {"prompt": "digit 8", "seed": 3}]
    for method in ("best_of_n", "svdd"):
        out = run_rows(gen, resolve, rows, nfe=3, search={
            "method": method, "particles": 2, "reward": "pipeline.faults:faulty_reward",
            "reward_options": {"fault": fault, "on": "3"}})
        assert out[0]["error"] and out[0]["error_stage"] == "reward" and out[0]["pixels"] is None, out[0]["error"]
        assert "faulty_reward" in out[0]["error"] or "NaN" in out[0]["error"]
        assert [r["error"] for r in out[1:]] == [None, None] and all(r["search_reward"] for r in out[1:])


# ---------------------------------------------------------------- resolution and config checks
def test_requests_resolve_search_and_refuse_bad_fields():
    cfg = load_config(None, JOB + ["search.reward=digits"])
    resolve = resolver_for(cfg)
    (r,) = resolve({"prompt": "3", "search": {"method": "fk", "particles": 3, "options": {"potential": "diff"}}})
    assert r.sampler.method == "euler_ancestral" and r.particles == 3 and r.model_calls == 3 * r.sampler.nfe
    assert r.search.model_dump() == {"method": "fk", "particles": 3, "reward": "digits", "reward_options": {},
                        "options": {"potential": "diff", "lambda": 10.0, "resample_every": 2, "ess_threshold": 1.0,
                                    "resampling": "systematic"}}
    (r,) = resolve({"prompt": "3", "search": json.dumps({"method": "svdd"})})       # JSON text (CSV manifests)
    assert r.search.options == {} and r.search.particles == 4
    assert resolve({"prompt": "3"})[0].search is None
    bad = [({"method": "beam"}, "search.method", "allowed"),
           ({"method": "fk", "particles": 0}, "search.particles", "1..256"),
           ({"method": "fk", "reward": "nope"}, "search.reward", "unknown reward"),
           ({"method": "fk", "reward": "no_such_module:f"}, "search.reward", "cannot import"),
           ({"method": "fk", "options": {"potential": "min"}}, "search.options", "potential"),
           ({"method": "fk", "options": {"temperature": 2}}, "search.options", "temperature")]
    for search, field, text in bad:
        with pytest.raises(RequestError) as e:
            resolve({"prompt": "3", "search": search})
        assert e.value.field == field and text in str(e.value), (search, str(e.value))
    with pytest.raises(RequestError) as e:
        resolve({"prompt": "3", "sampler": "dpmpp_2m", "search": {"method": "svdd"}})
    assert e.value.field == "search.method" and "sampler='dpmpp_2m'" in str(e.value) and "dpmpp_2m_sde" in str(e.value)
    with pytest.raises(RequestError, match="several model calls per step"):
        resolve({"prompt": "3", "sampler": "edm", "sampler_options": {"S_churn": 1.0}, "search": {"method": "fk"}})


def check_job(overrides):
    """What every entry point does before Ray starts: load the config, build the resolver."""
    return resolver_for(load_config(None, JOB + overrides)).cfg


def test_config_refuses_a_deterministic_sampler_with_steering_naming_both_keys():
    with pytest.raises(ConfigError) as e:
        check_job(["search.method=fk", "search.reward=digits", "sampler.method=euler"])
    assert e.value.key == "search.method" and "sampler.method='euler'" in str(e.value) and "euler_ancestral" in str(e.value)
    with pytest.raises(ConfigError, match="eta=0"):
        check_job(["search.method=svdd", "search.reward=digits", "sampler.method=dpmpp_2m_sde", "sampler.options.eta=0"])
    cfg = check_job(["search.method=svdd", "search.reward=digits", "sampler.method=ddim", "sampler.options.eta=0.5"])
    assert cfg.search.method == "svdd"
    with pytest.raises(ConfigError) as e:                  # options the method does not take, named as config keys
        check_job(["search.method=svdd", "search.reward=digits", "search.options.potential=max"])
    assert e.value.key == "search.options" and "potential" in str(e.value)


@pytest.mark.parametrize("reward,text", [("no_such_reward", "unknown reward"),
                                         ("no_such_module:score", "cannot import"),
                                         ("", "needs a reward")])
def test_cli_refuses_a_bad_reward_before_starting_ray(tmp_path, reward, text):
    r = subprocess.run([sys.executable, "-m", "jobs.generate", *JOB, "search.method=best_of_n",
                        f"search.reward={reward}", f"output.path={tmp_path}/o"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "search.reward" in r.stderr and text in r.stderr and "Traceback" not in r.stderr
    assert "Started a local Ray instance" not in r.stderr and not (tmp_path / "o").exists()


def test_rewards_check_what_they_return():
    check_reward("digits")
    with pytest.raises(RewardError, match="unknown reward"):
        check_reward("aesthetic")
    images = torch.rand(3, 3, 16, 16)
    with pytest.raises(RewardError, match=r"shape \(2,\)"):
        score(lambda im, p: torch.zeros(2), "r", images, ["1", "2", "3"])
    with pytest.raises(RewardError, match="raised ZeroDivisionError"):
        score(lambda im, p: 1 / 0, "r", images, ["1", "2", "3"])
    out = score(load_reward("digits"), "digits", images, ["1", "", "seven"])
    assert out.shape == (3,) and out.dtype == torch.float64 and ((out >= 0) & (out <= 1)).all()


def test_the_shipped_digits_reward_reads_held_out_real_digits():
    """The shipped classifier scores its own held-out split (the seeded 20% it never trained on) as its
    metadata says, and gives the true digit most of the probability."""
    from pipeline.models.digits_train import load_digits_data

    meta = json.loads((REPO / "pipeline/models/weights/digits-reward.json").read_text())
    data, labels = load_digits_data(16)
    g = torch.Generator().manual_seed(meta["seed"])
    test = torch.randperm(len(data), generator=g)[:meta["holdout_images"]]
    images = ((data[test] + 1) / 2).expand(-1, 3, -1, -1)
    probs = load_reward("digits")(images, [str(int(d)) for d in labels[test]])
    accuracy = torch.stack([load_reward("digits")(images, [str(d)] * len(test)) for d in range(10)]).argmax(0)
    assert (accuracy == labels[test]).float().mean().item() == pytest.approx(meta["holdout_accuracy"], abs=1e-3)
    assert meta["holdout_accuracy"] >= 0.95 and probs.mean() > 0.9


def test_clip_reward_from_a_tiny_random_clip(tmp_path):
    from pipeline.models import tiny

    tiny.build_clip(tmp_path)
    with pytest.raises(RewardError, match="path"):
        load_reward("clip")
    reward = load_reward("clip", {"path": str(tmp_path)})
    images = torch.rand(4, 3, 16, 16)
    a = score(reward, "clip", images, ["a cat", "a dog", "a cat", "digit 3"])
    assert a.shape == (4,) and torch.isfinite(a).all() and (a.abs() <= 1).all()
    b = score(reward, "clip", images[:1], ["a cat"])
    assert float(b[0]) == pytest.approx(float(a[0]), abs=1e-5)                # batch-independent
    assert abs(float(a[0]) - float(score(reward, "clip", images[:1], ["a dog"])[0])) > 1e-6   # the text matters


# ---------------------------------------------------------------- the job
def test_job_records_search_results_and_the_model_call_budget(ray_session, tmp_path):
    from pipeline.job import run_job

    out = tmp_path / "out"
    cfg = load_config(None, JOB + ["manifest.count=2", "sampler.nfe=3", "search.method=fk", "search.particles=3",
                                   "search.reward=pipeline.faults:faulty_reward", "search.reward_options.fault=raise",
                                   "search.reward_options.on=digit 4", "errors.max_errors=5",
                                   "output.rows_per_shard=10", "ray.num_cpus_per_actor=0.5",
                                   f"output.path={out}"])
    summary = run_job(cfg)
    assert summary.images == 18 and summary.errors == 2
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["model_calls"] == 20 * 3 * 3 == summary.model_calls       # failed rows count too
    table = pq.read_table(out / "parquet")
    row = table.slice(0, 1).to_pylist()[0]
    assert json.loads(row["search"])["method"] == "fk" and len(row["search_rewards"]) == 3
    assert row["search_reward"] == max(row["search_rewards"])
    errors = pq.read_table(out / "_errors").to_pylist()
    assert {e["stage"] for e in errors} == {"reward"} and {e["prompt"] for e in errors} == {"digit 4"}
    assert json.loads(errors[0]["search"])["particles"] == 3        # an error row can be fed back as a manifest
    import webdataset as wds
    sample = next(iter(wds.WebDataset(str(out / "shards" / "shard-000000.tar"), shardshuffle=False)))
    meta = json.loads(sample["json"])
    assert meta["search"]["particles"] == 3 and meta["search_particle"] in range(3)
    assert meta["search_reward"] == max(meta["search_rewards"])
