"""Noise processes, targets, weightings and DiffusionLoss against references and closed forms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vitdiff.diffusion import (
    EDM, PROCESSES, ContinuousVP, DiffusionLoss, DiscreteVP, GaussianData, convert_prediction,
    denoised_from_prediction, loss_weight, make_denoiser, make_process, prediction_target,
)
from vitdiff.models.base import DiffusionBackbone

SIGMAS = torch.tensor([0.0, 1e-3, 0.05, 0.3, 1.0, 4.0, 80.0], dtype=torch.float64)


def gaussian_data() -> GaussianData:
    q = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.2, -0.3, 0.93]], dtype=torch.float64)
    return GaussianData(torch.tensor([0.3, -0.2, 0.1]), q @ torch.diag(torch.tensor([0.3, 0.08, 0.01]).double()) @ q.T)


class TinyBackbone(DiffusionBackbone):
    """A small real network honouring the backbone interface (conv + time/label embeddings)."""

    def __init__(self, channels=2, num_classes=0, learn_sigma=False):
        super().__init__(image_size=4, in_channels=channels, learn_sigma=learn_sigma, num_classes=num_classes)
        self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        self.time = nn.Linear(1, self.out_channels)
        self.label = nn.Embedding(num_classes + 1, self.out_channels) if num_classes else None
        self.seen_cond = None

    def forward(self, x, t, cond=None):
        self.check_inputs(x, t, cond)
        self.seen_cond = cond
        out = self.conv(x) + self.time(t[:, None].float() / 1000)[:, :, None, None]
        if self.label is not None:
            out = out + self.label(cond)[:, :, None, None]
        return out


# --------------------------------------------------------------------------- processes
@pytest.mark.parametrize("schedule, diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_discrete_schedules_match_diffusers(schedule, diffusers_name):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
    ours = DiscreteVP(1000, schedule)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.sigmas, ((1 - ours.alphas_cumprod) / ours.alphas_cumprod).sqrt())


def test_continuous_vp_is_uvit_vpsde():
    process = ContinuousVP()
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    # U-ViT: cum_alpha(t) = exp(-(b0 t + (b1 - b0) t^2 / 2)); sigma^2 = (1 - abar) / abar
    abar = torch.exp(-(0.1 * t + 19.9 * t ** 2 / 2))
    torch.testing.assert_close(process.t_to_sigma(t), ((1 - abar) / abar).sqrt())
    torch.testing.assert_close(process.sigma_to_t(process.t_to_sigma(t[1:])), t[1:], rtol=1e-10, atol=0)
    torch.testing.assert_close(process.model_time(process.t_to_sigma(t[1:])), 999 * t[1:], rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_time_axes_round_trip(name):
    process = make_process(name)
    t = torch.linspace(process.t_min, process.t_max, 37, dtype=torch.float64)
    sigma = process.t_to_sigma(t)
    assert (sigma.diff() > 0).all()
    torch.testing.assert_close(process.sigma_to_t(sigma), t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.model_time_to_sigma(process.model_time(sigma)), sigma, rtol=1e-9, atol=0)
    assert process.sigma_min == pytest.approx(float(sigma[0])) and process.sigma_max == pytest.approx(float(sigma[-1]))


def test_priors():
    """VP: x_T ~ N(0, I) in VP coordinates (the model sees unit std at the prior); EDM: sigma_max N(0, I)."""
    sigma = torch.tensor([1.0, 50.0, 157.4], dtype=torch.float64)
    for name in ("ddpm-linear", "ddpm-cosine", "vp-sde"):
        process = make_process(name)
        torch.testing.assert_close(process.prior_std(sigma) * process.input_scale(sigma), torch.ones_like(sigma))
    torch.testing.assert_close(EDM().prior_std(sigma), sigma)


def test_model_time_conventions():
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(EDM().model_time(sigma), sigma.log() / 4)
    discrete = DiscreteVP()
    steps = torch.tensor([0, 17, 500, 999])
    assert torch.equal(discrete.model_time(discrete.sigmas[steps].float()), steps.float())  # exact integers
    between = discrete.model_time(discrete.t_to_sigma(torch.tensor([17.25])))
    assert between.item() == pytest.approx(17.25, abs=1e-9)


def test_training_sigma_distributions():
    gen = torch.Generator().manual_seed(0)
    discrete = DiscreteVP()
    steps = discrete.model_time(discrete.sample_sigma(20000, generator=gen))
    assert torch.equal(steps, steps.round()) and steps.min() == 0 and steps.max() == 999
    assert steps.mean().item() == pytest.approx(499.5, abs=10)
    t = ContinuousVP().sigma_to_t(ContinuousVP().sample_sigma(20000, generator=gen).double())
    assert t.min() >= 0 and t.max() < 1 and t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (t < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.015)
    log_sigma = EDM().sample_sigma(20000, generator=gen).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)


# --------------------------------------------------------------------------- targets and weights
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_prediction_conversions_round_trip(sigma_data):
    x0, noise = torch.randn(6, 3, 2, 2, dtype=torch.float64), torch.randn(6, 3, 2, 2, dtype=torch.float64)
    sigma = SIGMAS[1:]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    targets = {p: prediction_target(x0, noise, sigma, p, sigma_data) for p in ("eps", "x0", "v")}
    for p, target in targets.items():
        torch.testing.assert_close(denoised_from_prediction(target, x, sigma, p, sigma_data), x0)
        for q in ("eps", "x0", "v"):
            torch.testing.assert_close(convert_prediction(target, x, sigma, p, q, sigma_data), targets[q])


def test_v_is_salimans_for_vp_and_minus_edm_f():
    x0, noise = torch.randn(6, 3, 2, 2, dtype=torch.float64), torch.randn(6, 3, 2, 2, dtype=torch.float64)
    sigma = SIGMAS[1:].reshape(-1, 1, 1, 1)
    alpha = (1 + sigma ** 2).rsqrt()
    torch.testing.assert_close(prediction_target(x0, noise, sigma.flatten(), "v"),
                               alpha * noise - sigma * alpha * x0)  # v = sqrt(abar) eps - sqrt(1-abar) x0
    sd = 0.5  # EDM: F = (x0 - c_skip x) / c_out
    x = x0 + sigma * noise
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    torch.testing.assert_close(prediction_target(x0, noise, sigma.flatten(), "v", sd), -(x0 - c_skip * x) / c_out)


def _x0_weight(sigma, weighting, sigma_data, gamma):
    """lambda(sigma) on |x0_hat - x0|^2, as the papers write it."""
    return {"min_snr": torch.minimum(sigma ** -2, torch.full_like(sigma, gamma)),
            "edm": (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2}[weighting]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "edm"])
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_loss_weights_match_formulas(prediction, weighting, sigma_data):
    """The per-example loss of any model equals lambda(sigma) * mean |x0_hat - x0|^2."""
    process = EDM(sigma_data=sigma_data)
    sigma = SIGMAS[1:].float()
    model = TinyBackbone()
    x0, noise = torch.randn(len(sigma), 2, 4, 4), torch.randn(len(sigma), 2, 4, 4)
    loss_fn = DiffusionLoss(process, prediction, weighting, min_snr_gamma=5.0)
    loss = loss_fn.loss_at(model, x0, sigma, noise)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    x0_error = (make_denoiser(model, process, prediction)(x, sigma) - x0).pow(2).flatten(1).mean(1)
    if weighting == "uniform":
        c2 = {"eps": sigma ** 2, "x0": torch.ones_like(sigma),
              "v": (sigma * sigma_data) ** 2 / (sigma ** 2 + sigma_data ** 2)}[prediction]
        expected = x0_error / c2
    else:
        expected = _x0_weight(sigma, weighting, sigma_data, 5.0) * x0_error
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=1e-6)
    zero = torch.zeros(1)
    if not (prediction == "x0" and weighting == "edm"):  # the one combination whose lambda(0) is infinite
        assert torch.isfinite(loss_weight(zero, prediction, weighting, sigma_data=sigma_data)).all()


@pytest.mark.parametrize("name, prediction, weighting", [
    ("ddpm-linear", "eps", "uniform"), ("vp-sde", "v", "min_snr"), ("edm", "v", "edm"),
    ("ddpm-cosine", "x0", "uniform")])
def test_optimal_denoiser_reaches_analytic_minimum(name, prediction, weighting):
    """For Gaussian data the oracle's expected loss is lambda(sigma) tr(Cov[x0 | x_sigma]) / d."""
    data, process = gaussian_data(), make_process(name)
    model = data.as_model(process, prediction)
    loss_fn = DiffusionLoss(process, prediction, weighting)
    n = 4000
    sigma = torch.tensor([0.05, 0.5, 3.0], dtype=torch.float64).repeat_interleave(n)
    if isinstance(process, DiscreteVP):  # train on the process's own noise levels
        sigma = process.t_to_sigma(process.sigma_to_t(sigma).round())
    gen = torch.Generator().manual_seed(1)
    x0, noise = data.sample(len(sigma), gen), torch.randn(len(sigma), 3, 1, 1, generator=gen, dtype=torch.float64)
    loss = loss_fn.loss_at(model, x0, sigma, noise).double().reshape(3, n)
    lam = data.eigenvalues
    s = sigma.reshape(3, n)[:, 0]
    posterior_var = (lam * s[:, None] ** 2 / (lam + s[:, None] ** 2)).sum(1) / 3
    sd = process.sigma_data
    c2 = {"eps": s ** 2, "x0": torch.ones_like(s), "v": (s * sd) ** 2 / (s ** 2 + sd ** 2)}[prediction]
    x0_weight = loss_weight(s, prediction, weighting, sigma_data=sd) / c2
    expected = x0_weight * posterior_var
    torch.testing.assert_close(loss.mean(1), expected, rtol=0.06, atol=0)
    # any other denoiser does worse
    worse = DiffusionLoss(process, prediction, weighting).loss_at(
        _Scaled(model, 1.05), x0, sigma, noise).double().reshape(3, n)
    assert (worse.mean(1) > loss.mean(1)).all()


