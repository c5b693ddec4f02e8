"""Single-step, stochastic and wrapper samplers: NFE accounting, order of convergence, per-row noise,
final-step policy, method="auto", sigma = inf starts, and equivalence with diffusers."""
import math

import pytest
import torch

from pipeline.samplers import SAMPLERS, sample
from pipeline.samplers.singlestep import lu_orders

SD = 0.5
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146
MINE = ["heun", "dpm_2", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2s_ancestral", "edm",
        "restart", "euler_hb", "dpmpp_2m_hb", "ddim_ts"]


def gaussian_denoiser(x, sigma):
    """Exact denoiser of N(0, SD^2) data."""
    s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * SD ** 2 / (SD ** 2 + s ** 2)


def exact_at(noise, sigma_to, sigma_from=SIGMA_MAX):
    """The probability-flow ODE from noise * sigma_from down to sigma_to, in closed form."""
    return noise * sigma_from * math.sqrt(SD ** 2 + sigma_to ** 2) / math.sqrt(SD ** 2 + sigma_from ** 2)


def counting(denoiser):
    calls = []

    def d(x, sigma):
        calls.append(1)
        return denoiser(x, sigma)
    return d, calls


@pytest.mark.parametrize("method", MINE)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_budget_is_respected_and_mostly_spent(method, final):
    for nfe in range(1, 13):
        d, calls = counting(gaussian_denoiser)
        try:
            out = sample(d, torch.randn(2, 3, dtype=torch.float64), method=method, nfe=nfe, final=final,
                         generator=torch.Generator().manual_seed(0))
        except ValueError as e:                          # not even one step fits: a clear error
            assert "nfe" in str(e) and nfe == 1 and final == "sigma_min" and not calls
            continue
        assert 1 <= len(calls) <= nfe and torch.isfinite(out).all()
        if method not in ("restart",):                    # restart's loop cost is lumpy (K * inner calls)
            assert len(calls) >= nfe - 1, (method, nfe, len(calls))


def test_multi_call_methods_spend_exactly_what_their_plan_says():
    assert SAMPLERS["heun"].plan(5) == (3, {})            # 2 + 2 + 1 (last step Euler)
    assert SAMPLERS["heun"].calls(3) == 5 and SAMPLERS["heun"].calls(3, ends_at_zero=False) == 6
    steps, extra = SAMPLERS["dpm_solver_3"].plan(10)      # 9 calls of DPM-Solver-fast + final denoise
    assert extra["orders"] == [3, 3, 2, 1, 1] and steps == 5
    assert lu_orders(3, 7) == [3, 3, 1] and lu_orders(3, 8) == [3, 3, 2] and lu_orders(2, 5) == [2, 2, 1]


@pytest.mark.parametrize("nfe", range(1, 26))
def test_auto_spends_its_whole_budget_and_no_more(nfe):
    d, calls = counting(gaussian_denoiser)
    sample(d, torch.randn(2, 3, dtype=torch.float64), method="auto", nfe=nfe)
    assert len(calls) == nfe


@pytest.mark.parametrize("method, order, nfes", [
    ("heun", 2, (12, 24, 48)), ("dpm_2", 2, (12, 24, 48)), ("dpm_solver_1", 1, (12, 24, 48)),
    ("dpm_solver_2", 2, (12, 24, 48)), ("dpmpp_2s", 2, (12, 24, 48)), ("edm", 2, (12, 24, 48)),
    ("dpmpp_2m_hb", 1, (12, 24, 48)), ("euler_hb", 1, (12, 24, 48)),
])
def test_measured_order_of_convergence_matches_theory(method, order, nfes):
    """Error against the exact ODE solution at sigma_min (final='sigma_min' leaves out the last jump
    to 0, whose error does not shrink with the step size)."""
    noise = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = exact_at(noise, SIGMA_MIN)
    errs = [float((sample(gaussian_denoiser, noise, method=method, nfe=n, final="sigma_min",
                          schedule="exponential") - exact).abs().max()) for n in nfes]
    measured = math.log2(errs[1] / errs[2])
    assert order - 0.3 < measured < order + 0.6, (method, errs, measured)


