"""Solver plans: the file format, sampling with a plan, the calibrators and the acceptance gate."""
import json
import math
import time

import pytest
import torch
from conftest import chosen_by_rule

from pipeline.analytic import GaussianMixture, mixture_denoiser, per_sample_rms
from pipeline.samplers import CalibrationSpec, PlanError, PlanFamily, SolverPlan, calibrate, sample
from pipeline.samplers.calibrate import (CalibrationFigures, RowSplit, Teacher, budget_steps, dp_search, gate, run_teacher,
                                         thin_validation)
from pipeline.samplers.calibrators import pick
from pipeline.samplers.planned import BASES, plan_multistep
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
    # a baseline plan of a method that is not a calibrated base runs that method on the explicit grid
    other = SolverPlan(base="deis", nfe=6, sigma_min=SMIN, sigma_max=SMAX, sigmas=tuple(grid.tolist())).sealed()
    assert torch.equal(sample(den, z, method=other, nfe=6, sigma_min=SMIN, sigma_max=SMAX),
                       sample(den, z, method="deis", nfe=6, sigma_min=SMIN, sigma_max=SMAX, schedule="karras"))
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


def spec(**kw) -> CalibrationSpec:
    return CalibrationSpec(**{"nfe": 6, "sigma_min": SMIN, "sigma_max": SMAX, "noise_schedule": "vp_discrete",
                              "teacher_nfe": 120, "candidates": 30, "dp_samples": 48, "iterations": 60,
                              "batch_size": 48, **kw})


@pytest.fixture(scope="module")
def calibrated(gmm):
    den = mixture_denoiser(gmm)
    return den, calibrate(spec(), den, noise(160, 8, 100), progress=lambda m: None, diagnostics=True)


def test_a_calibrated_plan_beats_its_baseline_on_held_out_noise(calibrated):
    den, result = calibrated
    plan, f = result.plan, result.figures
    test = noise(256, 8, 999)                               # noise calibration never saw
    ref = run_teacher(den, test, SMIN, SMAX, nfe=600, candidates=2).target
    err_plan = per_sample_rms(sample(den, test, method=plan, nfe=6, sigma_min=SMIN, sigma_max=SMAX), ref).mean()
    err_base = per_sample_rms(sample(den, test, method=f.baseline["method"], nfe=6, sigma_min=SMIN, sigma_max=SMAX,
                                     schedule=f.baseline["schedule"]), ref).mean()
    assert f.accepted and plan.base in BASES and f.chosen.startswith(plan.base)
    assert err_plan < 0.6 * err_base, (float(err_plan), float(err_base))
    assert f.error["plan"]["held_out"] < f.error["baseline"]["held_out"]
    assert f.model_evaluations["teacher"] == 160 * 120 and f.model_evaluations["refine"] > 0
    assert f.samples == {"calibration": 96, "validation": 32, "held_out": 32}
    assert CalibrationFigures.from_dict(plan.calibration) == f          # the plan carries its figures


def test_the_base_is_chosen_on_the_validation_rows_and_the_gate_on_held_out_rows(calibrated):
    """Three splits: the chosen candidate is the one ``pick`` prefers on the validation rows (of 2M, 3M
    and UniPC bases, on the DP grid and refined), and the held-out error is reported for it alone."""
    _, result = calibrated
    cands = result.figures.error["candidates"]
    assert set(cands) == {f"{b}/{k}" for b in BASES for k in ("dp", "grad")} == set(result.figures.error["candidate_means"])
    assert chosen_by_rule(result.figures)
    assert cands[result.figures.chosen] == pytest.approx(result.figures.error["robust"]["plan"]["validation"])
    assert result.figures.error["robust"]["plan"]["held_out"] == pytest.approx(result.figures.error["gate"]["plan"])


def test_diagnostics_return_every_candidate_with_the_errors_the_choice_saw(calibrated):
    """``diagnostics=True`` (bench/choice_rule.py): every candidate and the baseline, each with the plan it
    would be and its per-sample errors; ``pick`` and ``gate`` on them give back the calibration's own choice."""
    _, result = calibrated
    reports, f = result.candidates, result.figures
    assert set(reports) == set(f.error["candidate_means"]) | {"baseline"}
    for name, mean in f.error["candidate_means"].items():
        assert float(reports[name].validation.mean()) == pytest.approx(mean)
        assert len(reports[name].validation) == f.samples["validation"]
        assert len(reports[name].held_out) == f.samples["held_out"]
    picked = pick({n: r.validation for n, r in reports.items() if n != "baseline"}, spec().trim)
    accepted, test = gate(reports[picked].held_out, reports["baseline"].held_out, spec().trim)
    assert (picked if accepted else "baseline") == f.chosen and test == pytest.approx(f.error["gate"])
    assert reports[f.chosen].plan.hash == result.plan.hash
    assert len({r.plan.hash for r in reports.values()}) == len(reports)     # each one its own plan


