"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator")."""
from __future__ import annotations

from ..errors import ParameterError
from .registry import register
from .multistep import eps_multistep, lagrange_integrals


@register("deis")
def deis(denoiser, x, sigmas, *, noise=None, on_step=None, order: int = 3, lower_order_final: bool = True):
    """DEIS multistep (the paper's AB exponential integrator, orders 1-3), as diffusers' DEISMultistepScheduler.

    In EDM variables the exponential integrator of the VP ODE is exact in ``x`` and leaves
    ``x_{i+1} = x_i + int_{sigma_i}^{sigma_{i+1}} eps dsigma``; eps is extrapolated by the Lagrange
    polynomial in the time variable log(sigma) through the last ``order`` points and integrated in
    closed form (float64, ``lagrange_integrals``). Order 1 is DDIM. Orders warm up 1, 2, ...; with
    ``lower_order_final`` step i uses order <= steps left.
    """
    if order not in (1, 2, 3):
        raise ParameterError("order", f"deis supports orders 1, 2, 3, got {order}")
    return eps_multistep(denoiser, x, sigmas, order=order, on_step=on_step, lower_order_final=lower_order_final,
                         coeffs=lambda hist, s_next: lagrange_integrals(hist, hist[0], s_next, log_basis=True))
