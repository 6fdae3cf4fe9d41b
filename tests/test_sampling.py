"""Samplers against diffusers step for step, and against Gaussian ground truth (moments, convergence order)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitdiff.diffusion import DiscreteVP, GaussianData, make_denoiser, make_process
from vitdiff.models.base import DiffusionBackbone
from vitdiff.sampling import (
    GRIDS, SAMPLERS, ClassifierFreeGuidance, get_sigmas, get_sigmas_karras, sample, sample_ddim, sample_euler,
)


def gaussian_data() -> GaussianData:
    q = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.2, -0.3, 0.93]], dtype=torch.float64)
    return GaussianData(torch.tensor([0.3, -0.2, 0.1]), q @ torch.diag(torch.tensor([0.3, 0.08, 0.01]).double()) @ q.T)


# --------------------------------------------------------------------------- diffusers references
class ToyEps(nn.Module):
    """A fixed float64 eps-model, linear in x (channel mixing) and t."""

    def __init__(self, channels=3):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.mix = torch.randn(channels, channels, generator=gen, dtype=torch.float64) * 0.1
        self.pattern = torch.randn(1, channels, 4, 4, generator=gen, dtype=torch.float64) * 0.3

    def forward(self, x, t, cond=None):
        time = (t.to(x) / 1000).reshape(-1, 1, 1, 1)
        return torch.einsum("ij,bjhw->bihw", self.mix, x) + 0.9 * x + time * self.pattern


def _float64_schedule(scheduler, process: DiscreteVP):
    """diffusers keeps its schedule in float32; give it ours in float64 so the comparison is exact."""
    scheduler.betas = process.betas.clone()
    scheduler.alphas = 1 - process.betas
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    return scheduler


def _compare_with_diffusers(scheduler, process, sampler, steps, spacing, seed=None, atol=1e-9, **opts):
    toy = ToyEps()
    x_vp = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    reference, latents = [], x_vp.clone()
    step_kw = {"eta": opts["eta"]} if "eta" in opts else {}
    for t in scheduler.timesteps:
        out = toy(latents, torch.full((2,), float(t), dtype=torch.float64))
        latents = scheduler.step(out, t, latents, generator=gen, **step_kw).prev_sample
        reference.append(latents)

    sigmas = get_sigmas(process, steps, "uniform_t", spacing=spacing)
    assert torch.equal(process.sigma_to_t(sigmas[:-1]).round().long(), scheduler.timesteps)
    states = []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    final = SAMPLERS[sampler](make_denoiser(toy, process, "eps"), x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                              generator=gen, progress=False, callback=lambda d: states.append(d["x"]), **opts)
    ours = [x / (1 + s ** 2).sqrt() for x, s in zip(states[1:], sigmas[1:])] + [final]  # back to VP coordinates
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("steps, spacing", [(20, "trailing"), (50, "leading"), (1000, "trailing")])
def test_ddpm_matches_diffusers(steps, spacing):
    from diffusers import DDPMScheduler

    process = DiscreteVP()
    scheduler = _float64_schedule(DDPMScheduler(num_train_timesteps=1000, clip_sample=False,
                                                timestep_spacing=spacing), process)
    _compare_with_diffusers(scheduler, process, "ddpm", steps, spacing, seed=3)


@pytest.mark.parametrize("eta, spacing", [(0.0, "leading"), (0.0, "trailing"), (0.7, "trailing")])
def test_ddim_matches_diffusers(eta, spacing):
    from diffusers import DDIMScheduler

    process = DiscreteVP()
    scheduler = _float64_schedule(DDIMScheduler(num_train_timesteps=1000, clip_sample=False,
                                                timestep_spacing=spacing), process)
    _compare_with_diffusers(scheduler, process, "ddim", 25, spacing, seed=4, eta=eta)


@pytest.mark.parametrize("steps", [10, 50])
def test_dpmpp_2m_matches_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler

    process = DiscreteVP()
    scheduler = _float64_schedule(DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="trailing"),
                                  process)
    # diffusers' DPM-Solver steps in float32 whatever the input dtype: agreement to float32 precision
    _compare_with_diffusers(scheduler, process, "dpmpp_2m", steps, "trailing", atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_spacings_match_diffusers(spacing):
    from diffusers import DDIMScheduler

    process = DiscreteVP()
    for steps in (1, 7, 50, 1000):
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        t = process.sigma_to_t(get_sigmas(process, steps, spacing=spacing)[:-1])
        assert torch.equal(t, scheduler.timesteps.double()), (spacing, steps)


def test_grids():
    vp = make_process("vp-sde")
    sigmas = get_sigmas(vp, 1000)  # U-ViT's Euler-Maruyama grid: linspace(1, 1e-3, 1000), then 0
    torch.testing.assert_close(vp.sigma_to_t(sigmas[:-1]), torch.linspace(1, 1e-3, 1000, dtype=torch.float64))
    assert sigmas[-1] == 0
    edm = make_process("edm")
    karras = get_sigmas(edm, 18)
    assert karras[0] == pytest.approx(80) and karras[-2] == pytest.approx(0.002) and karras[-1] == 0
    steps = karras[:-1] ** (1 / 7)
    torch.testing.assert_close(steps.diff(), steps.diff()[:1].expand(17))  # uniform in sigma^(1/rho)
    quad = vp.sigma_to_t(get_sigmas(vp, 11, "quadratic")[:-1])
    torch.testing.assert_close(((quad - 1e-3) / (1 - 1e-3)).sqrt(), torch.linspace(1, 0, 11, dtype=torch.float64))
    for name in GRIDS:
        for process in (vp, edm, make_process("ddpm-cosine")):
            grid = get_sigmas(process, 12, name)
            assert len(grid) == 13 and (grid.diff() < 0).all(), (name, process)


# --------------------------------------------------------------------------- Gaussian ground truth
def _ode_errors(sampler, steps_list, **opts):
    """RMS distance of the final sample from the exact ODE solution (same noise), EDM Karras grid."""
    data, process = gaussian_data(), make_process("edm")
    x = torch.randn(200, 3, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    errors = []
    for steps in steps_list:
        sigmas = get_sigmas_karras(process, steps + 1)[:-1]  # `steps` steps from sigma_max to sigma_min
        out = SAMPLERS[sampler](data.denoiser, x, sigmas, progress=False, **opts)
        exact = data.ode_solution(x, float(sigmas[0]), float(sigmas[-1]))
        errors.append((out - exact).pow(2).flatten(1).sum(1).mean().sqrt().item())
    return errors


def _slope(steps_list, errors):
    n, e = torch.tensor(steps_list, dtype=torch.float64).log(), torch.tensor(errors).log()
    return -float(((n - n.mean()) * (e - e.mean())).sum() / ((n - n.mean()) ** 2).sum())


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_ode_samplers_converge_at_their_order(sampler, order):
    steps_list = [10, 20, 40, 80]
    errors = _ode_errors(sampler, steps_list)
    assert order - 0.2 < _slope(steps_list, errors) < order + 0.35, errors
    assert errors[-1] < (2.5e-2 if order == 1 else 2e-3), errors


def test_ddim_eta0_is_euler():
    data, process = gaussian_data(), make_process("vp-sde")
    sigmas = get_sigmas(process, 30)
    x = torch.randn(50, 3, 1, 1, dtype=torch.float64) * float(process.prior_std(sigmas[0]))
    torch.testing.assert_close(sample_ddim(data.denoiser, x, sigmas, progress=False),
                               sample_euler(data.denoiser, x, sigmas, progress=False))


def _moment_error(samples, data):
    flat = samples.flatten(1).double()
    return ((flat.mean(0) - data.mean).abs().max().item(), (torch.cov(flat.T) - data.cov).abs().max().item())


@pytest.mark.parametrize("sampler, opts, steps", [
    ("ddpm", {}, 250), ("ddim", {"eta": 0.5}, 250), ("euler_maruyama", {}, 250),
    ("heun", {"s_churn": 10.0}, 60), ("euler", {}, 100), ("heun", {}, 60), ("dpmpp_2m", {}, 60)])
def test_samplers_reproduce_gaussian_moments(sampler, opts, steps):
    """Mean and covariance of 20k samples; tolerance = 4 MC standard errors + the discretisation bias measured
    by benchmarks/sampler_orders.py at these step counts."""
    data, process = gaussian_data(), make_process("edm")
    gen = torch.Generator().manual_seed(0)
    sigmas = get_sigmas(process, steps)
    x = torch.randn(20000, 3, 1, 1, dtype=torch.float64, generator=gen) * 80
    mean_err, cov_err = _moment_error(SAMPLERS[sampler](data.denoiser, x, sigmas, generator=gen, progress=False,
                                                        **opts), data)
    mc = math.sqrt(0.45 / 20000)  # std error of a mean of variance <= 0.45
    assert mean_err < 4 * mc + 5e-3 and cov_err < 4 * math.sqrt(2) * 0.45 * mc + 1e-2, (mean_err, cov_err)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_maruyama"])
def test_stochastic_samplers_improve_with_steps(sampler):
    data, process = gaussian_data(), make_process("vp-sde")
    errors = []
    for steps in (10, 200):
        gen = torch.Generator().manual_seed(0)
        sigmas = get_sigmas(process, steps)
        x = torch.randn(20000, 3, 1, 1, dtype=torch.float64, generator=gen) * float(process.prior_std(sigmas[0]))
        errors.append(sum(_moment_error(SAMPLERS[sampler](data.denoiser, x, sigmas, generator=gen,
                                                          progress=False), data)))
    assert errors[1] < errors[0] / 4, errors


@pytest.mark.parametrize("name", ["ddpm-linear", "vp-sde", "edm"])
def test_high_level_sample_matches_data(name):
    """sample() end to end (prior, input scaling, model time) with the optimal network as the model."""
    data, process = gaussian_data(), make_process(name)
    model = data.as_model(process, "v")
    out = sample(model, process, (8000, 3, 1, 1), sampler="dpmpp_2m", steps=40, prediction="v", grid="karras",
                 generator=torch.Generator().manual_seed(0), progress=False)
    mean_err, cov_err = _moment_error(out, data)
    assert mean_err < 0.03 and cov_err < 0.02, (mean_err, cov_err)


# --------------------------------------------------------------------------- guidance and the high level
class TinyConditional(DiffusionBackbone):
    def __init__(self, num_classes=4):
        super().__init__(image_size=4, in_channels=2, num_classes=num_classes)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.label = nn.Embedding(num_classes + 1, 2)
        self.calls = 0

    def forward(self, x, t, cond=None):
        self.check_inputs(x, t, cond)
        self.calls += 1
        return self.conv(x) * (1 + t[:, None, None, None] / 1000) + self.label(cond)[:, :, None, None]


@torch.no_grad()
def test_guidance_conventions():
    model, process = TinyConditional(), make_process("vp-sde")
    denoiser = make_denoiser(model, process, "eps")
    x, sigma, labels = torch.randn(3, 2, 4, 4), torch.tensor(2.0), torch.tensor([0, 1, 3])
    # DiT guides eps: eps_u + w (eps_c - eps_u)
    x_in, t = x / math.sqrt(5.0), process.model_time(sigma.expand(3))
    eps_c, eps_u = model(x_in, t, labels), model(x_in, t, model.null_cond(labels))
    expected = x - sigma * (eps_u + 1.4 * (eps_c - eps_u))
    model.calls = 0
    dit = ClassifierFreeGuidance(denoiser, model.null_cond, 1.4)(x, sigma, labels)
    assert model.calls == 1  # one batched forward for both halves
    torch.testing.assert_close(dit, expected)
    uvit = ClassifierFreeGuidance(denoiser, model.null_cond, 0.4, "uvit")(x, sigma, labels)  # (1+s) eps_c - s eps_u
    torch.testing.assert_close(uvit, x - sigma * (1.4 * eps_c - 0.4 * eps_u))
    torch.testing.assert_close(ClassifierFreeGuidance(denoiser, model.null_cond, 1.0)(x, sigma, labels),
                               denoiser(x, sigma, labels))


def test_sample_runs_every_sampler_with_guidance_and_callback():
    model, process = TinyConditional().eval(), make_process("ddpm-linear")
    labels = torch.tensor([0, 2])
    for name in SAMPLERS:
        seen = []
        out = sample(model, process, (2, 2, 4, 4), sampler=name, steps=4, cond=labels, guidance=2.0,
                     generator=torch.Generator().manual_seed(0), progress=False, callback=seen.append)
        again = sample(model, process, (2, 2, 4, 4), sampler=name, steps=4, cond=labels, guidance=2.0,
                       generator=torch.Generator().manual_seed(0), progress=False)
        assert out.shape == (2, 2, 4, 4) and torch.isfinite(out).all() and torch.equal(out, again)
        assert [d["i"] for d in seen] == [0, 1, 2, 3] and set(seen[0]) == {"i", "x", "sigma", "denoised"}


def test_bad_input_names_the_fix():
    model, cond_model, process = gaussian_data().as_model(make_process("edm")), TinyConditional(), make_process("edm")
    shape = (2, 3, 1, 1)
    with pytest.raises(ValueError, match="ddpm, ddim, euler_maruyama, euler, heun, dpmpp_2m"):
        sample(model, process, shape, sampler="plms")
    with pytest.raises(ValueError, match="uniform_t, quadratic, karras"):
        sample(model, process, shape, grid="cosine")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        sample(model, process, shape, steps=0)
    with pytest.raises(ValueError, match="unconditional: pass guidance=1.0"):
        sample(model, process, shape, guidance=3.0)
    with pytest.raises(ValueError, match="unconditional: pass guidance=0.0"):
        sample(model, process, shape, guidance=0.4, guidance_convention="uvit")
    with pytest.raises(ValueError, match="needs cond"):
        sample(cond_model, process, (2, 2, 4, 4), guidance=3.0)
    with pytest.raises(ValueError, match="dit, dit_official, uvit"):
        sample(cond_model, process, (2, 2, 4, 4), guidance_convention="cfg")
    with pytest.raises(ValueError, match="at most 1000 steps"):
        get_sigmas(DiscreteVP(), 1001)
    with pytest.raises(ValueError, match="discrete processes only"):
        get_sigmas(process, 10, "uniform_t", spacing="leading")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample(model, process, shape, sampler="ddim", eta=-1)
