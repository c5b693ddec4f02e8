"""Sampler interface: NFE budget, argument checks, accuracy on an exact Gaussian denoiser, per-row noise."""
import math

import pytest
import torch

from pipeline.samplers import SAMPLERS, sample
from pipeline.schedules import get_sigmas, karras

SD = 0.5  # data std of the analytic Gaussian problem


def gaussian_denoiser(x, sigma):
    """Exact denoiser of N(0, SD^2) data: E[x0 | x] = x SD^2 / (SD^2 + sigma^2)."""
    s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * SD ** 2 / (SD ** 2 + s ** 2)


def exact_solution(noise, sigma_max):
    """The probability-flow ODE from x_T = noise * sigma_max to sigma = 0, in closed form."""
    return noise * sigma_max * SD / math.sqrt(SD ** 2 + sigma_max ** 2)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
@pytest.mark.parametrize("nfe", [1, 5, 10])
def test_nfe_budget_is_respected(method, nfe):
    calls = []

    def d(x, sigma):
        calls.append(1)
        return gaussian_denoiser(x, sigma)
    sample(d, torch.randn(2, 3, dtype=torch.float64), method=method, nfe=nfe)
    assert 1 <= len(calls) <= nfe


@pytest.mark.parametrize("method", ["euler", "ddim", "dpmpp_2m"])
def test_deterministic_methods_converge_to_the_exact_ode_solution(method):
    noise = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = exact_solution(noise, 14.6146)
    errs = [float((sample(gaussian_denoiser, noise, method=method, nfe=n) - exact).abs().max()) for n in (10, 20, 40)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < errs[0] / 3  # at least first order


def test_dpmpp_2m_is_second_order_and_beats_euler():
    noise = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = exact_solution(noise, 14.6146)

    def err(method, n):
        # explicit exponential grid with final sigma_min step excluded from the comparison
        return float((sample(gaussian_denoiser, noise, method=method, nfe=n) - exact).abs().max())
    e_euler, e_2m = err("euler", 20), err("dpmpp_2m", 20)
    assert e_2m < e_euler / 5
    order = math.log2(err("dpmpp_2m", 20) / err("dpmpp_2m", 40))
    assert order > 1.5


@pytest.mark.parametrize("kwargs, field", [
    ({"method": "nope"}, "method"),
    ({"nfe": 0}, "nfe"),
    ({"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_min"),
    ({"schedule": "nope"}, "schedule"),
    ({"schedule": torch.tensor([1.0, 2.0, 0.0])}, "schedule"),
])
def test_bad_arguments_raise_a_clear_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sample(gaussian_denoiser, torch.randn(1, 2), **kwargs)


def test_explicit_grid_longer_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="nfe"):
        sample(gaussian_denoiser, torch.randn(1, 2), nfe=3, schedule=karras(6, 0.1, 10.0))


def test_grids_are_decreasing_and_end_at_zero():
    for name in ("karras", "exponential", "polyexponential"):
        s = get_sigmas(name, 7, 0.03, 14.6)
        assert len(s) == 8 and float(s[-1]) == 0.0
        assert bool((s[1:] < s[:-1]).all())
        assert math.isclose(float(s[0]), 14.6, rel_tol=1e-9) and math.isclose(float(s[-2]), 0.03, rel_tol=1e-9)


def test_stochastic_noise_is_per_row_and_independent_of_the_batch():
    """Row i's result depends only on its own generator: the same with or without other rows."""
    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(3, generator=g) for g in gens])
        return sample(gaussian_denoiser, noise, method="ddim", nfe=8, generator=gens, eta=1.0)
    together = run([11, 12, 13])
    alone = run([12])
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(run([12]), run([14]))


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m", "unipc", "heun", "lms", "dpmpp_2m_sde"])
def test_on_step_reports_each_step_k_diffusion_style(method):
    noise = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    steps = []
    out = sample(gaussian_denoiser, noise, method=method, nfe=8, on_step=steps.append,
                 generator=torch.Generator().manual_seed(2))
    assert steps and [s["i"] for s in steps] == list(range(len(steps)))
    assert all(set(s) == {"i", "sigma", "sigma_next", "x", "denoised"} for s in steps)
    assert all(float(a["sigma_next"]) == float(b["sigma"]) for a, b in zip(steps, steps[1:]))
    assert float(steps[0]["sigma"]) == pytest.approx(14.6146) and float(steps[-1]["sigma_next"]) == 0.0
    assert torch.equal(steps[-1]["x"], out)
