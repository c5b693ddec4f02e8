"""Adapters (eps / x0 / v / flow on VP, VE and rectified-flow schedules) and guidance wrappers."""
import pytest
import torch

from pipeline.denoisers import (Flow, NoiseSchedule, VPContinuous, VPDiscrete, adapt, cfg,
                                schedule_from_diffusers_config)

SD_ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)


def oracle_nets(schedule, x0, eps, sigma):
    """Networks that return the exact target of each prediction type."""
    shape = (-1, 1)
    a = schedule.c_in(sigma).reshape(shape)
    s = a * sigma.reshape(shape)
    return {"epsilon": lambda xn, t, c: eps, "sample": lambda xn, t, c: x0,
            "v_prediction": lambda xn, t, c: a * eps - s * x0, "flow": lambda xn, t, c: eps - x0}


@pytest.mark.parametrize("schedule", [VPDiscrete(SD_ALPHAS), VPContinuous(), Flow(shift=3.0), NoiseSchedule()],
                         ids=lambda s: s.kind)
def test_adapters_recover_x0_from_exact_predictions(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    preds = {"flow": ("epsilon", "sample", "flow"), "ve": ("epsilon", "sample")}.get(
        schedule.kind, ("epsilon", "sample", "v_prediction"))
    for pred in preds:
        net = oracle_nets(schedule, x0, eps, sigma)[pred]
        out = adapt(net, schedule, pred)(x0 + sigma[:, None] * eps, sigma, None)
        assert torch.allclose(out, x0, atol=1e-10), pred


def test_vp_discrete_time_matches_training_indices():
    s = VPDiscrete(SD_ALPHAS)
    idx = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(s.t(s.sigmas[idx]), idx.to(torch.float64), atol=1e-6)
    assert abs(s.sigma_min - 0.0292) < 1e-3 and abs(s.sigma_max - 14.6146) < 1e-3


def test_vp_continuous_time_inverts_sigma():
    s = VPContinuous()
    t = torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(s.t(s.sigma_of_t(t)), t, atol=1e-9)


def test_schedule_from_diffusers_configs():
    sch, pred = schedule_from_diffusers_config({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                                                "beta_start": 0.00085, "beta_end": 0.012,
                                                "prediction_type": "v_prediction"})
    assert isinstance(sch, VPDiscrete) and pred == "v_prediction"
    assert torch.allclose(sch.sigmas, ((1 - SD_ALPHAS) / SD_ALPHAS).sqrt())
    sch, pred = schedule_from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert isinstance(sch, Flow) and pred == "flow" and sch.shift == 3.0
    with pytest.raises(ValueError, match="beta_schedule"):
        schedule_from_diffusers_config({"beta_schedule": "weird"})


def test_cfg_is_one_batched_call_with_per_row_scale():
    calls = []

    def model_fn(x, sigma, cond):
        calls.append(x.shape[0])
        return cond[:, None].to(x.dtype).expand_as(x)          # "prediction" = the label value
    d = cfg(model_fn, torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]))
    out = d(torch.zeros(2, 4), torch.ones(2))
    assert calls == [4]
    assert torch.allclose(out[0], torch.full((4,), 2.0)) and torch.allclose(out[1], torch.full((4,), 4.0))


# ---------------------------------------------------------------- guidance options
def _linear_model(x, sigma, cond):
    """A toy model whose prediction is the input scaled by the label: cond rows differ from uncond rows."""
    return x * cond[:, None].to(x.dtype)


def test_guidance_rescale_matches_the_conditional_std_per_row():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond, uncond = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.2, 0.2, 0.2])
    sigma = torch.ones(3, dtype=torch.float64)
    plain = cfg(_linear_model, cond, uncond, torch.tensor([5.0, 5.0, 5.0]))(x, sigma)
    full = cfg(_linear_model, cond, uncond, torch.tensor([5.0, 5.0, 5.0]), rescale=1.0)(x, sigma)
    half = cfg(_linear_model, cond, uncond, torch.tensor([5.0, 5.0, 5.0]), rescale=0.5)(x, sigma)
    c = _linear_model(x, sigma, cond)
    assert torch.allclose(full.std(dim=1), c.std(dim=1), rtol=1e-10)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, rtol=1e-10)
    assert torch.equal(cfg(_linear_model, cond, uncond, 5.0, rescale=0.0)(x, sigma), plain)


def test_guidance_interval_guides_only_inside_the_interval():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond, uncond = torch.full((4,), 2.0), torch.full((4,), 1.0)
    sigma = torch.tensor([0.1, 0.5, 2.0, 9.0], dtype=torch.float64)
    out = cfg(_linear_model, cond, uncond, 3.0, interval=(0.3, 5.0))(x, sigma)
    guided = cfg(_linear_model, cond, uncond, 3.0)(x, sigma)
    c = _linear_model(x, sigma, cond)
    assert torch.equal(out[[0, 3]], c[[0, 3]]) and torch.equal(out[[1, 2]], guided[[1, 2]])
    with pytest.raises(ValueError, match="interval"):
        cfg(_linear_model, cond, uncond, 3.0, interval=(5.0, 0.3))


