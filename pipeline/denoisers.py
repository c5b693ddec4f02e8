"""Denoiser wrappers: guidance and friends wrap a ``denoiser(x, sigma) -> x0_hat``.

Model-type adapters (eps/v/flow prediction, VP schedules) belong here too, so samplers
never branch on what a model predicts.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable

import torch

from .errors import ParameterError
from .schedules import rescale_zero_terminal_snr

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cat_cond(*conds: Any) -> Any:
    """Concatenate conditionings along the batch: tensors, or dicts / tuples of tensors."""
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(conds)
    if isinstance(first, dict):
        return {k: cat_cond(*(c[k] for c in conds)) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(cat_cond(*parts) for parts in zip(*conds))
    raise TypeError(f"cannot batch conditioning of type {type(first).__name__}")


def take_cond(cond: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a conditioning: tensors, or dicts / tuples of tensors (``None`` stays)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx.to(cond.device)]
    if isinstance(cond, dict):
        return {k: take_cond(v, idx) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(take_cond(v, idx) for v in cond)
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}")


def conditioned(model_fn: ModelFn, cond: Any) -> Denoiser:
    """A plain conditional denoiser (no guidance)."""
    return lambda x, sigma: model_fn(x, sigma, cond)


def _rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-row value ``[B]`` (or a scalar) to broadcast against ``x``."""
    return torch.as_tensor(v).to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _row_std(x: torch.Tensor) -> torch.Tensor:
    """Per-row std, one row at a time: a batched reduction's result can depend on the batch size."""
    return torch.stack([row.std() for row in x.flatten(1)]).reshape(-1, *([1] * (x.ndim - 1)))


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed", eq. 15-16): match each row's std of the guided prediction to the conditional one,
    ``x = phi * guided * std(cond) / std(guided) + (1 - phi) * guided`` (here on the x0 prediction)."""
    if phi == 0:
        return guided
    return phi * guided * (_row_std(cond) / _row_std(guided).clamp(min=1e-12)) + (1 - phi) * guided


def dynamic_threshold(x0: torch.Tensor, percentile: float, max_value: float | None = None) -> torch.Tensor:
    """Dynamic thresholding, Saharia et al. 2022 (Imagen), sec. 2.3: per row, ``s`` = the
    ``percentile`` quantile of |x0| (at least 1, at most ``max_value``); clip x0 to [-s, s] and
    divide by s. Pixels are assumed to live in [-1, 1]."""
    if not 0 < percentile <= 1:
        raise ParameterError("threshold", f"percentile must be in (0, 1], got {percentile}")
    s = torch.stack([torch.quantile(row.abs().float(), percentile) for row in x0.flatten(1)])
    s = s.to(x0.dtype).clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def cfg(model_fn: ModelFn, cond: Any, uncond: Any, scale: torch.Tensor | float, *,
        rescale: float = 0.0, interval: tuple[float, float] | None = None,
        threshold: float | None = None, threshold_max: float | None = None) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + s (c - u)`` with a per-row scale.

    Conditional and unconditional halves run as one batched call, even where a row's scale is 1,
    so a row's result never depends on its batch. Options (all per-row deterministic):

    - ``rescale=phi``: guidance rescale (Lin et al. 2024), see ``rescale_guidance``.
    - ``interval=(lo, hi)``: guidance only where lo <= sigma <= hi, the conditional
      prediction elsewhere (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
      Improves Sample and Distribution Quality in Diffusion Models"). A call where no row's sigma is
      inside (a micro-batch shares its sigma at each step) runs the conditional half alone: one model
      row per image instead of two. A row outside the interval gets the conditional prediction itself
      on either path, so its result does not depend on the other rows of its call. Deciding reads sigma
      on the host: one synchronisation per call where sigma lives on a GPU, with an interval only.
    - ``threshold=p`` (and ``threshold_max``): dynamic thresholding of x0 (Saharia et al. 2022).
    """
    if interval is not None and not (len(interval) == 2 and 0 <= interval[0] <= interval[1]):
        raise ParameterError("interval", f"expected (lo, hi) with 0 <= lo <= hi, got {interval!r}")
    if not 0 <= rescale <= 1:
        raise ParameterError("rescale", f"phi must be in [0, 1], got {rescale}")

    def finish(x0: torch.Tensor) -> torch.Tensor:
        return x0 if threshold is None else dynamic_threshold(x0, threshold, threshold_max)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        inside = None if interval is None else (sigma >= interval[0]) & (sigma <= interval[1])
        if inside is not None and not bool(inside.any()):
            return finish(model_fn(x, sigma, cond))              # unguided everywhere: one model row
        out = model_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(cond, uncond))
        c, u = out.chunk(2)
        s = _rows(scale, x).expand(x.shape[0], *([1] * (x.ndim - 1)))
        x0 = rescale_guidance(u + s * (c - u), c, rescale)
        if inside is not None:
            x0 = torch.where(_rows(inside, x).bool(), x0, c)
        return finish(x0)
    return denoiser


