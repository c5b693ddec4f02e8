"""Our samplers against diffusers' own schedulers: same network, same grid, same start noise.

The "network" is an exact Gaussian-mixture denoiser turned into the eps-prediction model of
(x_vp, t) that diffusers expects, on the Stable Diffusion discrete schedule (scaled_linear
0.00085-0.012, 1000 steps). Our side wraps that same eps network back with the project's
adapters (``schedule_from_diffusers_config`` + ``adapt``), so the test covers adapter and sampler
together. Diffusers works in VP variables (x_vp = x / sqrt(1 + sigma^2)) and starts from
``noise * init_noise_sigma``; our ``sample`` starts from ``noise * sigma_max`` in EDM variables,
so the start noise is rescaled by sqrt(1 + sigma_max^2) / sigma_max. Diffusers keeps its sigmas
in float32, hence the 1e-5 relative tolerance.

Not compared, by definition:
- DPM-Solver++(3M) with ``third='taylor'``: the consistent third-order weight. Diffusers (like
  k-diffusion and the reference code) halves the phi_3 term, as our default ``third='reference'``
  does (compared below); see ``dpmpp_weights``.
- UniPC with ``solver_p`` (diffusers' UniC on another scheduler): diffusers hands the predictor the
  corrected sample with the eps evaluated at the uncorrected one, so its data prediction mixes two
  points; our ``unic`` keeps D from the model call, as UniPC itself does.
- Karras grids in the VP multistep schedulers: diffusers rounds the timesteps of a Karras grid to
  integers, so the network is called at a noise level other than the sigma in the update; we call
  it at the grid's sigma (Euler with Karras sigmas keeps fractional timesteps and is compared).
- iPNDM: diffusers' IPNDMScheduler uses its own cosine schedule that starts at sigma = infinity
  (t = 1, alpha = 0), which a finite EDM grid cannot represent.
"""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pipeline.denoisers import adapt, conditioned, schedule_from_diffusers_config  # noqa: E402
from pipeline.samplers import sample  # noqa: E402

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
MU = torch.tensor([[-1.0, 0.5, 0.2, 0.0], [1.0, -0.5, 0.0, 0.3], [0.2, 0.2, -0.8, 0.5]], dtype=torch.float64)
STD = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
LOG_PI = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64).log()
RTOL = 1e-5


def mixture_denoiser(x, sigma):
    """Exact E[x0 | x] for a 3-component isotropic Gaussian mixture in 4-D (EDM variables)."""
    var = STD ** 2 + sigma.to(torch.float64).reshape(-1, 1) ** 2
    diff = x.unsqueeze(1) - MU
    logw = LOG_PI - 0.5 * (diff ** 2).sum(-1) / var - x.shape[-1] / 2 * var.log()
    return (logw.softmax(-1).unsqueeze(-1) * (MU + (STD ** 2 / var).unsqueeze(-1) * diff)).sum(1)


@pytest.fixture(scope="module")
def setup():
    """(eps network of (x_vp, t), our EDM denoiser built from it, the model's VP schedule)."""
    schedule, prediction = schedule_from_diffusers_config({"_class_name": "DDIMScheduler", **SD_CONFIG})

    def eps_net(x_vp, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_vp.shape[0])
        sigma = schedule.sigma(t).reshape(-1, 1)
        x = x_vp.to(torch.float64) * (1 + sigma ** 2).sqrt()
        return (x - mixture_denoiser(x, sigma.reshape(-1))) / sigma
    return eps_net, conditioned(adapt(eps_net, schedule, prediction), None), schedule


@pytest.fixture(scope="module")
def noise():
    return torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def run_diffusers(scheduler, eps_net, noise, steps, step_kwargs=None, float64_sigmas=False):
    """The standard diffusers denoising loop; returns the final sample (VP or EDM, as the scheduler keeps it)."""
    scheduler.set_timesteps(steps)
    if float64_sigmas:
        scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        eps = eps_net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **(step_kwargs(i) if step_kwargs else {})).prev_sample
    return x


