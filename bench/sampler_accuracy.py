"""Sampler accuracy on an analytic Gaussian mixture: the library vs diffusers' schedulers.

The data distribution is a mixture of diagonal Gaussians, so the exact denoiser
E[x0 | x0 + sigma eps = x] is closed-form. Both sides see the same "network" (the exact
denoiser written as an eps-prediction model on the Stable Diffusion discrete VP schedule,
scaled_linear 0.00085-0.012 over 1000 steps, or as a flow-velocity model on a rectified-flow
schedule with shift 3), start from the same noise at the same state, and are compared with the
exact probability-flow ODE solution from that state, computed by scipy's DOP853 (rtol 1e-10) in
log-sigma time. The error is the RMSE over all samples and dimensions.

For every deterministic registered method x grid x NFE, and for diffusers' schedulers in their
usual configurations (spacing, karras sigmas, solver orders), the script writes
bench/results/sampler_accuracy.md (best library vs best diffusers per NFE and the ratio, plus
what method="auto" reaches), sampler_accuracy.json (every number) and sampler_accuracy.png.

    python bench/sampler_accuracy.py [--quick] [--samples 256] [--dim 32] [--components 6]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from pipeline.denoisers import Flow, VPDiscrete, adapt
from pipeline.samplers import SAMPLERS, auto_method, sample

NFES = (5, 6, 8, 10, 12, 15, 20)
OUT = Path(__file__).parent / "results"
SD_ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
FLOW_SHIFT = 3.0


# ---------------------------------------------------------------- the analytic problem
class GaussianMixture:
    """A mixture of diagonal Gaussians in ``dim`` dimensions with a closed-form denoiser."""

    def __init__(self, components: int, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.logw = torch.log_softmax(torch.randn(components, generator=g, dtype=torch.float64), 0)
        self.mu = torch.randn(components, dim, generator=g, dtype=torch.float64)
        self.var = (0.05 + 0.45 * torch.rand(components, dim, generator=g, dtype=torch.float64)) ** 2

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x] for x = x0 + sigma eps: posterior-weighted per-component Wiener filters."""
        var = self.var[None] + sigma.reshape(-1, 1, 1) ** 2                    # [B, K, d]
        diff = x[:, None, :] - self.mu[None]
        logp = self.logw[None] - 0.5 * (diff ** 2 / var + var.log()).sum(-1)  # [B, K]
        r = torch.softmax(logp, dim=1)
        return (r[..., None] * (self.mu[None] + self.var[None] / var * diff)).sum(1)


def exact_solution(gmm: GaussianMixture, x: np.ndarray, sigma_from: float, sigma_to: float = 1e-5) -> torch.Tensor:
    """The probability-flow ODE dx/dlog(sigma) = x - D(x, sigma) from ``sigma_from`` to ~0, DOP853."""
    shape = x.shape

    def f(s, y):
        xt = torch.from_numpy(y.reshape(shape))
        sig = torch.full((shape[0],), math.exp(s), dtype=torch.float64)
        return (xt - gmm.denoise(xt, sig)).numpy().ravel()
    sol = solve_ivp(f, (math.log(sigma_from), math.log(sigma_to)), x.ravel(), method="DOP853",
                    rtol=1e-10, atol=1e-10)
    xe = torch.from_numpy(sol.y[:, -1].reshape(shape))
    return gmm.denoise(xe, torch.full((shape[0],), sigma_to, dtype=torch.float64))  # O(sigma_to^2) away


