"""Solver plans: the file format, sampling with a plan, the calibrators and the acceptance gate."""
import json
import math

import pytest
import torch

from pipeline.analytic import GaussianMixture, mixture_denoiser, per_sample_rms
from pipeline.samplers import PlanError, SolverPlan, calibrate, sample
from pipeline.samplers.calibrate import Teacher, dp_search, run_teacher
from pipeline.schedules import karras

SMIN, SMAX = 0.0292, 14.6146


def a_plan(**kw) -> SolverPlan:
    base = dict(nfe=4, sigma_min=SMIN, sigma_max=SMAX, sigmas=(SMAX, 3.0, 0.8, 0.1, 0.0),
                shifts=(0.0, 0.1, -0.05, 0.2), gains=((0.0, 0.0), (0.1, 0.0), (0.2, -0.1), (0.0, 0.3)),
                guidance_scale=2.0, calibration={"accepted": True})
    return SolverPlan(**{**base, **kw}).sealed()


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture(6, 8, seed=11, spread=1.5, std=(0.05, 0.3))


def noise(n, dim, seed):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- the file
@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_plan_round_trips_through_json_exactly(tmp_path, where):
    plan = a_plan()
    url = str(tmp_path / "p.json") if where == "local" else "memory://plans/p.json"
    assert plan.to_json(url) == plan.hash and len(plan.hash) == 16
    back = SolverPlan.from_json(url)
    assert back == plan and back.sigmas == plan.sigmas and back.hash == plan.content_hash()
    # infinity (flow grids from sigma = inf) survives JSON too
    inf = a_plan(sigma_max=math.inf, sigmas=(math.inf, 3.0, 0.8, 0.1, 0.0), shifts=(0.0,) * 3, gains=((0.0, 0.0),) * 3)
    inf.to_json(str(tmp_path / "inf.json"))
    assert SolverPlan.from_json(str(tmp_path / "inf.json")).sigmas[0] == math.inf


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("tamper, match", [
    (lambda d: d.update(sigmas=[d["sigmas"][0], 2.9, *d["sigmas"][2:]]), "content hash mismatch"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(base="magic"), "unknown method 'magic'"),
    (lambda d: d.update(nfe=3), "nfe \\+ 1 = 4 levels"),
    (lambda d: d.update(colour="red"), "colour"),
])
def test_tampered_or_foreign_plans_are_refused_naming_the_file(tmp_path, tamper, match):
    doc = json.loads(a_plan().model_dump_json())
    tamper(doc)
    url = _write(tmp_path / "p.json", doc)
    with pytest.raises(PlanError, match=match) as e:
        SolverPlan.from_json(url)
    assert url in str(e.value)


def test_truncated_and_missing_plans_are_refused(tmp_path):
    good = tmp_path / "good.json"
    a_plan().to_json(str(good))
    cut = tmp_path / "cut.json"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(PlanError, match="truncated or not JSON") as e:
        SolverPlan.from_json(str(cut))
    assert str(cut) in str(e.value)
    with pytest.raises(PlanError, match="not found"):
        SolverPlan.from_json(str(tmp_path / "nope.json"))


def test_a_plan_for_another_nfe_or_sigma_range_names_both_values(gmm):
    plan, z = a_plan(), noise(4, 8, 0)
    den = mixture_denoiser(gmm)
    with pytest.raises(ValueError, match="nfe=4.*nfe=5"):
        sample(den, z, method=plan, nfe=5, sigma_min=SMIN, sigma_max=SMAX)
    with pytest.raises(ValueError, match="sigma_max=14.6146.*sigma_max=80"):
        sample(den, z, method=plan, nfe=4, sigma_min=SMIN, sigma_max=80.0)
    with pytest.raises(ValueError, match="options"):
        sample(den, z, method=plan, nfe=4, sigma_min=SMIN, sigma_max=SMAX, eta=1.0)


def test_a_plan_without_parameters_is_dpmpp_2m_on_its_grid(gmm):
    den, z = mixture_denoiser(gmm), noise(16, 8, 1)
    grid = karras(6, SMIN, SMAX)
    plan = SolverPlan(nfe=6, sigma_min=SMIN, sigma_max=SMAX, sigmas=tuple(grid.tolist())).sealed()
    ours = sample(den, z, method=plan, nfe=6, sigma_min=SMIN, sigma_max=SMAX)
    assert torch.equal(ours, sample(den, z, method="dpmpp_2m", nfe=6, sigma_min=SMIN, sigma_max=SMAX, schedule="karras"))
    # a baseline plan of another method runs that method on the explicit grid
    other = SolverPlan(base="unipc", nfe=6, sigma_min=SMIN, sigma_max=SMAX, sigmas=tuple(grid.tolist())).sealed()
    assert torch.equal(sample(den, z, method=other, nfe=6, sigma_min=SMIN, sigma_max=SMAX),
                       sample(den, z, method="unipc", nfe=6, sigma_min=SMIN, sigma_max=SMAX, schedule="karras"))
    # and the per-step parameters change the result
    tuned = a_plan(nfe=6, sigmas=tuple(grid.tolist()), shifts=(0.1,) * 6, gains=((0.2, 0.1),) * 6)
    assert not torch.allclose(sample(den, z, method=tuned, nfe=6, sigma_min=SMIN, sigma_max=SMAX), ours)


