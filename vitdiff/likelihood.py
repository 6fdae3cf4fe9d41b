"""Negative log-likelihood in bits/dim through the probability-flow ODE.

The ODE (VE coordinates, integrated in u = ln(sigma) for even step sizes)::

    dx/du = f(x, u) = x - D(x, sigma),    sigma = exp(u)

carries the data density p_{sigma_min} to p_{sigma_max}, and by the instantaneous
change of variables (Chen et al. 2018; Song et al. 2021)::

    log p_{sigma_min}(x(sigma_min)) = log N(x(sigma_max); 0, prior_std^2 I) + integral div_x f(x, u) du

with the prior of the process (VP: N(0, I) in VP coordinates, i.e. std
sqrt(1 + sigma_max^2) here; EDM: std sigma_max). The divergence is exact (one
backward pass per dimension; small data only) or Hutchinson's estimate z^T (df/dx) z
with one Rademacher z per example, held fixed along the trajectory (FFJORD).
Integration is fixed-step classical RK4 from sigma_min to sigma_max (default:
the process's range; for the continuous VP that starts at t = t_min, 1e-3 by default,
pass ``sigma_min=process.t_to_sigma(1e-5)`` for score_sde's likelihood setting).
The data are taken as the sample at sigma_min (no correction for the residual noise).

Dequantisation convention (``dequantize=True``, score_sde's): the inputs are 8-bit
images mapped to [-1, 1] as ``k / 127.5 - 1`` (k = 0..255, what the datasets yield).
We recover k, draw u ~ U(0, 1)^D, and evaluate the continuous density at
``y = (k + u) / 128 - 1`` in [-1, 1). The map from k + u in [0, 256)^D to y has
Jacobian 1/128 per dimension, so by Jensen

    -log2 P(k) <= E_u[-log2 p(y)] + D * log2(128),

and we report ``bits/dim = -log p(y) / (D ln 2) + 7``, a one-sample estimate of this
upper bound (the discrete-data NLL reported by DDPM/score_sde-style papers).
With ``dequantize=False`` the result is ``-log p(x0) / (D ln 2)`` for continuous data.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .diffusion import NoiseProcess, make_denoiser, rand


def _divergence(f: torch.Tensor, x: torch.Tensor, probe: torch.Tensor | None) -> torch.Tensor:
    """(B,) divergence of f w.r.t. x: exact per-dimension autograd when probe is None, else Hutchinson."""
    if probe is not None:
        (vjp,) = torch.autograd.grad(f, x, probe)
        return (vjp * probe).flatten(1).sum(1)
    f_flat = f.flatten(1)
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(f_flat.shape[1]):
        (grad,) = torch.autograd.grad(f_flat[:, i].sum(), x, retain_graph=True)
        trace = trace + grad.flatten(1)[:, i]
    return trace


def log_likelihood(denoiser, x: torch.Tensor, *, sigma_min: float, sigma_max: float, prior_std: float,
                   cond=None, exact_trace: bool = False, steps: int = 100,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) log-density in nats of x under p_{sigma_min} of the model's probability-flow ODE."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    probe = None
    if not exact_trace:
        probe = rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).lt(0.5).to(x.dtype) * 2 - 1

    def field(u: float, x: torch.Tensor):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            sigma = torch.full((x.shape[0],), math.exp(u), dtype=x.dtype, device=x.device)
            f = x - denoiser(x, sigma, cond)
            return f.detach(), _divergence(f, x, probe).detach()

    u0, u1 = math.log(sigma_min), math.log(sigma_max)
    h = (u1 - u0) / steps
    delta_logp = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(steps):
        u = u0 + i * h
        k1, d1 = field(u, x)
        k2, d2 = field(u + h / 2, x + h / 2 * k1)
        k3, d3 = field(u + h / 2, x + h / 2 * k2)
        k4, d4 = field(u + h, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta_logp = delta_logp + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    dims = x[0].numel()
    log_norm = dims * (math.log(prior_std) + 0.5 * math.log(2 * math.pi))
    prior_logp = -0.5 * (x / prior_std).pow(2).flatten(1).sum(1) - log_norm
    return prior_logp + delta_logp


def dequantize(x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit images as k/127.5 - 1 -> (k + u)/128 - 1 with u ~ U(0, 1) (module docstring)."""
    k = ((x0 + 1) * 127.5).round()
    if (k < 0).any() or (k > 255).any() or ((x0 + 1) * 127.5 - k).abs().max() > 1e-3:
        raise ValueError("dequantize expects 8-bit images scaled as k/127.5 - 1 (k = 0..255); "
                         "pass dequantize=False for continuous data")
    return (k + rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)) / 128 - 1


@torch.no_grad()
def nll_bits_per_dim(model: nn.Module, process: NoiseProcess, x0: torch.Tensor, *, prediction: str = "eps",
                     cond=None, exact_trace: bool = False, steps: int = 100, generator: torch.Generator | None = None,
                     dequantize_data: bool = True, sigma_min: float | None = None,
                     sigma_max: float | None = None) -> torch.Tensor:
    """(B,) NLL in bits/dim of data x0 in [-1, 1] (see the module docstring for the exact convention).

    ``steps`` RK4 steps cost 4 * steps network evaluations, each with one backward
    pass (Hutchinson) or D of them (``exact_trace``).
    """
    sigma_min = sigma_min or process.sigma_min
    sigma_max = sigma_max or process.sigma_max
    y = dequantize(x0, generator) if dequantize_data else x0
    logp = log_likelihood(make_denoiser(model, process, prediction), y, sigma_min=sigma_min, sigma_max=sigma_max,
                          prior_std=float(process.prior_std(torch.tensor(sigma_max, dtype=torch.float64))),
                          cond=cond, exact_trace=exact_trace, steps=steps, generator=generator)
    dims = x0[0].numel()
    return -logp / (dims * math.log(2)) + (7.0 if dequantize_data else 0.0)


__all__ = ["log_likelihood", "dequantize", "nll_bits_per_dim"]