class Problem:
    """A model type: the same exact denoiser seen through a schedule and a prediction type."""

    def __init__(self, name: str, gmm: GaussianMixture, noise: torch.Tensor):
        self.name, self.gmm, self.noise = name, gmm, noise
        if name == "sd":
            self.schedule, self.prediction = VPDiscrete(SD_ALPHAS), "epsilon"
            self.sigma_max, self.sigma_min = self.schedule.sigma_max, self.schedule.sigma_min
            self.x_start = noise * math.sqrt(1 + self.sigma_max ** 2)       # diffusers' x_T = noise (VP)
            self.reference = exact_solution(gmm, self.x_start.numpy(), self.sigma_max)
        else:
            self.schedule, self.prediction = Flow(shift=FLOW_SHIFT), "flow"
            self.sigma_max, self.sigma_min = math.inf, _flow_sigma_min()
            big = 1e6                                                         # x(sigma) = sigma n + D_inf + O(1/sigma)
            sig = torch.full((noise.shape[0],), big, dtype=torch.float64)
            x_big = big * noise + gmm.denoise(big * noise, sig)
            self.reference = exact_solution(gmm, x_big.numpy(), big)

    def net(self, x_net: torch.Tensor, t) -> torch.Tensor:
        """The exact model in the network's own variables: eps (VP) or flow velocity (t in [0, 1])."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_net.shape[0])
        if self.name == "sd":
            sigma = self.schedule.sigma(t)
            x = x_net * (1 + sigma[:, None] ** 2).sqrt()
            return (x - self.gmm.denoise(x, sigma)) / sigma[:, None]
        t = t.clamp(max=1 - 1e-12)
        x = x_net / (1 - t[:, None])
        return (x_net - self.gmm.denoise(x, t / (1 - t))) / t[:, None]

    def denoiser(self):
        model_fn = adapt(lambda xn, t, c: self.net(xn, t), self.schedule, self.prediction)
        return lambda x, sigma: model_fn(x, sigma, None)

    def rmse(self, x: torch.Tensor) -> float:
        return float(((x.to(torch.float64) - self.reference) ** 2).mean().sqrt())


def _flow_sigma_min() -> float:
    """The last nonzero level of diffusers' FlowMatchEulerDiscreteScheduler(shift=3), in EDM sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    s = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    s.set_timesteps(10)
    t = float(s.sigmas[-2])
    return t / (1 - t)


# ---------------------------------------------------------------- the library
LIB_GRIDS = {"sd": ["karras", "exponential", "kl_optimal", "beta", "sgm_uniform", "linspace", "trailing",
                    "ays_sd15"],
             "flow": ["flow", "flow_uniform"]}
QUICK_GRIDS = {"sd": ["karras", "exponential", "kl_optimal", "ays_sd15"], "flow": ["flow", "flow_uniform"]}


def library_methods() -> list[str]:
    """Every registered deterministic method (stochastic ones do not target the ODE solution)."""
    return sorted(name for name, m in SAMPLERS.items() if not m.stochastic)


def run_library(p: Problem, method: str, grid: str, nfe: int) -> float:
    opts = {}
    if grid in ("sgm_uniform", "linspace", "trailing", "beta"):
        opts["model_schedule"] = p.schedule
    if p.name == "flow":
        opts["schedule_options"] = {"shift": FLOW_SHIFT}
    noise = p.noise if p.name == "flow" else p.x_start / p.sigma_max      # sample() scales by sigma_max
    x = sample(p.denoiser(), noise, method=method, nfe=nfe, sigma_min=p.sigma_min, sigma_max=p.sigma_max,
               schedule=grid, **opts)
    return p.rmse(x)


