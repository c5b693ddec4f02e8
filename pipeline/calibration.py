"""The calibration job (``python -m jobs.calibrate``): a solver plan for the job's model on a Ray cluster.

    manifest rows (prompts, seeds) -> resolved requests (one nfe, guidance and size)   driver
      ray.data.from_items(rows) -> map_batches(TeacherPass)  (the Generator actor pool)
          each row: its initial noise -> high-NFE teacher trajectory -> target (+ states, limit)
      -> PlanWorker (one actor with the model): DP + gradient refinement + acceptance gate
      -> the plan JSON at calibrate.out, a table of the figures                        driver

The teacher trajectories, which cost the most model calls, run on the same actor pool as a
generation job, so a large model calibrates on a cluster; the DP and the refinement need every
calibration row together and run in one actor with the model (a GPU actor where the job asks
for one). Calibration rows are the manifest's rows; ``calibrate.holdout`` of them (a seeded,
reproducible choice) are held out for the acceptance gate and the reported held-out error.
"""
from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import ray
import torch

from . import manifest
from .config import JobConfig, to_dict
from .errors import ManifestError, OutputConflict, RequestError
from .job import ensure_ray, pool_size
from .request import Request, resolver_for
from .samplers import SolverPlan, calibrate
from .samplers.calibrate import Teacher, run_teacher, teacher_grid
from .storage import OutputDir
from .worker import Generator

log = logging.getLogger(__name__)


def teacher_levels(sigma_min: float, sigma_max: float, nfe: int, candidates: int) -> list[float]:
    """The candidate levels of ``run_teacher`` for this range (the plan worker rebuilds them)."""
    fine, idx = teacher_grid(sigma_min, sigma_max, nfe, candidates)
    return fine[idx].tolist()


def _bytes(t: torch.Tensor | None) -> bytes | None:
    if t is None:
        return None
    buf = io.BytesIO()
    np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def _tensor(b: bytes | None) -> torch.Tensor | None:
    return None if b is None else torch.from_numpy(np.load(io.BytesIO(b), allow_pickle=False))


class TeacherPass:
    """``map_batches`` over calibration rows on the Generator's actor pool: each row's teacher trajectory.

    Adds ``target`` (the teacher's sample), ``limit`` (D at sigma -> inf, flow grids from
    infinity) and, for rows with ``keep`` set, ``states`` (the trajectory at the candidate levels),
    each as a ``.npy`` blob.
    """

    def __init__(self, cfg: dict):
        self.gen = Generator(cfg)
        self.cfg = self.gen.cfg

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, c, gen = batch.to_pylist(), self.cfg.calibrate, self.gen
        out: dict[str, list] = {"target": [None] * len(rows), "limit": [None] * len(rows), "states": [None] * len(rows)}
        for keep in (True, False):
            idx = [i for i, r in enumerate(rows) if r["keep"] == keep]
            for start in range(0, len(idx), self.cfg.ray.batch_size):
                chunk = idx[start:start + self.cfg.ray.batch_size]
                part = [Request.from_row(rows[i]) for i in chunk]
                noise, _ = gen.noise([r.seed for r in part], part[0].height, part[0].width)
                lo, hi = gen.model.sigma_range(part[0].height, part[0].width)
                t = run_teacher(gen.denoiser(part), noise, lo, hi, nfe=c.teacher_nfe, candidates=c.candidates,
                                keep_states=len(part) if keep else 0)
                for j, i in enumerate(chunk):
                    out["target"][i] = _bytes(t.target[j])
                    out["limit"][i] = _bytes(None if t.limit is None else t.limit[j])
                    out["states"][i] = _bytes(t.states[:, j] if keep else None)
        for name, values in out.items():
            batch = batch.append_column(name, pa.array(values, pa.binary()))
        return batch