def ours(denoiser, x_start, grid, method, nfe, **options):
    """Our sample() on an explicit grid, from the start point ``x_start`` in EDM variables."""
    return sample(denoiser, x_start / float(grid[0]), method=method, nfe=nfe, schedule=grid, **options)


def vp_start(noise, scheduler, grid):
    """Diffusers' VP start ``noise * init_noise_sigma`` in EDM variables: times sqrt(1 + sigma_max^2)."""
    return noise * float(scheduler.init_noise_sigma) * math.sqrt(1 + float(grid[0]) ** 2)


def grid_of(scheduler):
    """The scheduler's sigma grid (float64), with each level once (Heun repeats them)."""
    s = scheduler.sigmas.to(torch.float64)
    return torch.unique_consecutive(s)


def assert_close(a, b):
    rel = float((a - b).abs().max() / b.abs().max())
    assert rel < RTOL, f"relative difference {rel:.2e}"


VP_CASES = [  # (scheduler class, config, steps, our method, our options)
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), 10, "dpmpp_2m", {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), 20, "dpmpp_2m", {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3), 10, "dpmpp_3m",
     dict(third="reference", solver_type="midpoint")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun"), 8,
     "dpmpp_3m", dict(third="reference", solver_type="heun")),
    # diffusers lowers the order of the last steps only below 15 steps; ours always (lower_order_final)
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3), 20, "dpmpp_3m",
     dict(third="reference", solver_type="midpoint", lower_order_final=False)),
    # bh1 with final_sigmas_type="zero" gives NaN in diffusers (B(h) = -h is -inf on the step to sigma 0 and
    # is multiplied by a zero residual); compare bh1 on diffusers' "sigma_min" ending instead
    ("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=2, final_sigmas_type="sigma_min"), 10, "unipc",
     dict(variant="bh1", order=2)),
    ("UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2), 10, "unipc", dict(variant="bh2", order=2)),
    ("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), 12, "unipc",
     dict(variant="bh1", order=3)),
    ("UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=3, final_sigmas_type="sigma_min"), 9, "unipc",
     dict(variant="bh2", order=3)),
    ("UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=3), 7, "unipc", dict(variant="bh2", order=3)),
    ("UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=1), 6, "unipc", dict(variant="bh2", order=1)),
    ("DDIMScheduler", dict(clip_sample=False), 10, "ddim", {}),   # (the default clips x0 to [-1, 1])
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing"), 10, "ddim", {}),
]


@pytest.mark.parametrize("cls, config, steps, method, options", VP_CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[2]}-{i}" for i, c in enumerate(VP_CASES)])
def test_vp_multistep_schedulers_match(setup, noise, cls, config, steps, method, options):
    eps_net, denoiser, _ = setup
    scheduler = getattr(diffusers, cls)(**SD_CONFIG, **config)
    expected = run_diffusers(scheduler, eps_net, noise, steps)
    if cls == "DDIMScheduler":   # DDIM exposes no sigmas: its grid is sigma at each timestep, then 0
        ac = scheduler.alphas_cumprod.to(torch.float64)[scheduler.timesteps]
        grid = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])
    else:
        grid = grid_of(scheduler)
    assert len(grid) == steps + 1
    if float(grid[-1]) > 0:      # final_sigmas_type="sigma_min": no final denoising; VP -> EDM
        expected = expected * math.sqrt(1 + float(grid[-1]) ** 2)
        options = {**options, "final": "sigma_min"}
    assert_close(ours(denoiser, vp_start(noise, scheduler, grid), grid, method, steps, **options), expected)