def test_dynamic_thresholding_clips_to_the_percentile_and_rescales():
    from pipeline.denoisers import dynamic_threshold
    x0 = torch.stack([torch.linspace(-4, 4, 1001, dtype=torch.float64), torch.linspace(-0.5, 0.5, 1001,
                                                                                        dtype=torch.float64)])
    out = dynamic_threshold(x0, 0.9)
    assert float(out[0].abs().max()) == pytest.approx(1.0) and abs(float(out[0, 500])) < 1e-12
    assert torch.allclose(out[0, 450:551], x0[0, 450:551] / 3.6, rtol=1e-3)     # inside: divided by s = q90(|x|)
    assert torch.equal(out[1], x0[1])                                           # s clamps at 1: untouched
    with pytest.raises(ValueError, match="threshold"):
        dynamic_threshold(x0, 1.5)


def test_guidance_options_are_per_row_deterministic():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    cond, uncond, scale = torch.tensor([1.5, 2.0, 3.0]), torch.tensor([0.5, 0.4, 0.3]), torch.tensor([4.0, 6.0, 8.0])
    sigma = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    opts = {"rescale": 0.7, "interval": (0.5, 2.0), "threshold": 0.95}
    together = cfg(_linear_model, cond, uncond, scale, **opts)(x, sigma)
    alone = cfg(_linear_model, cond[1:2], uncond[1:2], scale[1:2], **opts)(x[1:2], sigma[1:2])
    assert torch.equal(together[1:2], alone)


def test_vp_discrete_sigma_inverts_t_and_zero_snr_is_clamped():
    s = VPDiscrete(SD_ALPHAS)
    t = torch.tensor([0.0, 3.25, 500.5, 999.0], dtype=torch.float64)
    assert torch.allclose(s.t(s.sigma(t)), t, atol=1e-6)
    zsnr = SD_ALPHAS.clone()
    zsnr[-1] = 0.0
    assert s.sigma_max < VPDiscrete(zsnr).sigma_max == pytest.approx(4096.0, rel=1e-6)


def test_v_prediction_adapter_recovers_x0_on_a_zero_terminal_snr_schedule():
    sch, pred = schedule_from_diffusers_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                "beta_end": 0.012, "rescale_betas_zero_snr": True,
                                                "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([sch.sigma_max, 1.0], dtype=torch.float64)
    net = oracle_nets(sch, x0, eps, sigma)["v_prediction"]
    out = adapt(net, sch, pred)(x0 + sigma[:, None] * eps, sigma, None)
    assert torch.allclose(out, x0, atol=1e-8)


def test_guidance_interval_spends_one_model_row_where_no_row_is_guided():
    """Outside the interval a call runs the conditional half alone (B model rows, not 2B), and a row's
    result is the same whether its call took the one-row path or the two-row one (batch-independent)."""
    rows = []

    def model_fn(x, sigma, cond):
        rows.append(x.shape[0])
        return _linear_model(x, sigma, cond) + 0.1 * sigma[:, None].to(x.dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    cond, uncond, scale = torch.tensor([2.0, 1.5, 3.0]), torch.tensor([1.0, 0.5, 0.2]), torch.tensor([4.0, 2.0, 6.0])
    opts = {"interval": (0.3, 5.0), "rescale": 0.5, "threshold": 0.9}
    den = cfg(model_fn, cond, uncond, scale, **opts)
    high = den(x, torch.full((3,), 9.0, dtype=torch.float64))
    low = den(x, torch.full((3,), 0.1, dtype=torch.float64))
    mid = den(x, torch.full((3,), 1.0, dtype=torch.float64))
    assert rows == [3, 3, 6]
    from pipeline.denoisers import dynamic_threshold
    assert torch.equal(high, dynamic_threshold(model_fn(x, torch.full((3,), 9.0, dtype=torch.float64), cond), 0.9))
    mixed = den(x, torch.tensor([9.0, 1.0, 0.1], dtype=torch.float64))        # two-row path, rows 0 and 2 outside
    assert rows[-1] == 6
    assert torch.equal(mixed[0], high[0]) and torch.equal(mixed[2], low[2]) and torch.equal(mixed[1], mid[1])
    plain = cfg(model_fn, cond, uncond, scale, rescale=0.5, threshold=0.9)(x, torch.full((3,), 1.0, dtype=torch.float64))
    assert torch.equal(mid, plain)                                             # inside: ordinary guidance


def test_feature_cache_runs_the_full_network_every_interval_and_when_the_row_count_changes():
    from pipeline.denoisers import FeatureCache, active_feature_cache, feature_cached
    seen = []

    def model_fn(x, sigma, cond):
        cache = active_feature_cache()
        return cache.run(x.shape[0], lambda: (seen.append("full") or x, x * 2), lambda deep: seen.append("shallow") or deep)
    fn = feature_cached(model_fn, 3)
    x = torch.ones(2, 3)
    outs = [fn(x, torch.ones(2), None) for _ in range(5)]
    assert seen == ["full", "shallow", "shallow", "full", "shallow"]
    assert torch.equal(outs[1], x * 2) and active_feature_cache() is None      # only active during a call
    fn(torch.ones(4, 3), torch.ones(4), None)                                  # other row count: full again
    assert seen[-1] == "full" and (fn.cache.full_calls, fn.cache.shallow_calls) == (3, 3)
    assert feature_cached(model_fn, 3).cache is not fn.cache                   # one per sampling run
    with pytest.raises(ValueError, match="interval"):
        FeatureCache(0)