def test_dpm_solver_3_is_third_order():
    noise = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = exact_at(noise, SIGMA_MIN)
    errs = [float((sample(gaussian_denoiser, noise, method="dpm_solver_3", nfe=3 * k, final="sigma_min",
                          schedule="exponential", orders=[3] * k) - exact).abs().max()) for k in (8, 16, 32)]
    assert 2.6 < math.log2(errs[1] / errs[2]) < 3.6, errs


def test_heavy_ball_with_beta_one_is_the_plain_solver():
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for hb, plain in (("dpmpp_2m_hb", "dpmpp_2m"), ("euler_hb", "euler")):
        a = sample(gaussian_denoiser, noise, method=hb, nfe=9, beta=1.0)
        assert torch.allclose(a, sample(gaussian_denoiser, noise, method=plain, nfe=9), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(a, sample(gaussian_denoiser, noise, method=hb, nfe=9, beta=0.5))


def test_heavy_ball_damps_an_overshooting_guided_denoiser():
    """Under strong guidance (an over-amplified x0 prediction) momentum keeps the result smaller."""
    def guided(x, sigma):
        return 6.0 * gaussian_denoiser(x, sigma) - 5.0 * gaussian_denoiser(x, sigma * 2)
    noise = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain = sample(guided, noise, method="dpmpp_2m", nfe=6).abs().max()
    damped = sample(guided, noise, method="dpmpp_2m_hb", nfe=6, beta=0.6).abs().max()
    assert damped < plain


def test_edm_without_churn_is_heun_and_time_shift_without_window_is_ddim():
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample(gaussian_denoiser, noise, method="edm", nfe=9),
                       sample(gaussian_denoiser, noise, method="heun", nfe=9))
    assert torch.allclose(sample(gaussian_denoiser, noise, method="ddim_ts", nfe=9, window=0.0),
                          sample(gaussian_denoiser, noise, method="ddim", nfe=9), rtol=1e-12)


def test_time_shift_moves_the_level_towards_the_sample_variance():
    from pipeline.samplers.wrappers import matched_sigma
    x = 3.0 * torch.randn(2, 20000, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x[1] *= 1.02                                   # row 1 is a little noisier than its nominal level
    sigma = torch.tensor([3.0, 3.0], dtype=torch.float64)   # VP variance 9 / (1 + 9) matches sigma 3
    s = matched_sigma(x, sigma, torch.tensor(1.0), torch.tensor(10.0))
    assert abs(float(s[0]) - 3.0) < 0.3 and float(s[1]) > 1.1 * float(s[0])
    clipped = matched_sigma(x, sigma, torch.tensor(2.9), torch.tensor(3.1))
    assert float(clipped.min()) >= 2.9 and float(clipped.max()) <= 3.1


def test_restart_without_restarts_is_its_inner_solver_and_restarts_stay_in_budget():
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(sample(gaussian_denoiser, noise, method="restart", nfe=9, K=0),
                       sample(gaussian_denoiser, noise, method="heun", nfe=9))
    d, calls = counting(gaussian_denoiser)
    sample(d, noise, method="restart", nfe=20, K=2, restart_steps=2, generator=torch.Generator().manual_seed(0))
    assert 16 <= len(calls) <= 20                   # 2 restarts x 2 Heun steps x 2 calls + the main grid


@pytest.mark.parametrize("method, opts", [("edm", {"S_churn": 40.0}), ("dpmpp_2s_ancestral", {}),
                                          ("restart", {"K": 2, "t_max": 1.0})])
def test_stochastic_methods_are_reproducible_per_row_and_batch_independent(method, opts):
    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(5, generator=g, dtype=torch.float64) for g in gens])
        return sample(gaussian_denoiser, noise, method=method, nfe=16, generator=gens, **opts)
    together, alone = run([21, 22, 23]), run([22])
    assert torch.equal(together[1], alone[0])
    assert torch.equal(run([22]), alone)
    assert not torch.equal(run([24]), alone)


def test_restart_sampling_keeps_the_data_variance():
    """A restart sampler is stochastic, but its samples still follow the data distribution."""
    gens = torch.Generator().manual_seed(7)
    noise = torch.randn(4000, 2, dtype=torch.float64, generator=gens)
    out = sample(gaussian_denoiser, noise, method="restart", nfe=40, K=2, generator=gens)
    assert abs(float(out.std()) - SD) < 0.02