# ---------------------------------------------------------------- nesting a lower-NFE plan
@pytest.fixture(scope="module")
def nested(calibrated):
    """The calibration at nfe 8 on the same rows, always nesting the nfe-6 plan of ``calibrated``."""
    den, lower = calibrated
    return lower.plan, calibrate(spec(nfe=8), den, noise(160, 8, 100), progress=lambda m: None, diagnostics=True,
                                 lower=lower.plan, nesting="always")


def test_a_nested_start_is_the_lower_plan_with_steps_inserted_and_is_refined(nested):
    """The nested start holds every level of the nfe-6 plan, and its per-step numbers with zeros for the
    two new steps. It is refined like each base's DP start, and on the validation rows (the same rows:
    same seed, same split) the refined one and the plan chosen at nfe 8 beat the nfe-6 plan."""
    lower, r = nested
    name = f"{lower.base}/nested 6"
    start, f = r.candidates[name].plan, r.figures
    assert start.nfe == 8 and start.base == lower.base and set(lower.sigmas) < set(start.sigmas)
    assert sorted(start.shifts) == sorted(lower.shifts + (0.0, 0.0))
    assert sorted(start.gains) == sorted(lower.gains + ((0.0, 0.0), (0.0, 0.0)))
    lower_val, means = lower.calibration["error"]["plan"]["validation"], f.error["candidate_means"]
    assert means[f"{name}+grad"] < lower_val and f.iterations[name] > 0, (means, lower_val)
    assert f.error["plan"]["validation"] < lower_val
    assert f.model_evaluations["nest"] > 0 and f.projection["model_evaluations"]["nest"] > 0
    assert chosen_by_rule(f)


def test_nesting_on_a_rise_nests_only_where_the_lower_plan_wins_on_validation(calibrated):
    """``nesting="rise"``: refined nfe-8 candidates beat the nfe-6 plan on the validation rows, so nothing is
    nested, ``nest`` costs one pass of the nfe-6 plan over those rows, and the plan is the one calibrated
    without a lower plan, number for number; 3M's DP grid alone (no refinement) does not beat it, so its
    nested start joins it."""
    den, lower = calibrated
    z, rows = noise(160, 8, 100), lower.figures.samples["validation"]
    kept = calibrate(spec(nfe=8), den, z, progress=lambda m: None, lower=lower.plan, nesting="rise")
    quiet = kept.figures
    assert not any("nested" in n for n in quiet.error["candidate_means"])
    assert quiet.model_evaluations["nest"] == 6 * rows and quiet.projection["model_evaluations"]["nest"] > 6 * rows
    assert quiet.error["plan"]["validation"] < lower.figures.error["plan"]["validation"]
    alone = calibrate(spec(nfe=8), den, z, progress=lambda m: None).plan     # where it does not fire: the same plan
    numbers = lambda p: (p.base, p.sigmas, p.shifts, p.gains)                # noqa: E731
    assert numbers(kept.plan) == numbers(alone)
    said = []
    weak = calibrate(spec(nfe=8, calibrators=("dp",), bases=("dpmpp_3m",)), den, z, progress=said.append,
                     lower=lower.plan, nesting="rise").figures
    means = weak.error["candidate_means"]
    assert set(means) == {"dpmpp_3m/dp", f"{lower.plan.base}/nested 6"}
    assert means["dpmpp_3m/dp"] > lower.figures.error["plan"]["validation"]
    assert weak.model_evaluations["nest"] > 6 * rows and any("does not beat" in m and "nesting it" in m for m in said)
    with pytest.raises(ValueError, match="nesting: expected one of \\['always', 'rise'\\], got 'sometimes'"):
        calibrate(spec(nfe=8), den, z, lower=lower.plan, nesting="sometimes")


