"""Multistep samplers (LMS, DPM-Solver++ 3M / SDE, UniPC / UniC, DEIS, PLMS, iPNDM): budget, order, noise.

The order tests use an exact denoiser of a 2-component Gaussian mixture in 2-D, whose
probability-flow ODE has no closed form: the reference is RK4 in lambda = -log(sigma) with
2000 steps (error ~2e-11, far below the solvers' errors at the budgets measured).
"""
import math

import pytest
import torch

from pipeline.samplers import SAMPLERS, sample
from pipeline.samplers.dpm_solver import dpmpp_weights
from pipeline.samplers.multistep import lagrange_integrals
from pipeline.samplers.unipc import unic_weights, unip_weights

MU = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)
STD = torch.tensor([0.3, 0.5], dtype=torch.float64)
LOG_PI = torch.tensor([0.4, 0.6], dtype=torch.float64).log()
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002

NEW = ["lms", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "unic", "deis", "plms", "pndm", "ipndm"]


def mixture_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ sum_k pi_k N(mu_k, std_k^2 I) and x = x0 + sigma eps."""
    s2 = sigma.to(torch.float64).reshape(-1, 1) ** 2                          # [B, 1]
    var = STD ** 2 + s2                                                       # [B, K]
    diff = x.to(torch.float64).unsqueeze(1) - MU                              # [B, K, d]
    logw = LOG_PI - 0.5 * (diff ** 2).sum(-1) / var - x.shape[-1] / 2 * var.log()
    post = MU + (STD ** 2 / var).unsqueeze(-1) * diff                         # per-component posterior mean
    return (logw.softmax(-1).unsqueeze(-1) * post).sum(1).to(x.dtype)


def ode_reference(noise, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, steps=2000):
    """x(sigma_min) of dx/dlambda = D(x) - x by RK4, then the final denoising step D(x, sigma_min)."""
    lam0, lam1 = -math.log(sigma_max), -math.log(sigma_min)
    h, x = (lam1 - lam0) / steps, noise * sigma_max

    def f(x, lam):
        return mixture_denoiser(x, torch.full((x.shape[0],), math.exp(-lam), dtype=torch.float64)) - x
    for i in range(steps):
        lam = lam0 + i * h
        k1 = f(x, lam)
        k2 = f(x + h / 2 * k1, lam + h / 2)
        k3 = f(x + h / 2 * k2, lam + h / 2)
        k4 = f(x + h * k3, lam + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return mixture_denoiser(x, torch.full((x.shape[0],), sigma_min, dtype=torch.float64))


@pytest.fixture(scope="module")
def problem():
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return noise, ode_reference(noise)


# ------------------------------------------------------------------------------------ NFE budget
@pytest.mark.parametrize("method, options", [
    ("lms", {}), ("lms", {"order": 2}), ("dpmpp_3m", {}), ("dpmpp_3m", {"third": "taylor"}),
    ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_3m_sde", {}),
    ("unipc", {"order": 1}), ("unipc", {"order": 2, "variant": "bh1"}), ("unipc", {"order": 3}),
    ("unipc", {"corrector": False}), ("unic", {}), ("unic", {"predictor": "dpmpp_3m"}),
    ("deis", {"order": 1}), ("deis", {"order": 2}), ("deis", {}), ("plms", {}), ("pndm", {}), ("ipndm", {}),
])
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 12])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_multistep_methods_never_exceed_the_budget(method, options, nfe, final):
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return mixture_denoiser(x, sigma)
    out = sample(counting, torch.randn(3, 2, dtype=torch.float64), method=method, nfe=nfe, final=final,
                 generator=torch.Generator().manual_seed(0), **options)
    assert torch.isfinite(out).all()
    assert 1 <= len(calls) <= nfe
    # every method spends the whole budget except where its warm-up makes it impossible
    assert len(calls) >= nfe - 1


def test_plms_spends_one_extra_call_on_its_warmup_step():
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return mixture_denoiser(x, sigma)
    grid = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    sample(counting, torch.randn(2, 2, dtype=torch.float64), method="plms", nfe=6, schedule=grid)
    # x_0 at 10, the Euler prediction at 5, then x_1 at 5 again, 2, 1, 0.5 (5 steps to 0)
    assert calls == [10.0, 5.0, 5.0, 2.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="nfe"):
        sample(counting, torch.randn(2, 2, dtype=torch.float64), method="plms", nfe=5, schedule=grid)


# ------------------------------------------------------------------------- coefficient exactness
def _poly_exact_ei(lam_next, lam0, f):
    """sigma_next * int_{lam0}^{lam_next} e^lam f(lam) dlam, by 200-point Gauss-Legendre."""
    import numpy as np
    t, w = np.polynomial.legendre.leggauss(200)
    u = (lam_next - lam0) / 2 * t + (lam_next + lam0) / 2
    return math.exp(-lam_next) * (lam_next - lam0) / 2 * float((w * np.exp(u) * f(u)).sum())


@pytest.mark.parametrize("weights, k, degree", [
    (lambda ln, ls: dpmpp_weights(ln, ls, 0.0, "heun", "taylor"), 3, 2),
    (lambda ln, ls: dpmpp_weights(ln, ls, 0.0, "heun", "reference"), 3, 1),
    (lambda ln, ls: unip_weights(ln, ls, "bh1"), 3, 2),
    (lambda ln, ls: unip_weights(ln, ls, "bh2"), 3, 2),
])  # (UniP-2 fixes rho = 1/2, i.e. DPM-Solver++(2M): second order but not exact for linear D)
def test_predictor_weights_integrate_polynomials_of_their_order_exactly(weights, k, degree):
    lams, lam_next = [0.0, -0.4, -1.1][:k], 0.55
    a, w = weights(lam_next, lams)
    assert math.isclose(a, math.exp(-(lam_next - lams[0])), rel_tol=1e-14)
    for p in range(degree + 1):
        got = sum(wi * lj ** p for wi, lj in zip(w, lams))
        assert math.isclose(got, _poly_exact_ei(lam_next, lams[0], lambda u: u ** p), rel_tol=1e-10, abs_tol=1e-14)


def test_reference_3m_weight_is_only_exact_to_first_degree():
    """The k-diffusion/diffusers 3M weight halves the D'' term: exact for linear, not quadratic D."""
    lams, lam_next = [0.0, -0.4, -1.1], 0.55
    _, w = dpmpp_weights(lam_next, lams, 0.0, "heun", "reference")
    lin = sum(wi * lj for wi, lj in zip(w, lams))
    quad = sum(wi * lj ** 2 for wi, lj in zip(w, lams))
    assert math.isclose(lin, _poly_exact_ei(lam_next, 0.0, lambda u: u), rel_tol=1e-10)
    assert not math.isclose(quad, _poly_exact_ei(lam_next, 0.0, lambda u: u ** 2), rel_tol=1e-3)


def test_unic_weights_integrate_polynomials_one_degree_higher():
    lams, lam_t = [0.0, -0.4, -1.1], 0.55      # UniC-3: D at lam_t plus three older values
    for variant in ("bh1", "bh2"):
        _, w = unic_weights(lam_t, lams, variant)
        for p in range(4):
            got = sum(wi * lj ** p for wi, lj in zip(w, [lam_t, *lams]))
            assert math.isclose(got, _poly_exact_ei(lam_t, 0.0, lambda u: u ** p), rel_tol=1e-10, abs_tol=1e-14)


@pytest.mark.parametrize("log_basis", [False, True])
def test_lagrange_integrals_match_quadrature(log_basis):
    import numpy as np
    nodes, lo = [1.0, 1.3, 1.8], 1.0
    for hi in (0.7, 0.0):
        got = lagrange_integrals(nodes, lo, hi, log_basis=log_basis)
        if log_basis:   # int L(log s) ds = int L(u) e^u du, on a fine u grid (from u = -50 for hi = 0)
            var = np.linspace(math.log(hi) if hi else -50.0, math.log(lo), 400001)
            un, jac = np.log(nodes), np.exp(var)
        else:
            var = np.linspace(hi, lo, 400001)
            un, jac = np.asarray(nodes), np.ones_like(var)
        for j in range(3):
            lj = np.prod([(var - un[m]) / (un[j] - un[m]) for m in range(3) if m != j], axis=0)
            assert got[j] == pytest.approx(-np.trapezoid(lj * jac, var), rel=1e-8, abs=1e-10)


# ------------------------------------------------------------------------- order of convergence
ORDERS = [  # (method, options, expected global order on the exponential grid, NFE pair for the slope)
    ("dpmpp_3m", {"third": "taylor"}, 3.0, (40, 160)),
    # the reference 3M weight (the default, as k-diffusion/diffusers) is second order; it gets there late
    ("dpmpp_3m", {}, 2.0, (160, 640)),
    ("dpmpp_3m", {"order": 2, "solver_type": "heun"}, 2.0, (40, 160)),
    ("unipc", {"order": 1}, 2.0, (40, 160)),            # UniP-p + UniC-p: order p + 1
    ("unipc", {"order": 2, "variant": "bh1"}, 3.0, (40, 160)),
    ("unipc", {"order": 2}, 3.0, (40, 160)),
    ("unipc", {"order": 3}, 4.0, (40, 160)),
    ("unipc", {"order": 3, "corrector": False}, 3.0, (40, 160)),
    ("unic", {}, 3.0, (40, 160)),                       # DPM-Solver++(2M) + UniC
    ("deis", {"order": 2}, 2.0, (40, 160)),
    ("deis", {"order": 3}, 3.0, (40, 160)),
    ("lms", {"lower_order_final": True}, 4.0, (160, 640)),   # variable-step AB4 in sigma
    # constant-step Adams-Bashforth weights on a geometric grid are only second-order consistent
    ("ipndm", {"lower_order_final": True}, 2.0, (40, 160)),
    ("plms", {"lower_order_final": True}, 2.0, (40, 160)),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method, options, order, nfes", ORDERS)
def test_measured_order_of_convergence_matches_theory(problem, method, options, order, nfes):
    noise, ref = problem

    def err(nfe):
        out = sample(mixture_denoiser, noise, method=method, nfe=nfe, schedule="exponential",
                     sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **options)
        return float((out - ref).abs().max())
    e_lo, e_hi = err(nfes[0]), err(nfes[1])
    measured = math.log(e_lo / e_hi) / math.log(nfes[1] / nfes[0])
    assert measured == pytest.approx(order, abs=0.4), f"{method} {options}: errors {e_lo:.2e} -> {e_hi:.2e}"


def test_third_order_methods_beat_second_order_ones(problem):
    noise, ref = problem

    def err(method, **options):
        out = sample(mixture_denoiser, noise, method=method, nfe=20, schedule="exponential",
                     sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **options)
        return float((out - ref).abs().max())
    e2m = err("dpmpp_2m")
    assert err("dpmpp_3m") < e2m and err("dpmpp_3m", third="taylor") < e2m and err("deis") < e2m
    assert err("unipc") < e2m and err("unipc", order=3) < e2m and err("unic", predictor="dpmpp_3m") < e2m


# ----------------------------------------------------------------------- identities between methods
def test_special_cases_reduce_to_known_methods():
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(method, **kw):
        return sample(mixture_denoiser, noise, method=method, nfe=9, **kw)
    # eta = 0 removes the noise: 2M-SDE(midpoint) is DPM-Solver++(2M), 3M-SDE is 3M without lower-order end
    torch.testing.assert_close(run("dpmpp_2m_sde", eta=0.0), run("dpmpp_2m"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run("dpmpp_3m_sde", eta=0.0), run("dpmpp_3m", lower_order_final=False),
                               rtol=1e-12, atol=1e-12)
    # UniP-2 (bh2, no corrector) and 3M at order 2 (midpoint) are DPM-Solver++(2M)
    torch.testing.assert_close(run("dpmpp_3m", order=2, solver_type="midpoint"), run("dpmpp_2m"),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run("unipc", order=2, corrector=False), run("dpmpp_2m"), rtol=1e-12, atol=1e-12)
    # order 1 of every exponential integrator / eps method is DDIM
    ddim = run("ddim")
    for method in ("unipc", "dpmpp_3m", "deis", "ipndm", "lms"):
        opts = {"corrector": False} if method == "unipc" else {}
        torch.testing.assert_close(run(method, order=1, **opts), ddim, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- stochastic methods
@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_methods_are_reproducible_per_row_and_batch_independent(method):
    def run(seeds, **kw):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(2, generator=g) for g in gens])
        return sample(mixture_denoiser, noise, method=method, nfe=8, generator=gens, **kw)
    together, alone = run([11, 12, 13]), run([12])
    assert torch.equal(together[1], alone[0])
    assert torch.equal(run([12]), run([12]))
    assert not torch.equal(run([12]), run([14]))
    assert SAMPLERS[method].stochastic
    # the noise matters: eta = 1 differs from the ODE solution from the same start
    assert not torch.allclose(run([12]), run([12], eta=0.0))


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_methods_sample_the_data_distribution(method):
    """On Gaussian data N(0, 0.5^2) the SDE samples have the data's std (wrong noise scales would not)."""
    sd = 0.5

    def gauss(x, sigma):
        s = sigma.to(x.dtype).reshape(-1, 1)
        return x * sd ** 2 / (sd ** 2 + s ** 2)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 4, dtype=torch.float64, generator=gen)
    out = sample(gauss, noise, method=method, nfe=30, schedule="exponential", sigma_min=0.002, generator=gen)
    assert float(out.std()) == pytest.approx(sd, rel=0.03)
    # the injected noise forgets the start (the ODE would keep a correlation of 1)
    assert abs(float((out * noise).mean() / out.std())) < 0.1


@pytest.mark.parametrize("kwargs, field", [
    ({"method": "unipc", "order": 4}, "order"),
    ({"method": "unipc", "variant": "bh3"}, "variant"),
    ({"method": "unic", "predictor": "euler"}, "predictor"),
    ({"method": "deis", "order": 5}, "order"),
    ({"method": "ipndm", "order": 5}, "order"),
    ({"method": "dpmpp_3m", "third": "x"}, "third"),
    ({"method": "dpmpp_2m_sde", "solver_type": "rk"}, "solver_type"),
])
def test_bad_options_raise_a_clear_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sample(mixture_denoiser, torch.randn(1, 2, dtype=torch.float64), nfe=5, **kwargs)


def test_all_new_methods_are_registered():
    assert set(NEW) <= set(SAMPLERS)
