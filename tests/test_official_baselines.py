"""The official samplers and losses of DiT (guidance, learned variance, respacing) and U-ViT (Euler–Maruyama),
each against an independent step-by-step computation of the official formulas, and the learned variance
against the closed-form optimum on Gaussian data."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitdiff.build import load_experiment
from vitdiff.config import ConfigError, load_config
from vitdiff.diffusion import ContinuousVP, DiffusionLoss, DiscreteVP, GaussianData, make_denoiser, make_process
from vitdiff.models.base import DiffusionBackbone
from vitdiff.sampling import (
    ClassifierFreeGuidance, ClipDenoised, get_sigmas, get_sigmas_karras, sample, sample_ddim, sample_ddpm,
    sample_euler, sample_euler_maruyama,
)


class ToyLearnSigma(DiffusionBackbone):
    """A fixed float64 class-conditional learn_sigma network: eps linear in x, t and label; variance in (-1, 1)."""

    def __init__(self, channels=4, num_classes=3, image_size=4):
        super().__init__(image_size=image_size, in_channels=channels, learn_sigma=True, num_classes=num_classes)
        gen = torch.Generator().manual_seed(2)
        self.mix = torch.randn(2 * channels, channels, generator=gen, dtype=torch.float64) * 0.2
        self.time = torch.randn(2 * channels, generator=gen, dtype=torch.float64)
        self.labels = torch.randn(num_classes + 1, 2 * channels, generator=gen, dtype=torch.float64) * 0.5
        self.gain = nn.Parameter(torch.ones((), dtype=torch.float64))  # a device for sample(), a path for gradients

    def forward(self, x, t, cond=None):
        self.check_inputs(x, t, cond)
        dtype, x = x.dtype, x.double()
        out = (torch.einsum("oc,bchw->bohw", self.mix, x) + 0.8 * torch.cat([x, x], 1)
               + (t.to(x) / 1000)[:, None, None, None] * self.time[None, :, None, None]
               + self.labels[0 if cond is None else cond][..., None, None]) * self.gain
        channels = self.in_channels
        return torch.cat([out[:, :channels], torch.tanh(out[:, channels:])], 1).to(dtype)


# --------------------------------------------------------------------------- DiT, written from its formulas
def dit_forward_with_cfg(model, x, t, labels, scale):
    """DiT's forward_with_cfg: the raw output's first 3 channels guided (all eps channels and, with fewer than 3
    data channels, variance channels too), the rest conditional."""
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


@pytest.mark.parametrize("variance, spacing, guidance, channels", [
    ("learned_range", "linspace", 4.0, 4), ("learned_range", "leading", 1.0, 4), ("fixed_large", "linspace", 1.5, 4),
    ("fixed_small", "trailing", 4.0, 4), ("learned_range", "linspace", 4.0, 2), ("learned_range", "linspace", 4.0, 1)])
def test_ddpm_matches_dit_step_by_step(variance, spacing, guidance, channels):
    """sample(sampler='ddpm', variance=..., spacing=..., guidance_convention='dit_official') is DiT's sampler."""
    model, process = ToyLearnSigma(channels), DiscreteVP()
    shape = (2, channels, 4, 4)
    labels, steps = torch.tensor([0, 2]), 25
    timesteps = process.sigma_to_t(get_sigmas(process, steps, spacing=spacing)[:-1]).round().long().flip(0)
    if spacing == "linspace":
        assert timesteps[0] == 0 and timesteps[-1] == 999  # DiT's "25": the respaced chain reaches t = 0
    generator = torch.Generator().manual_seed(1)
    x_vp = torch.randn(shape, generator=generator).double()  # sample() draws its (float32) prior first too
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
    through_sample = sample(model, process, shape, sampler="ddpm", steps=steps, cond=labels,
                            guidance=guidance, guidance_convention="dit_official", spacing=spacing, variance=variance,
                            generator=torch.Generator().manual_seed(1), progress=False)
    generator = torch.Generator().manual_seed(1)
    prior = torch.randn(shape, generator=generator) * float(process.prior_std(sigmas[0]))
    # (w = 1 skips the guidance wrapper in sample(): equal up to the rounding of u + 1 (c - u))
    torch.testing.assert_close(through_sample, sample_ddpm(denoiser, prior, sigmas, cond=labels, variance=variance,
                                                           generator=generator, progress=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [4, 3, 2, 1])
def test_dit_official_guidance_matches_forward_with_cfg(channels):
    """dit_official is DiT's raw-output slice [:, :3] for any number of data channels: with 4 the 4th data channel
    stays conditional; with 1 or 2 and a learned variance, the first 3 - C variance channels are guided too."""
    model, process = ToyLearnSigma(channels), DiscreteVP()
    denoiser = make_denoiser(model, process, "eps")
    x, sigma, labels = torch.randn(3, channels, 4, 4, dtype=torch.float64), torch.tensor(2.0), torch.tensor([0, 1, 2])
    x_in, t = x / math.sqrt(5.0), process.model_time(sigma.expand(3).double())
    out = dit_forward_with_cfg(model, x_in, t, labels, 3.0)
    x0, variance = ClassifierFreeGuidance(denoiser, model.null_cond, 3.0, "dit_official").denoise(x, sigma, labels)
    torch.testing.assert_close(x0, x - sigma * out[:, :channels], rtol=0, atol=1e-12)
    torch.testing.assert_close(variance, out[:, channels:], rtol=0, atol=1e-12)
    standard, conditional_variance = ClassifierFreeGuidance(denoiser, model.null_cond, 3.0, "dit").denoise(
        x, sigma, labels)
    guided = min(channels, 3)
    torch.testing.assert_close(standard[:, :guided], x0[:, :guided])
    assert (standard[:, guided:] - x0[:, guided:]).abs().amin(dim=(0, 2, 3)).gt(1e-3).all()  # the 4th: conditional
    # the standard rule keeps the variance conditional; DiT's slice guides the variance channels below index 3
    torch.testing.assert_close(conditional_variance, model(x_in, t, labels)[:, channels:])
    torch.testing.assert_close(variance[:, 3 - guided:], conditional_variance[:, 3 - guided:])
    assert (variance[:, :3 - guided] - conditional_variance[:, :3 - guided]).abs().amin(dim=(0, 2, 3)).gt(1e-3).all()


def dit_ddim_sample_loop(eps_fn, x_t, timesteps, alphas_cumprod, clip_denoised):
    """iDDPM/DiT's ddim_sample_loop with eta = 0 on the respaced chain of `timesteps` (increasing), VP coordinates;
    a clipped x0 estimate gives the eps the step uses."""
    abar = alphas_cumprod[timesteps]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    states = []
    for i in reversed(range(len(timesteps))):
        eps = eps_fn(x_t, torch.full((x_t.shape[0],), float(timesteps[i]), dtype=torch.float64))
        x0 = (1 / abar[i]).sqrt() * x_t - (1 / abar[i] - 1).sqrt() * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        eps = ((1 / abar[i]).sqrt() * x_t - x0) / (1 / abar[i] - 1).sqrt()
        x_t = abar_prev[i].sqrt() * x0 + (1 - abar_prev[i]).sqrt() * eps
        states.append(x_t)
    return states


@pytest.mark.parametrize("clip_denoised", [False, True])
def test_ddim_matches_dit_step_by_step(clip_denoised):
    """sample_ddim (eta 0) on the leading grid, with or without ClipDenoised, is DiT's ddim_sample_loop on
    create_diffusion("ddim25") with that clip_denoised (the loop's own default is True)."""
    model, process, steps = ToyLearnSigma(channels=3, num_classes=0), DiscreteVP(), 25
    sigmas = get_sigmas(process, steps, spacing="leading")
    timesteps = process.sigma_to_t(sigmas[:-1]).round().long().flip(0)
    assert torch.equal(timesteps, torch.arange(0, 1000, 1000 // steps))  # DiT's "ddim25"
    x_vp = 1.5 * torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = dit_ddim_sample_loop(lambda x, t: model(x, t)[:, :3], x_vp, timesteps, process.alphas_cumprod,
                                     clip_denoised)
    denoiser, states = make_denoiser(model, process, "eps"), []
    ours = sample_ddim(ClipDenoised(denoiser) if clip_denoised else denoiser, x_vp * (1 + sigmas[0] ** 2).sqrt(),
                       sigmas, progress=False, callback=lambda d: states.append(d["x"] / (1 + d["sigma"] ** 2).sqrt()))
    for i, (a, b) in enumerate(zip(states[1:] + [ours], reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=lambda m: f"step {i}: {m}")
    unclipped = dit_ddim_sample_loop(lambda x, t: model(x, t)[:, :3], x_vp, timesteps, process.alphas_cumprod, False)
    assert clip_denoised == bool((unclipped[-1] - reference[-1]).abs().max() > 1e-3)  # the clip takes effect


# --------------------------------------------------------------------------- the hybrid loss
def _approx_phi(x):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def iddpm_hybrid_loss(model, x0, t, noise, process):
    """iDDPM's training_losses for learned_range + eps + hybrid loss, from the formulas, in VP coordinates."""
    abar_all = process.alphas_cumprod
    abar, abar_prev = abar_all[t], torch.where(t > 0, abar_all[(t - 1).clamp(min=0)], 1.0)
    beta = process.betas[t]
    posterior_variance = beta * (1 - abar_prev) / (1 - abar)
    variance_at_1 = process.betas[1] * (1 - abar_all[0]) / (1 - abar_all[1])
    log_posterior = torch.where(t > 0, posterior_variance, variance_at_1).log()
    bc = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    x_t = bc(abar.sqrt()) * x0 + bc((1 - abar).sqrt()) * noise
    out = model(x_t, t.double(), None)
    eps, v = out[:, :x0.shape[1]], out[:, x0.shape[1]:]
    x0_hat = (x_t - bc((1 - abar).sqrt()) * eps.detach()) / bc(abar.sqrt())
    coef_x0, coef_xt = beta * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
    true_mean = bc(coef_x0) * x0 + bc(coef_xt) * x_t
    model_mean = bc(coef_x0) * x0_hat + bc(coef_xt) * x_t
    log_var = (v + 1) / 2 * bc(beta.log()) + (1 - v) / 2 * bc(log_posterior)
    kl = 0.5 * (-1 + log_var - bc(log_posterior) + (bc(log_posterior) - log_var).exp()
                + (true_mean - model_mean) ** 2 * (-log_var).exp())
    inv_std = (-0.5 * log_var).exp()
    cdf_plus = _approx_phi(inv_std * (x0 - model_mean + 1 / 255))
    cdf_minus = _approx_phi(inv_std * (x0 - model_mean - 1 / 255))
    log_p = torch.where(x0 < -0.999, cdf_plus.clamp(min=1e-12).log(),
                        torch.where(x0 > 0.999, (1 - cdf_minus).clamp(min=1e-12).log(),
                                    (cdf_plus - cdf_minus).clamp(min=1e-12).log()))
    vb = torch.where(t == 0, -log_p.flatten(1).mean(1), kl.flatten(1).mean(1)) / math.log(2)
    return (noise - eps).pow(2).flatten(1).mean(1) + vb * process.num_steps / 1000


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_hybrid_loss_matches_iddpm(schedule):
    process = DiscreteVP(schedule=schedule)
    model = ToyLearnSigma(channels=2, num_classes=0)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 0, 1, 7, 500, 999])
    # 8-bit data in [-1, 1], edge bins included (the decoder NLL at t = 0 treats them apart)
    x0 = (torch.randint(0, 256, (6, 2, 4, 4), generator=gen) / 127.5 - 1).double()
    x0[0, 0, 0] = -1.0
    x0[1, 1, 1] = 1.0
    noise = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    sigma = process.sigmas[t].float()
    ours = DiffusionLoss(process).loss_at(model, x0, sigma, noise)
    torch.testing.assert_close(ours.double(), iddpm_hybrid_loss(model, x0, t, noise, process), rtol=2e-5, atol=2e-6)

    def output_gradient(vlb_weight):
        outputs = []

        def keep(module, inputs, output):
            output.retain_grad()
            outputs.append(output)
        handle = model.register_forward_hook(keep)
        DiffusionLoss(process, vlb_weight=vlb_weight).loss_at(model, x0, sigma, noise).sum().backward()
        handle.remove()
        return outputs[0].grad
    hybrid, mean_only = output_gradient(0.001), output_gradient(0.0)
    torch.testing.assert_close(hybrid[:, :2], mean_only[:, :2])  # stop-gradient: L_vlb leaves the mean alone
    assert mean_only[:, 2:].abs().max() == 0 and hybrid[:, 2:].abs().min() > 0  # and trains the variance


# --------------------------------------------------------------------------- learned variance: closed forms
def reverse_step_optimum(sigma, sigma_next, data_variance):
    """(beta, beta_tilde, Sigma*) of the DDPM step sigma -> sigma_next for Gaussian data of per-dimension variance
    `data_variance`: the true reverse step q(x_next | x) is Gaussian with variance Sigma* = beta_tilde +
    coef^2 Var[x0 | x], coef = sqrt(abar_next) beta / (1 - abar) (VP coordinates, written from abar)."""
    abar, abar_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    beta = 1 - abar / abar_next
    beta_tilde = beta * (1 - abar_next) / (1 - abar)
    posterior_x0_variance = data_variance * sigma ** 2 / (data_variance + sigma ** 2)
    return beta, beta_tilde, beta_tilde + (abar_next.sqrt() * beta / (1 - abar)) ** 2 * posterior_x0_variance


class OracleMeanConstantVariance(nn.Module):
    """The exact eps of Gaussian data, and one trainable variance output v for every pixel."""

    learn_sigma, is_conditional = True, False

    def __init__(self, data: GaussianData, process):
        super().__init__()
        self.eps = data.as_model(process, "eps")
        self.v = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t, cond=None):
        eps = self.eps(x, t)
        return torch.cat([eps, self.v.expand_as(eps)], 1)


@pytest.mark.parametrize("data_std", [1.0, 0.3])
def test_hybrid_loss_learns_the_optimal_variance(data_std):
    """Minimising the hybrid loss over the variance output (exact mean) finds Sigma* in closed form; for data of
    unit variance Sigma* = beta exactly ("fixed_large" is optimal there, DDPM's observation)."""
    process = DiscreteVP()
    data = GaussianData(torch.full((3,), 0.1), data_std ** 2 * torch.eye(3, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    for t in (3, 60, 400):
        model, n = OracleMeanConstantVariance(data, process), 20000
        x0, noise = data.sample(n, gen), torch.randn(n, 3, 1, 1, generator=gen, dtype=torch.float64)
        sigma = process.sigmas[t].expand(n)
        loss_fn = DiffusionLoss(process, vlb_weight=10.0)  # the optimum is lambda's; a large one keeps float32 exact
        optimizer = torch.optim.LBFGS([model.v], max_iter=50, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = loss_fn.loss_at(model, x0, sigma, noise).mean()
            loss.backward()
            return loss
        optimizer.step(closure)
        beta, beta_tilde, optimum = reverse_step_optimum(process.sigmas[t], process.sigmas[t - 1], data_std ** 2)
        fraction = (model.v.detach() + 1) / 2
        fitted = (fraction * beta.log() + (1 - fraction) * beta_tilde.log()).exp()
        assert fitted.item() == pytest.approx(optimum.item(), rel=3e-3), (t, fitted, optimum, beta, beta_tilde)
        gap = (beta / beta_tilde).log()
        if gap > 0.02:  # the output itself where the range is wide enough to pin it
            v_optimum = 2 * (optimum / beta_tilde).log() / gap - 1
            assert model.v.item() == pytest.approx(v_optimum.item(), abs=0.05), t
        if data_std == 1.0:
            assert fitted.item() == pytest.approx(beta.item(), rel=3e-3)


class OracleOptimalVariance(nn.Module):
    """Exact eps of diagonal Gaussian data and, for each step of a known grid, the variance output that makes the
    step the true reverse transition (per dimension)."""

    learn_sigma, is_conditional = True, False

    def __init__(self, data: GaussianData, process, sigmas: torch.Tensor):
        super().__init__()
        self.eps, self.process, self.sigmas = data.as_model(process, "eps"), process, sigmas
        self.data_variance = data.cov.diagonal().reshape(1, -1, 1, 1)

    def forward(self, x, t, cond=None):
        eps = self.eps(x, t)
        sigma = self.process.model_time_to_sigma(t.double())
        index = (self.sigmas[None, :-1] - sigma[:, None]).abs().argmin(1)
        sigma, sigma_next = self.sigmas[index].reshape(-1, 1, 1, 1), self.sigmas[index + 1].reshape(-1, 1, 1, 1)
        beta, beta_tilde, optimum = reverse_step_optimum(sigma, sigma_next, self.data_variance)
        v = torch.where(sigma_next > 0, 2 * (optimum / beta_tilde).log() / (beta / beta_tilde).log() - 1, 0.0)
        return torch.cat([eps, v.expand_as(eps).to(eps)], 1)


def test_learned_range_with_the_optimal_variance_is_exact_in_few_steps():
    """Each DDPM step with Sigma* is the true reverse transition of Gaussian data, so 6 respaced steps sample the
    data exactly (the last, noise-free step returns E[x0 | x] at the smallest sigma: variance lam^2 / (lam + s^2));
    the fixed variances are off by far more at 6 steps."""
    lam = torch.tensor([0.5, 0.08, 0.01], dtype=torch.float64)
    data, process, steps, n = GaussianData(torch.tensor([0.3, -0.2, 0.1]), torch.diag(lam)), DiscreteVP(), 6, 40000
    sigmas = get_sigmas(process, steps, spacing="linspace")
    model = OracleOptimalVariance(data, process, sigmas)
    expected = lam ** 2 / (lam + sigmas[-2] ** 2)
    errors = {}
    for variance in ("learned_range", "fixed_small", "fixed_large"):
        out = sample(model, process, (n, 3, 1, 1), sampler="ddpm", steps=steps, spacing="linspace", variance=variance,
                     generator=torch.Generator().manual_seed(0), progress=False).double().flatten(1)
        errors[variance] = ((out.var(0) / expected - 1).abs().max().item(),
                            (out.mean(0) - data.mean).abs().max().item())
    standard_error = math.sqrt(2 / n)  # of a variance estimate, relative
    assert errors["learned_range"][0] < 4 * standard_error, errors
    assert errors["learned_range"][1] < 4 * math.sqrt(0.5 / n), errors  # the mean, its largest std is sqrt(0.5)
    assert min(errors["fixed_small"][0], errors["fixed_large"][0]) > 10 * standard_error, errors


# --------------------------------------------------------------------------- U-ViT's Euler–Maruyama
def uvit_euler_maruyama(eps_fn, x, steps, generator, beta_min=0.1, beta_max=20.0, eps=1e-3):
    """U-ViT's sde.py euler_maruyama on its VPSDE and ScoreModel (noise_pred), from the formulas."""
    timesteps = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(eps, 1, steps, dtype=torch.float64)])
    states = []
    for s, t in reversed(list(zip(timesteps[:-1], timesteps[1:]))):
        beta = beta_min + t * (beta_max - beta_min)
        cum_beta = -torch.expm1(-(beta_min * t + (beta_max - beta_min) * t ** 2 / 2))
        score = -eps_fn(x, torch.full((x.shape[0],), float(t) * 999, dtype=torch.float64)) / cum_beta.sqrt()
        drift = -0.5 * beta * x - beta * score
        mean = x + drift * (s - t)
        x = mean + beta.sqrt() * (t - s).sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype) \
            if s != 0 else mean
        states.append(x)
    return states


@pytest.mark.parametrize("steps", [25, 1000])
def test_euler_maruyama_matches_uvit_step_by_step(steps):
    model, process = ToyLearnSigma(channels=3, num_classes=0), ContinuousVP()
    x_vp = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = uvit_euler_maruyama(lambda x, t: model(x, t)[:, :3], x_vp, steps, torch.Generator().manual_seed(1))
    sigmas = get_sigmas(process, steps)
    denoiser, states = make_denoiser(model, process, "eps"), []
    official = sample_euler_maruyama(denoiser, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                                     generator=torch.Generator().manual_seed(1), progress=False,
                                     beta_dt=process.beta_dt_at_start,
                                     callback=lambda d: states.append(d["x"] / (1 + d["sigma"] ** 2).sqrt()))
    for i, (a, b) in enumerate(zip(states[1:] + [official], reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"step {i}: {m}")
    # vitdiff's default integrates beta over each step instead: a first-order difference
    default = sample_euler_maruyama(denoiser, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                                    generator=torch.Generator().manual_seed(1), progress=False)
    assert (default - official).abs().max() > 1e-3


# --------------------------------------------------------------------------- config, trainer, command line
DIT_RUN = {
    "model": {"preset": "DiT-tiny", "learn_sigma": True, "dim": 32, "depth": 1, "num_heads": 2, "patch_size": 4},
    "diffusion": {"process": "ddpm-linear"},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 8, "num_workers": 0},
    "train": {"steps": 2, "lr": 1.0e-3, "warmup_steps": 1, "sample_every": 0, "progress": False},
    "sample": {"sampler": "ddpm", "variance": "learned_range", "spacing": "linspace", "steps": 4},
}


def _variance_output_after_training(tmp_path, name, *overrides):
    import yaml

    from vitdiff.trainer import Trainer

    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(DIT_RUN))
    trainer = Trainer(load_config(tmp_path / "dit.yaml", [f"out_dir={tmp_path / name}", *overrides]))
    trainer.fit()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return trainer.loss_fn.vlb_weight, trainer.model(x, torch.tensor([10.0, 500.0]))[:, 1:]


