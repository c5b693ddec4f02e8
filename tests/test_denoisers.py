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