# ---------------------------------------------------------------- diffusers
def diffusers_configs(problem: str, quick: bool) -> dict[str, tuple[str, dict]]:
    """Label -> (scheduler class, config) for the usual ways of running each scheduler."""
    if problem == "flow":
        fl = {"use_flow_sigmas": True, "flow_shift": FLOW_SHIFT, "prediction_type": "flow_prediction"}
        cfgs = {"FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", {"shift": FLOW_SHIFT}),
                "FlowMatchHeun": ("FlowMatchHeunDiscreteScheduler", {"shift": FLOW_SHIFT}),
                "DPM++2M flow": ("DPMSolverMultistepScheduler", {**fl, "solver_order": 2}),
                "DPM++3M flow": ("DPMSolverMultistepScheduler", {**fl, "solver_order": 3}),
                "UniPC-bh2 flow": ("UniPCMultistepScheduler", {**fl, "solver_type": "bh2"}),
                "UniPC-bh1 flow": ("UniPCMultistepScheduler", {**fl, "solver_type": "bh1"})}
        return cfgs
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    cfgs: dict[str, tuple[str, dict]] = {}
    for karras in (False, True):
        k = {"use_karras_sigmas": True} if karras else {}
        tag = " karras" if karras else ""
        cfgs[f"DPM++2M{tag}"] = ("DPMSolverMultistepScheduler", {**sd, **k, "solver_order": 2})
        cfgs[f"DPM++3M{tag}"] = ("DPMSolverMultistepScheduler", {**sd, **k, "solver_order": 3})
        cfgs[f"UniPC-bh2{tag}"] = ("UniPCMultistepScheduler", {**sd, **k, "solver_type": "bh2"})
        cfgs[f"UniPC-bh1{tag}"] = ("UniPCMultistepScheduler", {**sd, **k, "solver_type": "bh1"})
        cfgs[f"UniPC-bh2 o3{tag}"] = ("UniPCMultistepScheduler", {**sd, **k, "solver_type": "bh2", "solver_order": 3})
        cfgs[f"DEIS-3{tag}"] = ("DEISMultistepScheduler", {**sd, **k, "solver_order": 3})
        cfgs[f"DPM2S singlestep{tag}"] = ("DPMSolverSinglestepScheduler", {**sd, **k, "solver_order": 2})
        cfgs[f"DPM3 singlestep{tag}"] = ("DPMSolverSinglestepScheduler", {**sd, **k, "solver_order": 3})
        cfgs[f"Euler{tag}"] = ("EulerDiscreteScheduler", {**sd, **k})
        cfgs[f"Heun{tag}"] = ("HeunDiscreteScheduler", {**sd, **k})
        cfgs[f"LMS{tag}"] = ("LMSDiscreteScheduler", {**sd, **k})
    cfgs["DPM++2M lu-lambdas"] = ("DPMSolverMultistepScheduler", {**sd, "solver_order": 2, "use_lu_lambdas": True})
    cfgs["DPM++2M exponential"] = ("DPMSolverMultistepScheduler", {**sd, "use_exponential_sigmas": True})
    cfgs["DPM++2M beta"] = ("DPMSolverMultistepScheduler", {**sd, "use_beta_sigmas": True})
    cfgs["UniPC-bh2 exponential"] = ("UniPCMultistepScheduler", {**sd, "use_exponential_sigmas": True})
    cfgs["DDIM trailing"] = ("DDIMScheduler", {**sd, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                                          "clip_sample": False})
    cfgs["PNDM (PLMS) trailing"] = ("PNDMScheduler", {**sd, "timestep_spacing": "trailing", "skip_prk_steps": True,
                                                        "set_alpha_to_one": True})
    cfgs["Euler trailing"] = ("EulerDiscreteScheduler", {**sd, "timestep_spacing": "trailing"})
    if quick:
        keep = ("DPM++2M", "DPM++3M", "DPM++2M karras", "DPM++3M karras", "UniPC-bh2", "UniPC-bh2 karras",
                "UniPC-bh1", "DEIS-3", "DDIM trailing", "Euler", "Heun karras")
        cfgs = {k: v for k, v in cfgs.items() if k in keep}
    return cfgs


def _make(cls_name: str, config: dict):
    import diffusers
    return getattr(diffusers, cls_name)(**config)


