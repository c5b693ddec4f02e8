"""Exact benchmark problems, seen the way the library and diffusers' schedulers each see a model.

A ``Problem`` is a Gaussian mixture (``pipeline.analytic``) whose exact denoiser is written as the
network a real model would be: an eps-prediction model of ``(x_vp, t)`` on the Stable Diffusion
discrete VP schedule (scaled_linear 0.00085-0.012, 1000 steps), or a flow-velocity model of
``(x_t, t)`` on a rectified-flow schedule (shift 3, from t = 1). The library reaches it through its
own adapters (``pipeline.denoisers.adapt``); diffusers' schedulers call the network directly, from
the same start noise. Errors are per-sample RMS distances to a 1000-call reference solve
(``pipeline.samplers.calibrate.run_teacher``: DPM-Solver++(3M) with third-order weights, the same
"ODE to sigma_min, then denoise" convention as every solver's last step).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from pipeline.analytic import GaussianMixture
from pipeline.denoisers import Flow, VPDiscrete, adapt
from pipeline.samplers import sample
from pipeline.samplers.calibrate import run_teacher

SD_ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
FLOW_SHIFT = 3.0
REFERENCE_NFE = 1000


def flow_sigma_min() -> float:
    """The last nonzero level of diffusers' FlowMatchEulerDiscreteScheduler(shift=3), in EDM sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    s = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    s.set_timesteps(10)
    t = float(s.sigmas[-2])
    return t / (1 - t)


class Problem:
    """``gmm`` in sample shape ``shape`` on schedule ``kind`` (``sd`` or ``flow``)."""

    def __init__(self, name: str, gmm: GaussianMixture, shape: tuple[int, ...], kind: str):
        self.name, self.gmm, self.shape, self.kind = name, gmm, shape, kind
        if kind == "sd":
            self.schedule, self.prediction = VPDiscrete(SD_ALPHAS), "epsilon"
            self.sigma_min, self.sigma_max, self.schedule_kind = self.schedule.sigma_min, self.schedule.sigma_max, \
                "vp_discrete"
            self.grid_options = {}
        else:
            self.schedule, self.prediction = Flow(shift=FLOW_SHIFT), "flow"
            self.sigma_min, self.sigma_max, self.schedule_kind = flow_sigma_min(), math.inf, "flow"
            self.grid_options = {"shift": FLOW_SHIFT}

    # ---------------------------------------------------------------- the "network"
    def net(self, x_net: torch.Tensor, t) -> torch.Tensor:
        """The exact model in its own variables: eps of (x_vp, timestep), or flow velocity of (x_t, t in [0, 1])."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_net.shape[0])
        col = (-1, *([1] * len(self.shape)))
        if self.kind == "sd":
            sigma = self.schedule.sigma(t)
            x = x_net * (1 + sigma.reshape(col) ** 2).sqrt()
            return (x - self.gmm.denoise(x, sigma)) / sigma.reshape(col)
        t = t.clamp(max=1 - 1e-12)
        x = x_net / (1 - t.reshape(col))
        return (x_net - self.gmm.denoise(x, t / (1 - t))) / t.reshape(col)

    def denoiser(self) -> Callable:
        """The network through the library's adapter: ``D(x, sigma)`` in EDM variables."""
        model_fn = adapt(lambda xn, t, c: self.net(xn, t), self.schedule, self.prediction)
        return lambda x, sigma: model_fn(x, sigma, None)

    # ---------------------------------------------------------------- noise, starts, references
    def noise(self, seed: int, n: int) -> torch.Tensor:
        return torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """``sample()``'s noise argument for diffusers' start: VP ``x_T = noise`` is EDM ``noise sqrt(1 + s^2)``."""
        return noise * math.sqrt(1 + self.sigma_max ** 2) / self.sigma_max if self.kind == "sd" else noise

    def reference(self, noise: torch.Tensor) -> torch.Tensor:
        return run_teacher(self.denoiser(), self.start(noise), self.sigma_min, self.sigma_max, nfe=REFERENCE_NFE,
                           candidates=2, batch_size=256).target

    def library(self, noise: torch.Tensor, method, nfe: int, schedule: str | None = None, **options) -> torch.Tensor:
        """The library's ``sample`` (a method name, "auto" or a ``SolverPlan``) from diffusers' start."""
        if not hasattr(method, "sigmas"):
            options = {"schedule": schedule, "model_schedule": self.schedule, **options}
            if self.grid_options and schedule in ("flow", "flow_uniform", None):
                options["schedule_options"] = self.grid_options
        return sample(self.denoiser(), self.start(noise), method=method, nfe=nfe, sigma_min=self.sigma_min,
                      sigma_max=self.sigma_max, **options)

    # ---------------------------------------------------------------- diffusers
    def diffusers(self, noise: torch.Tensor, cls_name: str, config: dict, nfe: int) -> torch.Tensor | None:
        """A diffusers denoising loop with the most inference steps whose model calls fit in ``nfe``
        (None if none fit, or a VP schedule that does not start at the last training step)."""
        import diffusers
        diffusers.utils.logging.set_verbosity_error()    # "Changing scheduler ... lower_order_final" notes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = getattr(diffusers, cls_name)(**config)
            steps = next((n for n in range(nfe, 0, -1) if _calls(sched, n) <= nfe), None)
            if steps is None:
                return None
            sched.set_timesteps(steps)
            if self.kind == "sd" and float(sched.timesteps[0]) < 998:
                return None
            latents = noise * getattr(sched, "init_noise_sigma", 1.0)
            for t in sched.timesteps:
                inp = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
                latents = sched.step(self.net(inp, (t / 1000.0) if self.kind == "flow" else t), t, latents).prev_sample
        return latents


def _calls(sched, n: int) -> int:
    sched.set_timesteps(n)
    return len(sched.timesteps)


def diffusers_configs(kind: str) -> dict[str, tuple[str, dict]]:
    """Label -> (scheduler class, config): every diffusers scheduler in its usual configurations."""
    if kind == "flow":
        fl = {"use_flow_sigmas": True, "flow_shift": FLOW_SHIFT, "prediction_type": "flow_prediction"}
        return {"FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", {"shift": FLOW_SHIFT}),
                "FlowMatchHeun": ("FlowMatchHeunDiscreteScheduler", {"shift": FLOW_SHIFT}),
                "DPM++2M flow": ("DPMSolverMultistepScheduler", {**fl, "solver_order": 2}),
                "DPM++3M flow": ("DPMSolverMultistepScheduler", {**fl, "solver_order": 3}),
                "UniPC-bh2 flow": ("UniPCMultistepScheduler", {**fl, "solver_type": "bh2"}),
                "UniPC-bh1 flow": ("UniPCMultistepScheduler", {**fl, "solver_type": "bh1"})}
    sd, cfgs = SD_CONFIG, {}
    for karras in (False, True):
        k, tag = ({"use_karras_sigmas": True}, " karras") if karras else ({}, "")
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
    return cfgs