# ---------------------------------------------------------------- feature caching
class FeatureCache:
    """DeepCache (Ma, Fang & Wang 2024, "DeepCache: Accelerating Diffusion Models for Free", uniform
    1:N strategy): over one sampling run, the network's deep branch runs at every ``interval``-th model
    call; the calls between reuse its output (the deep feature) and run only the shallow branch.

    Which calls are full depends only on the call's index and its row count (a different count, e.g.
    where a guidance interval switches between one and two model rows per image, starts again with a
    full call), never on values, and each row's feature is its own: a row's result does not depend on
    its batch. One per sampling run (a micro-batch): see ``feature_cached``.
    """

    def __init__(self, interval: int):
        if interval < 1:
            raise ParameterError("interval", f"feature cache interval must be >= 1, got {interval}")
        self.interval, self.age, self.feature = interval, 0, None
        self.full_calls = self.shallow_calls = 0

    def run(self, rows: int, full: Callable[[], tuple[Any, torch.Tensor]],
            shallow: Callable[[torch.Tensor], Any]) -> Any:
        """One model call of ``rows`` rows: ``full()`` returns (output, deep feature), ``shallow(feature)``
        the output from the kept feature."""
        if self.feature is None or self.feature.shape[0] != rows or self.age >= self.interval:
            out, feature = full()
            # a copy: a network compiled with CUDA graphs reuses its outputs' memory at its next replay
            self.feature, self.age, self.full_calls = feature.clone(), 0, self.full_calls + 1
        else:
            out = shallow(self.feature)
            self.shallow_calls += 1
        self.age += 1
        return out


_ACTIVE_CACHE: ContextVar[FeatureCache | None] = ContextVar("feature_cache", default=None)


def active_feature_cache() -> FeatureCache | None:
    """The feature cache of the model call in progress (``feature_cached``), or None: the plain network."""
    return _ACTIVE_CACHE.get()


def feature_cached(model_fn: ModelFn, interval: int) -> ModelFn:
    """``model_fn`` with a fresh ``FeatureCache`` active during each of its calls, for a model whose network
    has a deep/shallow split (it reads ``active_feature_cache()``); wrappers around ``model_fn`` (guidance,
    heartbeats, fault drills) stay as they are. ``.cache`` is the cache, for counting calls."""
    cache = FeatureCache(interval)

    def fn(x: torch.Tensor, sigma: torch.Tensor, c: Any) -> torch.Tensor:
        token = _ACTIVE_CACHE.set(cache)
        try:
            return model_fn(x, sigma, c)
        finally:
            _ACTIVE_CACHE.reset(token)
    fn.cache = cache
    return fn


# ---------------------------------------------------------------- model-type adapters
class NoiseSchedule:
    """How a network's own time variable and input scaling relate to EDM's sigma.

    ``t(sigma)`` is the network's time input and ``c_in(sigma)`` scales ``x`` (EDM variables) to
    the network's input space, where the signal and noise coefficients are ``a = c_in(sigma)`` and
    ``s = sigma c_in(sigma)`` (``x_net = a x0 + s eps``); ``sigma(t)`` inverts ``t``.
    """
    kind = "ve"

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of ``t``: the noise level at the network's time ``t``."""
        return torch.as_tensor(t, dtype=torch.float64)

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
    A zero-terminal-SNR schedule (last ``alphas_cumprod`` = 0, Lin et al. 2024) has an
    infinite last sigma: like diffusers, the last ``alphas_cumprod`` is clamped to 2^-24,
    i.e. sigma_max = 4096 (``pipeline.schedules.SIGMA_INF_CLAMP``).
    """
    kind = "vp_discrete"

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clone()
        ac[-1] = ac[-1].clamp(min=2.0 ** -24)
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a fractional training index: linear interpolation in log-sigma."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.sigmas) - 2)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()

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

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_of_t(t)

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

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return t / (1 - t)

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

    With ``a = c_in(sigma)`` and ``s = sigma c_in(sigma)`` in the network's space
    (VP: a = 1/sqrt(1+sigma^2), s = a sigma; flow: a = 1 - t, s = t; VE: a = 1, s = sigma):
    eps -> x0 = (x_net - s eps) / a; v -> x0 = a x_net - s v (VP only, a^2 + s^2 = 1);
    flow velocity v = eps - x0 -> x0 = x_net - t v.
    """
    if prediction not in PREDICTIONS:
        raise ParameterError("prediction", f"unknown prediction type {prediction!r}; allowed: {PREDICTIONS}")

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
        raise ParameterError("scheduler config", f"unsupported beta_schedule {kind!r}")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)     # sigma_max becomes 4096 (see VPDiscrete)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return VPDiscrete(alphas_cumprod), config.get("prediction_type", "epsilon")