def run_diffusers(p: Problem, cls_name: str, config: dict, nfe: int) -> float | None:
    """A diffusers denoising loop with the most inference steps whose model calls fit in ``nfe``."""
    sched = _make(cls_name, config)
    steps = None
    for n in range(nfe, 0, -1):
        sched.set_timesteps(n)
        if len(sched.timesteps) <= nfe:
            steps = n
            break
    if steps is None:
        return None
    if float(sched.timesteps[0]) < 998 and p.name == "sd":
        return None                                    # does not start at the last training step
    latents = p.noise * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        out = p.net(inp, (t / 1000.0) if p.name == "flow" else t)
        latents = sched.step(out, t, latents).prev_sample
    return p.rmse(latents)


# ---------------------------------------------------------------- report
def best(rows: dict[str, dict[int, float]], nfe: int) -> tuple[str, float]:
    cand = [(v[nfe], k) for k, v in rows.items() if v.get(nfe) is not None and math.isfinite(v[nfe])]
    err, label = min(cand)
    return label, err


def write_markdown(results: dict, args, elapsed: float) -> str:
    lines = ["# Sampler accuracy: library vs diffusers on an exact Gaussian-mixture model", "",
             f"`python bench/sampler_accuracy.py{' --quick' if args.quick else ''}` — {args.samples} samples, "
             f"{args.components}-component diagonal Gaussian mixture in {args.dim} dims, RMSE against the exact "
             f"probability-flow ODE solution (DOP853, rtol 1e-10). {platform.processor() or platform.machine()}, "
             f"{elapsed:.0f} s wall (shared machine).",
             f"Library grids: SD {args.grids or (QUICK_GRIDS if args.quick else LIB_GRIDS)['sd']}, flow "
             f"{(QUICK_GRIDS if args.quick else LIB_GRIDS)['flow']}; every registered deterministic method "
             f"({len(library_methods())}). Stochastic methods are left out (they do not target the ODE solution).", ""]
    for prob, title in (("sd", "Stable Diffusion discrete VP schedule (scaled_linear 0.00085-0.012, eps-prediction)"),
                        ("flow", f"Rectified flow, shift {FLOW_SHIFT:g} (flow-velocity prediction)")):
        if prob not in results:
            continue
        lib, dif, auto = results[prob]["library"], results[prob]["diffusers"], results[prob].get("auto", {})
        lines += [f"## {title}", "",
                  "| NFE | best library (method / grid) | RMSE | best diffusers | RMSE | ratio lib/diffusers |"
                  + (" `auto` RMSE | auto/diffusers |" if auto else ""),
                  "|---|---|---|---|---|---|" + ("---|---|" if auto else "")]
        for nfe in NFES:
            (ll, le), (dl, de) = best(lib, nfe), best(dif, nfe)
            row = f"| {nfe} | {ll} | {le:.2e} | {dl} | {de:.2e} | {le / de:.2f} |"
            if auto:
                row += f" {auto[str(nfe)]['rmse']:.2e} ({auto[str(nfe)]['label']}) | {auto[str(nfe)]['rmse'] / de:.2f} |"
            lines.append(row)
        lines.append("")
        lines += ["Top library configurations per NFE:", ""]
        for nfe in (5, 6, 8, 10):
            top = sorted((v[nfe], k) for k, v in lib.items() if v.get(nfe) is not None and math.isfinite(v[nfe]))[:5]
            lines.append(f"- NFE {nfe}: " + ", ".join(f"{k} {e:.2e}" for e, k in top))
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, prob in zip(axes, ("sd", "flow")):
        if prob not in results:
            continue
        lib, dif = results[prob]["library"], results[prob]["diffusers"]
        ax.plot(NFES, [best(lib, n)[1] for n in NFES], "o-", lw=2.5, color="C3", label="library: best per NFE")
        ax.plot(NFES, [best(dif, n)[1] for n in NFES], "s-", lw=2.5, color="C0", label="diffusers: best per NFE")
        if results[prob].get("auto"):
            ax.plot(NFES, [results[prob]["auto"][str(n)]["rmse"] for n in NFES], "x--", color="C1",
                    label='library: method="auto"')
        for label, style in (("DPM++2M karras", ":"), ("UniPC-bh2", "--"), ("FlowMatchEuler", ":")):
            if label in dif:
                ax.plot(NFES, [dif[label].get(n, np.nan) for n in NFES], style, color="C0", alpha=0.6,
                        label=f"diffusers {label}")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (model calls)")
        ax.set_ylabel("RMSE vs exact ODE solution")
        ax.set_title({"sd": "SD discrete VP (eps)", "flow": f"rectified flow, shift {FLOW_SHIFT:g}"}[prob])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples, grids and diffusers configurations")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--components", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--problems", nargs="+", default=["sd", "flow"])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--grids", nargs="+", default=None, help="library grids for the SD problem (default: all)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a previous sampler_accuracy.json: recompute only the method='auto' rows and rewrite")
    args = ap.parse_args()
    args.samples = args.samples or (64 if args.quick else 256)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    t0 = time.time()
    gmm = GaussianMixture(args.components, args.dim, args.seed)
    noise = torch.randn(args.samples, args.dim, generator=torch.Generator().manual_seed(args.seed + 1),
                        dtype=torch.float64)
    results: dict = {}
    if args.reuse:
        results = json.loads(args.reuse.read_text())
        for prob in results:                                   # json keys are strings: back to ints
            for side in ("library", "diffusers"):
                results[prob][side] = {k: {int(n): e for n, e in v.items()} for k, v in results[prob][side].items()}
        p = Problem("sd", gmm, noise)
        results["sd"]["auto"] = {str(n): {"label": "/".join(map(str, auto_method(n)[:2])), "rmse": _run_auto(p, n)}
                                 for n in NFES}
        args.problems = []
    for prob in args.problems:
        p = Problem(prob, gmm, noise)
        lib: dict[str, dict[int, float]] = {}
        grids = (QUICK_GRIDS if args.quick else LIB_GRIDS)[prob]
        if args.grids and prob == "sd":
            grids = args.grids
        for grid in grids:
            for method in library_methods():
                row = {}
                for nfe in NFES:
                    try:
                        row[nfe] = run_library(p, method, grid, nfe)
                    except (ValueError, RuntimeError) as e:  # a method that rejects a grid / budget
                        row[nfe] = None
                        print(f"  skip {method}/{grid} nfe={nfe}: {e}")
                lib[f"{method} / {grid}"] = row
        dif: dict[str, dict[int, float | None]] = {}
        for label, (cls_name, config) in diffusers_configs(prob, args.quick).items():
            dif[label] = {nfe: run_diffusers(p, cls_name, config, nfe) for nfe in NFES}
        auto = {}
        if prob == "sd":
            for nfe in NFES:
                m, g, _ = auto_method(nfe)
                auto[str(nfe)] = {"label": f"{m} / {g}", "rmse": _run_auto(p, nfe)}
        results[prob] = {"library": lib, "diffusers": dif, "auto": auto}
        for nfe in NFES:
            (ll, le), (dl, de) = best(lib, nfe), best(dif, nfe)
            print(f"[{prob}] nfe {nfe:2d}: library {le:.3e} ({ll}) | diffusers {de:.3e} ({dl}) | ratio {le / de:.2f}")
    elapsed = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_accuracy.md").write_text(write_markdown(results, args, elapsed) + "\n")
    (args.out / "sampler_accuracy.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "sampler_accuracy.png")
    print(f"wrote {args.out}/sampler_accuracy.md, .json, .png in {elapsed:.0f} s")


def _run_auto(p: Problem, nfe: int) -> float:
    x = sample(p.denoiser(), p.x_start / p.sigma_max, method="auto", nfe=nfe, sigma_min=p.sigma_min,
               sigma_max=p.sigma_max, model_schedule=p.schedule)
    return p.rmse(x)


if __name__ == "__main__":
    main()