class _Scaled(nn.Module):
    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x, t, cond=None):
        return self.model(x, t, cond) * self.factor


# --------------------------------------------------------------------------- DiffusionLoss
def _real_backbone(**overrides):
    from vitdiff.models import PRESETS, create_model

    if "DiT-tiny" in PRESETS:
        return create_model("DiT-tiny", image_size=8, in_channels=2, **overrides)
    return TinyBackbone(channels=2, **overrides)


def test_loss_trains_a_real_backbone_and_is_reproducible():
    model = _real_backbone(num_classes=3)
    loss_fn = DiffusionLoss(make_process("vp-sde"), "eps", "min_snr", cond_drop_prob=0.2)
    x0, labels = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 0])
    loss = loss_fn(model, x0, labels, generator=torch.Generator().manual_seed(3))
    assert loss.shape == (4,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    again = loss_fn(model, x0, labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, again)
    loss.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_condition_dropout_rate_and_null_label():
    model = TinyBackbone(num_classes=5)
    labels = torch.zeros(4000, dtype=torch.long)
    DiffusionLoss(make_process("edm"), cond_drop_prob=0.3)(model, torch.randn(4000, 2, 4, 4), labels,
                                                          generator=torch.Generator().manual_seed(0))
    dropped = (model.seen_cond == 5).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.03) and set(model.seen_cond.unique().tolist()) == {0, 5}
    DiffusionLoss(make_process("edm"))(model, torch.randn(8, 2, 4, 4), labels[:8])
    assert (model.seen_cond == 0).all()