# ---------------------------------------------------------------- the calibrators
def test_dp_recovers_the_known_optimal_grid():
    """A denoiser constant within bands of sigma (independent of x): a DDIM step is exact unless it
    jumps over a band edge, and the last call returns that band's value. With one model call per
    band, the only exact grid is sigma_max followed by every band edge; the DP must find it."""
    levels = torch.exp(torch.linspace(math.log(SMAX), math.log(SMIN), 24, dtype=torch.float64))
    edges = levels[[5, 11, 17, 20]]                        # band edges on candidate levels
    values = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-0.7, 1.2], [1.5, 1.5], [-0.2, 0.4]], dtype=torch.float64)

    def band(sigma):                                       # an edge belongs to the band below it
        return sum((sigma <= e).long() for e in edges)

    def den(x, sigma):
        return values[band(sigma.reshape(-1))].reshape(x.shape[0], -1).expand_as(x).clone()

    z = noise(3, 2, 5)
    states, x = [], z * SMAX
    for i, s in enumerate(levels):                          # the exact solution, band by band
        states.append(x)
        if i + 1 < len(levels):
            c, nxt = values[band(s.reshape(1))].expand_as(x), levels[i + 1]
            x = c + nxt / s * (x - c)
    teacher = Teacher(levels, values[band(levels[-1:])].expand(3, 2), torch.stack(states), None, 1000)
    grid = dp_search(den, z, teacher, nfe=5, sigma_max=SMAX, order=1)
    assert torch.allclose(grid, torch.cat([levels[:1], edges, torch.zeros(1, dtype=torch.float64)]))


@pytest.fixture(scope="module")
def calibrated(gmm):
    den = mixture_denoiser(gmm)
    plan = calibrate(den, noise(160, 8, 100), nfe=6, sigma_min=SMIN, sigma_max=SMAX, schedule="vp_discrete",
                     teacher_nfe=120, candidates=30, dp_samples=48, iterations=120, batch_size=48, seed=0)
    return den, plan


def test_a_calibrated_plan_beats_its_baseline_on_held_out_noise(calibrated):
    den, plan = calibrated
    test = noise(256, 8, 999)                               # noise calibration never saw
    ref = run_teacher(den, test, SMIN, SMAX, nfe=600, candidates=2).target
    base = plan.calibration["baseline"]
    err_plan = per_sample_rms(sample(den, test, method=plan, nfe=6, sigma_min=SMIN, sigma_max=SMAX), ref).mean()
    err_base = per_sample_rms(sample(den, test, method=base["method"], nfe=6, sigma_min=SMIN, sigma_max=SMAX,
                                     schedule=base["schedule"]), ref).mean()
    assert plan.calibration["accepted"] and plan.base == "dpmpp_2m"
    assert err_plan < 0.6 * err_base, (float(err_plan), float(err_base))
    f = plan.calibration
    assert f["error"]["plan"]["held_out"] < f["error"]["baseline"]["held_out"]
    assert f["model_evaluations"]["teacher"] == 160 * 120 and f["model_evaluations"]["refine"] > 0
    assert f["samples"] == {"calibration": 120, "held_out": 40}


def test_the_gate_returns_the_baseline_when_calibration_cannot_beat_it(gmm):
    """A model whose flow is exact for any solver (x-independent D = const): nothing beats the baseline."""
    den = lambda x, sigma: torch.full_like(x, 0.25)  # noqa: E731
    plan = calibrate(den, noise(24, 3, 7), nfe=4, sigma_min=SMIN, sigma_max=SMAX, teacher_nfe=40, candidates=12,
                     dp_samples=8, iterations=10, batch_size=8)
    assert not plan.calibration["accepted"] and plan.calibration["chosen"] == "baseline"
    assert plan.base == plan.calibration["baseline"]["method"] and not plan.shifts
    assert plan.calibration["error"]["plan"] == plan.calibration["error"]["baseline"]


def test_calibrate_refuses_bad_arguments(gmm):
    den = mixture_denoiser(gmm)
    with pytest.raises(ValueError, match="nfe"):
        calibrate(den, noise(16, 8, 0), nfe=1)
    with pytest.raises(ValueError, match="calibrators"):
        calibrate(den, noise(16, 8, 0), nfe=4, calibrators=("magic",))
    with pytest.raises(ValueError, match="holdout"):
        calibrate(den, noise(3, 8, 0), nfe=4)
