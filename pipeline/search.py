"""Inference-time search: several particles per image, scored by a reward (``pipeline.rewards``).

Methods (``search.method``; each is a ``SearchMethod`` in ``SEARCH_METHODS``):

* ``best_of_n``: ``particles`` independent samples (initial noises) per image; the one with the
  highest reward is kept. "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising
  Steps" (Ma et al. 2025), random search over noises with a verifier.
* ``fk``: Feynman-Kac steering (Singhal et al. 2025, "A General Framework for Inference-time
  Scaling and Steering of Diffusion Models"): the particles run together on a stochastic sampler;
  at the resampling steps each one is weighted by a potential of the rewards of its clean estimates
  and the image's particles are resampled (systematic resampling) from those weights; the final
  pick is the best reward.
* ``fk_log``: ``fk`` with the potential taken of the rewards' log-odds ``log(r / (1 - r))``, for
  rewards in (0, 1) that saturate near 1, where ``exp(lambda * r)`` weights are almost even.
* ``svdd``: soft value-based decoding (Li et al. 2024, "Derivative-Free Guidance in Continuous and
  Discrete Diffusion Models with Soft Value-Based Decoding"), SVDD-PM: at every step the
  particles are the candidates of one stochastic step from the image's current state; the one
  whose clean estimate scores best becomes the state all particles step from next.

Particles are a batch axis: particle ``p`` of a row draws its noise from its own generator, seeded
from ``(seed, p)`` (particle 0 uses the row's seed, so it is the image ``none`` gives); resampling
gathers every particle's state within its row's group only, with a generator seeded from the row's
seed, so an image depends only on its seed and request.

Steering works inside the denoiser: the sampler hands ``Steering`` its state ``x`` at each model
call; at a resampling step ``Steering`` scores the clean estimates, gathers ``x`` (in place) and
the data predictions it returned earlier (a multistep sampler's history) by the chosen ancestors,
and returns the gathered estimate. That is exact for samplers whose state between steps is only
``x`` and those data predictions, which ``Method.steerable`` marks (one model call per step). The
noise generators stay with their slots, so copies of one particle diverge at the next step.

A new method is one ``SearchMethod`` subclass registered here: its options (a pydantic model,
defaults recorded in each image's metadata), whether it steers, and for a steering method when
(``at``) and how (``ancestors``) it resamples.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RequestError
from .rewards import RewardError, check_reward
from .samplers import SAMPLERS, SamplerSpec

MAX_PARTICLES = 256
DEFAULT_PARTICLES = 4
HISTORY = 3                  # data predictions a steerable multistep sampler may keep (3M: 3)
# what ``auto`` runs under a steering method: ancestral Euler (DDPM-like sampling, as in the FK-steering
# paper). Chosen on calibration seeds 5000-5199 by bench/search_defaults.py (guidance 1 and 3, NFE 4 and
# 10, 4 particles): the digits reward's shortfall 1 - r was 7e-6..4e-5 with it against 3e-5..0.56 with
# DPM-Solver++(2M) SDE at eta 1 or 0.5 (worse in every cell; its particles collapse at low NFE);
# bench/search_scaling.py reports on other seeds.
STEERED_AUTO = "euler_ancestral"
# the steerable stochastic variant of each deterministic method, for error messages
STOCHASTIC_VARIANT = {"euler": "euler_ancestral", "ddim": "ddim (with eta > 0)", "dpmpp_2m": "dpmpp_2m_sde",
                      "dpmpp_3m": "dpmpp_3m_sde", "auto": STEERED_AUTO}


# ---------------------------------------------------------------- the resolved search of one image
class SearchSpec(BaseModel):
    """One image's search, resolved once (``resolve_search``): what runs and what its sidecar records."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(description="a registered search method (not 'none': no search is no spec)")
    particles: int = Field(ge=1, le=MAX_PARTICLES, description="candidates per image")
    reward: str = Field(description="a registered reward or 'module:function'")
    reward_options: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options, defaults filled in")

    @property
    def runner(self) -> "SearchMethod":
        return SEARCH_METHODS[self.method]

    @property
    def steered(self) -> bool:
        return self.runner.steered

    def key(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True, default=str)

    def reward_key(self) -> str:
        """What identifies the loaded reward (name and options)."""
        return json.dumps([self.reward, self.reward_options], sort_keys=True, default=str)