class PlanWorker:
    """A Ray actor with the model that runs the DP, the refinement and the gate on all rows."""

    def __init__(self, cfg: dict):
        self.gen = Generator(cfg)
        self.cfg = self.gen.cfg

    def calibrate(self, rows: list[dict], teacher: dict, holdout: float) -> dict:
        c, gen = self.cfg.calibrate, self.gen
        reqs = [Request.from_row(r) for r in rows]
        first = reqs[0]
        noise, _ = gen.noise([r.seed for r in reqs], first.height, first.width)
        lo, hi = gen.model.sigma_range(first.height, first.width)
        levels = torch.tensor(teacher_levels(lo, hi, c.teacher_nfe, c.candidates), dtype=torch.float64)
        plan = calibrate(
            gen.denoiser(reqs), noise, nfe=first.sampler.nfe, sigma_min=lo, sigma_max=hi, holdout=holdout,
            schedule=gen.model.schedule_kind, schedule_options=gen.model.grid_options("flow", first.height,
                                                                                      first.width),
            guidance_scale=first.guidance_scale, model_id=gen.model.model_id,
            resolution=(first.height, first.width), calibrators=tuple(c.calibrators),
            teacher_nfe=c.teacher_nfe, candidates=c.candidates, dp_samples=c.dp_samples, iterations=c.iterations,
            batch_size=c.batch_size, lr=c.lr, time_budget_s=c.time_budget_s, seed=c.seed, chunk=self.cfg.ray.batch_size,
            teacher=Teacher(levels=levels, target=teacher["target"].to(noise), states=None if teacher["states"] is None
                            else teacher["states"].to(noise), limit=None if teacher["limit"] is None
                            else teacher["limit"].to(noise), nfe=c.teacher_nfe, seconds=teacher["seconds"]),
            progress=lambda msg: log.info("calibrate: %s", msg))
        return plan.model_dump(mode="json")


@dataclass
class CalibrationSummary:
    url: str
    plan: SolverPlan
    seconds: float

    def __str__(self) -> str:
        p, f = self.plan, self.plan.calibration
        e, calls, secs = f["error"], f["model_evaluations"], f["seconds"]
        b = f["baseline"]
        lines = [f"solver plan {p.hash} for {p.model.id} (nfe {p.nfe}, guidance {p.guidance_scale:g}, "
                 f"{p.resolution[0]}x{p.resolution[1]}) written to {self.url}",
                 f"{'accepted' if f['accepted'] else 'NOT accepted: the plan is the baseline itself'}; "
                 f"{f['samples']['calibration']} calibration rows, {f['samples']['held_out']} held out",
                 "", "| solver | held-out error | calibration error |", "|---|---|---|",
                 f"| baseline {b['method']} / {b['schedule']} | {e['baseline']['held_out']:.4g} | "
                 f"{e['baseline']['calibration']:.4g} |",
                 f"| plan ({f['chosen']}) | {e['plan']['held_out']:.4g} | {e['plan']['calibration']:.4g} |", "",
                 "model evaluations (rows x calls): " + ", ".join(f"{k} {v}" for k, v in calls.items()),
                 "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()) + f"; wall {self.seconds:.1f}"]
        return "\n".join(lines)


def calibration_rows(cfg: JobConfig) -> list[dict]:
    """The manifest's (or template's) rows as resolved requests; they must share nfe, guidance and size.
    ``ManifestError`` names the file (or template), row and field."""
    resolver = resolver_for(replace(cfg, sampler=replace(cfg.sampler, plan=None, method="dpmpp_2m", schedule=None,
                                                          options={})))
    m, rows, first = cfg.manifest, [], None
    if m.template is not None:
        t = manifest.Template(m.template, dict(m.values), m.count)
        raws, source = (t.raw_row(i) for i in range(len(t))), "manifest.template"
    else:
        raws, source = manifest.iter_raw_rows(m.path), m.path
    for i, raw in enumerate(raws):
        if m.limit is not None and len(rows) >= m.limit:
            break
        try:
            for r in (q.to_row() for q in resolver(raw, i, len(rows))):
                if first is None:
                    first = r
                    if r["nfe"] < 2:
                        raise RequestError("nfe", f"a solver plan needs nfe >= 2, got {r['nfe']}")
                for name in ("nfe", "guidance_scale", "height", "width"):
                    if r[name] != first[name]:
                        raise RequestError(name, f"a plan is calibrated for one {name}; row 0 has "
                                                 f"{first[name]}, this row {r[name]}")
                rows.append(r)
        except RequestError as e:
            raise manifest.row_failure(source, i, e) from None
    if len(rows) < 8:
        raise ManifestError(source, f"{len(rows)} calibration rows; need at least 8 (more rows generalise better: "
                                    "a few hundred is typical)")
    return rows


def run_teacher_pass(cfg: JobConfig, rows: list[dict]) -> dict:
    """Every row's teacher through Ray Data on the Generator actor pool; the arrays, in row order."""
    r = cfg.ray
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / r.batch_size)))
    size = min(pool_size(r), math.ceil(len(rows) / r.batch_size))
    ds = ds.map_batches(TeacherPass, fn_constructor_kwargs={"cfg": to_dict(cfg)}, batch_size=r.batch_size,
                        batch_format="pyarrow", num_cpus=r.num_cpus_per_actor, num_gpus=r.num_gpus_per_actor or None,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size))
    got: dict[int, dict] = {}
    t0 = time.time()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.select(["row", "target", "limit", "states"]).to_pylist():
            got[row["row"]] = row
        log.info("teacher: %d/%d rows (%.0f s)", len(got), len(rows), time.time() - t0)
    order = [got[r["row"]] for r in rows]
    kept = [_tensor(o["states"]) for o in order if o["states"] is not None]
    return {"target": torch.stack([_tensor(o["target"]) for o in order]),
            "limit": torch.stack([_tensor(o["limit"]) for o in order]) if order[0]["limit"] is not None else None,
            "states": torch.stack(kept, 1) if kept else None, "seconds": time.time() - t0}


