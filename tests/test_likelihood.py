"""Probability-flow likelihood against the analytic density of Gaussian data."""
from __future__ import annotations

import math

import pytest
import torch

from vitdiff.diffusion import GaussianData, make_process
from vitdiff.likelihood import dequantize, log_likelihood, nll_bits_per_dim


def gaussian_data() -> GaussianData:
    q = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.2, -0.3, 0.93]], dtype=torch.float64)
    return GaussianData(torch.tensor([0.3, -0.2, 0.1]), q @ torch.diag(torch.tensor([0.3, 0.08, 0.01]).double()) @ q.T)


def expected_logp(data: GaussianData, x, sigma_min, sigma_max, prior_std):
    """What exact integration gives: the true density change along the exact ODE path, plus the process's prior
    at the path's end (which differs from the true N(mean, cov + sigma_max^2 I) by O(|mean| / sigma_max))."""
    x_end = data.ode_solution(x, sigma_min, sigma_max)
    prior = torch.distributions.Normal(0.0, prior_std).log_prob(x_end.double()).flatten(1).sum(1)
    return data.log_prob(x, sigma_min) - data.log_prob(x_end, sigma_max) + prior


def test_exact_trace_matches_analytic_density():
    data = gaussian_data()
    x = data.sample(16, torch.Generator().manual_seed(0))
    logp = log_likelihood(data.denoiser, x, sigma_min=0.002, sigma_max=80.0, prior_std=80.0, exact_trace=True,
                          steps=60)
    torch.testing.assert_close(logp, expected_logp(data, x, 0.002, 80.0, 80.0), rtol=0, atol=5e-4)  # RK4 error
    # and the prior's mismatch is small: within 0.02 nats of the true density
    torch.testing.assert_close(logp, data.log_prob(x, sigma=0.002), rtol=0, atol=2e-2)


def test_hutchinson_is_unbiased_and_noisy():
    """Non-diagonal covariance, so Rademacher probes do not give the trace exactly."""
    data = gaussian_data()
    x = data.sample(1, torch.Generator().manual_seed(1)).expand(600, -1, -1, -1)
    estimate = log_likelihood(data.denoiser, x, sigma_min=0.002, sigma_max=80.0, prior_std=80.0, steps=40,
                              generator=torch.Generator().manual_seed(2))
    exact = expected_logp(data, x[:1], 0.002, 80.0, 80.0)
    assert estimate.std() > 0.05  # the probe noise is real ...
    assert abs(estimate.mean() - exact).item() < 4 * estimate.std().item() / math.sqrt(600) + 5e-3  # ... and unbiased


@pytest.mark.parametrize("name, prediction", [("vp-sde", "eps"), ("edm", "v"), ("ddpm-linear", "x0")])
def test_bits_per_dim_through_a_model(name, prediction):
    data, process = gaussian_data(), make_process(name)
    x = data.sample(8, torch.Generator().manual_seed(3))
    bpd = nll_bits_per_dim(data.as_model(process, prediction), process, x, prediction=prediction, exact_trace=True,
                           steps=60, dequantize_data=False)
    prior_std = float(process.prior_std(torch.tensor(process.sigma_max)))
    analytic = -expected_logp(data, x, process.sigma_min, process.sigma_max, prior_std) / (3 * math.log(2))
    torch.testing.assert_close(bpd, analytic, rtol=0, atol=3e-4)


def test_dequantisation_convention():
    k = torch.arange(256, dtype=torch.float64).reshape(4, 64, 1, 1)
    images = k / 127.5 - 1
    y = dequantize(images, torch.Generator().manual_seed(0))
    assert ((y + 1) * 128 >= k).all() and ((y + 1) * 128 < k + 1).all()  # y = (k + u) / 128 - 1
    with pytest.raises(ValueError, match="dequantize=False"):
        dequantize(images + 1e-3)
    # bits/dim = continuous bits/dim of y + log2(128)
    data, process = GaussianData(torch.zeros(2), torch.eye(2) * 0.3), make_process("edm")
    model, x = data.as_model(process, "v"), (torch.tensor([[3.0, 200.0], [128.0, 17.0]]) / 127.5 - 1)[:, :, None, None]
    with_deq = nll_bits_per_dim(model, process, x.double(), prediction="v", exact_trace=True, steps=10,
                                generator=torch.Generator().manual_seed(5))
    y = dequantize(x.double(), torch.Generator().manual_seed(5))
    without = nll_bits_per_dim(model, process, y, prediction="v", exact_trace=True, steps=10, dequantize_data=False)
    torch.testing.assert_close(with_deq, without + 7.0)


def test_bad_input():
    data = gaussian_data()
    x = data.sample(2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        log_likelihood(data.denoiser, x, sigma_min=0.01, sigma_max=80.0, prior_std=80.0, steps=0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(data.denoiser, x, sigma_min=1.0, sigma_max=0.5, prior_std=1.0)