@pytest.mark.parametrize("order, steps", [(1, 10), (2, 10), (3, 10), (3, 20)])
def test_deis_matches(setup, noise, order, steps):
    """DEISMultistepScheduler stops at sigma_min of the training schedule (no final denoising):
    ours runs the same grid with ``final='sigma_min'``; the VP result is converted to EDM.

    Diffusers' float32 sigmas feed its closed-form third-order weights, whose cancellation leaves
    a 9e-6 relative difference at order 3; with its sigmas upcast to float64 it is 4e-7.
    """
    eps_net, denoiser, _ = setup
    scheduler = diffusers.DEISMultistepScheduler(**SD_CONFIG, solver_order=order)
    expected_vp = run_diffusers(scheduler, eps_net, noise, steps, float64_sigmas=True)
    grid = scheduler.sigmas.to(torch.float64)
    assert float(grid[-1]) > 0
    expected = expected_vp * math.sqrt(1 + float(grid[-1]) ** 2)
    got = ours(denoiser, vp_start(noise, scheduler, grid), grid, "deis", steps, order=order, final="sigma_min",
               lower_order_final=steps < 15)     # diffusers lowers the final orders only below 15 steps
    assert_close(got, expected)


@pytest.mark.parametrize("steps", [6, 12])
def test_pndm_plms_matches(setup, noise, steps):
    """PNDMScheduler(skip_prk_steps) with SD's settings (steps_offset=1, final alpha = alphas_cumprod[0]):
    a pseudo-Heun first step (one extra call), then AB2, AB3, AB4 on eps; it ends at sigma_min."""
    eps_net, denoiser, _ = setup
    scheduler = diffusers.PNDMScheduler(**SD_CONFIG, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    expected_vp = run_diffusers(scheduler, eps_net, noise, steps)
    ac = scheduler.alphas_cumprod.to(torch.float64)
    levels = torch.cat([ac[torch.unique_consecutive(scheduler.timesteps)], ac[:1]])
    grid = ((1 - levels) / levels).sqrt()
    expected = expected_vp * math.sqrt(1 + float(grid[-1]) ** 2)
    got = ours(denoiser, vp_start(noise, scheduler, grid), grid, "plms", steps + 1, final="sigma_min")
    assert_close(got, expected)


EDM_CASES = [  # schedulers that keep x in EDM variables (k-diffusion style)
    ("EulerDiscreteScheduler", dict(), 10, "euler", {}, lambda n: n),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), 10, "euler", {}, lambda n: n),
    ("HeunDiscreteScheduler", dict(), 8, "heun", {}, lambda n: 2 * n - 1),
    ("LMSDiscreteScheduler", dict(), 10, "lms", {}, lambda n: n),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True), 15, "lms", {}, lambda n: n),
]


@pytest.mark.parametrize("cls, config, steps, method, options, nfe", EDM_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(EDM_CASES)])
def test_k_diffusion_style_schedulers_match(setup, noise, cls, config, steps, method, options, nfe):
    eps_net, denoiser, _ = setup
    scheduler = getattr(diffusers, cls)(**SD_CONFIG, **config)
    expected = run_diffusers(scheduler, eps_net, noise, steps)
    grid = grid_of(scheduler)
    assert float(grid[-1]) == 0.0 and len(grid) == steps + 1
    # these schedulers keep x in EDM variables already: the start is noise * init_noise_sigma
    start = noise * float(scheduler.init_noise_sigma)
    assert_close(ours(denoiser, start, grid, method, nfe(steps), **options), expected)


@pytest.mark.parametrize("steps", [8, 12])
def test_sde_dpmsolver_pp_2m_matches_with_the_same_noise(setup, noise, steps):
    """SDE-DPM-Solver++(2M) (algorithm_type='sde-dpmsolver++', midpoint) with diffusers fed the very
    noise our per-row source draws (one float32 draw per step, none on the final step to 0)."""
    eps_net, denoiser, _ = setup
    gens = [torch.Generator().manual_seed(100 + i) for i in range(noise.shape[0])]
    twins = [torch.Generator().manual_seed(100 + i) for i in range(noise.shape[0])]
    draws = [torch.stack([torch.randn(noise.shape[1:], generator=g) for g in twins]).to(torch.float64)
             for _ in range(steps - 1)] + [torch.zeros_like(noise)]
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2)
    expected = run_diffusers(scheduler, eps_net, noise, steps, lambda i: {"variance_noise": draws[i]})
    grid = grid_of(scheduler)
    got = ours(denoiser, vp_start(noise, scheduler, grid), grid, "dpmpp_2m_sde", steps, generator=gens)
    assert_close(got, expected)