def test_a_plan_to_nest_must_be_this_models_at_a_lower_nfe(calibrated, gmm):
    den, lower = calibrated
    z = noise(40, 8, 1)
    with pytest.raises(ValueError, match="lower: plan .* has nfe 6; nesting needs a lower nfe than 6"):
        calibrate(spec(), den, z, lower=lower.plan)
    with pytest.raises(ValueError, match="lower: plan .* is for guidance scale None, not 3.0"):
        calibrate(spec(nfe=8, guidance_scale=3.0), den, z, lower=lower.plan)
    with pytest.raises(ValueError, match="lower: .*sigma_max=14.6146, got sigma_max=20"):
        calibrate(spec(nfe=8, sigma_max=20.0), den, z, lower=lower.plan)


@pytest.mark.parametrize("base", BASES)
def test_each_base_converges_at_its_order(base):
    """On an exact problem with a smooth flow the plain bases (no per-step parameters) converge: 2M at
    second order, 3M and UniPC (predictor-corrector) at third."""
    gm = GaussianMixture(3, 4, seed=2, spread=0.5, std=(0.3, 0.6))
    den, z = mixture_denoiser(gm), noise(8, 4, 3)
    ref = sample(den, z, "dpmpp_3m", 400, 0.05, 10.0, "exponential", third="taylor")
    errs = []
    for nfe in (16, 32):
        from pipeline.schedules import get_sigmas
        grid = get_sigmas("exponential", nfe, 0.05, 10.0)
        errs.append(float((plan_multistep(den, z * grid[0], grid, base=base) - ref).abs().max()))
    order = math.log2(errs[0] / errs[1])
    assert order > {"dpmpp_2m": 1.7, "dpmpp_3m": 2.6, "unipc": 2.6}[base], (base, errs)


def test_unipc_base_without_parameters_is_the_registered_unipc(gmm):
    den, z = mixture_denoiser(gmm), noise(8, 8, 4)
    grid = karras(7, SMIN, SMAX)
    assert torch.allclose(plan_multistep(den, z * grid[0], grid, base="unipc"),       # to float64 rounding
                          sample(den, z, "unipc", 7, SMIN, SMAX, "karras", lower_order_final=False), rtol=1e-12, atol=1e-12)


def _flips(n: int, flips: int, typical: float, seed: int) -> torch.Tensor:
    """Per-sample errors: ``typical`` (jittered) on most samples, 0.7 on ``flips`` of them (another mode)."""
    e = typical * (1 + 0.1 * torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    e[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:flips]] = 0.7
    return e


def test_the_plan_is_the_lowest_validation_mean_once_validation_sees_the_flips():
    """``choose`` (bench/choice_rule.py): on 400 validation rows or more the lowest mean decides, even where
    its difference is not significant and the trimmed mean prefers another candidate (mix16-sd at NFE 10:
    the candidate with more flips had the lower trimmed mean and the higher test error). On fewer rows
    ``pick`` decides."""
    from pipeline.samplers.calibrate import SEEN_ROWS, choose
    from pipeline.samplers.calibrators import significantly_worse, trimmed_mean
    for n in (SEEN_ROWS, 410):
        steady, flippy = _flips(n, 2, 0.0012, 5), _flips(n, 3, 0.0010, 6)
        assert trimmed_mean(flippy, 0.1) < trimmed_mean(steady, 0.1) and flippy.mean() > steady.mean()
        assert not significantly_worse(flippy, steady)
        assert choose({"2m/grad": flippy, "unipc/grad": steady}, 0.1) == "unipc/grad"
        assert pick({"2m/grad": flippy, "unipc/grad": steady}, 0.1) == "2m/grad"
    few = {"2m/grad": _flips(SEEN_ROWS - 1, 3, 0.0010, 6), "unipc/grad": _flips(SEEN_ROWS - 1, 2, 0.0012, 5)}
    assert choose(few, 0.1) == pick(few, 0.1) == "2m/grad"


def test_pick_lets_the_mean_decide_only_where_its_difference_is_significant():
    """The case that made mix3x32x32-sd at NFE 6 a 0.65x cell: on 410 rows, a candidate with a trimmed error
    a hair lower but 6 flips against none has a significantly worse mean and is not picked. On 40 rows one
    flip against none is chance, and the trimmed error decides."""
    from pipeline.samplers.calibrators import significantly_worse, trimmed_mean
    flippy, steady = _flips(410, 6, 0.00019, 1), _flips(410, 0, 0.00020, 2)
    assert trimmed_mean(flippy, 0.1) < trimmed_mean(steady, 0.1)
    assert significantly_worse(flippy, steady) and not significantly_worse(steady, flippy)
    assert pick({"2m/grad": flippy, "unipc/grad": steady}, 0.1) == "unipc/grad"
    assert pick({"unipc/grad": steady, "2m/grad": flippy}, 0.1) == "unipc/grad"        # whatever the order
    lucky, typical = _flips(40, 0, 0.01, 3), _flips(40, 1, 0.002, 4)     # one flip on 40 rows: not significant
    assert not significantly_worse(typical, lucky) and pick({"a": lucky, "b": typical}, 0.1) == "b"
    same = _flips(50, 2, 0.003, 5)
    assert pick({"first": same, "second": same.clone()}, 0.1) == "first"                # ties: the first


