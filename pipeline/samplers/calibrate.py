"""Calibrating a solver plan for one model: ``calibrate(spec, denoiser, noise) -> CalibrationResult``.

The calibration noise is split three ways, by a seeded choice (``RowSplit``): calibration rows fit
the plan, validation rows pick the refinement iterate and the base method, and held-out rows are
used for nothing but the acceptance gate, so the plan's held-out figure is unbiased. The stages
(``pipeline.samplers.calibrators``):

1. a timed probe batch projects the model evaluations and the time of the whole calibration;
2. ``run_teacher``: a high-NFE solve from every noise, keeping the states at a few dozen candidate
   levels for the rows the DP follows;
3. ``dp_search`` (gradient-free): the DPM-Solver++(2M) grid over those levels whose own trajectory
   stays closest to the teacher's;
4. ``refine`` (gradient-based), for each base method (DPM-Solver++ 2M and 3M, UniPC): the grid,
   per-step evaluation shifts and difference gains of ``plan_multistep``, by backpropagation through
   the unrolled solver from the DP grid, within ``time_budget_s``;
   with the model's plan at a lower NFE (``lower``), ``nest`` starts one more refinement from that plan
   with steps inserted, so the choice can keep what the lower NFE reached: always (``nesting="always"``),
   or only when no other candidate beats the lower plan on the validation rows (``nesting="rise"``, the
   default);
5. the candidate ``choose`` takes on the validation rows (the lowest mean error on 400 rows or more,
   else ``pick``) is the plan, if it beats the baseline (the ``auto`` rule's method and grid) on the
   held-out rows; otherwise the baseline itself is returned as the plan, and its figures say so.

Every stage sums over a ``Group`` of processes (Ray Train workers in ``jobs.calibrate``), each
holding a share of the rows: the plan is the same for one process and many.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ParameterError
from ..schedules import SIGMA_INF_CLAMP
from .calibrators import (
    Counter,
    Fit,
    Group,
    Teacher,
    chunks,
    dp_search,
    lowest_mean,
    paired_difference,
    pick,
    refine,
    rms,
    run_plan,
    run_teacher,
    subset,
    teacher_grid,
    top_level,
    trimmed_mean,
)
from .core import auto_method, build_grid, sample
from .plan import PlanModel, SolverPlan
from .planned import BASES

log = logging.getLogger(__name__)
CALIBRATION, VALIDATION, HELD_OUT = 0, 1, 2
SPLIT_NAMES = ("calibration", "validation", "held_out")


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate (a plan's identity) and how (the calibrators' settings)."""
    nfe: int
    sigma_min: float
    sigma_max: float
    noise_schedule: str = "ve"              # the model's noise-schedule kind: ve | vp_discrete | vp_continuous | flow
    grid_options: dict = field(default_factory=dict)   # the model's grid parameters (a flow model's shift)
    guidance_scale: float | None = None
    model_id: str | None = None
    resolution: tuple[int, int] | None = None
    bases: tuple[str, ...] = BASES          # base methods to calibrate; the validation rows choose among them
    calibrators: tuple[str, ...] = ("dp", "grad")
    validation: float = 0.2                 # share of the rows that choose the iterate and the base
    holdout: float = 0.2                    # share held out for the acceptance gate alone
    teacher_nfe: int = 120                  # model calls per teacher trajectory
    candidates: int = 40                    # its levels the DP may choose from
    dp_samples: int = 64                    # calibration rows whose teacher states the DP follows
    iterations: int = 300                   # refinement steps per base, at most
    batch_size: int = 64                    # rows per refinement step
    lr: float = 0.01                        # Adam's learning rate
    time_budget_s: float | None = None      # the whole calibration's wall time
    seed: int = 0                           # the split, the minibatches
    chunk: int | None = None                # rows per model call (memory bound)
    use_checkpoint: bool = True
    validate_every: int = 25
    patience: int | None = 4                # validations without a better one before a base's refinement stops
    trim: float = 0.1                       # choices (iterate, base, gate) by the mean error less its largest 10%

    def check(self) -> None:
        if not isinstance(self.nfe, int) or self.nfe < 2:
            raise ParameterError("nfe", f"a solver plan needs nfe >= 2, got {self.nfe!r}")
        if not self.calibrators or set(self.calibrators) - {"dp", "grad"}:
            raise ParameterError("calibrators", f"expected a non-empty subset of ['dp', 'grad'], got {list(self.calibrators)}")
        if not self.bases or set(self.bases) - set(BASES):
            raise ParameterError("bases", f"expected a non-empty subset of {list(BASES)}, got {list(self.bases)}")
        if not (0 < self.validation < 1 and 0 < self.holdout < 1 and self.validation + self.holdout < 1):
            raise ParameterError("validation/holdout", f"shares must be in (0, 1) and sum below 1, got "
                                                       f"{self.validation} and {self.holdout}")
        if self.sigma_max > SIGMA_INF_CLAMP and not math.isinf(self.sigma_max):
            log.info("sigma_max %g is past the clamp: plans start at %g, as sample() does", self.sigma_max,
                     SIGMA_INF_CLAMP)


SEEN_ROWS = 400   # validation rows that see a failure of 1% of the samples about 4 times (bench/plan_tail.py)