# ---------------------------------------------------------------- methods
class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchMethod:
    """A search method: its options and, if it steers, when and how it resamples particles."""
    steered: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = NoOptions

    def options(self, raw: dict) -> dict:
        """The options that run, defaults filled in (``ValidationError`` on bad ones)."""
        return self.Options(**raw).model_dump(by_alias=True, exclude_none=True)

    def at(self, step: int, options: dict) -> bool:
        """Whether to resample after model call ``step`` (steering methods)."""
        return False

    def weights(self, history: torch.Tensor, rewards: torch.Tensor, options: dict) -> torch.Tensor:
        """Log weights of the particles from their reward ``history`` ``[N, calls so far]``."""
        raise NotImplementedError

    def draw(self, logw: torch.Tensor, gen: torch.Generator, options: dict) -> Optional[torch.Tensor]:
        """Ancestor indices (within one group) from the group's log weights; ``None``: keep all."""
        raise NotImplementedError


class BestOfN(SearchMethod):
    """Independent particles; the best final reward is kept (Ma et al. 2025)."""


class FKOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lambda_: float = Field(10.0, alias="lambda", ge=0, allow_inf_nan=False,
                           description="temperature of the weights exp(lambda * potential)")
    potential: Literal["diff", "max", "sum"] = Field("max", description="of the rewards so far")
    resample_every: Optional[int] = Field(2, ge=1, description="resample at every k-th model call")
    resample_steps: Optional[list[int]] = Field(None, description="the model calls (0-based) to resample at")
    ess_threshold: float = Field(1.0, ge=0, le=1, description="resample only when ESS < this x particles")
    resampling: Literal["systematic", "multinomial"] = Field("systematic", description="how ancestors are drawn "
                                                             "(resample)")

    @model_validator(mode="after")
    def _one_schedule(self) -> "FKOptions":
        if self.resample_steps is not None:
            if any(s < 0 for s in self.resample_steps):
                raise ValueError("resample_steps are model-call indices >= 0")
            self.resample_every = None                # the steps replace the period
        return self


class FK(SearchMethod):
    """Feynman-Kac steering (Singhal et al. 2025): weights ``exp(lambda * potential)``, systematic
    resampling within the row's group when the effective sample size drops below the threshold."""
    steered = True
    Options = FKOptions

    def at(self, step: int, options: dict) -> bool:
        if options.get("resample_steps") is not None:
            return step in options["resample_steps"]
        k = options["resample_every"]
        return step % k == k - 1

    def transform(self, rewards: torch.Tensor) -> torch.Tensor:
        """The scale the potential is taken on (the rewards themselves)."""
        return rewards

    def weights(self, history: torch.Tensor, rewards: torch.Tensor, options: dict) -> torch.Tensor:
        """fk's log weights from each particle's rewards so far (Singhal et al., sec. 3)."""
        h, lam = self.transform(history), options["lambda"]
        if options["potential"] == "max":
            return lam * h.max(1).values
        if options["potential"] == "sum":
            return lam * h.sum(1)
        prev = h[:, -2] if h.shape[1] > 1 else torch.zeros(len(h), dtype=h.dtype)
        return lam * (h[:, -1] - prev)

    def draw(self, logw: torch.Tensor, gen: torch.Generator, options: dict) -> Optional[torch.Tensor]:
        w = torch.softmax(logw, 0)
        if 1.0 / float((w ** 2).sum()) >= options["ess_threshold"] * len(w):
            return None
        return resample(w, gen, options.get("resampling", "systematic"))


