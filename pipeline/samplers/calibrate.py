"""Calibrating a solver plan for one model: teacher trajectories, a DP over them, gradient refinement.

``calibrate(denoiser, noise, nfe, sigma_min, sigma_max)`` spends model calls on the given
calibration noise only and returns a ``SolverPlan``:

1. ``run_teacher``: a high-NFE solve of the probability-flow ODE from every noise, keeping the
   states at a few dozen candidate levels (the teacher trajectory) and the final samples.
2. ``dp_search`` (gradient-free): dynamic programming over the candidate levels for the
   DPM-Solver++(2M) grid whose own trajectory stays closest to the teacher's.
3. ``refine`` (gradient-based): the grid, per-step evaluation shifts and difference gains of
   ``plan_multistep``, fitted by backpropagation through the unrolled solver, starting from the DP
   grid, with activation checkpointing per model call.
4. An acceptance gate on held-out noise (the last ``holdout`` fraction, never trained on): the
   plan is returned only if it beats the baseline (the ``auto`` rule's method and grid) there;
   otherwise the baseline itself is returned as the plan, and its figures say so.

A denoiser whose rows carry their own conditioning (prompts, guidance) exposes
``subset(index) -> denoiser`` for a subset of the rows; a plain function is taken to treat every
row alike. Errors are per-sample RMS distances to the teacher's samples, averaged.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ParameterError
from .core import SIGMA_INF_EVAL, auto_method, build_grid, sample
from .registry import SAMPLERS
from .basic import _sigma_batch
from .plan import (
    CALIBRATED_BASE,
    PlanModel,
    SolverPlan,
    direction,
    ei_step,
    plan_multistep,
)

log = logging.getLogger(__name__)
INF_TOP = 1000.0          # with sigma_max = inf: the highest finite level a plan may use after its first step


# ---------------------------------------------------------------- helpers
def subset(denoiser: Callable, idx: torch.Tensor) -> Callable:
    """The denoiser for rows ``idx`` (see the module docstring)."""
    return denoiser.subset(idx) if hasattr(denoiser, "subset") else denoiser


def rms(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS distance, ``[B]``."""
    return (x - reference).pow(2).flatten(1).mean(1).sqrt()


