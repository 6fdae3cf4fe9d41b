"""The official samplers and losses of DiT (guidance, learned variance, respacing) and U-ViT (Euler–Maruyama),
each against an independent step-by-step computation of the official formulas, and the learned variance
against the closed-form optimum on Gaussian data."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitdiff.config import ConfigError, load_config
from vitdiff.diffusion import ContinuousVP, DiffusionLoss, DiscreteVP, GaussianData, make_denoiser, make_process
from vitdiff.models.base import DiffusionBackbone
from vitdiff.sampling import (
    ClassifierFreeGuidance, get_sigmas, get_sigmas_karras, sample, sample_ddpm, sample_euler, sample_euler_maruyama,
)


class ToyLearnSigma(DiffusionBackbone):
    """A fixed float64 class-conditional learn_sigma network: eps linear in x, t and label; variance in (-1, 1)."""

    def __init__(self, channels=4, num_classes=3, image_size=4):
        super().__init__(image_size=image_size, in_channels=channels, learn_sigma=True, num_classes=num_classes)
        gen = torch.Generator().manual_seed(2)
        self.mix = torch.randn(2 * channels, channels, generator=gen, dtype=torch.float64) * 0.2
        self.time = torch.randn(2 * channels, generator=gen, dtype=torch.float64)
        self.labels = torch.randn(num_classes + 1, 2 * channels, generator=gen, dtype=torch.float64) * 0.5
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # a device for sample()

    def forward(self, x, t, cond=None):
        self.check_inputs(x, t, cond)
        dtype, x = x.dtype, x.double()
        out = (torch.einsum("oc,bchw->bohw", self.mix, x) + 0.8 * torch.cat([x, x], 1)
               + (t.to(x) / 1000)[:, None, None, None] * self.time[None, :, None, None]
               + self.labels[cond][:, :, None, None] + self.anchor)
        channels = self.in_channels
        return torch.cat([out[:, :channels], torch.tanh(out[:, channels:])], 1).to(dtype)


# --------------------------------------------------------------------------- DiT, written from its formulas
def dit_forward_with_cfg(model, x, t, labels, scale):
    """DiT's forward_with_cfg: eps of the first 3 channels guided, the 4th and the variance conditional."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, model.num_classes)]))
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = eps.chunk(2)
    return torch.cat([uncond_eps + scale * (cond_eps - uncond_eps), rest.chunk(2)[0]], 1)


def dit_p_sample_loop(model_fn, x_t, timesteps, alphas_cumprod, variance, generator):
    """iDDPM/DiT's ancestral loop on the respaced chain of `timesteps` (increasing), in VP coordinates."""
    abar = alphas_cumprod[timesteps]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    posterior_variance = betas * (1 - abar_prev) / (1 - abar)
    log_small = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
    log_large = torch.cat([posterior_variance[1:2], betas[1:]]).log()
    coef_x0 = betas * abar_prev.sqrt() / (1 - abar)
    coef_xt = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    channels, states = x_t.shape[1], []
    for i in reversed(range(len(timesteps))):
        out = model_fn(x_t, torch.full((x_t.shape[0],), float(timesteps[i]), dtype=torch.float64))
        eps, v = out[:, :channels], out[:, channels:]
        x0 = (1 / abar[i]).sqrt() * x_t - (1 / abar[i] - 1).sqrt() * eps
        mean = coef_x0[i] * x0 + coef_xt[i] * x_t
        if variance == "learned_range":
            fraction = (v + 1) / 2
            log_var = fraction * betas[i].log() + (1 - fraction) * log_small[i]
        else:
            log_var = {"fixed_small": log_small, "fixed_large": log_large}[variance][i]
        x_t = mean + (0.5 * log_var).exp() * torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype) \
            if i > 0 else mean
        states.append(x_t)
    return states


@pytest.mark.parametrize("variance, spacing, guidance", [
    ("learned_range", "linspace", 4.0), ("learned_range", "leading", 1.0), ("fixed_large", "linspace", 1.5),
    ("fixed_small", "trailing", 4.0)])
def test_ddpm_matches_dit_step_by_step(variance, spacing, guidance):
    """sample(sampler='ddpm', variance=..., spacing=..., guidance_convention='dit_official') is DiT's sampler."""
    model, process = ToyLearnSigma(), DiscreteVP()
    labels, steps = torch.tensor([0, 2]), 25
    timesteps = process.sigma_to_t(get_sigmas(process, steps, spacing=spacing)[:-1]).round().long().flip(0)
    if spacing == "linspace":
        assert timesteps[0] == 0 and timesteps[-1] == 999  # DiT's "25": the respaced chain reaches t = 0
    generator = torch.Generator().manual_seed(1)
    x_vp = torch.randn(2, 4, 4, 4, generator=generator).double()  # sample() draws its (float32) prior first too
    after_prior = generator.get_state()

    def model_fn(x, t):
        return dit_forward_with_cfg(model, x, t, labels, guidance)
    reference = dit_p_sample_loop(model_fn, x_vp, timesteps, process.alphas_cumprod, variance, generator)
    sigmas = get_sigmas(process, steps, spacing=spacing)
    denoiser = ClassifierFreeGuidance(make_denoiser(model, process, "eps"), model.null_cond, guidance, "dit_official")
    states = []
    ours = sample_ddpm(denoiser, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas, cond=labels, variance=variance,
                       generator=torch.Generator().manual_seed(1).set_state(after_prior), progress=False,
                       callback=lambda d: states.append(d["x"] / (1 + d["sigma"] ** 2).sqrt()))
    assert len(states) == steps
    for i, (a, b) in enumerate(zip(states[1:] + [ours], reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=lambda m: f"step {i}: {m}")
    # sample() (float32) builds exactly this sampler: its grid, prior, guidance and variance
    through_sample = sample(model, process, (2, 4, 4, 4), sampler="ddpm", steps=steps, cond=labels,
                            guidance=guidance, guidance_convention="dit_official", spacing=spacing, variance=variance,
                            generator=torch.Generator().manual_seed(1), progress=False)
    generator = torch.Generator().manual_seed(1)
    prior = torch.randn(2, 4, 4, 4, generator=generator) * float(process.prior_std(sigmas[0]))
    # (w = 1 skips the guidance wrapper in sample(): equal up to the rounding of u + 1 (c - u))
    torch.testing.assert_close(through_sample, sample_ddpm(denoiser, prior, sigmas, cond=labels, variance=variance,
                                                           generator=generator, progress=False), rtol=1e-5, atol=1e-5)


def test_dit_official_guidance_matches_forward_with_cfg():
    model, process = ToyLearnSigma(), DiscreteVP()
    denoiser = make_denoiser(model, process, "eps")
    x, sigma, labels = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.tensor(2.0), torch.tensor([0, 1, 2])
    x_in, t = x / math.sqrt(5.0), process.model_time(sigma.expand(3).double())
    out = dit_forward_with_cfg(model, x_in, t, labels, 3.0)
    x0, variance = ClassifierFreeGuidance(denoiser, model.null_cond, 3.0, "dit_official").denoise(x, sigma, labels)
    torch.testing.assert_close(x0, x - sigma * out[:, :4])
    torch.testing.assert_close(variance, out[:, 4:])
    standard = ClassifierFreeGuidance(denoiser, model.null_cond, 3.0, "dit")(x, sigma, labels)
    assert not torch.allclose(standard[:, 3], x0[:, 3]) and torch.allclose(standard[:, :3], x0[:, :3])
