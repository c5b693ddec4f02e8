"""Inference-time search: several particles per image, scored by a reward (``pipeline.rewards``).

Methods (``search.method``):

* ``best_of_n``: ``particles`` independent samples (initial noises) per image; the one with the
  highest reward is kept. "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising
  Steps" (Ma et al. 2025), random search over noises with a verifier.
* ``fk``: Feynman-Kac steering (Singhal et al. 2025, "A General Framework for Inference-time
  Scaling and Steering of Diffusion Models"): the particles run together on a stochastic sampler;
  at the resampling steps each one is weighted by a potential of the reward of its clean estimate
  and the image's particles are resampled (systematic resampling) from those weights; the final
  pick is the best reward.
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
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("none", "best_of_n", "fk", "svdd")
STEERED = ("fk", "svdd")
POTENTIALS = ("diff", "max", "sum")
MAX_PARTICLES = 256
HISTORY = 3                  # data predictions a steerable multistep sampler may keep (3M: 3)
# what ``auto`` runs under fk/svdd: ancestral Euler (DDPM-like sampling, as in the FK-steering paper).
# Chosen on calibration seeds 5000-5199 by bench/search_defaults.py (guidance 1 and 3, NFE 4 and 10,
# 4 particles): the digits reward's shortfall 1 - r was 7e-6..4e-5 with it against 3e-5..0.56 with
# DPM-Solver++(2M) SDE at eta 1 or 0.5 (worse in every cell; its particles collapse at low NFE);
# bench/search_scaling.py reports on other seeds.
STEERED_AUTO = "euler_ancestral"
# the steerable stochastic variant of each deterministic method, for error messages
STOCHASTIC_VARIANT = {"euler": "euler_ancestral", "ddim": "ddim (with eta > 0)", "dpmpp_2m": "dpmpp_2m_sde",
                      "dpmpp_3m": "dpmpp_3m_sde", "auto": STEERED_AUTO}


class SearchOptions(BaseModel):
    """A method's options (``search.options``)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    potential: str = Field("max", description="fk: diff | max | sum (of the rewards so far)")
    lambda_: Optional[float] = Field(None, alias="lambda", ge=0, allow_inf_nan=False,
                                     description="temperature of the weights exp(lambda * potential); "
                                                 "fk default 10, svdd default none (argmax)")
    resample_every: int = Field(2, ge=1, description="fk: resample at every k-th model call")
    resample_steps: Optional[list[int]] = Field(None, description="fk: the model calls (0-based) to resample at")
    ess_threshold: float = Field(1.0, ge=0, le=1, description="fk: resample only when ESS < this x particles")

    @model_validator(mode="after")
    def _potential(self) -> "SearchOptions":
        if self.potential not in POTENTIALS:
            raise ValueError(f"potential must be one of {list(POTENTIALS)}, got {self.potential!r}")
        if self.resample_steps is not None and any(s < 0 for s in self.resample_steps):
            raise ValueError("resample_steps are model-call indices >= 0")
        return self

    def dump(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


def particle_seeds(seed: int, particles: int) -> list[int]:
    """The noise seeds of a row's particles: the row's own seed for particle 0, then seeds drawn
    from ``numpy.random.SeedSequence((seed, p))``."""
    return [seed] + [int(np.random.SeedSequence((seed, p)).generate_state(1, np.uint64)[0]) >> 1
                     for p in range(1, particles)]


def resampling_seed(seed: int) -> int:
    """The seed of a row's resampling generator (not any of its particles' noise seeds)."""
    return int(np.random.SeedSequence((seed, 0x5EA)).generate_state(1, np.uint64)[0]) >> 1


class Steering:
    """The particles' denoiser for ``fk`` and ``svdd``: resamples within groups at model calls.

    ``denoiser``: the guided denoiser of all particle rows; ``groups``: the group (row) of each;
    ``scorer(x0) -> [N]`` the rewards of clean estimates (float64, CPU); ``seeds``: one resampling
    seed per group; ``calls``: the model calls the sampler will make (no resampling at the last).
    """

    def __init__(self, denoiser: Callable, groups: Sequence[int], method: str, options: SearchOptions,
                 scorer: Callable[[torch.Tensor], torch.Tensor], seeds: dict[int, int], calls: int):
        self.denoiser, self.method, self.options, self.scorer, self.calls = denoiser, method, options, scorer, calls
        self.groups = torch.tensor(list(groups))
        self.members = {g: (self.groups == g).nonzero()[:, 0] for g in dict.fromkeys(groups)}
        self.gens = {g: torch.Generator().manual_seed(seeds[g]) for g in self.members}
        self.lam = options.lambda_ if options.lambda_ is not None else (10.0 if method == "fk" else math.inf)
        self.step, self.kept, self.history = 0, [], torch.zeros(len(self.groups), 0, dtype=torch.float64)
        self.resamples = 0

    def at(self, step: int) -> bool:
        if step >= self.calls - 1:
            return False
        if self.method == "svdd":
            return True
        o = self.options
        return step in o.resample_steps if o.resample_steps is not None else step % o.resample_every == o.resample_every - 1

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

    def log_potential(self) -> torch.Tensor:
        """fk's log weights from each particle's rewards so far (Singhal et al., sec. 3)."""
        h, lam = self.history, self.lam
        if self.options.potential == "max":
            return lam * h.max(1).values
        if self.options.potential == "sum":
            return lam * h.sum(1)
        prev = h[:, -2] if h.shape[1] > 1 else torch.zeros(len(h), dtype=h.dtype)
        return lam * (h[:, -1] - prev)

    def ancestors(self, rewards: torch.Tensor) -> Optional[torch.Tensor]:
        """The particle each slot continues from (``None``: no change), chosen within each group."""
        idx = torch.arange(len(rewards))
        logw = self.log_potential() if self.method == "fk" else rewards
        for g, m in self.members.items():
            n = len(m)
            if n == 1:
                continue
            lw = logw[m]
            if math.isinf(self.lam):                              # svdd's argmax (the first best on ties)
                idx[m] = m[int(torch.argmax(rewards[m]))]
                continue
            w = torch.softmax(lw * (1 if self.method == "fk" else self.lam), 0)
            if self.method == "fk" and 1.0 / float((w ** 2).sum()) >= self.options.ess_threshold * n:
                continue
            if self.method == "fk":
                idx[m] = m[resample(w, self.gens[g])]
            else:
                idx[m] = m[torch.multinomial(w, 1, generator=self.gens[g])].expand(n)
        return None if torch.equal(idx, torch.arange(len(rewards))) else idx


# fk's resampling scheme. Systematic, chosen on calibration seeds 5000-5199 by bench/search_defaults.py
# (guidance 1 and 3, NFE 5 and 10, 4 particles): multinomial draws duplicate and drop particles even
# under near-even weights, and left 1.9e-5..1.6e-4 of reward against 6.8e-6..4.1e-5 for systematic.
RESAMPLING = "systematic"


def resample(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``len(w)`` ancestors drawn from the normalised weights ``w``: systematic resampling (one
    uniform offset, evenly spaced points on the weights' CDF; Kitagawa 1996), which keeps each
    particle ``floor(n w_i)`` or ``ceil(n w_i)`` times, with less variance than multinomial draws."""
    n = len(w)
    if RESAMPLING == "multinomial":
        return torch.multinomial(w, n, replacement=True, generator=gen)
    points = (torch.rand((), generator=gen, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    return torch.searchsorted(torch.cumsum(w.double(), 0), points).clamp(max=n - 1)


def pick(rewards: torch.Tensor) -> int:
    """The particle a row keeps: the highest reward (the first on ties)."""
    return int(torch.argmax(rewards))


def rgb(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` images as a reward takes them: three channels (grey ones repeated)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def stochastic(sampler: str, options: dict) -> bool:
    """Whether ``sampler`` with ``options`` adds fresh noise at its steps (and a steering method can
    use it: ``Method.steerable``)."""
    from .samplers import SAMPLERS

    spec = SAMPLERS.get(sampler)
    if spec is None or not spec.steerable:
        return False
    eta = options.get("eta", 1.0 if spec.stochastic else 0.0)
    return bool(eta and eta > 0)


def resolve_search(fields: dict, sampler: str, sampler_options: dict, sampler_key: str = "sampler") -> dict | None:
    """The concrete search of a request, or ``None`` for ``none``: ``{method, particles, reward,
    reward_options, options}`` with the method's options filled in. Raises ``RequestError`` naming the
    field (``search.method``, ``search.particles``, ``search.reward``, ``search.options``); a steering
    method on a deterministic sampler names ``sampler_key`` too."""
    from .errors import RequestError
    from .rewards import RewardError, check_reward

    method = fields.get("method") or "none"
    if method not in METHODS:
        raise RequestError("search.method", f"unknown search method {method!r}; allowed: {list(METHODS)}")
    if method == "none":
        return None
    particles = fields.get("particles")
    particles = 4 if particles is None else particles
    if isinstance(particles, bool) or not isinstance(particles, int) or not 1 <= particles <= MAX_PARTICLES:
        raise RequestError("search.particles", f"must be an integer in 1..{MAX_PARTICLES}, got {particles!r}")
    try:
        check_reward(fields.get("reward"))
    except RewardError as e:
        raise RequestError("search.reward", str(e) if e.subject != "search.reward" else e.message) from None
    try:
        options = SearchOptions(**(fields.get("options") or {})).dump()
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError or a TypeError from a non-dict
        msg = e.errors()[0] if hasattr(e, "errors") else None
        detail = (f"{'.'.join(map(str, msg['loc']))}: {msg['msg']}" if msg and msg["loc"] else
                  msg["msg"] if msg else str(e))
        raise RequestError("search.options", detail.removeprefix("Value error, ")) from None
    if method in STEERED and not stochastic(sampler, sampler_options):
        from .samplers import SAMPLERS
        spec = SAMPLERS.get(sampler)
        why = ("makes several model calls per step" if spec is not None and spec.stochastic and not spec.steerable
               else "is deterministic" + (" with eta=0" if spec is not None and spec.steerable else ""))
        hint = STOCHASTIC_VARIANT.get(sampler, "euler_ancestral, ddim (eta > 0), dpmpp_2m_sde or dpmpp_3m_sde")
        raise RequestError("search.method", f"{method!r} resamples particles between sampler steps and needs a "
                                            f"stochastic one-call-per-step sampler, but {sampler_key}={sampler!r} "
                                            f"{why}: use {hint}")
    # record exactly what runs: the options the method uses, with its defaults filled in
    if method == "fk":
        options = {"lambda": 10.0, **options}
        options.pop("resample_every" if "resample_steps" in options else "resample_steps", None)
    else:
        options = {k: v for k, v in options.items() if k == "lambda" and method == "svdd"}
    return {"method": method, "particles": particles, "reward": fields["reward"],
            "reward_options": dict(fields.get("reward_options") or {}), "options": options}