def thin_validation(n_rows: int, validation: float) -> str | None:
    """A warning when the validation split of ``n_rows`` is too small to see a sampler's rare failures
    (samples that end in another mode, about 1% of them), which dominate the mean error a plan is chosen
    on; None when it is large enough."""
    n_val = round(n_rows * validation)
    if n_val >= SEEN_ROWS:
        return None
    return (f"{n_val} validation rows ({validation:g} of {n_rows}) see about {n_val / 100:.0f} of a sampler's rare "
            f"mode flips (about 1% of samples), so the plan and its base are chosen nearly blind to them; at least "
            f"{math.ceil(SEEN_ROWS / validation)} rows are advised where the model is cheap enough (README: "
            f"Calibration rows)")


def choose(errors: dict[str, torch.Tensor], trim: float) -> str:
    """The candidate that becomes the plan, from its per-sample validation ``errors``: with ``SEEN_ROWS``
    rows or more, the lowest mean error; with fewer, ``pick`` (the lowest trimmed mean among those whose
    mean is not significantly worse). A mean over 400 rows or more sees a sampler's rare mode flips often
    enough to rank candidates by them, and the trimmed mean hides them. Checked offline on 52 cells the rule
    was not read off (``bench/choice_rule.py``, README "Which rule picks the plan"): significantly better
    than ``pick`` in 5, worse in 1, and no cell over 0.5x diffusers' best against one for ``pick`` (2.0x).
    Refinement still keeps its iterate by ``pick``; the offline check could not test that choice."""
    if len(next(iter(errors.values()))) >= SEEN_ROWS:
        return lowest_mean(errors)
    return pick(errors, trim)


@dataclass
class RowSplit:
    """Which rows are which: ``split`` per row (``CALIBRATION``, ``VALIDATION``, ``HELD_OUT``), each
    calibration row's id among all of them (``fit_id``; -1 for the others), the calibration rows the
    DP follows (``dp``), and the number of calibration rows in the whole group (``n_fit``)."""
    split: torch.Tensor
    fit_id: torch.Tensor
    dp: torch.Tensor
    n_fit: int

    @classmethod
    def assign(cls, n: int, spec: CalibrationSpec) -> "RowSplit":
        """A seeded three-way split of ``n`` rows (at least 2 in each part); the DP follows the first
        ``dp_samples`` calibration rows."""
        n_held, n_val = max(2, round(n * spec.holdout)), max(2, round(n * spec.validation))
        if n - n_held - n_val < 2:
            raise ParameterError("rows", f"{n} rows split into {n - n_held - n_val} calibration, {n_val} validation "
                                         f"and {n_held} held-out rows; need at least 2 of each")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
        split = torch.full((n,), CALIBRATION, dtype=torch.long)
        split[perm[:n_held]], split[perm[n_held:n_held + n_val]] = HELD_OUT, VALIDATION
        fit = (split == CALIBRATION).nonzero()[:, 0]
        fit_id = torch.full((n,), -1, dtype=torch.long)
        fit_id[fit] = torch.arange(len(fit))
        dp = (fit_id >= 0) & (fit_id < spec.dp_samples) if "dp" in spec.calibrators else torch.zeros(n, dtype=torch.bool)
        return cls(split, fit_id, dp, len(fit))

    def part(self, rank: int, size: int) -> "RowSplit":
        """Process ``rank``'s share of the rows (rows ``rank::size``)."""
        idx = torch.arange(rank, len(self.split), size)
        return RowSplit(self.split[idx], self.fit_id[idx], self.dp[idx], self.n_fit)