def test_trainer_trains_the_variance_with_the_hybrid_loss_and_samples_with_it(tmp_path):
    from vitdiff.cli import main as vitdiff

    weight, variance = _variance_output_after_training(tmp_path, "hybrid")
    assert weight == 0.001 and variance.abs().max() > 0
    # DiT's output layer starts at zero: without L_vlb nothing moves the variance channels
    weight, variance = _variance_output_after_training(tmp_path, "mean-only", "diffusion.vlb_weight=0")
    assert weight == 0 and variance.abs().max() == 0
    out = tmp_path / "grid.png"
    assert vitdiff(["sample", str(tmp_path / "hybrid"), "--n", "2", "--spacing", "leading", "--out", str(out)]) == 0
    assert out.is_file()


UVIT_RUN = {
    "model": {"preset": "U-ViT-tiny", "dim": 32, "depth": 2, "num_heads": 2},
    "diffusion": {"process": "vp-sde", "prediction": "eps", "weighting": "uniform"},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 8, "num_workers": 0},
    "train": {"steps": 2, "lr": 1.0e-3, "warmup_steps": 1, "sample_every": 0, "progress": False},
    "sample": {"sampler": "dpmpp_2m", "steps": 3},
}


def test_uvit_sampler_from_the_command_line_and_the_config(tmp_path, monkeypatch):
    """`vitdiff sample RUN --sampler euler_maruyama --steps 1000 --beta-dt start` (and the config's
    sample.beta_dt: start) is sample(..., beta_dt=process.beta_dt_at_start) with the same noise: U-ViT's sde.py."""
    import torchvision.utils
    import yaml

    from vitdiff.cli import main as vitdiff
    from vitdiff.config import Config
    from vitdiff.generate import generate, load_for_inference
    from vitdiff.trainer import Trainer

    (tmp_path / "uvit.yaml").write_text(yaml.safe_dump(UVIT_RUN))
    Trainer(load_config(tmp_path / "uvit.yaml", [f"out_dir={tmp_path / 'run'}"])).fit()
    grids = []
    monkeypatch.setattr(torchvision.utils, "save_image", lambda images, *args, **kw: grids.append(images))
    command = ["sample", str(tmp_path / "run"), "--n", "2", "--sampler", "euler_maruyama", "--steps", "1000",
               "--no-clip-denoised", "--out", str(tmp_path / "grid.png")]
    assert vitdiff([*command, "--beta-dt", "start"]) == 0 and vitdiff(command) == 0
    model, process, config, _, _ = load_for_inference(tmp_path / "run")
    cond = torch.arange(2) % model.num_classes if model.num_classes else None

    official = sample(model, process, (2, 1, 8, 8), sampler="euler_maruyama", steps=1000, cond=cond,
                      beta_dt=process.beta_dt_at_start, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(grids[0], (official + 1) / 2)  # the grid holds (x + 1) / 2
    assert (grids[0] - grids[1]).abs().max() > 1e-3  # the default integrates beta over each step
    raw = config.to_dict()
    raw["sample"].update(sampler="euler_maruyama", steps=1000, beta_dt="start", clip_denoised=False)
    assert torch.equal(generate(model, process, Config.from_dict(raw), n=2), official)


def test_sample_and_eval_options_are_checked_with_the_config(tmp_path, capsys):
    """The official settings as options: checked as the config is (exit 2, one line, nothing written); a setting
    of the config's own sampler is dropped when --sampler picks another; eval records what ran."""
    import json

    import yaml

    from vitdiff.cli import main as vitdiff
    from vitdiff.trainer import Trainer

    run = {**UVIT_RUN, "sample": {"sampler": "euler_maruyama", "steps": 3, "beta_dt": "start"}}
    (tmp_path / "uvit.yaml").write_text(yaml.safe_dump(run))
    Trainer(load_config(tmp_path / "uvit.yaml", [f"out_dir={tmp_path / 'run'}"])).fit()
    grid = ["sample", str(tmp_path / "run"), "--n", "2", "--out", str(tmp_path / "grid.png")]
    for options, message in [
            (["--sampler", "ddim", "--beta-dt", "start"], "beta_dt=start is read by the euler_maruyama sampler only"),
            (["--beta-dt", "midpoint"], "sample.beta_dt='midpoint' is not one of: exact, start"),
            (["--variance", "learned_range"], "sample.variance is read by the ddpm sampler only"),
            (["--spacing", "leading"], "sample.spacing places the uniform_t grid of a discrete process"),
            (["--guidance-convention", "uvit"], "pass --guidance in the 'uvit' convention")]:
        assert vitdiff([*grid, *options]) == 2, options
        assert message in capsys.readouterr().err, options
        assert not (tmp_path / "grid.png").exists()
    assert vitdiff([*grid, "--sampler", "ddim"]) == 0  # the config's beta_dt belongs to euler_maruyama
    results = tmp_path / "results.jsonl"
    assert vitdiff(["eval", str(tmp_path / "run"), "--metric", "fd-clf", "--n", "4", "--steps", "2",
                    "--sampler", "ddpm", "--variance", "fixed_large", "--no-clip-denoised",
                    "--results", str(results)]) == 0
    assert vitdiff(["eval", str(tmp_path / "run"), "--metric", "fd-clf", "--n", "4", "--steps", "2",
                    "--results", str(results)]) == 0
    ddpm, em = (json.loads(line) for line in results.read_text().splitlines())
    assert (ddpm["sampler"], ddpm["extra"]["variance"], ddpm["extra"]["beta_dt"], ddpm["extra"]["clip_denoised"]) == (
        "ddpm", "fixed_large", "exact", False)
    assert (em["sampler"], em["extra"]["variance"], em["extra"]["beta_dt"], em["extra"]["clip_denoised"]) == (
        "euler_maruyama", None, "start", True)


def test_config_checks_the_new_settings(tmp_path):
    config = load_config(None, ["diffusion.process=ddpm-linear", "sample.sampler=ddpm", "sample.spacing=linspace",
                                "sample.variance=learned_range", "sample.guidance_convention=dit_official",
                                "diffusion.vlb_weight=0.001"])
    assert (config.sample.variance, config.sample.spacing, config.sample.guidance_convention) == (
        "learned_range", "linspace", "dit_official")
    # Names are checked where the registries are (vitdiff.build.check_names), before anything is built.
    with pytest.raises(ConfigError, match="sample.spacing='even' is not one of: leading, linspace, trailing"):
        load_experiment(None, ["diffusion.process=ddpm-linear", "sample.spacing=even"])
    with pytest.raises(ConfigError, match="sample.variance='learned' is not one of: fixed_large, fixed_small, learned"):
        load_experiment(None, ["sample.sampler=ddpm", "sample.variance=learned"])
    with pytest.raises(ConfigError, match="read by the ddpm sampler only"):
        load_config(None, ["sample.variance=fixed_large"])  # the default sampler is dpmpp_2m
    with pytest.raises(ConfigError, match="vlb_weight must be >= 0"):
        load_config(None, ["diffusion.vlb_weight=-1"])
    with pytest.raises(ConfigError, match="dit, dit_official, uvit"):
        load_experiment(None, ["sample.guidance_convention=official"])
    config = load_config(None, ["sample.sampler=euler_maruyama", "sample.beta_dt=start"])
    assert (config.sample.beta_dt, load_config(None).sample.beta_dt) == ("start", "exact")
    with pytest.raises(ConfigError, match="sample.beta_dt='mid' is not one of: exact, start"):
        load_experiment(None, ["sample.sampler=euler_maruyama", "sample.beta_dt=mid"])
    with pytest.raises(ConfigError, match="beta_dt=start is read by the euler_maruyama sampler only"):
        load_config(None, ["sample.beta_dt=start"])  # the default sampler is dpmpp_2m
    with pytest.raises(ConfigError, match="beta_dt=start is read by the euler_maruyama sampler only"):
        load_config(None, ["sample.sampler=euler_maruyama", "sample.beta_dt=start", "eval.sampler=heun"])
    with pytest.raises(ConfigError, match="spacing places the uniform_t grid of a discrete process"):
        load_config(None, ["sample.spacing=leading"])  # the default process is vp-sde
    with pytest.raises(ConfigError, match="spacing places the uniform_t grid of a discrete process"):
        load_config(None, ["sample.spacing=leading", "diffusion.process=ddpm-linear", "sample.grid=karras"])
    with pytest.raises(ConfigError, match="set diffusion.process=vp-sde"):
        load_config(None, ["sample.sampler=euler_maruyama", "sample.beta_dt=start", "diffusion.process=ddpm-linear"])


# --------------------------------------------------------------------------- grids and small things
@pytest.mark.parametrize("spacing, first, last", [("trailing", 999, 199), ("leading", 800, 0), ("linspace", 999, 0)])
def test_sample_reaches_every_spacing(spacing, first, last):
    model, process = ToyLearnSigma(channels=2, num_classes=0), DiscreteVP()
    seen = []
    sample(model, process, (1, 2, 4, 4), sampler="ddim", steps=5, spacing=spacing, progress=False,
           callback=lambda d: seen.append(d["sigma"]))
    steps = process.sigma_to_t(torch.stack(seen).double()).round().long()
    assert torch.equal(steps, process.sigma_to_t(get_sigmas(process, 5, spacing=spacing)[:-1]).round().long())
    assert (steps[0], steps[-1]) == (first, last), steps


def test_bad_settings_name_the_fix():
    model, process = ToyLearnSigma(channels=2, num_classes=0), DiscreteVP()
    shape = (1, 2, 4, 4)
    with pytest.raises(ValueError, match="places the uniform_t grid, not 'karras'"):
        sample(model, process, shape, grid="karras", spacing="leading")
    with pytest.raises(ValueError, match="choose one of trailing, leading, linspace"):
        sample(model, process, shape, spacing="even")
    with pytest.raises(ValueError, match="ddpm sampler only"):
        sample(model, process, shape, sampler="ddim", variance="learned_range")
    with pytest.raises(ValueError, match="fixed_small, fixed_large, learned_range"):
        sample(model, process, shape, sampler="ddpm", variance="learned")
    data = GaussianData(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="needs a learn_sigma model"):
        sample(data.as_model(process), process, (1, 2, 1, 1), sampler="ddpm", variance="learned_range")
    with pytest.raises(ValueError, match="euler_maruyama sampler only"):
        sample(model, ContinuousVP(), shape, sampler="ddim", beta_dt="start")
    with pytest.raises(ValueError, match="has none: use beta_dt='exact'"):
        sample(model, process, shape, sampler="euler_maruyama", beta_dt="start")
    with pytest.raises(ValueError, match="choose one of exact, start"):
        sample(model, ContinuousVP(), shape, sampler="euler_maruyama", beta_dt="midpoint")
    with pytest.raises(ValueError, match="vlb_weight=0"):
        DiffusionLoss(ContinuousVP())(model, torch.randn(shape))  # the VLB needs a discrete chain
    with pytest.raises(ValueError, match="vlb_weight must be >= 0"):
        DiffusionLoss(process, vlb_weight=-1)


def test_karras_grid_honours_explicit_bounds():
    process = make_process("edm")
    grid = get_sigmas_karras(process, 5, sigma_min=1e-4, sigma_max=10.0)
    assert grid[0] == pytest.approx(10.0) and grid[-2] == pytest.approx(1e-4) and grid[-1] == 0
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        get_sigmas_karras(process, 5, sigma_min=0.0)  # was silently replaced by the process's sigma_min


def test_churn_draws_noise_only_inside_its_window():
    data, process = GaussianData(torch.zeros(2), torch.eye(2)), make_process("edm")
    sigmas, x = get_sigmas(process, 8), torch.randn(4, 2, 1, 1, dtype=torch.float64)
    outside, fresh = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = sample_euler(data.denoiser, x, sigmas, progress=False)
    churned = sample_euler(data.denoiser, x, sigmas, generator=outside, progress=False, s_churn=10.0, s_tmin=1e3)
    assert torch.equal(plain, churned) and torch.equal(outside.get_state(), fresh.get_state())
    inside = torch.Generator().manual_seed(0)
    sample_euler(data.denoiser, x, sigmas, generator=inside, progress=False, s_churn=10.0, s_tmin=1.0, s_tmax=20.0)
    in_window = int(((sigmas[:-1] >= 1.0) & (sigmas[:-1] <= 20.0)).sum())
    assert torch.equal(inside.get_state(), _after_draws(in_window, x.shape))


def _after_draws(count, shape):
    gen = torch.Generator().manual_seed(0)
    for _ in range(count):
        torch.randn(shape, generator=gen, dtype=torch.float64)
    return gen.get_state()