def test_refinement_keeps_an_iterate_only_when_pick_prefers_it(gmm):
    """``refine`` keeps the best validated iterate by ``pick``: an iterate with a lower trimmed error but
    significantly more flips is not kept; a uniformly better one is."""
    from pipeline.samplers.calibrators import Fit, refine
    den, z = mixture_denoiser(gmm), noise(16, 8, 9)
    fit = Fit(den, z, torch.zeros_like(z), None, torch.arange(16), 16)
    start = _flips(410, 0, 0.0002, 2)
    for later, kept in ((_flips(410, 6, 0.00019, 1), False), (start * 0.5, True)):
        seen = iter([start, later])
        _, best, its = refine(fit, karras(5, SMIN, SMAX), SMIN, SMAX, validate=lambda p: next(seen), iterations=1,
                              batch_size=8, validate_every=1, patience=None)
        assert its == 1 and (best is later) == kept and (best is start) != kept


def test_refinement_backpropagates_a_chunk_of_rows_at_a_time(gmm):
    """``Fit.chunk`` (``ray.batch_size`` in ``jobs.calibrate``) bounds the rows of every model call in
    refinement, so its memory is one chunk's activations; the gradients add up to the unchunked ones."""
    from pipeline.samplers.calibrators import Fit, refine
    base, z = mixture_denoiser(gmm), noise(16, 8, 9)
    target = sample(base, z, method="dpmpp_2m", nfe=30, sigma_min=SMIN, sigma_max=SMAX)
    rows_seen = []

    def den(x, sigma):
        rows_seen.append(x.shape[0])
        return base(x, sigma)
    plans = {}
    for chunk in (None, 3):
        rows_seen.clear()
        params, _, _ = refine(Fit(den, z, target, None, torch.arange(16), 16, chunk), karras(5, SMIN, SMAX), SMIN,
                              SMAX, validate=lambda p: torch.ones(4), iterations=3, batch_size=8, validate_every=10,
                              patience=None)
        plans[chunk] = params
        assert max(rows_seen) == (8 if chunk is None else 3)
    for a, b in zip(plans[None].parameters(), plans[3].parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_gate_returns_the_baseline_when_calibration_cannot_beat_it(gmm):
    """A model whose flow is exact for any solver (x-independent D = const): nothing beats the baseline."""
    den = lambda x, sigma: torch.full_like(x, 0.25)  # noqa: E731
    r = calibrate(spec(nfe=4, noise_schedule="ve", teacher_nfe=40, candidates=12, dp_samples=8, iterations=10,
                       batch_size=8), den, noise(24, 3, 7), progress=lambda m: None)
    assert not r.figures.accepted and r.figures.chosen == "baseline"
    assert r.plan.base == r.figures.baseline["method"] and not r.plan.shifts
    assert r.figures.error["plan"] == r.figures.error["baseline"]


def test_too_few_validation_rows_to_see_rare_failures_are_warned_of():
    """bench/plan_tail.py: at 512 rows (102 validation rows) plans chose blind to the ~1% of samples that
    flip modes; 2048 rows (410) saw them."""
    warning = thin_validation(512, 0.2)
    assert "102 validation rows (0.2 of 512)" in warning and "at least 2000 rows" in warning
    assert thin_validation(2048, 0.2) is None and thin_validation(2048, 0.1) is not None


def test_calibrate_refuses_bad_arguments(gmm):
    den = mixture_denoiser(gmm)
    with pytest.raises(ValueError, match="nfe"):
        calibrate(spec(nfe=1), den, noise(16, 8, 0))
    with pytest.raises(ValueError, match="calibrators"):
        calibrate(spec(calibrators=("magic",)), den, noise(16, 8, 0))
    with pytest.raises(ValueError, match="bases"):
        calibrate(spec(bases=("dpmpp_4m",)), den, noise(16, 8, 0))
    with pytest.raises(ValueError, match="need at least 2 of each"):
        calibrate(spec(), den, noise(5, 8, 0))


def test_the_time_budget_holds_and_the_plan_is_the_best_validated_iterate(gmm):
    """A budget far below what 100k iterations need: calibration ends within 10% of it, refinement having
    stopped early, and the plan is an iterate that was validated: its validation error, measured again,
    is the best one the figures report, not that of the last (unvalidated) step."""
    den = mixture_denoiser(gmm)
    z = noise(96, 8, 21)
    budget, said = 12.0, []
    r = calibrate(spec(iterations=100_000, validate_every=5, patience=None, bases=("dpmpp_2m",), time_budget_s=budget),
                  den, z,
                  progress=said.append)
    f = r.figures
    assert f.seconds["total"] <= 1.1 * budget, f.seconds
    assert 0 < f.iterations["dpmpp_2m"] < 100_000
    # the steps the budget leaves were projected before the work, and said: of the order of those run (the
    # probe times model calls only, so on a model this cheap the solver's own work makes the steps fewer: ~2.5x)
    steps = f.projection["steps_in_budget"]
    assert 0 < steps < 100_000 and steps / 10 <= f.iterations["dpmpp_2m"] <= 10 * steps, (steps, f.iterations)
    assert any(f"leaves about {steps} of 100000 refinement steps per start (1 starts;" in m for m in said), said
    rows = RowSplit.assign(96, spec())
    val = (rows.split == 1).nonzero()[:, 0]
    teacher = run_teacher(den, z[val], SMIN, SMAX, nfe=120, candidates=30)
    again = per_sample_rms(sample(den, z[val], method=r.plan, nfe=6, sigma_min=SMIN, sigma_max=SMAX),
                           teacher.target).mean()
    assert float(again) == pytest.approx(f.error["plan"]["validation"], rel=1e-9)
    assert f.error["robust"]["plan"]["validation"] == f.error["candidates"][f.chosen] and chosen_by_rule(f)


def test_budget_steps_share_what_is_left_equally_between_the_starts():
    """100 s budget, 40 s for the rest, 0.1 s a step: 600 steps of one start, 200 each of three, never more
    than the iterations asked for, and none when the rest alone fills the budget."""
    assert budget_steps(100, 40, 0.1, 1, 10_000) == 600
    assert budget_steps(100, 40, 0.1, 3, 10_000) == 200
    assert budget_steps(100, 40, 0.1, 3, 150) == 150
    assert budget_steps(100, 120, 0.1, 3, 300) == 0


def test_a_calibration_given_its_projections_probe_refuses_exactly_the_budgets_below_its_fixed_seconds(gmm):
    """``projected`` (a family's up-front projection) and ``calibrate`` given its probe cost the same seconds,
    bit for bit, so an entry whose share covers its fixed seconds is never refused by its own check."""
    from pipeline.samplers.calibrate import projected
    from pipeline.errors import ParameterError

    den, z = mixture_denoiser(gmm), noise(64, 8, 3)
    proj, cost = projected(spec(iterations=4), den, z)
    again, cost_again = projected(spec(iterations=4, time_budget_s=60.0), den, z, probe=proj["probe"])
    assert cost_again == cost and again["seconds"] == proj["seconds"] and cost.fixed > cost.teacher_dp > 0
    calibrate(spec(iterations=4, time_budget_s=cost.fixed), den, z, probe=proj["probe"], progress=lambda m: None)
    with pytest.raises(ParameterError, match="the final checks and nesting alone take about"):
        calibrate(spec(iterations=4, time_budget_s=cost.fixed * (1 - 1e-9)), den, z, probe=proj["probe"],
                  progress=lambda m: None)


def test_the_probe_waits_for_the_device_before_it_reads_the_clock():
    """On a GPU the kernels run after the call returns: each timed call must include the wait for them
    (here a sync that takes 50 ms, after a call that takes none), or the projection is of launches alone."""
    from pipeline.samplers.calibrate import _timed
    order = []
    seconds = _timed(lambda: order.append("call"), lambda: (order.append("sync"), time.sleep(0.05)))
    assert order == ["call", "sync"] * 4 and seconds >= 0.05
    assert _timed(lambda: None) < 0.05                       # on the CPU there is nothing to wait for


def test_without_a_budget_no_steps_are_projected_into_one(gmm):
    r = calibrate(spec(iterations=4, bases=("dpmpp_2m",)), mixture_denoiser(gmm), noise(64, 8, 3),
                  progress=lambda m: None)
    assert "steps_in_budget" not in r.figures.projection


def test_two_processes_calibrate_the_same_plan_as_one(gmm):
    """The calibrator summed over a torch.distributed group (gloo, 2 processes, each half of the rows)
    gives the plan one process gives, to float64 rounding."""
    import json as _json
    import subprocess
    import sys

    from conftest import REPO
    r = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "distributed_calibration.py")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    diff = _json.loads(r.stdout.strip().splitlines()[-1])
    assert diff["base"][0] == diff["base"][1] and max(diff["max_abs"].values()) < 1e-10, diff


