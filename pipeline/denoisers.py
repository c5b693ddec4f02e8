"""Denoiser wrappers: guidance and friends wrap a ``denoiser(x, sigma) -> x0_hat``.

Model-type adapters (eps/v/flow prediction, VP schedules) belong here too, so samplers
never branch on what a model predicts.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, or dicts / tuples of tensors."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def conditioned(model_fn: ModelFn, cond: Any) -> Denoiser:
    """A plain conditional denoiser (no guidance)."""
    return lambda x, sigma: model_fn(x, sigma, cond)


def cfg(model_fn: ModelFn, cond: Any, uncond: Any, scale: torch.Tensor) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + s (c - u)`` with a per-row scale.

    Conditional and unconditional halves run as one batched call. Both halves are always
    computed, even where a row's scale is 1, so a row's result never depends on its batch.
    """
    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(cond, uncond))
        c, u = out.chunk(2)
        s = scale.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return u + s * (c - u)
    return denoiser


# ---------------------------------------------------------------- model-type adapters
class NoiseSchedule:
    """How a network's own time variable and input scaling relate to EDM's sigma.

    ``t(sigma)`` is the network's time input, ``c_in(sigma)`` scales ``x`` (EDM variables)
    to the network's input space, and ``alpha(sigma)`` / ``sigma_net(sigma)`` are the signal
    and noise coefficients there (``x_net = alpha x0 + sigma_net eps``).
    """
    kind = "ve"

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    @property
    def sigma_min(self) -> float:
        return 0.002

    @property
    def sigma_max(self) -> float:
        return 80.0


class VPDiscrete(NoiseSchedule):
    """DDPM-style discrete VP schedule from ``alphas_cumprod``: sigma_i = sqrt((1 - a_i) / a_i).

    The time input is the fractional training index found by linear interpolation in
    log-sigma (k-diffusion's ``DiscreteSchedule.sigma_to_t``; diffusers does the same).
    """
    kind = "vp_discrete"

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        ls = sigma.to(torch.float64).clamp(min=1e-10).log()
        idx = torch.searchsorted(self.log_sigmas.to(ls.device), ls).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas.to(ls.device)[idx - 1], self.log_sigmas.to(ls.device)[idx]
        w = ((ls - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).to(sigma.dtype)

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma ** 2 + 1).sqrt()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


class VPContinuous(NoiseSchedule):
    """Continuous VP (Song et al. 2021, linear beta): t in [eps, 1], log alpha = -b_d t^2/4 - b_min t/2."""
    kind = "vp_continuous"

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, eps_t: float = 1e-3):
        self.beta_min, self.beta_d, self.eps_t = beta_min, beta_d, eps_t

    def sigma_of_t(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(torch.float64)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + s ** 2).log()).sqrt() - self.beta_min).div(self.beta_d).to(sigma.dtype)

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma ** 2 + 1).sqrt()

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_of_t(self.eps_t))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_of_t(1.0))


class Flow(NoiseSchedule):
    """Rectified flow: ``x_t = (1 - t) x0 + t eps``, so ``sigma = t / (1 - t)``, ``t = sigma / (1 + sigma)``.

    ``shift`` (SD3/Flux "flow shift") maps t to ``shift t / (1 + (shift - 1) t)``, i.e. sigma to
    ``shift * sigma``: it only moves the sampling grid, so it is applied to sigma_min/max here.
    """
    kind = "flow"

    def __init__(self, shift: float = 1.0, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        self.shift, self.t_min, self.t_max = shift, t_min, t_max

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma / (1 + sigma)

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + sigma)

    @property
    def sigma_min(self) -> float:
        return self.shift * self.t_min / (1 - self.t_min)

    @property
    def sigma_max(self) -> float:
        return self.shift * self.t_max / (1 - self.t_max)


PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")


def adapt(net: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], schedule: NoiseSchedule,
          prediction: str) -> ModelFn:
    """Turn ``net(x_net, t, cond)`` predicting eps / x0 / v / flow velocity into an EDM denoiser.

    With ``a = alpha(sigma)`` and ``s = sigma_net(sigma)`` in the network's space
    (VP: a = 1/sqrt(1+sigma^2), s = a sigma; flow: a = 1 - t, s = t; VE: a = 1, s = sigma):
    eps -> x0 = (x_net - s eps) / a; v -> x0 = a x_net - s v (VP only, a^2 + s^2 = 1);
    flow velocity v = eps - x0 -> x0 = x_net - t v.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: unknown prediction type {prediction!r}; allowed: {PREDICTIONS}")

    def model_fn(x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        c_in = schedule.c_in(sigma).to(x.dtype).reshape(shape)
        a, s = c_in, (sigma.to(x.dtype).reshape(shape) * c_in)     # alpha and sigma in net space
        x_net = x * c_in
        out = net(x_net, schedule.t(sigma), cond).to(x.dtype)
        if prediction == "epsilon":
            return (x_net - s * out) / a
        if prediction == "sample":
            return out
        if prediction == "v_prediction":
            return a * x_net - s * out
        return x_net - s * out            # flow: s = t in net space
    return model_fn


def schedule_from_diffusers_config(config: dict) -> tuple[NoiseSchedule, str]:
    """(schedule, prediction type) from a diffusers scheduler config (``scheduler_config.json``)."""
    cls = config.get("_class_name", "")
    if "FlowMatch" in cls or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return Flow(shift=float(config.get("shift", config.get("flow_shift", 1.0)) or 1.0)), "flow"
    n = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: torch.cos(torch.as_tensor((t + 0.008) / 1.008 * torch.pi / 2, dtype=torch.float64)) ** 2  # noqa: E731
        i = torch.arange(n, dtype=torch.float64)
        betas = (1 - f((i + 1) / n) / f(i / n)).clamp(max=0.999)
    else:
        raise ValueError(f"scheduler config: unsupported beta_schedule {kind!r}")
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler config: rescale_betas_zero_snr needs the zero-terminal-SNR grid handling")
    return VPDiscrete(alphas_cumprod), config.get("prediction_type", "epsilon")