@dataclass
class CalibrationFigures:
    """What calibration measured; a plan's ``calibration`` field holds it as JSON (``to_dict``)."""
    accepted: bool = False
    chosen: str = "baseline"                 # the candidate that became the plan ("unipc/grad", ...) or "baseline"
    baseline: dict = field(default_factory=dict)      # {"method", "schedule"}: auto's rule
    samples: dict = field(default_factory=dict)       # rows per split
    error: dict = field(default_factory=dict)         # {"baseline"|"plan": {split: mean e}, "robust": {same, trimmed},
                                                      #  "candidates": {name: trimmed validation e},
                                                      #  "candidate_means": {name: mean}, "gate": {...}}
    model_evaluations: dict = field(default_factory=dict)   # per stage, rows x calls
    seconds: dict = field(default_factory=dict)       # per stage
    projection: dict = field(default_factory=dict)    # the probe's projection, before the work
    iterations: dict = field(default_factory=dict)    # refinement steps run, per base
    teacher_nfe: int = 0
    candidates: int = 0
    workers: int = 1
    sigma_clamp: float | None = None         # the grid's top when sigma_max is past SIGMA_INF_CLAMP
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationFigures":
        """The figures of a plan (plans from before the three splits lack some; they take defaults)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class CalibrationResult:
    plan: SolverPlan
    figures: CalibrationFigures
    candidates: dict = field(default_factory=dict)   # with ``diagnostics=True``: name -> ``CandidateReport``


@dataclass
class CandidateReport:
    """One candidate of a calibration (``calibrate(..., diagnostics=True)``): the plan it would be, and its
    per-sample errors against the teacher on the validation and held-out rows (the figures a choice
    rule and the gate see; ``bench/choice_rule.py`` compares rules on them)."""
    plan: SolverPlan
    validation: torch.Tensor
    held_out: torch.Tensor


@dataclass
class Candidate:
    """A plan candidate: a grid and per-step parameters on a base (no parameters: the plain base)."""
    name: str
    grid: torch.Tensor
    base: str
    shifts: torch.Tensor | None = None
    gains: torch.Tensor | None = None

    @property
    def refined(self) -> str:
        """The name of this candidate refined: ``<base>/grad`` from a plain start (the DP grid), else
        ``<name>+grad``."""
        return f"{self.base}/grad" if self.shifts is None else f"{self.name}+grad"


class Session:
    """One calibration's state in this process: its rows by split, the counted denoiser, the teacher,
    the clock and the group (what the stages below share)."""

    def __init__(self, spec: CalibrationSpec, denoiser: Callable, noise: torch.Tensor, rows: RowSplit, group: Group,
                 say: Callable[[str], None], lower: SolverPlan | None = None, lower_nfe: int | None = None,
                 probe: dict | None = None):
        self.spec, self.noise, self.rows, self.group, self.say, self.lower = spec, noise, rows, group, say, lower
        self.probe = probe                              # an earlier probe's figures, to project from
        self.lower_nfe = lower.nfe if lower is not None else lower_nfe      # (a projection's lower plan to come)
        self.den = Counter(denoiser)
        self.t0 = time.time()
        self.deadline = None if spec.time_budget_s is None else self.t0 + spec.time_budget_s
        self.idx = {s: (rows.split == s).nonzero()[:, 0] for s in (CALIBRATION, VALIDATION, HELD_OUT)}
        self.counts = {s: int(self.group.sum(torch.tensor(float(len(i))))) for s, i in self.idx.items()}
        self.teacher: Teacher | None = None
        self.evaluations: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.refined = 0                                # refinement starts done
        self._validation: dict[str, torch.Tensor] = {}

    @property
    def starts(self) -> int:
        """Refinement starts: each base's DP grid, and the nested plan when there is a lower one (counted,
        and its share of the time kept, even where ``nesting="rise"`` may not need it)."""
        return len(self.spec.bases) + (self.lower_nfe is not None)

    def stage(self, name: str, t: float) -> None:
        """Close a stage (again: it adds up): its seconds since ``t``, and the model evaluations since the
        last stage closed."""
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t, 2)
        self.evaluations[name] = self.evaluations.get(name, 0) + self.den.evaluations - sum(self.evaluations.values())

    def validation(self, cand: Candidate) -> torch.Tensor:
        """The candidate's per-sample errors on the validation rows, computed once per candidate name."""
        if cand.name not in self._validation:
            self._validation[cand.name] = self.errors(cand, VALIDATION)
        return self._validation[cand.name]

    def errors(self, cand: Candidate | SolverPlan, split: int, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The candidate's per-sample errors on a split (or on this process's rows ``idx``), every process's
        rows (in rank order)."""
        idx, out = self.idx[split] if idx is None else idx, []
        with torch.no_grad():
            for part in chunks(len(idx), self.spec.chunk):
                rows = idx[part]
                out.append(rms(self.run(cand, subset(self.den, rows), rows), self.teacher.target[rows]))
        return self.group.gather(torch.cat(out) if out else torch.zeros(0))

    def run(self, cand: Candidate | SolverPlan, den: Callable, rows: torch.Tensor) -> torch.Tensor:
        s, z = self.spec, self.noise[rows]
        if isinstance(cand, SolverPlan):          # the baseline, or a lower plan at its own nfe
            return sample(den, z, method=cand, nfe=cand.nfe, sigma_min=s.sigma_min, sigma_max=s.sigma_max)
        lim = None if self.teacher.limit is None else self.teacher.limit[rows]
        return run_plan(cand.grid, den, z, cand.shifts, cand.gains, lim, cand.base)


def calibrate(spec: CalibrationSpec, denoiser: Callable, noise: torch.Tensor, *, rows: RowSplit | None = None,
              group: Group | None = None, progress: Callable[[str], None] | None = None,
              diagnostics: bool = False, lower: SolverPlan | None = None, nesting: str = "rise",
              probe: dict | None = None) -> CalibrationResult:
    """Calibrate a solver plan for ``denoiser`` from standard-normal calibration ``noise`` ``[N, ...]``
    (see the module docstring). ``rows`` says which of this process's rows are which (default: a
    seeded split of all of them); ``group`` the processes calibrating together (default: the
    ``torch.distributed`` process group if one runs, else this process alone). ``diagnostics`` also
    returns every candidate, the baseline included, with its per-sample errors (``CandidateReport``;
    it costs one more held-out pass per other candidate, not counted in the plan's figures). ``lower``, this
    model's plan at a lower NFE (same sigma range, guidance and size), adds two candidates: that plan with
    steps inserted (``nest``), and that start refined: with ``nesting="rise"`` (the default) only if the
    candidates without them do not beat ``lower`` on the validation rows (``rises``), with ``"always"``
    always. ``probe``, the figures of an earlier probe of the same calibration (``projected``'s
    ``["probe"]``), is projected from instead of timing a new batch."""
    if lower is not None:
        check_lower(spec, lower)
    ses = _session(spec, denoiser, noise, rows, group, nesting, progress or (lambda m: log.info("%s", m)), lower,
                   probe=probe)
    projection = project(ses, check=lower is not None and nesting == "rise")
    _teacher(ses)
    baseline = baseline_plan(spec)
    start = _dp(ses) if "dp" in spec.calibrators else baseline.grid()
    found = [Candidate(f"{b}/{'dp' if 'dp' in spec.calibrators else 'baseline grid'}", start, b) for b in spec.bases]
    grad = "grad" in spec.calibrators
    if lower is not None and nesting == "always":
        found.append(nest(ses, lower))
    iterations = _refine_all(ses, found) if grad else {}
    if lower is not None and nesting == "rise":
        if rises(ses, found, lower):
            more = [nest(ses, lower)]
            iterations |= _refine_all(ses, more) if grad else {}
            found += more
    return _choose(ses, baseline, found, projection, iterations, diagnostics)


def projected(spec: CalibrationSpec, denoiser: Callable, noise: torch.Tensor, *, rows: RowSplit | None = None,
              group: Group | None = None, lower_nfe: int | None = None, nesting: str = "rise",
              probe: dict | None = None) -> tuple[dict, Cost]:
    """What ``calibrate`` projects before its work (``estimate``: the figures and their ``Cost``), without the
    work, for a plan family's budget to be planned up front; ``lower_nfe`` stands for the nfe of the lower
    plan ``calibrate`` will be given. It costs one probe batch, unless ``probe`` (an earlier one's figures)
    is given."""
    ses = _session(spec, denoiser, noise, rows, group, nesting, lambda m: None, lower_nfe=lower_nfe, probe=probe)
    return estimate(ses, check=lower_nfe is not None and nesting == "rise")


def _session(spec: CalibrationSpec, denoiser: Callable, noise: torch.Tensor, rows: RowSplit | None,
             group: Group | None, nesting: str, say: Callable[[str], None], lower: SolverPlan | None = None,
             lower_nfe: int | None = None, probe: dict | None = None) -> Session:
    spec.check()
    if nesting not in NESTING:
        raise ParameterError("nesting", f"expected one of {list(NESTING)}, got {nesting!r}")
    return Session(spec, denoiser, noise, rows or RowSplit.assign(noise.shape[0], spec), group or Group(), say,
                   lower, lower_nfe, probe)


def _teacher(ses: Session) -> None:
    s, t = ses.spec, time.time()
    ses.say(f"teacher: {ses.noise.shape[0]} rows x {s.teacher_nfe} model calls")
    ses.teacher = run_teacher(ses.den, ses.noise, s.sigma_min, s.sigma_max, nfe=s.teacher_nfe, candidates=s.candidates,
                              keep_states=ses.rows.dp, batch_size=s.chunk)
    ses.stage("teacher", t)


def _dp(ses: Session) -> torch.Tensor:
    s, t = ses.spec, time.time()
    dp_rows = ses.rows.dp.nonzero()[:, 0]
    tt = ses.teacher
    dp_teacher = Teacher(tt.levels, tt.target[dp_rows], tt.states, None if tt.limit is None else tt.limit[dp_rows],
                         tt.nfe)
    grid = dp_search(subset(ses.den, dp_rows), ses.noise[dp_rows], dp_teacher, s.nfe, s.sigma_max, ses.group)
    ses.stage("dp", t)
    ses.say(f"dp: grid {[round(v, 4) for v in grid.tolist()]}")
    return grid


def _refine_all(ses: Session, found: list[Candidate]) -> dict[str, int]:
    """Refine every start in ``found`` (each base from the DP grid, and a nested plan), the most promising
    (lowest validation error) first, each within an equal share of the time left before the budget's
    reserve; the refined candidates join ``found``."""
    s, t, iterations = ses.spec, time.time(), {}
    order = sorted(found, key=lambda c: trimmed_mean(ses.validation(c), s.trim)) if len(found) > 1 else list(found)
    idx = ses.idx[CALIBRATION]
    fit = Fit(subset(ses.den, idx), ses.noise[idx], ses.teacher.target[idx],
              None if ses.teacher.limit is None else ses.teacher.limit[idx], ses.rows.fit_id[idx], ses.rows.n_fit,
              s.chunk)
    for k, cand in enumerate(order):
        deadline = None
        if ses.deadline is not None:
            left = ses.deadline - time.time() - _reserve(ses)
            deadline = time.time() + max(0.0, left) / max(1, ses.starts - ses.refined)

        def validate(p, base=cand.base) -> torch.Tensor:
            return ses.errors(Candidate("", p.grid().detach(), base, p.shifts.detach(), p.gains.detach()), VALIDATION)
        params, _, its = refine(fit, cand.grid, s.sigma_min, s.sigma_max, base=cand.base, validate=validate,
                                iterations=s.iterations, batch_size=s.batch_size, lr=s.lr, deadline=deadline,
                                seed=s.seed, use_checkpoint=s.use_checkpoint, validate_every=s.validate_every,
                                patience=s.patience, trim=s.trim, group=ses.group, progress=ses.say,
                                shifts=cand.shifts, gains=cand.gains)
        with torch.no_grad():
            found.append(Candidate(cand.refined, params.grid().detach(), cand.base, params.shifts.detach(),
                                   params.gains.detach()))
        iterations[cand.base if cand.shifts is None else cand.name] = its
        ses.refined += 1
    ses.stage("refine", t)
    return iterations


def final_rows(counts: dict[int, int], starts: int) -> int:
    """Rows the final choice and gate evaluate: each start's two candidates (DP grid and refined) and the
    baseline on the validation rows, and the baseline and the plan on the held-out and calibration rows."""
    return (2 * starts + 1) * counts[VALIDATION] + 2 * (counts[HELD_OUT] + counts[CALIBRATION])


def _reserve(ses: Session) -> float:
    """Seconds to keep for the final choice and gate (from the probe's rate)."""
    s = ses.spec
    rows = final_rows(ses.counts, ses.starts)
    per_row = ses.seconds.get("call_forward", 0.0) / max(1, ses.seconds.get("probe_rows", 1))
    return rows * s.nfe * per_row / ses.group.size


def _choose(ses: Session, baseline: SolverPlan, found: list[Candidate], projection: dict,
            iterations: dict, diagnostics: bool = False) -> CalibrationResult:
    """The candidate ``choose`` takes on the validation rows, gated against the baseline on the held-out
    rows (``gate``)."""
    s, t = ses.spec, time.time()
    val = {c.name: ses.validation(c) for c in found}
    scored = {n: trimmed_mean(e, s.trim) for n, e in val.items()}
    chosen = choose(val, s.trim)
    best = next(c for c in found if c.name == chosen)
    base_e = {n: ses.errors(baseline, k) for k, n in enumerate(SPLIT_NAMES)}
    plan_e = {n: val[best.name] if k == VALIDATION else ses.errors(best, k) for k, n in enumerate(SPLIT_NAMES)}
    accepted, test = gate(plan_e["held_out"], base_e["held_out"], s.trim)
    ses.stage("evaluation", t)
    ses.say(f"plan ({best.name}): held-out error {test['plan']:.4g} vs baseline {test['baseline']:.4g} (mean less its "
            f"largest {s.trim:.0%})" + ("" if accepted else ": not better, returning the baseline"))
    mean = {k: {n: float(e.mean()) for n, e in v.items()} for k, v in (("baseline", base_e), ("plan", plan_e))}
    robust = {k: {n: trimmed_mean(e, s.trim) for n, e in v.items()} for k, v in (("baseline", base_e), ("plan", plan_e))}
    kept = "plan" if accepted else "baseline"
    figures = _figures(ses, baseline, best.name if accepted else "baseline", accepted,
                       {"baseline": mean["baseline"], "plan": mean[kept], "candidates": scored,
                        "candidate_means": {n: float(e.mean()) for n, e in val.items()}, "gate": test,
                        "robust": {"baseline": robust["baseline"], "plan": robust[kept]}}, projection, iterations)
    meta = dict(nfe=s.nfe, sigma_min=s.sigma_min, sigma_max=s.sigma_max,
                model=PlanModel(id=s.model_id, schedule=s.noise_schedule, schedule_options=dict(s.grid_options)),
                guidance_scale=s.guidance_scale, resolution=tuple(s.resolution) if s.resolution else None,
                latent_shape=tuple(ses.noise.shape[1:]), calibration=figures.to_dict())
    plan = _plan(best if accepted else baseline, meta)
    reports = {}
    if diagnostics:
        # after the evaluation stage closed, so the plan's figures count no diagnostic passes
        reports = {c.name: CandidateReport(_plan(c, meta), val[c.name],
                                           plan_e["held_out"] if c is best else ses.errors(c, HELD_OUT)) for c in found}
        reports["baseline"] = CandidateReport(_plan(baseline, meta), base_e["validation"], base_e["held_out"])
    return CalibrationResult(plan, figures, reports)


def _plan(cand: Candidate | SolverPlan, meta: dict) -> SolverPlan:
    """The sealed plan of a candidate (or of the baseline plan), with the calibration's ``meta`` fields."""
    if isinstance(cand, SolverPlan):
        return SolverPlan(base=cand.base, sigmas=cand.sigmas, options=cand.options, **meta).sealed()
    return SolverPlan(base=cand.base, sigmas=tuple(cand.grid.tolist()), shifts=_values(cand.shifts),
                      gains=tuple(map(tuple, cand.gains.tolist())) if cand.gains is not None else (),
                      **meta).sealed()


def gate(plan: torch.Tensor, base: torch.Tensor, trim: float) -> tuple[bool, dict]:
    """Accept the plan over the baseline on the held-out rows (paired per sample): if its typical error is
    lower (the trimmed mean) and its mean error is not significantly higher (the mean per-sample difference
    below two standard errors of it; a few samples ending in another mode swing a hundred-row mean)."""
    mean, se = paired_difference(plan, base)
    test = {"plan": trimmed_mean(plan, trim), "baseline": trimmed_mean(base, trim), "mean_difference": mean,
            "standard_error": se, "rows": len(plan)}
    return test["plan"] < test["baseline"] and mean <= 2 * se, test


def _values(t: torch.Tensor | None) -> tuple:
    return tuple(t.tolist()) if t is not None else ()


def _figures(ses: Session, baseline: SolverPlan, chosen: str, accepted: bool, errors: dict, projection: dict,
             iterations: dict) -> CalibrationFigures:
    s, stages = ses.spec, ("teacher", "dp", "nest", "refine", "evaluation")
    evals = {k: int(ses.group.sum(torch.tensor(float(ses.evaluations[k])))) for k in stages if k in ses.evaluations}
    seconds = {k: v for k, v in ses.seconds.items() if k in stages}
    return CalibrationFigures(
        accepted=accepted, chosen=chosen, baseline={"method": baseline.base, "schedule": baseline.calibration["schedule"]},
        samples={n: ses.counts[k] for k, n in enumerate(SPLIT_NAMES)}, error=errors,
        model_evaluations={**evals, "total": sum(evals.values())},
        seconds={**seconds, "total": round(time.time() - ses.t0, 2)}, projection=projection, iterations=iterations,
        teacher_nfe=s.teacher_nfe, candidates=len(ses.teacher.levels), workers=ses.group.size,
        sigma_clamp=SIGMA_INF_CLAMP if not math.isinf(s.sigma_max) and s.sigma_max > SIGMA_INF_CLAMP else None,
        seed=s.seed)


def baseline_plan(spec: CalibrationSpec) -> SolverPlan:
    """The ``auto`` rule's method and grid for this model, as a plan without per-step parameters."""
    method, grid_name, options = auto_method(spec.nfe, kind=spec.noise_schedule, guidance=spec.guidance_scale)
    sigmas, extra = build_grid(method, spec.nfe, spec.sigma_min, spec.sigma_max, grid_name,
                               schedule_options=spec.grid_options or None, options=options)
    return SolverPlan(base=method, nfe=spec.nfe, sigma_min=spec.sigma_min, sigma_max=spec.sigma_max,
                      sigmas=tuple(sigmas.tolist()), options={**options, **extra}, calibration={"schedule": grid_name})


# ---------------------------------------------------------------- nesting a lower-NFE plan
NEST_ROWS = 256   # calibration rows that choose where nest() inserts its steps
NESTING = ("always", "rise")     # calibrate(nesting=): nest a lower plan always, or on a validated rise only
LOWER = "the lower plan"


def check_lower(spec: CalibrationSpec, lower: SolverPlan) -> None:
    """Refuse a ``lower`` plan that is not this model's plan at a lower NFE (``ParameterError`` naming both
    values)."""
    ours = (("model id", spec.model_id, lower.model.id), ("noise schedule", spec.noise_schedule, lower.model.schedule),
            ("guidance scale", spec.guidance_scale, lower.guidance_scale),
            ("resolution", tuple(spec.resolution) if spec.resolution else None, lower.resolution))
    for name, want, got in ours:
        if want != got:
            raise ParameterError("lower", f"plan {lower.hash} is for {name} {got}, not {want}")
    if lower.nfe >= spec.nfe:
        raise ParameterError("lower", f"plan {lower.hash} has nfe {lower.nfe}; nesting needs a lower nfe than {spec.nfe}")
    try:
        lower.check(lower.nfe, spec.sigma_min, spec.sigma_max, source="lower")
    except ValueError as e:
        raise ParameterError("lower", str(e)) from None
    if lower.base not in BASES:
        raise ParameterError("lower", f"plan {lower.hash} runs {lower.base!r}; nesting needs one of {list(BASES)}")


def nest_evaluations(lower_nfe: int | None, nfe: int, n_fit: int, n_check: int = 0) -> int:
    """Model evaluations of ``nest`` from a lower plan of ``lower_nfe`` steps (every split tried at every
    insertion, on its rows), and of ``rises`` on ``n_check`` validation rows."""
    if lower_nfe is None:
        return 0
    return min(NEST_ROWS, n_fit) * sum((k + 1) * k for k in range(lower_nfe, nfe)) + n_check * lower_nfe


def rises(ses: Session, found: list[Candidate], lower: SolverPlan) -> bool:
    """Whether the error would rise from ``lower``'s nfe to this one: ``choose``, offered ``lower`` beside
    the candidates ``found`` on the validation rows, takes ``lower`` (the lowest mean on 400 rows or more).
    ``calibrate(nesting="rise")`` nests ``lower`` only then. The check reruns ``lower`` on these rows; where
    ``lower`` was chosen on the same rows (a family calibrated on one set of rows) its figure is optimistic,
    which makes the check fire more often, not less. The candidates' validation pass (the choice's, done
    early) counts in the evaluation stage; the lower plan's pass in ``nest``'s."""
    t = time.time()
    val = {c.name: ses.validation(c) for c in found}
    ses.stage("evaluation", t)
    t = time.time()
    low = ses.errors(lower, VALIDATION)
    ses.stage("nest", t)
    rise = choose({**val, LOWER: low}, ses.spec.trim) == LOWER
    best = choose(val, ses.spec.trim)
    ses.say(f"nest: the best candidate ({best}, validation mean {float(val[best].mean()):.4g}) "
            f"{'does not beat' if rise else 'beats'} plan {lower.hash} at nfe {lower.nfe} ({float(low.mean()):.4g})"
            + (": nesting it" if rise else ": no nesting"))
    return rise


def nest(ses: Session, lower: SolverPlan) -> Candidate:
    """The start ``<base>/nested <k>``: the ``lower`` plan (this model's, at nfe k below this one) with
    ``nfe - k`` steps inserted one at a time, each where ``pick`` prefers it on the first ``NEST_ROWS``
    calibration rows (their plain mean is dominated by a few rows far from every plan). A step is split at
    its log-midpoint (the new step without shift or gains), or the last step to 0 is split at sigma_min
    (the new last step taking the old one's parameters).

    A calibrated plan's steps make up for each other's errors, so an inserted step undoes part of that
    (on mix16-sd, splitting a middle step of a 5-step plan raised its error 2-5x; splitting its last
    step at sigma_min did not). ``calibrate`` therefore refines this start too, like each base's DP
    grid, and keeps its best validated iterate. The choice can then take what the lower NFE reached, and
    more: a family of NFEs is calibrated lowest first, each nesting the one before where ``rises`` finds
    that the plan would otherwise not beat it (``calibrate.nest: rise``, the default of ``jobs.calibrate``;
    ``always`` nests every time, which on unseen problems added as many rising steps as it removed; README
    "Nested plans").
    The steps are placed on calibration rows; the validation rows that choose among the candidates also
    chose the lower plan, which favours the nested ones (README)."""
    t, off = time.time(), int(math.isinf(lower.sigmas[0]))
    steps = lower.nfe - off
    idx = ses.idx[CALIBRATION]
    idx = idx[ses.rows.fit_id[idx] < NEST_ROWS]
    cand = Candidate(f"{lower.base}/nested {lower.nfe}", lower.grid(), lower.base,
                     torch.tensor(lower.shifts or [0.0] * steps, dtype=torch.float64),
                     torch.tensor(lower.gains or [(0.0, 0.0)] * steps, dtype=torch.float64).reshape(steps, 2))
    for _ in range(ses.spec.nfe - lower.nfe):
        g = cand.grid
        splits = [_split(cand, j, (g[j] * g[j + 1]).sqrt(), j + 1 - off) for j in range(off, len(g) - 1) if g[j + 1] > 0]
        if g[-2] > ses.spec.sigma_min:        # the last step to 0, split at sigma_min
            splits.append(_split(cand, len(g) - 2, g.new_tensor(ses.spec.sigma_min), len(g) - 2 - off))
        errors = {str(k): ses.errors(c, CALIBRATION, idx) for k, c in enumerate(splits)}
        cand = splits[int(pick(errors, ses.spec.trim))]
    ses.stage("nest", t)
    ses.say(f"nest: plan {lower.hash} (nfe {lower.nfe}) on grid {[round(v, 4) for v in cand.grid.tolist()]}")
    return cand


def _split(cand: Candidate, j: int, level: torch.Tensor, at: int) -> Candidate:
    """``cand`` with step ``j`` split at ``level``; a step without shift or gains enters the per-step
    parameters at index ``at``."""
    g = cand.grid
    return Candidate(cand.name, torch.cat([g[:j + 1], level.reshape(1), g[j + 1:]]), cand.base,
                     torch.cat([cand.shifts[:at], torch.zeros(1, dtype=torch.float64), cand.shifts[at:]]),
                     torch.cat([cand.gains[:at], torch.zeros(1, 2, dtype=torch.float64), cand.gains[at:]]))


# ---------------------------------------------------------------- the probe and the projection
@dataclass(frozen=True)
class Cost:
    """A calibration's projected seconds, in the parts a time budget treats differently: the teacher and
    the DP, the rest but refinement's steps (the final choice and gate, nesting), which together are the
    ``fixed`` seconds a budget must hold (else it is refused), and refinement's steps with their
    validation checks (what a budget cuts)."""
    teacher_dp: float
    other: float
    refine: float

    @property
    def fixed(self) -> float:
        """Seconds that do not shrink with the budget."""
        return self.teacher_dp + self.other


def estimate(ses: Session, check: bool = False) -> tuple[dict, Cost]:
    """Time one batch of model calls (forward, and forward with a checkpointed backward) and project
    the whole calibration's model evaluations and seconds from it (with a lower plan, nesting counted
    even where ``check``, ``nesting="rise"``, may not need it): the projection (as the plan's figures keep
    it) and its ``Cost``. Every process of the group gets the same figures.

    A call on ``r`` rows is taken to cost ``max(r, B) / B`` probe calls of ``B`` rows (fixed costs
    dominate small batches, compute large ones); refinement rows are evaluated twice (the forward
    pass and the checkpoint's recompute) and backpropagated once."""
    s, c, w = ses.spec, ses.counts, ses.group.size
    fwd, back, b = _probe(ses)
    ses.seconds["call_forward"], ses.seconds["probe_rows"] = fwd, b
    steps, m, chunk = s.nfe - int(math.isinf(s.sigma_max)), min(s.candidates, s.teacher_nfe), s.chunk or 10 ** 9
    dp_rows = int(ses.group.sum(ses.rows.dp.sum())) if "dp" in s.calibrators else 0
    n, per_batch = sum(c.values()), min(s.batch_size, c[CALIBRATION])
    refines = ses.starts * s.iterations if "grad" in s.calibrators else 0
    checks = ses.starts * (s.iterations // s.validate_every) * c[VALIDATION] if refines else 0   # during refinement
    evals = {"teacher": n * s.teacher_nfe, "dp": dp_rows * steps * m, "refine": 2 * refines * per_batch * s.nfe,
             "validation": (checks + final_rows(c, ses.starts if refines else 0)) * s.nfe,
             "nest": nest_evaluations(ses.lower_nfe, s.nfe, c[CALIBRATION], c[VALIDATION] if check else 0)}

    def cost(rows: float, calls: float, per_call: float) -> float:       # seconds of `calls` calls on `rows` rows
        return calls * per_call * max(rows, b) / b if rows else 0.0
    teacher_dp = (cost(min(n / w, chunk), s.teacher_nfe * math.ceil(n / w / chunk), fwd)
                  + cost(dp_rows / w, steps * m, fwd))
    refine_s = cost(per_batch / w, refines * s.nfe, back)
    validation_s = cost(min(c[VALIDATION] / w, chunk), evals["validation"] / max(1, c[VALIDATION]), fwd)
    nest_rows = min(NEST_ROWS, c[CALIBRATION])
    nest_s = cost(min(nest_rows / w, chunk), evals["nest"] / max(1, nest_rows), fwd)
    checks_s = validation_s / max(1, evals["validation"]) * checks * s.nfe
    seconds = teacher_dp + refine_s + validation_s + nest_s
    proj = {"model_evaluations": {**evals, "total": sum(evals.values())}, "seconds": round(seconds, 1),
            "probe": {"rows": b, "forward_s": fwd, "forward_backward_s": back}, "workers": w}
    return proj, Cost(teacher_dp, validation_s - checks_s + nest_s, refine_s + checks_s)


def project(ses: Session, check: bool = False) -> dict:
    """``estimate``, logged; stop early (``ParameterError`` on ``time_budget_s``) when the teacher, the DP,
    the final checks and nesting alone would not fit the budget, and say how many refinement steps a
    budget leaves."""
    s = ses.spec
    proj, cost = estimate(ses, check)
    evals, w, probe = proj["model_evaluations"], proj["workers"], proj["probe"]
    ses.say(f"projected: {evals['total']:,} model evaluations (teacher {evals['teacher']:,}, "
            f"dp {evals['dp']:,}, refine {evals['refine']:,}, validation {evals['validation']:,}"
            + (f", nest {evals['nest']:,}" if evals["nest"] else "") + "), about "
            f"{proj['seconds']:,.0f} s on {w} worker(s) (probe: {probe['rows']} rows, "
            f"{1e3 * probe['forward_s']:.3g} ms per model call, {1e3 * probe['forward_backward_s']:.3g} ms with backward)")
    refines = ses.starts * s.iterations if "grad" in s.calibrators else 0
    if s.time_budget_s is not None and refines:      # a step's share: its gradient and every validate_every-th check
        steps = proj["steps_in_budget"] = budget_steps(s.time_budget_s, cost.fixed, cost.refine / refines,
                                                       ses.starts, s.iterations)
        if steps < s.iterations and cost.fixed <= s.time_budget_s:
            ses.say(f"time_budget_s: {s.time_budget_s:.4g} s leaves about {steps} of {s.iterations} refinement steps "
                    f"per start ({ses.starts} starts; projected from the probe's model calls): a plan cut short is "
                    "less accurate than the full setting's (README: What a time budget costs)")
    if s.time_budget_s is not None and cost.fixed > s.time_budget_s:
        raise ParameterError("time_budget_s", f"the teacher, the DP, the final checks and nesting alone take about "
                                              f"{cost.fixed:,.0f} s, more than the budget of {s.time_budget_s:g} s: "
                                              "use fewer rows, a lower calibrate.teacher_nfe or calibrate.candidates, "
                                              "or more workers")
    return proj


def budget_steps(budget_s: float, other_s: float, step_s: float, starts: int, iterations: int) -> int:
    """Refinement steps per start that fit in ``budget_s``, the rest of the calibration taking ``other_s``
    and a step ``step_s``, the starts sharing the time equally as refinement does; at most ``iterations``."""
    return max(0, min(iterations, math.floor((budget_s - other_s) / max(step_s * starts, 1e-12) + 1e-9)))


def _probe(ses: Session) -> tuple[float, float, int]:
    """Seconds of one model call on a probe batch, and of one checkpointed call with its backward pass,
    and the batch's rows: the means over the group's processes that have rows, so every process
    projects the same figures (and takes the same decisions on a budget); or the session's earlier probe."""
    s = ses.spec
    if ses.probe is not None:
        return ses.probe["forward_s"], ses.probe["forward_backward_s"], ses.probe["rows"]
    rows = torch.arange(min(ses.noise.shape[0], s.chunk or s.batch_size, s.batch_size))
    timed = torch.zeros(4, dtype=torch.float64)            # forward s, backward s, rows, processes timed
    if len(rows):                                           # (a process without rows still takes part)
        den, level = subset(ses.den.denoiser, rows), min(top_level(s.sigma_max), 1.0)
        x = ses.noise[rows] * level
        sig = torch.full((len(rows),), level, dtype=x.dtype, device=x.device)

        def forward() -> None:
            with torch.no_grad():
                den(x, sig)

        def backward() -> None:
            out = checkpoint(den, x.clone().requires_grad_(True), sig, use_reentrant=False)
            if out.requires_grad:                           # (a denoiser that ignores x has nothing to backpropagate)
                out.pow(2).sum().backward()
        sync = torch.cuda.synchronize if x.is_cuda else None
        timed = torch.tensor([_timed(forward, sync), _timed(backward, sync), len(rows), 1.0], dtype=torch.float64)
    fwd, back, b, n = (float(v) for v in ses.group.sum(timed))
    n = max(n, 1.0)
    return fwd / n, back / n, max(1, round(b / n))  # back: the call, its recompute in the backward pass, the backward


def _timed(fn: Callable[[], None], sync: Callable[[], None] | None = None, repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, after one untimed (first-call allocations).
    ``sync`` waits for the device (``torch.cuda.synchronize``): a GPU runs the kernels after the call
    returns, so without it the time would be the launches' alone."""
    wait = sync or (lambda: None)
    fn()
    wait()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - t)
    return min(times)


__all__ = ["CalibrationSpec", "CalibrationResult", "CalibrationFigures", "RowSplit", "calibrate", "projected", "Cost",
           "run_teacher",
           "dp_search", "teacher_grid", "Teacher", "baseline_plan", "nest", "rises", "NESTING"]