class FKLog(FK):
    """``fk`` on the log-odds of rewards in (0, 1): ``log(r / (1 - r))``, clipped at 1e-12 from either
    end. A saturated reward (0.9999 against 0.999) differs by 2.3 there, and by 1e-3 on its own scale."""

    def transform(self, rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.clamp(1e-12, 1 - 1e-12)
        return torch.log(r) - torch.log1p(-r)


class SVDDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lambda_: Optional[float] = Field(None, alias="lambda", ge=0, allow_inf_nan=False,
                                     description="draw the kept candidate from softmax(lambda * r); "
                                                 "none: the best (argmax)")


class SVDD(SearchMethod):
    """SVDD-PM (Li et al. 2024): at every step all particles continue from one candidate, the best
    by the reward of its clean estimate (or one drawn from ``softmax(lambda * r)``)."""
    steered = True
    Options = SVDDOptions

    def at(self, step: int, options: dict) -> bool:
        return True

    def weights(self, history: torch.Tensor, rewards: torch.Tensor, options: dict) -> torch.Tensor:
        return rewards * options.get("lambda", 1.0)

    def draw(self, logw: torch.Tensor, gen: torch.Generator, options: dict) -> Optional[torch.Tensor]:
        n = len(logw)
        if options.get("lambda") is None:                  # argmax (the first best on ties)
            return torch.full((n,), int(torch.argmax(logw)))
        return torch.multinomial(torch.softmax(logw, 0), 1, generator=gen).expand(n)


SEARCH_METHODS: dict[str, SearchMethod] = {"best_of_n": BestOfN(), "fk": FK(), "fk_log": FKLog(), "svdd": SVDD()}
METHODS = ("none", *SEARCH_METHODS)


# ---------------------------------------------------------------- resampling
def particle_seeds(seed: int, particles: int) -> list[int]:
    """The noise seeds of a row's particles: the row's own seed for particle 0, then seeds drawn
    from ``numpy.random.SeedSequence((seed, p))``."""
    return [seed] + [int(np.random.SeedSequence((seed, p)).generate_state(1, np.uint64)[0]) >> 1
                     for p in range(1, particles)]


def resampling_seed(seed: int) -> int:
    """The seed of a row's resampling generator (not any of its particles' noise seeds)."""
    return int(np.random.SeedSequence((seed, 0x5EA)).generate_state(1, np.uint64)[0]) >> 1


def resample(w: torch.Tensor, gen: torch.Generator, scheme: str = "systematic") -> torch.Tensor:
    """``len(w)`` ancestors drawn from the normalised weights ``w``. ``systematic`` (fk's, chosen on
    calibration seeds 5000-5199 by bench/search_defaults.py over ``multinomial`` draws, which duplicate
    and drop particles even under near-even weights): one uniform offset and evenly spaced points on
    the weights' CDF (Kitagawa 1996), so each particle is kept ``floor(n w_i)`` or ``ceil(n w_i)`` times."""
    n = len(w)
    if scheme == "multinomial":
        return torch.multinomial(w, n, replacement=True, generator=gen)
    points = (torch.rand((), generator=gen, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    return torch.searchsorted(torch.cumsum(w.double(), 0), points).clamp(max=n - 1)


class Steering:
    """The particles' denoiser for a steering method: resamples within groups at model calls.

    ``denoiser``: the guided denoiser of all particle rows; ``groups``: the group (row) of each;
    ``search``: the rows' ``SearchSpec``; ``scorer(x0) -> [N]`` the rewards of clean estimates
    (float64, CPU); ``seeds``: one resampling seed per group; ``calls``: the model calls the sampler
    will make (no resampling at the last).
    """

    def __init__(self, denoiser: Callable, groups: Sequence[int], search: SearchSpec,
                 scorer: Callable[[torch.Tensor], torch.Tensor], seeds: dict[int, int], calls: int):
        self.denoiser, self.method, self.options = denoiser, search.runner, search.options
        self.scorer, self.calls = scorer, calls
        self.groups = torch.tensor(list(groups))
        self.members = {g: (self.groups == g).nonzero()[:, 0] for g in dict.fromkeys(groups)}
        self.gens = {g: torch.Generator().manual_seed(seeds[g]) for g in self.members}
        self.step, self.kept, self.history = 0, [], torch.zeros(len(self.groups), 0, dtype=torch.float64)
        self.resamples = 0

    def at(self, step: int) -> bool:
        return step < self.calls - 1 and self.method.at(step, self.options)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d = self.denoiser(x, sigma)
        step, self.step = self.step, self.step + 1
        if float(sigma.max()) < 1e7 and self.at(step):          # never at the limit call from sigma = inf
            rewards = self.scorer(d)
            self.history = torch.cat([self.history, rewards[:, None]], 1)
            idx = self.ancestors(rewards)
            if idx is not None:
                self.resamples += 1
                x.copy_(x[idx.to(x.device)])
                for t in self.kept:
                    t.copy_(t[idx.to(t.device)])
                d = d[idx.to(d.device)]
                self.history = self.history[idx]
        self.kept = [d, *self.kept[:HISTORY - 1]]
        return d

    def ancestors(self, rewards: torch.Tensor) -> Optional[torch.Tensor]:
        """The particle each slot continues from (``None``: no change), chosen within each group."""
        idx = torch.arange(len(rewards))
        logw = self.method.weights(self.history, rewards, self.options)
        for g, m in self.members.items():
            if len(m) == 1:
                continue
            chosen = self.method.draw(logw[m], self.gens[g], self.options)
            if chosen is not None:
                idx[m] = m[chosen]
        return None if torch.equal(idx, torch.arange(len(rewards))) else idx


def pick(rewards: torch.Tensor) -> int:
    """The particle a row keeps: the highest reward (the first on ties)."""
    return int(torch.argmax(rewards))


def rgb(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` images as a reward takes them: three channels (grey ones repeated)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# ---------------------------------------------------------------- resolution
def stochastic(spec: SamplerSpec) -> bool:
    """Whether the sampler adds fresh noise at its steps and makes one call per step (``Method.steerable``)."""
    method = SAMPLERS.get(spec.method)
    if method is None or not method.steerable:
        return False
    eta = spec.options.get("eta", 1.0 if method.stochastic else 0.0)
    return bool(eta and eta > 0)


def _pydantic_detail(e: Exception) -> str:
    err = e.errors()[0] if isinstance(e, ValidationError) else None
    if err is None:
        return str(e)
    where = ".".join(map(str, err["loc"]))
    return (f"{where}: {err['msg']}" if where else err["msg"]).removeprefix("Value error, ")


def resolve_search(fields: dict, sampler: SamplerSpec, sampler_key: str = "sampler") -> SearchSpec | None:
    """The concrete search of a request (``None`` for ``none``): ``fields`` has ``method, particles,
    reward, reward_options, options``. Raises ``RequestError`` naming the field (``search.method``,
    ``search.particles``, ``search.reward``, ``search.options``); a steering method on a sampler that
    cannot be steered names ``sampler_key`` too."""
    name = fields.get("method") or "none"
    if name != "none" and name not in SEARCH_METHODS:
        raise RequestError("search.method", f"unknown search method {name!r}; allowed: {list(METHODS)}")
    if name == "none":
        return None
    particles = fields.get("particles")
    particles = DEFAULT_PARTICLES if particles is None else particles
    if isinstance(particles, bool) or not isinstance(particles, int) or not 1 <= particles <= MAX_PARTICLES:
        raise RequestError("search.particles", f"must be an integer in 1..{MAX_PARTICLES}, got {particles!r}")
    try:
        check_reward(fields.get("reward"))
    except RewardError as e:
        raise RequestError("search.reward", str(e) if e.subject != "search.reward" else e.message) from None
    method = SEARCH_METHODS[name]
    try:
        options = method.options(dict(fields.get("options") or {}))
    except (ValidationError, TypeError) as e:
        raise RequestError("search.options", f"{name!r}: {_pydantic_detail(e)}") from None
    if method.steered and not stochastic(sampler):
        raise RequestError("search.method", _not_steerable(name, sampler.method, sampler_key))
    return SearchSpec(method=name, particles=particles, reward=fields["reward"],
                      reward_options=dict(fields.get("reward_options") or {}), options=options)


def _not_steerable(search: str, sampler: str, sampler_key: str) -> str:
    m = SAMPLERS.get(sampler)
    why = ("makes several model calls per step" if m is not None and m.stochastic and not m.steerable
           else "is deterministic" + (" with eta=0" if m is not None and m.steerable else ""))
    hint = STOCHASTIC_VARIANT.get(sampler, "euler_ancestral, ddim (eta > 0), dpmpp_2m_sde or dpmpp_3m_sde")
    return (f"{search!r} resamples particles between sampler steps and needs a stochastic one-call-per-step "
            f"sampler, but {sampler_key}={sampler!r} {why}: use {hint}")