def test_a_sigma_range_past_the_clamp_is_recorded_not_refused():
    """sigma_max = 1e4 (a zero-terminal-SNR model told as VE): sample() starts at the clamp (4096), so the
    plan does too and says so; before, the plan refused its own grid with a raw validation error."""
    gm = GaussianMixture(4, 4, seed=3, spread=1.0, std=(0.1, 0.4))
    den, z = mixture_denoiser(gm), noise(40, 4, 8)
    r = calibrate(spec(nfe=6, sigma_max=1e4, noise_schedule="ve", teacher_nfe=60, candidates=20, dp_samples=16,
                       iterations=10, batch_size=16), den, z, progress=lambda m: None)
    assert r.plan.sigma_max == 1e4 and r.plan.sigmas[0] == 4096.0 and r.figures.sigma_clamp == 4096.0
    out = sample(den, z, method=r.plan, nfe=6, sigma_min=SMIN, sigma_max=1e4)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not at sigma_max = 10000.0 clamped to 4096"):
        SolverPlan(nfe=4, sigma_min=SMIN, sigma_max=1e4, sigmas=(5000.0, 3.0, 0.8, 0.1, 0.0))


# ---------------------------------------------------------------- plan families
def test_a_family_finds_the_entry_that_fits_and_says_why_none_does(tmp_path):
    g2, g4 = a_plan(guidance_scale=2.0, resolution=(32, 32)), a_plan(guidance_scale=4.0, resolution=(32, 32))
    g2_64 = a_plan(guidance_scale=2.0, resolution=(64, 64))
    exact = PlanFamily.of([g2, g4, g2_64])
    assert exact.find(4, 2.0, 32, 32)[0] == g2 and exact.find(4, 2.0, 64, 64)[0] == g2_64
    entry, why = exact.find(4, 3.0, 32, 32)
    assert entry is None and "guidance_scale 2, 4" in why and "3" in why
    entry, why = exact.find(5, 2.0, 32, 32)
    assert entry is None and "nfe=5" in why
    assert exact.find(4, 2.0, 48, 48)[0] is None and exact.find(4, 2.0, 48, 48, any_size=True)[0] is not None
    nearest = PlanFamily.of([g2, g4], guidance_rule="nearest")
    assert [nearest.find(4, g, 32, 32)[0] for g in (2.5, 3.0, 3.5)] == [g2, g2, g4]
    assert nearest.find(4, 4.5, 32, 32)[0] is None and "within [2, 4]" in nearest.find(4, 4.5, 32, 32)[1]
    url = str(tmp_path / "family.json")
    assert nearest.to_json(url) == nearest.hash and PlanFamily.from_json(url) == nearest
    single = str(tmp_path / "single.json")
    g2.to_json(single)                                   # a single plan's file is a family of one
    assert PlanFamily.from_json(single).entries == (g2,)


@pytest.mark.parametrize("tamper, match", [
    (lambda d: d["entries"].append(d["entries"][0]), "same nfe, guidance scale and size"),
    (lambda d: d.update(entries=[]), "at least one entry"),
    (lambda d: d["entries"][0].update(nfe=3), "nfe \\+ 1 = 4 levels"),
    (lambda d: d["entries"][1].update(guidance_scale=9.0), "does not match its content hash"),
    (lambda d: d.update(guidance_rule="closest"), "guidance_rule"),
    (lambda d: d.update(hash="0" * 16), "content hash mismatch"),
])
def test_tampered_families_are_refused_naming_the_file(tmp_path, tamper, match):
    doc = json.loads(PlanFamily.of([a_plan(guidance_scale=2.0), a_plan(guidance_scale=4.0)]).model_dump_json())
    tamper(doc)
    url = _write(tmp_path / "f.json", doc)
    with pytest.raises(PlanError, match=match) as e:
        PlanFamily.from_json(url)
    assert url in str(e.value)
