"""Sigma grids: shape, order, published tables, flow shift, zero terminal SNR, equivalence with diffusers."""
import math

import numpy as np
import pytest
import torch

from pipeline.denoisers import VPDiscrete, schedule_from_diffusers_config
from pipeline.schedules import (GRIDS, SIGMA_INF_CLAMP, flow, flow_shift_for_resolution, get_sigmas,
                                rescale_zero_terminal_snr)

SD_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
SD = VPDiscrete(torch.cumprod(1 - SD_BETAS, 0))
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
# diffusers keeps alphas_cumprod in float32: a cumulative product of 1000 float32 factors is off by up to
# ~1000 ulp (6e-5 relative), and sigma = sqrt((1 - a) / a) amplifies that near a = 1 (sigma_min), so
# float64 values are compared with float32-derived ones at a relative 2e-4, whatever the CPU's rounding.
F32_SCHEDULE_RTOL = 2e-4


@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("n", [1, 2, 5, 10, 23])
def test_every_grid_is_decreasing_float64_ends_at_zero_with_n_steps(name, n):
    s = get_sigmas(name, n, SD.sigma_min, SD.sigma_max, model_schedule=SD)
    assert s.dtype == torch.float64 and s.ndim == 1 and len(s) == n + 1
    assert float(s[-1]) == 0.0 and bool((s[1:] < s[:-1]).all())
    assert bool(torch.isfinite(s).all())


@pytest.mark.parametrize("name", ["karras", "exponential", "polyexponential", "kl_optimal", "beta", "sgm_uniform",
                                  "flow"])
def test_sigma_range_grids_start_at_sigma_max(name):
    s = get_sigmas(name, 8, 0.03, 14.6, model_schedule=SD)
    assert math.isclose(float(s[0]), 14.6, rel_tol=1e-6)
    if name != "sgm_uniform":                      # sgm_uniform drops its last point (t_min) by design
        assert math.isclose(float(s[-2]), 0.03, rel_tol=1e-6)