def test_final_sigma_min_stops_at_sigma_min_without_denoising():
    noise = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    out = sample(gaussian_denoiser, noise, method="dpmpp_2m", nfe=30, sigma_min=0.3, final="sigma_min")
    assert torch.allclose(out, exact_at(noise, 0.3), atol=2e-3)
    assert not torch.allclose(out, exact_at(noise, 0.0), atol=2e-2)
    with pytest.raises(ValueError, match="final"):
        sample(gaussian_denoiser, noise, final="last")


def test_a_flow_grid_from_infinity_takes_the_exact_limit_step():
    """From sigma = inf, x/sigma -> noise, so the exact ODE endpoint is noise * SD; Euler converges to it."""
    noise = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    errs = []
    for nfe in (4, 8, 16, 32):
        d, calls = counting(gaussian_denoiser)
        out = sample(d, noise, method="euler", nfe=nfe, sigma_min=0.01, sigma_max=math.inf, schedule="flow",
                     schedule_options={"shift": 3.0})
        assert len(calls) == nfe
        errs.append(float((out - noise * SD).abs().max()))
    assert all(1.8 < errs[i] / errs[i + 1] < 2.2 for i in range(3)), errs


def test_euler_on_a_flow_grid_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline.denoisers import Flow, adapt
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(6)

    def velocity(x_flow, t, cond=None):               # exact flow velocity of N(0, SD^2) data
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1).clamp(max=1 - 1e-12)
        x = x_flow / (1 - t)
        return (x_flow - gaussian_denoiser(x, t / (1 - t))) / t
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    x = noise.clone()
    for t in sch.timesteps:
        x = sch.step(velocity(x, t / 1000), t, x).prev_sample
    t_last = float(sch.sigmas[-2])
    model = adapt(velocity, Flow(shift=3.0), "flow")
    ours = sample(lambda x, s: model(x, s, None), noise, method="euler", nfe=6, sigma_max=math.inf,
                  sigma_min=t_last / (1 - t_last), schedule="flow", schedule_options={"shift": 3.0})
    assert torch.allclose(ours, x.to(torch.float64), rtol=1e-5, atol=1e-6)


def test_heun_matches_diffusers_heun_on_the_same_grid():
    from diffusers import HeunDiscreteScheduler

    from pipeline.denoisers import VPDiscrete, adapt
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sch = HeunDiscreteScheduler(**cfg, use_karras_sigmas=True)
    sch.set_timesteps(5)
    vp = VPDiscrete(sch.alphas_cumprod.to(torch.float64))

    def eps_net(x_vp, t, cond=None):
        sigma = vp.sigma(torch.as_tensor(t, dtype=torch.float64).reshape(-1)).reshape(-1, 1)
        x = x_vp * (1 + sigma ** 2).sqrt()
        return (x - gaussian_denoiser(x, sigma)) / sigma
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(eps_net(sch.scale_model_input(x, t), t), t, x).prev_sample
    grid = torch.unique_consecutive(sch.sigmas.to(torch.float64))
    model = adapt(eps_net, vp, "epsilon")
    ours = sample(lambda x, s: model(x, s, None), noise * sch.init_noise_sigma / grid[0], method="heun",
                  nfe=len(sch.timesteps), schedule=grid)
    assert torch.allclose(ours, x.to(torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    ({"method": "dpm_solver_3", "orders": [3, 4]}, "orders"),
    ({"method": "restart", "inner": "dpm_solver_3"}, "inner"),
    ({"method": "euler_hb", "beta": 0.0}, "beta"),
    ({"method": "heun", "nfe": 3, "schedule": torch.tensor([10.0, 5.0, 1.0, 0.0])}, "nfe"),
])
def test_bad_method_options_raise_value_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sample(gaussian_denoiser, torch.randn(1, 2, dtype=torch.float64), **{"nfe": 10, **kwargs})


def test_time_shifted_sampler_is_per_row():
    noise = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    together = sample(gaussian_denoiser, noise, method="ddim_ts", nfe=8)
    alone = sample(gaussian_denoiser, noise[1:2], method="ddim_ts", nfe=8)
    assert torch.equal(together[1:2], alone)
    assert not torch.allclose(together, sample(gaussian_denoiser, noise, method="ddim", nfe=8))