class Counter:
    """Counts sample evaluations (one model evaluation of one row) of a denoiser and its subsets."""

    def __init__(self, denoiser: Callable, total: list[int] | None = None):
        self.denoiser, self.total = denoiser, total if total is not None else [0]

    @property
    def evaluations(self) -> int:
        return self.total[0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.total[0] += x.shape[0]
        return self.denoiser(x, sigma)

    def subset(self, idx: torch.Tensor) -> "Counter":
        return Counter(subset(self.denoiser, idx), self.total)


def _limit(denoiser: Callable, noise: torch.Tensor) -> torch.Tensor:
    """D at sigma -> inf (``pipeline.samplers._step_from_infinity``'s model call)."""
    s = torch.full((noise.shape[0],), SIGMA_INF_EVAL, dtype=noise.dtype, device=noise.device)
    return denoiser(noise * SIGMA_INF_EVAL, s)


def run_plan(plan_sigmas: torch.Tensor, denoiser: Callable, noise: torch.Tensor, shifts=None, gains=None,
             limit: torch.Tensor | None = None) -> torch.Tensor:
    """Sample a calibrated-family plan (differentiably) from standard-normal ``noise``."""
    if math.isinf(float(plan_sigmas[0].detach())):
        x = (_limit(denoiser, noise) if limit is None else limit) + noise * plan_sigmas[1].to(noise.dtype)
        return plan_multistep(denoiser, x, plan_sigmas[1:], shifts=shifts, gains=gains)
    return plan_multistep(denoiser, noise * plan_sigmas[0].to(noise.dtype), plan_sigmas, shifts=shifts, gains=gains)


def _chunks(n: int, size: int | None) -> list[torch.Tensor]:
    size = size or n
    return [torch.arange(i, min(n, i + size)) for i in range(0, n, size)]


# ---------------------------------------------------------------- 1. the teacher
@dataclass
class Teacher:
    """High-NFE trajectories from the calibration noise."""
    levels: torch.Tensor             # [M] candidate levels, float64, decreasing, finite (the last is sigma_min)
    target: torch.Tensor             # [N, ...] the teacher's samples (ODE solution at sigma_min, denoised)
    states: torch.Tensor | None      # [M, K, ...] teacher states at the levels for the first K rows
    limit: torch.Tensor | None       # [N, ...] D at sigma -> inf when sigma_max = inf
    nfe: int                         # model calls per sample
    seconds: float = 0.0             # how long it took (when computed elsewhere, e.g. on a Ray cluster)

    def take(self, idx: torch.Tensor) -> "Teacher":
        """The teacher of rows ``idx`` (states only where kept)."""
        return Teacher(self.levels, self.target[idx], None, None if self.limit is None else self.limit[idx], self.nfe,
                       self.seconds)


def teacher_grid(sigma_min: float, sigma_max: float, nfe: int, candidates: int) -> tuple[torch.Tensor, list[int]]:
    """The teacher's fine grid (log-uniform from sigma_max, or ``INF_TOP`` after a first step from
    infinity, to sigma_min, then 0) and the indices of the candidate levels on it."""
    steps = nfe - int(math.isinf(sigma_max))
    if steps < 2 or candidates < 2:
        raise ParameterError("teacher_nfe/candidates", f"need at least 2 teacher steps and 2 candidates, got {steps}, {candidates}")
    top = INF_TOP if math.isinf(sigma_max) else sigma_max
    fine = torch.exp(torch.linspace(math.log(top), math.log(sigma_min), steps, dtype=torch.float64))
    idx = sorted({round(float(v)) for v in torch.linspace(0, steps - 1, min(candidates, steps))})
    return torch.cat([fine, fine.new_zeros(1)]), idx


@torch.no_grad()
def run_teacher(denoiser: Callable, noise: torch.Tensor, sigma_min: float, sigma_max: float, *, nfe: int = 120,
                candidates: int = 40, keep_states: int = 0, batch_size: int | None = None) -> Teacher:
    """Solve the ODE from every row of ``noise`` with DPM-Solver++(3M) (third-order weights) on a
    log-uniform ``nfe``-call grid; keep the states at ``candidates`` levels for the first
    ``keep_states`` rows. The sample is the denoised ODE solution at sigma_min, the convention of
    every solver's last step."""
    fine, cand = teacher_grid(sigma_min, sigma_max, nfe, candidates)
    inf = math.isinf(sigma_max)
    targets, limits, states = [], [], []
    for idx in _chunks(noise.shape[0], batch_size):
        den, z = subset(denoiser, idx), noise[idx]
        lim = _limit(den, z) if inf else None
        x = (lim + z * fine[0].to(z.dtype)) if inf else z * fine[0].to(z.dtype)
        keep = idx < keep_states
        rec: dict[int, torch.Tensor] = {0: x[keep]}

        def on_step(step: dict) -> None:
            if step["i"] + 1 in cand:
                rec[step["i"] + 1] = step["x"][keep]
        targets.append(SAMPLERS["dpmpp_3m"].fn(den, x, fine, on_step=on_step, third="taylor", lower_order_final=False))
        limits.append(lim)
        if bool(keep.any()):
            states.append(torch.stack([rec[i] for i in cand]))
    return Teacher(fine[cand], torch.cat(targets), torch.cat(states, 1) if states else None,
                   torch.cat(limits) if inf else None, nfe)


# ---------------------------------------------------------------- 2. dynamic programming (gradient-free)
def dp_search(denoiser: Callable, noise: torch.Tensor, teacher: Teacher, nfe: int, sigma_max: float,
              order: int = 2) -> torch.Tensor:
    """The DPM-Solver++(2M) grid (``order=1``: DDIM) of ``nfe`` calls over the teacher's candidate
    levels whose own trajectory ends closest to the teacher's samples.

    Dynamic programming as in OSS (Pei et al. 2025, "Optimal Stepsize for Diffusion Sampling"),
    over the stored teacher trajectory of GITS (Chen et al. 2024, "On the Trajectory Regularity of
    ODE-based Diffusion Sampling"): for each number of steps k and candidate level j it keeps the
    path whose student state at j is nearest the teacher's state there (mean per-sample RMS over
    the rows with kept states), extending it by one model call at a time; the last call returns
    the clean estimate, compared with the teacher's sample. The student carries its own
    multistep history, so the cost is that of the real solver, not of a local error proxy.
    Costs ``steps x candidates`` model calls on those rows, no backpropagation.
    """
    if order not in (1, 2):
        raise ParameterError("order", f"dp_search follows DDIM (1) or DPM-Solver++(2M) (2), got {order}")
    if teacher.states is None:
        raise ParameterError("teacher", "dp_search needs teacher states (run_teacher(..., keep_states=K))")
    lv, ref, k_rows = teacher.levels, teacher.states, teacher.states.shape[1]
    rows = torch.arange(k_rows)
    den, z, target = subset(denoiser, rows), noise[:k_rows], teacher.target[:k_rows]
    m, inf = len(lv), math.isinf(sigma_max)
    steps = nfe - int(inf)
    if steps > m:
        raise ParameterError("candidates", f"{m} candidate levels cannot hold {steps} steps; raise candidates")
    # a state per level: (x, newest-first history, previous log-step, path, cost)
    if inf:
        lim = teacher.limit[:k_rows]
        states = {j: (lim + z * lv[j].to(z.dtype), [], None, [j], 0.0) for j in range(m - steps + 1)}
    else:
        states = {0: (z * lv[0].to(z.dtype), [], None, [0], 0.0)}
    best: tuple[float, list[int]] | None = None
    with torch.no_grad():
        for k in range(steps):
            new: dict[int, tuple] = {}
            for i, (x, hist, h_last, path, _) in states.items():
                d = den(x, _sigma_batch(lv[i], x))
                hist = [d, *hist[:order - 1]]
                if k == steps - 1:                      # the last call: its clean estimate is the sample
                    cost = float(rms(d, target).mean())
                    best = min(best or (math.inf, []), (cost, path))
                    continue
                for j in range(i + 1, m - (steps - 2 - k)):
                    x_j = ei_step(x, direction(hist, lv[i], lv[j], h_last), lv[i], lv[j])
                    cost = float(rms(x_j, ref[j]).mean())
                    if j not in new or cost < new[j][4]:
                        new[j] = (x_j, hist, lv[i].log() - lv[j].log(), path + [j], cost)
            states = new
    levels = lv[best[1]]
    head = [torch.tensor([math.inf], dtype=torch.float64)] if inf else []
    return torch.cat([*head, levels, levels.new_zeros(1)])


# ---------------------------------------------------------------- 3. gradient refinement
class PlanParameters(torch.nn.Module):
    """The free numbers of a calibrated plan: the grid (as softmax gaps in log-sigma between the top
    level and sigma_min; sigma_max itself stays the first level unless it is infinite), per-call
    evaluation shifts and per-step difference gains."""

    def __init__(self, grid: torch.Tensor, sigma_min: float, sigma_max: float):
        super().__init__()
        self.inf = math.isinf(sigma_max)
        self.top, self.sigma_min = (INF_TOP if self.inf else sigma_max), sigma_min
        finite = grid[int(self.inf):-1]
        free = finite if self.inf else finite[1:]          # levels below the fixed top
        chain = torch.cat([finite.new_tensor([self.top]), free, finite.new_tensor([sigma_min])]).log()
        span = math.log(self.top) - math.log(sigma_min)
        gaps = (chain[:-1] - chain[1:]).clamp(min=1e-3 * span)
        self.n_free = len(free)
        self.logits = torch.nn.Parameter(gaps.log())
        self.shifts = torch.nn.Parameter(torch.zeros(len(finite), dtype=torch.float64))
        self.gains = torch.nn.Parameter(torch.zeros(len(finite), 2, dtype=torch.float64))

    def grid(self) -> torch.Tensor:
        span = math.log(self.top) - math.log(self.sigma_min)
        cum = torch.cumsum(torch.softmax(self.logits, 0), 0)[: self.n_free]
        free = torch.exp(math.log(self.top) - span * cum)
        parts = [free.new_tensor([math.inf])] if self.inf else [free.new_tensor([self.top])]
        return torch.cat([*parts, free, free.new_zeros(1)])


def refine(denoiser: Callable, noise: torch.Tensor, target: torch.Tensor, grid: torch.Tensor, sigma_min: float,
           sigma_max: float, *, val: tuple[torch.Tensor, torch.Tensor, Callable], iterations: int = 300,
           batch_size: int = 64, lr: float = 0.01, time_budget_s: float | None = None, seed: int = 0,
           use_checkpoint: bool = True, limit: torch.Tensor | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[PlanParameters, float, int]:
    """Fit the grid, evaluation shifts and gains of ``plan_multistep`` by gradient descent on the mean
    per-sample RMS distance to the teacher's samples, backpropagating through the unrolled solver.

    LD3 (Tong et al. 2025, "Learning to Discretize Denoising Diffusion ODEs") learns the timesteps
    this way from a teacher; S4S (Frankel et al. 2025, "S4S: Solving for a Diffusion Model Solver")
    adds the solver's coefficients. Adam with cosine decay and gradient clipping on random
    minibatches of ``batch_size`` rows; every 25 steps the plan is scored on the validation rows
    ``val = (noise, target, denoiser)`` and the best one kept. Each model call is checkpointed
    (recomputed in the backward pass), so memory holds the solver's states, not the network's
    activations. Stops after ``iterations`` or ``time_budget_s``. Returns (parameters, validation
    error, iterations run).
    """
    params = PlanParameters(grid, sigma_min, sigma_max)
    opt = torch.optim.Adam(params.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iterations))
    gen = torch.Generator().manual_seed(seed)
    v_noise, v_target, v_den = val

    def run(den, z, lim):
        call = (lambda x, s: checkpoint(den, x, s, use_reentrant=False)) if use_checkpoint else den
        return run_plan(params.grid(), call, z, params.shifts, params.gains, lim)

    def score() -> float:
        with torch.no_grad():
            return float(rms(run_plan(params.grid(), v_den, v_noise, params.shifts, params.gains), v_target).mean())
    best, best_state, t0, it = score(), {k: v.detach().clone() for k, v in params.state_dict().items()}, time.time(), 0
    for it in range(1, iterations + 1):
        idx = torch.randperm(noise.shape[0], generator=gen)[:batch_size]
        loss = rms(run(subset(denoiser, idx), noise[idx], None if limit is None else limit[idx]), target[idx]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.parameters(), 1.0)
        opt.step()
        sched.step()
        out_of_time = time_budget_s is not None and time.time() - t0 > time_budget_s
        if it % 25 == 0 or it == iterations or out_of_time:
            v = score()
            if v < best:
                best, best_state = v, {k: t.detach().clone() for k, t in params.state_dict().items()}
            if progress:
                progress(f"refine: step {it}/{iterations}, loss {float(loss.detach()):.4g}, held-out {v:.4g} (best {best:.4g})")
        if out_of_time:
            break
    params.load_state_dict(best_state)
    return params, best, it


# ---------------------------------------------------------------- 4. the whole calibration
def _baseline(nfe: int, sigma_min: float, sigma_max: float, kind: str, guidance: float | None,
              schedule_options: dict) -> SolverPlan:
    """The ``auto`` rule's method and grid for this model, as a plan without per-step parameters."""
    method, grid_name, options = auto_method(nfe, kind=kind, guidance=guidance)
    sigmas, extra = build_grid(method, nfe, sigma_min, sigma_max, grid_name, schedule_options=schedule_options,
                               options=options)
    return SolverPlan(base=method, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, sigmas=tuple(sigmas.tolist()),
                      options={**options, **extra}, calibration={"schedule": grid_name})


def calibrate(denoiser: Callable, noise: torch.Tensor, nfe: int = 10, sigma_min: float = 0.0292,
              sigma_max: float = 14.6146, *, holdout: float = 0.25, schedule: str = "ve",
              schedule_options: dict | None = None, guidance_scale: float | None = None,
              model_id: str | None = None, resolution: Sequence[int] | None = None,
              calibrators: Sequence[str] = ("dp", "grad"), teacher_nfe: int = 120, candidates: int = 40,
              dp_samples: int = 64, iterations: int = 300, batch_size: int = 64, lr: float = 0.01,
              time_budget_s: float | None = None, seed: int = 0, teacher: Teacher | None = None,
              chunk: int | None = None, use_checkpoint: bool = True,
              progress: Callable[[str], None] | None = None) -> SolverPlan:
    """Calibrate a solver plan for ``denoiser`` from standard-normal calibration ``noise`` ``[N, ...]``.

    The first ``1 - holdout`` of the rows train, the rest are held out: they pick the best
    refinement step and decide the acceptance gate. ``calibrators``: ``"dp"`` (``dp_search``) and/or
    ``"grad"`` (``refine``, from the DP grid if any, else from the baseline's grid; needs a
    differentiable denoiser). ``schedule`` (``ve``, ``vp_discrete``, ``vp_continuous``, ``flow``),
    ``schedule_options`` (e.g. the flow shift) and ``guidance_scale`` pick the baseline by the
    ``auto`` rule and are recorded in the plan with ``model_id`` and ``resolution``. A precomputed
    ``teacher`` (``run_teacher`` on the same noise, states kept for ``dp_samples`` rows) skips step 1;
    ``jobs.calibrate`` computes it on a Ray cluster. ``chunk`` bounds the rows per model call.
    """
    unknown = set(calibrators) - {"dp", "grad"}
    if unknown or not calibrators:
        raise ParameterError("calibrators", f"expected a non-empty subset of ['dp', 'grad'], got {list(calibrators)}")
    if not isinstance(nfe, int) or nfe < 2:
        raise ParameterError("nfe", f"a solver plan needs nfe >= 2, got {nfe!r}")
    n = noise.shape[0]
    n_train = int(round(n * (1 - holdout)))
    if n_train < 2 or n - n_train < 2:
        raise ParameterError("holdout", f"{n} noise rows split into {n_train} calibration and {n - n_train} held-out "
                         "rows; need at least 2 of each")
    say = progress or (lambda msg: log.info("%s", msg))
    counter, t0 = Counter(denoiser), time.time()
    if teacher is None:
        say(f"teacher: {n} rows x {teacher_nfe} model calls")
        teacher = run_teacher(counter, noise, sigma_min, sigma_max, nfe=teacher_nfe, candidates=candidates,
                              keep_states=min(dp_samples, n_train) if "dp" in calibrators else 0, batch_size=chunk)
        teacher.seconds = time.time() - t0
    else:
        counter.total[0] = teacher.nfe * n                # computed elsewhere: count its calls all the same
        t0 -= teacher.seconds
    seconds, mark = {"teacher": teacher.seconds}, counter.evaluations
    train, held = torch.arange(n_train), torch.arange(n_train, n)
    steps = nfe - int(math.isinf(sigma_max))          # model calls after any first step from sigma = inf
    t_train, t_held = teacher.take(train), teacher.take(held)
    d_train, d_held = subset(counter, train), subset(counter, held)

    def error(plan_sigmas, den, z, tgt, shifts=None, gains=None, base=None, options=None) -> float:
        with torch.no_grad():
            if base is None:
                return float(rms(run_plan(plan_sigmas, den, z, shifts, gains), tgt).mean())
            out = sample(den, z, method=SolverPlan(base=base, nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max,
                                                   sigmas=tuple(plan_sigmas.tolist()), options=options or {}),
                         nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max)
            return float(rms(out, tgt).mean())

    baseline = _baseline(nfe, sigma_min, sigma_max, schedule, guidance_scale, schedule_options or {})
    base_err = {split: error(baseline.grid(), den, noise[idx], tt.target, base=baseline.base, options=baseline.options)
                for split, den, idx, tt in (("calibration", d_train, train, t_train), ("held_out", d_held, held, t_held))}
    say(f"baseline {baseline.base} on {baseline.calibration['schedule']}: held-out error {base_err['held_out']:.4g}")
    candidates_found: dict[str, tuple[torch.Tensor, Any, Any]] = {}
    if "dp" in calibrators:
        t = time.time()
        grid = dp_search(d_train, noise[train], teacher if teacher.states is not None else t_train, nfe, sigma_max)
        candidates_found["dp"] = (grid, torch.zeros(steps), torch.zeros(steps, 2))
        seconds["dp"] = time.time() - t
        say(f"dp: grid {[round(v, 4) for v in grid.tolist()]}, held-out error "
            f"{error(grid, d_held, noise[held], t_held.target):.4g}")
    mark_dp, iters_run = counter.evaluations, 0
    if "grad" in calibrators:
        t = time.time()
        start = candidates_found["dp"][0] if "dp" in candidates_found else baseline.grid()
        params, _, iters_run = refine(
            d_train, noise[train], t_train.target, start, sigma_min, sigma_max,
            val=(noise[held], t_held.target, d_held), iterations=iterations, batch_size=batch_size, lr=lr,
            time_budget_s=None if time_budget_s is None else max(0.0, time_budget_s - (time.time() - t0)),
            seed=seed, use_checkpoint=use_checkpoint, limit=t_train.limit, progress=say)
        with torch.no_grad():
            candidates_found["grad"] = (params.grid().detach(), params.shifts.detach(), params.gains.detach())
        seconds["refine"] = time.time() - t
    # pick the better calibrated candidate on the held-out rows, then the gate against the baseline
    scored = {name: error(g, d_held, noise[held], t_held.target, s, gn) for name, (g, s, gn) in candidates_found.items()}
    name = min(scored, key=scored.get)
    grid, shifts, gains = candidates_found[name]
    accepted = scored[name] < base_err["held_out"]
    figures = {
        "calibrators": list(calibrators), "chosen": name if accepted else "baseline", "accepted": accepted,
        "baseline": {"method": baseline.base, "schedule": baseline.calibration["schedule"]},
        "samples": {"calibration": n_train, "held_out": n - n_train},
        "error": {"baseline": base_err,
                  "plan": {"calibration": error(grid, d_train, noise[train], t_train.target, shifts, gains),
                           "held_out": scored[name]},
                  **{f"held_out_{k}": v for k, v in scored.items()}},
        "teacher_nfe": teacher.nfe, "candidates": len(teacher.levels), "iterations": iters_run,
        "model_evaluations": {"teacher": mark, "dp": mark_dp - mark, "refine": counter.evaluations - mark_dp,
                              "total": counter.evaluations},
        "seconds": {k: round(v, 2) for k, v in {**seconds, "total": time.time() - t0}.items()},
        "seed": seed,
    }
    meta = dict(nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max,
                model=PlanModel(id=model_id, schedule=schedule, schedule_options=schedule_options or {}),
                guidance_scale=guidance_scale, resolution=tuple(resolution) if resolution else None,
                latent_shape=tuple(noise.shape[1:]), calibration=figures)
    if not accepted:
        say(f"the calibrated plan ({scored[name]:.4g}) does not beat the baseline ({base_err['held_out']:.4g}) "
            "on held-out noise: returning the baseline")
        figures["error"]["plan"] = base_err
        return SolverPlan(base=baseline.base, sigmas=baseline.sigmas, options=baseline.options, **meta).sealed()
    say(f"plan ({name}): held-out error {scored[name]:.4g} vs baseline {base_err['held_out']:.4g}")
    return SolverPlan(base=CALIBRATED_BASE, sigmas=tuple(grid.tolist()), shifts=tuple(shifts.tolist()),
                      gains=tuple(map(tuple, gains.tolist())), **meta).sealed()