def test_ays_reproduces_the_published_table_at_ten_steps_and_interpolates_log_linearly():
    """The 10-step tables against diffusers' copy of NVIDIA's published ones (an independent source)."""
    from diffusers.schedulers import AysSchedules
    published = {"ays_sd15": "StableDiffusionSigmas", "ays_sdxl": "StableDiffusionXLSigmas",
                 "ays_svd": "StableDiffusionVideoSigmas"}
    for name, theirs in published.items():
        s = get_sigmas(name, 10, 0.03, 14.6)
        assert torch.allclose(s, torch.tensor(AysSchedules[theirs], dtype=torch.float64), rtol=1e-12), name
        # 20 steps: every other level of the interpolated grid is the published one (log-linear)
        s20 = get_sigmas(name, 20, 0.03, 14.6)
        assert torch.allclose(s20[0:-1:2], s[:-1], rtol=1e-12)
        mid = (math.log(float(s[0])) + math.log(float(s[1]))) / 2
        assert math.isclose(math.log(float(s20[1])), mid, rel_tol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_shift_maps_t_as_published(shift):
    sigma_min, sigma_max = 0.01, 50.0
    s = flow(7, sigma_min, sigma_max, shift=shift)[:-1]
    t_shifted = s / (1 + s)
    # the unshifted t is uniform between the unshifted ends; shifting maps t -> shift t / (1 + (shift - 1) t)
    t_hi, t_lo = (x / shift / (1 + x / shift) for x in (sigma_max, sigma_min))
    t = torch.linspace(t_hi, t_lo, 7, dtype=torch.float64)
    assert torch.allclose(t_shifted, shift * t / (1 + (shift - 1) * t), rtol=1e-12)


def test_resolution_dependent_shift_follows_sequence_length():
    assert math.isclose(flow_shift_for_resolution(256), math.exp(0.5))
    assert math.isclose(flow_shift_for_resolution(4096), math.exp(1.15))
    assert flow_shift_for_resolution(1024) < flow_shift_for_resolution(4096)
    a = get_sigmas("flow", 6, 0.01, 100.0, image_seq_len=1024)
    b = get_sigmas("flow", 6, 0.01, 100.0, shift=flow_shift_for_resolution(1024))
    assert torch.equal(a, b)


def test_flow_grid_from_infinity_starts_at_inf():
    s = get_sigmas("flow", 5, 0.01, math.inf, shift=3.0)
    assert math.isinf(float(s[0])) and bool(torch.isfinite(s[1:]).all()) and float(s[-1]) == 0.0


def test_flow_grid_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(8)
    t = sch.sigmas.to(torch.float64)
    t_min_unshifted = float(t[-2]) / (3 - 2 * float(t[-2]))       # invert the shift on the last level
    ours = flow(8, t_min_unshifted * 3 / (1 - t_min_unshifted), math.inf, shift=3.0)
    ours_t = ours / (1 + ours)
    ours_t[0] = 1.0
    assert torch.allclose(ours_t, t, rtol=1e-6, atol=1e-6)      # diffusers: float32 t in [0, 1] (ulp 6e-8)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timestep_spacings_match_diffusers(spacing):
    from diffusers import DPMSolverMultistepScheduler
    sch = DPMSolverMultistepScheduler(**SD_CONFIG, timestep_spacing=spacing)
    for n in (4, 10, 25):
        sch.set_timesteps(n)
        ours = get_sigmas(spacing, n, SD.sigma_min, SD.sigma_max, model_schedule=SD)
        assert torch.allclose(ours, sch.sigmas.to(torch.float64), rtol=F32_SCHEDULE_RTOL), (spacing, n)


@pytest.mark.parametrize("flag, name", [("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
                                        ("use_beta_sigmas", "beta")])
def test_sigma_space_grids_match_diffusers(flag, name):
    from diffusers import DPMSolverMultistepScheduler
    sch = DPMSolverMultistepScheduler(**SD_CONFIG, **{flag: True})
    sch.set_timesteps(12)
    ours = get_sigmas(name, 12, SD.sigma_min, SD.sigma_max)
    assert torch.allclose(ours, sch.sigmas.to(torch.float64), rtol=F32_SCHEDULE_RTOL)


def test_zero_terminal_snr_rescale_matches_diffusers_and_clamps_sigma_max():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale
    betas = rescale_zero_terminal_snr(SD_BETAS)
    # diffusers' function is dtype-generic: compare in float64, where rounding cannot differ by machine
    torch.testing.assert_close(betas, diffusers_rescale(SD_BETAS.clone()), rtol=1e-10, atol=1e-14)
    ac = torch.cumprod(1 - betas, 0)
    assert float(ac[-1]) < 1e-12 and math.isclose(float(ac[0]), float(1 - SD_BETAS[0]), rel_tol=1e-9)
    sch, pred = schedule_from_diffusers_config({**SD_CONFIG, "rescale_betas_zero_snr": True,
                                                "prediction_type": "v_prediction"})
    assert math.isclose(sch.sigma_max, SIGMA_INF_CLAMP, rel_tol=1e-6) and pred == "v_prediction"
    s = get_sigmas("trailing", 10, sch.sigma_min, sch.sigma_max, model_schedule=sch)
    assert math.isclose(float(s[0]), SIGMA_INF_CLAMP, rel_tol=1e-6)


def test_an_infinite_sigma_max_is_clamped_for_sigma_space_grids():
    s = get_sigmas("karras", 5, 0.03, math.inf)
    assert math.isclose(float(s[0]), SIGMA_INF_CLAMP)


@pytest.mark.parametrize("call, field", [
    (lambda: get_sigmas("nope", 5, 0.1, 10.0), "schedule"),
    (lambda: get_sigmas("karras", 0, 0.1, 10.0), "n"),
    (lambda: get_sigmas("karras", 5, 10.0, 0.1), "sigma_min"),
    (lambda: get_sigmas("trailing", 5, 0.1, 10.0), "model_schedule"),
    (lambda: get_sigmas("karras", 5, 0.1, 10.0, shift=3.0), "schedule options"),
    (lambda: get_sigmas("flow", 5, 0.1, 10.0, shift=-1.0), "shift"),
    (lambda: get_sigmas(torch.tensor([1.0, 1.0, 0.0]), 2, 0.1, 10.0), "schedule"),
    (lambda: get_sigmas(torch.tensor([[3.0, 2.0], [1.0, 0.5]]), 2, 0.1, 10.0), "schedule"),
    (lambda: flow_shift_for_resolution(0), "image_seq_len"),
])
def test_bad_grid_arguments_raise_value_errors_naming_the_argument(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_unknown_grid_error_lists_the_allowed_names():
    with pytest.raises(ValueError) as e:
        get_sigmas("nope", 5, 0.1, 10.0)
    for name in ("karras", "ays_sdxl", "kl_optimal", "trailing"):
        assert name in str(e.value)


def test_explicit_grid_gets_a_trailing_zero():
    s = get_sigmas(torch.tensor([5.0, 1.0, 0.2], dtype=torch.float64), 0, 0.1, 10.0)
    assert s.tolist() == [5.0, 1.0, 0.2, 0.0]
    assert np.isclose(float(get_sigmas(torch.tensor([5.0, 0.0]), 0, 0.1, 10.0)[0]), 5.0)