def test_learn_sigma_mse_uses_the_mean_half():
    model = TinyBackbone(learn_sigma=True)
    with torch.no_grad():
        model.conv.bias[2:] += 1e3  # the variance half must not reach the mean's loss
    half = _FirstHalf(model)
    loss_fn = DiffusionLoss(make_process("ddpm-linear"), vlb_weight=0.0)
    x0, sigma, noise = torch.randn(3, 2, 4, 4), torch.tensor([0.1, 1.0, 5.0]), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(loss_fn.loss_at(model, x0, sigma, noise), loss_fn.loss_at(half, x0, sigma, noise))
    assert make_denoiser(model, make_process("ddpm-linear"))(x0, sigma).shape == x0.shape


class _FirstHalf(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, cond=None):
        return self.model(x, t, cond)[:, :2]


# --------------------------------------------------------------------------- errors
def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="ddpm-linear.*ddpm-cosine.*vp-sde.*edm"):
        make_process("ddpm")
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        DiscreteVP(schedule="quadratic")
    with pytest.raises(ValueError, match="'eps', 'x0', 'v'"):
        DiffusionLoss(EDM(), prediction="score")
    with pytest.raises(ValueError, match="'uniform', 'min_snr', 'edm'"):
        DiffusionLoss(EDM(), weighting="snr")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionLoss(EDM(), weighting="min_snr", min_snr_gamma=0)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        DiffusionLoss(EDM(), cond_drop_prob=1.0)
    with pytest.raises(ValueError, match="set cond_drop_prob=0"):
        DiffusionLoss(EDM(), cond_drop_prob=0.1)(TinyBackbone(), torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="t_min"):
        ContinuousVP(t_min=0)