def run_calibration(cfg: JobConfig) -> CalibrationSummary:
    """The whole calibration job; returns its summary (the plan is written to ``calibrate.out``)."""
    t0 = time.time()
    c = cfg.calibrate
    url = c.out or f"{cfg.output.path.rstrip('/')}/plan.json"
    if OutputDir(url.rsplit("/", 1)[0] if "/" in url else ".").exists(url.rsplit("/", 1)[-1]) \
            and not cfg.output.overwrite:
        raise OutputConflict(url, "already exists; pick another calibrate.out, or pass --overwrite")
    rows = calibration_rows(cfg)
    # the held-out rows: a seeded choice of calibrate.holdout of them, placed last (calibrate() holds out the tail)
    n = len(rows)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(c.seed)).tolist()
    n_held = max(2, round(n * c.holdout))
    held, train = sorted(perm[:n_held]), sorted(perm[n_held:])
    rows = [rows[i] for i in train] + [rows[i] for i in held]
    keep = min(c.dp_samples, len(train)) if "dp" in c.calibrators else 0
    for i, r in enumerate(rows):
        r["keep"] = i < keep
    log.info("calibrating %s: %d rows (%d held out), nfe %d, guidance %g, %dx%d", cfg.model.kind, n, n_held,
             rows[0]["nfe"], rows[0]["guidance_scale"], rows[0]["height"], rows[0]["width"])
    ensure_ray(cfg.ray)
    teacher = run_teacher_pass(cfg, rows)
    worker_cfg = replace(cfg, ray=replace(cfg.ray, num_cpus_per_actor=max(cfg.ray.num_cpus_per_actor,
                                                                           _free_cpus(cfg))))
    worker = ray.remote(PlanWorker).options(num_cpus=worker_cfg.ray.num_cpus_per_actor,
                                            num_gpus=cfg.ray.num_gpus_per_actor or None).remote(to_dict(worker_cfg))
    try:
        doc = ray.get(worker.calibrate.remote([{k: v for k, v in r.items() if k != "keep"} for r in rows],
                                              teacher, n_held / n))
    finally:
        ray.kill(worker)
    plan = SolverPlan.model_validate(doc)
    plan.to_json(url)
    return CalibrationSummary(url, plan, time.time() - t0)


def _free_cpus(cfg: JobConfig) -> float:
    """CPUs the plan worker may take once the teacher pool is gone (all but the reserve)."""
    return max(1.0, ray.cluster_resources().get("CPU", 1.0) - cfg.ray.reserve_cpus) \
        if cfg.ray.num_gpus_per_actor == 0 else cfg.ray.num_cpus_per_actor
