"""The calibration job (``python -m jobs.calibrate``): a solver plan family for the job's model, on Ray Train.

    manifest rows (prompts, seeds) -> one list of resolved requests per entry          driver
        (entry = nfe x guidance scale x size: calibrate.nfes x guidance_scales x sizes)
    TorchTrainer (calibrate.workers data-parallel workers, each loading the model once):
        for each entry, lowest nfe first: its rows split three ways (calibration / validation / held out),
        each worker taking rows rank::workers; samplers.calibrate sums every stage over the
        workers (the teacher and the DP's costs per worker, the refinement's gradients and the
        validation errors all-reduced by torch.distributed); the plan of the same guidance and size at
        the next lower nfe is a candidate too, with steps inserted, where no other candidate beats it on
        the validation rows (calibrate.nest: rise, the default; always; never)
        -> rank 0 reports the PlanFamily as a checkpoint
    -> the family JSON at calibrate.out, a table of the figures                        driver

Before any work, the rank-0 worker logs the family's projected model evaluations and time, from a timed
probe batch per entry (``samplers.calibrate.projected``), and before each entry's work that entry's.
``calibrate.time_budget_s`` covers the whole job. A budget that the entries' fixed seconds (teacher, DP,
final checks, nesting) alone exceed is refused before any other work; otherwise each entry gets its fixed seconds and
a part of the rest in proportion to its refinement's (``budget_share``), and refinement stops at its best
validated iterate when the entry's share runs out. An entry whose share no longer covers its fixed
seconds (earlier ones ran past their projection) is left out, the others go on, and the job writes the
entries done and exits 1 (``BudgetExhausted``), naming the ones left out.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import fsspec
import ray
import torch

from . import manifest
from .config import JobConfig, from_dict, to_dict
from .errors import BudgetExhausted, ConfigError, ManifestError, OutputConflict, PipelineError, RequestError
from .job import ensure_ray
from .request import Request, RequestFields, resolver_for
from .samplers import CalibrationSpec, PlanFamily, calibrate
from .samplers.calibrate import CalibrationFigures, Cost, RowSplit, projected, thin_validation
from .storage import OutputDir
from .worker import Generator

log = logging.getLogger(__name__)
FAMILY_FILE, REFUSED_FILE = "plan.json", "refused.json"
BUDGET_KEY = "calibrate.time_budget_s"


@dataclass
class Entry:
    """One plan of the family to calibrate: its nfe, guidance scale and size, and its rows (Arrow rows
    of resolved requests)."""
    nfe: int
    guidance_scale: float
    height: int
    width: int
    rows: list[dict]

    def label(self) -> str:
        return f"nfe {self.nfe}, guidance {self.guidance_scale:g}, {self.height}x{self.width}"

    def shape(self) -> tuple[float, int, int]:
        """(guidance scale, height, width): the entries of one shape nest, lowest nfe first."""
        return self.guidance_scale, self.height, self.width


# ---------------------------------------------------------------- on the driver
def entries(cfg: JobConfig) -> list[Entry]:
    """Every entry's calibration rows: the manifest's (or template's) rows resolved at the entry's nfe,
    guidance scale and size (the rows' own values of those are replaced). ``ManifestError`` names the
    file (or template), row and field; fewer than 8 rows are refused."""
    c, d = cfg.calibrate, cfg.defaults
    nfes, key = (c.nfes, "calibrate.nfes") if c.nfes else ([cfg.sampler.nfe], "sampler.nfe")
    if nfes[0] < 2:
        raise ConfigError(key, f"a solver plan needs nfe >= 2, got {nfes[0]}")
    levels = min(c.candidates, c.teacher_nfe)                  # the DP's grid is chosen among these levels
    if "dp" in c.calibrators and max(nfes) > levels:
        short = "calibrate.candidates" if c.candidates <= c.teacher_nfe else "calibrate.teacher_nfe"
        raise ConfigError(short, f"the DP picks {max(nfes)} steps ({key} {max(nfes)}) among min(calibrate.candidates, "
                                 f"calibrate.teacher_nfe) = {levels} levels: raise {short} to {max(nfes)} or more")
    base = replace(cfg, sampler=replace(cfg.sampler, plan=None, method="dpmpp_2m", schedule=None, options={}),
                   search=replace(cfg.search, method="none"))
    resolve = resolver_for(base)
    raws, source = _raw_rows(cfg)
    out = []
    for nfe in c.nfes or [cfg.sampler.nfe]:
        for g in c.guidance_scales if c.guidance_scales is not None else [d.guidance_scale]:
            for h, w in c.sizes or [[d.height, d.width]]:
                rows = []
                for i, raw in enumerate(raws):
                    fields = {**raw, "nfe": nfe, "steps": None, "guidance_scale": g, "height": h, "width": w}
                    try:
                        rows += [r.to_row() for r in resolve(RequestFields.model_validate(fields), i, len(rows))]
                    except RequestError as e:
                        raise manifest.row_failure(source, i, e) from None
                out.append(Entry(nfe, g, h, w, rows))
    if len(out[0].rows) < 8:
        raise ManifestError(source, f"{len(out[0].rows)} calibration rows; need at least 8 (more rows generalise "
                                    "better: a few hundred is typical)")
    return out


def _raw_rows(cfg: JobConfig) -> tuple[list[dict], str]:
    m = cfg.manifest
    if m.template is not None:
        t = manifest.Template(m.template, dict(m.values), m.count)
        raws, source = (t.raw_row(i) for i in range(len(t))), "manifest.template"
    else:
        raws, source = manifest.iter_raw_rows(m.path), m.path
    out = []
    for raw in raws:
        if m.limit is not None and len(out) >= m.limit:
            break
        out.append(raw)
    return out, source


@dataclass
class CalibrationSummary:
    url: str
    family: PlanFamily
    seconds: float
    refused: list[dict] = field(default_factory=list)     # entries a time budget left out: {"entry", "reason", ...}

    def __str__(self) -> str:
        f = self.family
        lines = [f"solver plan family {f.hash} for {f.model.id}: {len(f.entries)} entr{'y' if len(f.entries) == 1 else 'ies'} "
                 f"written to {self.url} (guidance rule: {f.guidance_rule})", "",
                 "| entry | plan | accepted | held-out error: baseline | plan | ratio | calibration rows / validation "
                 "/ held out | projected s | measured s |", "|---|---|---|---|---|---|---|---|---|"]
        for p in f.entries:
            fig = CalibrationFigures.from_dict(p.calibration)
            e, n = fig.error, fig.samples
            lines.append(f"| {p.label()} | {fig.chosen} | {'yes' if fig.accepted else 'NO (baseline)'} | "
                         f"{e['baseline']['held_out']:.4g} | {e['plan']['held_out']:.4g} | "
                         f"{e['plan']['held_out'] / e['baseline']['held_out']:.2f} | {n['calibration']} / "
                         f"{n['validation']} / {n['held_out']} | {fig.projection.get('seconds', float('nan')):.0f} | "
                         f"{fig.seconds['total']:.0f} |")
        lines += [f"| {r['entry']} | NOT CALIBRATED (time budget) | | | | | | | |" for r in self.refused]
        evals = sum(CalibrationFigures.from_dict(p.calibration).model_evaluations["total"] for p in f.entries)
        lines += ["", f"model evaluations (rows x calls): {evals:,}; wall {self.seconds:.1f} s"]
        return "\n".join(lines)


def run_calibration(cfg: JobConfig) -> CalibrationSummary:
    """The whole calibration job; returns its summary (the plan family is written to ``calibrate.out``)."""
    t0 = time.time()
    c = cfg.calibrate
    url = c.out or f"{cfg.output.path.rstrip('/')}/{FAMILY_FILE}"
    parent, name = url.rsplit("/", 1) if "/" in url else (".", url)
    if OutputDir(parent).exists(name) and not cfg.output.overwrite:
        raise OutputConflict(url, "already exists; pick another calibrate.out, or pass --overwrite")
    work = entries(cfg)
    ensure_ray(cfg.ray, dashboard=True)
    workers = c.workers or max(1, min(train_workers(cfg), math.ceil(len(work[0].rows) / cfg.ray.batch_size)))
    log.info("calibrating %s: %d entr%s (%s), %d rows each, on %d worker(s)", cfg.model.kind, len(work),
             "y" if len(work) == 1 else "ies", "; ".join(e.label() for e in work), len(work[0].rows), workers)
    if warning := thin_validation(len(work[0].rows), c.validation):
        log.warning("calibrate: %s", warning)
    family, refused = _train(cfg, work, workers, parent)
    family.to_json(url)
    summary = CalibrationSummary(url, family, time.time() - t0, refused)
    if refused:
        log.warning("%s", summary)
        fallback = ("the nearest entry of their nfe and size when one is calibrated on each side of their guidance "
                    "scale (guidance_rule nearest), else auto's rule" if family.guidance_rule == "nearest"
                    else "auto's rule")
        raise BudgetExhausted(BUDGET_KEY, f"the budget of {c.time_budget_s:g} s ran out before {len(refused)} of "
                                          f"{len(work)} entries ({'; '.join(r['entry'] for r in refused)}): the "
                                          f"other {len(family.entries)} are written to {url}, where rows the missing "
                                          f"entries would take run {fallback}. For the whole family, raise "
                                          "calibrate.time_budget_s and rerun with --overwrite")
    return summary


def train_workers(cfg: JobConfig) -> int:
    """Data-parallel workers that fit the cluster: every GPU (``GPUs / num_gpus_per_actor``), or every CPU
    (``CPUs / num_cpus_per_actor``: calibration has no read or write tasks to keep CPUs for)."""
    r, res = cfg.ray, ray.cluster_resources()
    if r.num_gpus_per_actor > 0:
        return max(1, int(res.get("GPU", 0) // r.num_gpus_per_actor))
    return max(1, int(res.get("CPU", 1) // (r.num_cpus_per_actor or 1)))


def train_backend(use_gpu: bool) -> str:
    """The ``torch.distributed`` backend of the calibration workers. The calibrator sums and gathers on the
    CPU (``samplers.calibrators.Group``), so GPU workers need gloo for CPU tensors beside NCCL (Ray
    Train's default with GPUs is NCCL alone, which cannot reduce a CPU tensor)."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def worker_config(cfg: JobConfig) -> JobConfig:
    """The job's config as the Ray Train workers get it: the model's local path absolute (each worker runs in
    its own folder), no feature cache (``model.cache`` would reuse deep features across the teacher's, the
    DP's and the gradients' unrelated calls), no plan and no search."""
    model_path = cfg.model.path and (str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).exists()
                                     else cfg.model.path)
    return replace(cfg, model=replace(cfg.model, path=model_path, cache=None), sampler=replace(cfg.sampler, plan=None),
                   search=replace(cfg.search, method="none", reward=None))


def _train(cfg: JobConfig, work: list[Entry], workers: int, parent: str) -> tuple[PlanFamily, list[dict]]:
    """Run the calibration on a ``TorchTrainer`` of ``workers`` workers; the family rank 0 reports, and the
    entries a time budget left out."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r, c = cfg.ray, cfg.calibrate
    if cfg.model.cache:
        log.info("calibrate: model.cache=%s is off while calibrating (every call runs the full network, as the "
                 "teacher and the gradients need); generation with the plan still uses it", cfg.model.cache)
    cfg = worker_config(cfg)
    storage = c.storage_path or (f"{parent}/_calibrate_runs" if "://" in parent else
                                 str(Path(parent).resolve() / "_calibrate_runs"))
    run = f"calibrate-{uuid.uuid4().hex[:12]}"
    trainer = TorchTrainer(
        calibrate_worker, train_loop_config={"cfg": to_dict(cfg), "entries": [vars(e) for e in work]},
        torch_config=TorchConfig(backend=train_backend(r.num_gpus_per_actor > 0)),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=r.num_gpus_per_actor > 0,
                                     resources_per_worker={"CPU": r.num_cpus_per_actor,
                                                           **({"GPU": r.num_gpus_per_actor} if r.num_gpus_per_actor else {})}),
        run_config=RunConfig(storage_path=storage, name=run))
    fs, path = fsspec.core.url_to_fs(f"{storage}/{run}")
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            return (PlanFamily.model_validate_json(Path(d, FAMILY_FILE).read_text()),
                    json.loads(Path(d, REFUSED_FILE).read_text()))
    except Exception as e:      # noqa: BLE001 - a worker's typed error (a budget, a bad row) says more than Ray's
        raise _worker_error(e) or e
    finally:
        if fs.exists(path):
            fs.rm(path, recursive=True)          # the run's folder holds nothing but the family, read above


def _worker_error(e: BaseException) -> PipelineError | None:
    """The pipeline error a Ray Train worker raised, if that is what stopped the run."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, PipelineError):
            return x
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__,
                  *getattr(x, "worker_failures", {}).values()]
    return None


# ---------------------------------------------------------------- in each Ray Train worker
def calibrate_worker(config: dict) -> None:
    """Ray Train's training function: ``calibrate_family`` on this worker's share of the rows, the
    gradients and sums all-reduced with the other workers; rank 0 reports the family, and the entries a
    time budget left out."""
    import ray.train
    from ray.train import Checkpoint

    from .samplers.calibrators import Group

    cfg = from_dict(config["cfg"])
    gen, group, work = Generator(cfg), Group(), [Entry(**e) for e in config["entries"]]
    plans, refused = calibrate_family(gen, work, group)
    family = PlanFamily.of([plans[i] for i in range(len(work)) if i in plans], cfg.calibrate.guidance_rule)
    metrics = {"family": family.hash, "entries": len(plans)}
    if group.rank == 0:
        with tempfile.TemporaryDirectory() as d:
            Path(d, FAMILY_FILE).write_text(family.model_dump_json(indent=1))
            Path(d, REFUSED_FILE).write_text(json.dumps(refused))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def calibrate_family(gen: Generator, work: list[Entry], group, clock: Callable[[], float] = time.time
                     ) -> tuple[dict, list[dict]]:
    """Every entry calibrated, lowest nfe first (each nesting the plan of its guidance and size below it),
    within ``calibrate.time_budget_s`` as ``clock`` reads it (``budget_share``): the plans by entry index,
    and the entries the budget left out (``{"entry", "nfe", "guidance_scale", "size", "reason"}``). Every
    process of ``group`` takes the same decisions. Raises the first refusal when no entry was calibrated."""
    c, t0 = gen.cfg.calibrate, clock()
    order = sorted(range(len(work)), key=lambda i: work[i].nfe)
    costs, probes = _project_family(gen, work, order, group)

    def left() -> float:                                # the group's mean, so every worker decides alike
        return float(group.sum(torch.tensor(c.time_budget_s - (clock() - t0), dtype=torch.float64))) / group.size
    if c.time_budget_s is not None:
        _refuse_up_front(work, order, costs, left(), c.time_budget_s)
    plans, last, refused = {}, {}, []   # entry index -> plan; (guidance, size) -> its plan at the highest nfe so far
    for k, i in enumerate(order):
        entry = work[i]
        budget = budget_share(left(), [costs[j] for j in order[k:]]) if c.time_budget_s is not None else None
        shape = entry.shape()
        try:
            plans[i] = last[shape] = _calibrate_entry(gen, entry, budget, group, last.get(shape), probes[i])
        except ConfigError as e:
            if e.key != BUDGET_KEY:
                raise
            refused.append({"entry": entry.label(), "nfe": entry.nfe, "guidance_scale": entry.guidance_scale,
                            "size": [entry.height, entry.width], "reason": e.message})
            if group.rank == 0:
                log.warning("%s: %s; the entries done are kept, and the next ones go on", e.key, e.message)
            after = next((j for j in order[k + 1:] if work[j].shape() == shape), None)
            if after is not None and c.nest != "never":     # it nests the plan below the one left out
                below = last.get(shape)
                costs[after] = _projected(gen, work[after], group, below.nfe if below is not None else None,
                                          probes[after])[1]
    if not plans:
        raise ConfigError(BUDGET_KEY, refused[0]["reason"])
    return plans, refused


def budget_share(left_s: float, costs: list[Cost]) -> float:
    """The next entry's share of the ``left_s`` seconds of a time budget, ``costs`` being the projected
    costs of it and the entries after it: its fixed seconds (teacher, DP, final checks, nesting), and of what the
    fixed seconds of all of them leave, a part in proportion to its refinement's seconds, so that every
    entry gets the same fraction of its refinement steps (an equal part where none refines). When what
    is left does not cover every entry's fixed seconds (earlier entries ran past their projection), the
    entry gets its fixed seconds at most, and is refused if even those are not left."""
    first, slack = costs[0], left_s - sum(c.fixed for c in costs)
    if slack < 0:
        return max(0.0, min(left_s, first.fixed))
    refine = sum(c.refine for c in costs)
    return first.fixed + slack * (first.refine / refine if refine > 0 else 1 / len(costs))


def _project_family(gen: Generator, work: list[Entry], order: list[int], group) -> tuple[dict, dict]:
    """Every entry's projected ``Cost`` (nesting the entry below it, as it will if that one is calibrated)
    and its probe's figures (which its calibration projects from again, so its share and its own check
    agree), before any work (a probe batch each), logged by rank 0 with the family's total."""
    c, costs, probes, total, evals = gen.cfg.calibrate, {}, {}, 0.0, 0
    below: dict[tuple, int] = {}                       # (guidance, size) -> the nfe below, to nest
    for i in order:
        entry = work[i]
        proj, costs[i] = _projected(gen, entry, group, below.get(entry.shape()) if c.nest != "never" else None)
        total, evals, probes[i] = total + proj["seconds"], evals + proj["model_evaluations"]["total"], proj["probe"]
        below[entry.shape()] = entry.nfe
    if group.rank == 0:
        log.info("projected for the family: %s model evaluations, about %s s on %d worker(s) (%d entr%s; teacher, "
                 "DP, final checks and nesting %s s, refinement %s s)", f"{evals:,}", f"{total:,.0f}", group.size,
                 len(work), "y" if len(work) == 1 else "ies", f"{sum(x.fixed for x in costs.values()):,.0f}",
                 f"{sum(x.refine for x in costs.values()):,.0f}")
    return costs, probes


def _projected(gen: Generator, entry: Entry, group, lower_nfe: int | None, probe: dict | None = None):
    """``samplers.calibrate.projected`` for one entry (from ``probe`` when given, else from a new one)."""
    spec, den, noise, rows = _inputs(gen, entry, None, group)
    return projected(spec, den, noise, rows=rows, group=group, nesting=_nesting(gen.cfg.calibrate),
                     lower_nfe=lower_nfe, probe=probe)


def _refuse_up_front(work: list[Entry], order: list[int], costs: dict, left_s: float, budget_s: float) -> None:
    """``ConfigError`` on ``calibrate.time_budget_s`` when the entries' fixed seconds exceed what the
    budget leaves after the probes."""
    fixed = sum(x.fixed for x in costs.values())
    if fixed > left_s:
        each = "; ".join(f"{work[i].label()}: {costs[i].fixed:,.0f} s" for i in order) if len(work) > 1 else ""
        raise ConfigError(BUDGET_KEY, f"the teacher, the DP, the final checks and nesting alone take about "
                                      f"{fixed:,.0f} s" + (f" ({each})" if each else "") + f", more than the "
                                      f"{max(0.0, left_s):,.0f} s the budget of {budget_s:g} s leaves after the probes: "
                                      "use fewer rows or entries, a lower calibrate.teacher_nfe or "
                                      "calibrate.candidates, or more workers")


def _nesting(c) -> str:
    return "always" if c.nest == "never" else c.nest


def _inputs(gen: Generator, entry: Entry, budget: float | None, group) -> tuple:
    """(spec, denoiser, noise, row split) of one entry's calibration on this worker's share of its rows."""
    cfg, c, model = gen.cfg, gen.cfg.calibrate, gen.model
    lo, hi = model.sigma_range(entry.height, entry.width)
    spec = CalibrationSpec(
        nfe=entry.nfe, sigma_min=lo, sigma_max=hi, noise_schedule=model.schedule_kind,
        grid_options=model.grid_options("flow", entry.height, entry.width), guidance_scale=entry.guidance_scale,
        model_id=model.model_id, resolution=(entry.height, entry.width), bases=tuple(c.bases),
        calibrators=tuple(c.calibrators), validation=c.validation, holdout=c.holdout, teacher_nfe=c.teacher_nfe,
        candidates=c.candidates, dp_samples=c.dp_samples, iterations=c.iterations, batch_size=c.batch_size,
        lr=c.lr, time_budget_s=budget, seed=c.seed, chunk=cfg.ray.batch_size)
    mine = [Request.from_row(r) for r in entry.rows[group.rank::group.size]]
    noise, _ = gen.noise([r.seed for r in mine], entry.height, entry.width)
    return spec, gen.denoiser(mine), noise, RowSplit.assign(len(entry.rows), spec).part(group.rank, group.size)


def _calibrate_entry(gen: Generator, entry: Entry, budget: float | None, group, lower=None, probe=None):
    """One entry's plan: its rows split, this worker's share sampled, ``samplers.calibrate`` run (nesting
    ``lower``, the plan of the same guidance and size at a lower nfe, unless ``calibrate.nest`` is never;
    projecting from ``probe``, when given)."""
    spec, den, noise, rows = _inputs(gen, entry, budget, group)
    lower = lower if lower is not None and lower.nfe < entry.nfe and gen.cfg.calibrate.nest != "never" else None
    say = (lambda m: log.info("[%s] %s", entry.label(), m)) if group.rank == 0 else (lambda m: None)
    try:
        return calibrate(spec, den, noise, rows=rows, group=group, progress=say, lower=lower,
                         nesting=_nesting(gen.cfg.calibrate), probe=probe).plan
    except PipelineError as e:
        key = {"time_budget_s": BUDGET_KEY, "rows": "calibrate"}.get(e.subject, e.subject)
        raise ConfigError(key, f"[{entry.label()}] {e.message}") from None
