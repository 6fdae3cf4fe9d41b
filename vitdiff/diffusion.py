"""Noise processes, prediction targets, loss weightings and the training loss.

Design (after k-diffusion): every process is described in *sigma-space*. A noisy
sample is written in "VE coordinates" as ``x = x0 + sigma * eps``. A
variance-preserving (VP) sample is the same thing rescaled,
``x_t = alpha * (x0 + sigma * eps)`` with ``alpha = 1 / sqrt(1 + sigma^2)``, i.e.
``sigma = sqrt(1 - abar) / sqrt(abar)``. So one set of samplers and one loss serve
DDPM, U-ViT's VP-SDE and EDM; a process only says

* which sigmas it trains on (:meth:`NoiseProcess.sample_sigma`),
* what the backbone sees: input ``c_in(sigma) * x`` with
  ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` (``sigma_data = 1`` for VP processes
  makes ``c_in * x`` exactly the VP sample ``x_t``) and time value
  :meth:`NoiseProcess.model_time` (discrete VP: the fractional step index;
  continuous VP: ``999 * t`` as U-ViT; EDM: ``c_noise = ln(sigma) / 4``),
* its own time axis (``t_to_sigma``/``sigma_to_t``, ``t_min``/``t_max``) on which the
  sampling grids of :mod:`vitdiff.sampling` are laid out, and the prior
  (:meth:`NoiseProcess.prior_std`).

Prediction targets. The network output ``F`` is read as

* ``"eps"``: the noise, ``x0_hat = x - sigma * F``;
* ``"x0"``:  the clean data, ``x0_hat = F``;
* ``"v"``:   ``v = (sigma_d * eps - (sigma / sigma_d) * x0) / sqrt(sigma^2 + sigma_d^2)``,
  ``x0_hat = c_skip * x - c_out * F`` with ``c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)``,
  ``c_out = sigma * sigma_d / sqrt(sigma^2 + sigma_d^2)``. For VP (``sigma_d = 1``) this
  is the usual ``v = alpha * eps - sqrt(1 - abar) * x0`` (Salimans & Ho); for EDM it is
  minus EDM's ``F_theta``, so ``EDM()`` with ``prediction="v"`` is exactly EDM's
  c_skip / c_out / c_in / c_noise preconditioning (the sign is immaterial to a
  network trained from scratch).

Weightings. The loss is the per-example mean square error in target space times a
weight; written as the weight ``lambda(sigma)`` each puts on ``|x0_hat - x0|^2``:

* ``"uniform"``: the unweighted target MSE (``L_simple`` for eps); ``lambda`` =
  ``1/sigma^2`` (eps), ``1`` (x0), ``1/c_out^2`` (v);
* ``"min_snr"``: ``lambda = min(SNR, gamma)`` with ``SNR = 1/sigma^2`` (Hang et al. 2023);
* ``"edm"``: ``lambda = (sigma^2 + sigma_d^2) / (sigma * sigma_d)^2`` (Karras et al. 2022).

Learned variance (iDDPM, Nichol & Dhariwal 2021; DiT). A backbone with ``learn_sigma``
outputs twice the channels: the first half is the mean prediction above, the second a
raw ``v`` per pixel whose reverse-step variance is the "learned range"
``log Sigma = f log beta + (1 - f) log beta_tilde``, ``f = (v + 1) / 2``
(:func:`learned_range_log_variance`). :class:`DiffusionLoss` trains it with the hybrid
loss ``L_simple + lambda L_vlb`` (``vlb_weight`` = lambda = 0.001): ``L_vlb`` is
estimated at the drawn step t as ``T L_t``, with ``L_t`` the KL between the true
posterior ``q(x_{t-1} | x_t, x0)`` and the model's Gaussian, and at t = 0 the
discretized-Gaussian decoder NLL, both in bits per dimension; the mean enters
``L_vlb`` under a stop-gradient, so ``L_vlb`` trains only the variance. This needs a
discrete process (its steps define the chain). The DDPM sampler reads the variance
with ``variance="learned_range"`` (:mod:`vitdiff.sampling`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .nn import check_choice

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min_snr", "edm")


def _bc(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example sigma, shaped to broadcast against x (B, ...)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def randn(shape, *, generator: torch.Generator | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise from ``generator`` on its own device, then moved (a CPU generator may feed CUDA tensors)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def rand(shape, *, generator: torch.Generator | None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) noise, drawn like :func:`randn`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


# --------------------------------------------------------------------------- processes
class NoiseProcess:
    """A forward noising process seen in sigma-space (see the module docstring)."""

    sigma_data: float = 1.0      # data scale assumed by the input scaling c_in
    default_grid: str = "karras"  # name of the sampling grid in vitdiff.sampling.GRIDS
    t_min: float                  # time axis range on which sampling grids are laid out
    t_max: float

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (B,) float noise-conditioning value the backbone embeds."""
        raise NotImplementedError

    def model_time_to_sigma(self, time: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`model_time`."""
        raise NotImplementedError

    def sample_sigma(self, batch: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(B,) float32 training noise levels."""
        raise NotImplementedError

    def prior_std(self, sigma: torch.Tensor) -> torch.Tensor:
        """Std of the Gaussian the sampler starts from at noise level sigma (VE coordinates)."""
        raise NotImplementedError

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_in: the factor applied to x = x0 + sigma*eps before the backbone."""
        return torch.rsqrt(sigma ** 2 + self.sigma_data ** 2)

    @property
    def sigma_min(self) -> float:
        return float(self.t_to_sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        return float(self.t_to_sigma(torch.tensor(self.t_max, dtype=torch.float64)))


class DiscreteVP(NoiseProcess):
    """DDPM's discrete-time VP chain (Ho et al. 2020; cosine: Nichol & Dhariwal 2021).

    The time axis is the step index in [0, T-1]; between integer steps sigma is
    interpolated linearly in log(sigma) (as k-diffusion), so fractional indices
    from non-uniform grids are meaningful. Training draws integer steps uniformly.
    """

    default_grid = "uniform_t"

    def __init__(self,
                 num_steps: int = 1000,      # T, the number of diffusion steps
                 schedule: str = "linear",   # "linear" beta or "cosine" abar schedule
                 beta_start: float = 1e-4,   # linear schedule: beta_1
                 beta_end: float = 0.02,     # linear schedule: beta_T
                 cosine_s: float = 0.008,    # cosine schedule: offset s that keeps beta_1 from being tiny
                 max_beta: float = 0.999):   # cosine schedule: clip for the betas near t = T
        check_choice("beta schedule", schedule, ("linear", "cosine"))
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {num_steps}")
        self.num_steps = num_steps
        self.schedule = schedule
        if schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            def abar(t):
                return math.cos((t / num_steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - abar(i + 1) / abar(i), max_beta) for i in range(num_steps)],
                                 dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # increasing in t
        self.log_sigmas = self.sigmas.log()
        self.t_min, self.t_max = 0.0, float(num_steps - 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        t = t.to(torch.float64).clamp(self.t_min, self.t_max)
        log_sigmas = self.log_sigmas.to(t.device)
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp().to(out_dtype)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        # In sigma's own precision, a sigma taken from the table maps back to its exact integer step.
        log_sigmas = self.sigmas.to(device=sigma.device, dtype=sigma.dtype).log()
        log_sigma = sigma.clamp(min=torch.finfo(sigma.dtype).tiny).log()
        hi = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, self.num_steps - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w).clamp(self.t_min, self.t_max)

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_t(sigma)

    def model_time_to_sigma(self, time):
        return self.t_to_sigma(time)

    def sample_sigma(self, batch, *, generator=None, device=None):
        gen_device = generator.device if generator is not None else device
        steps = torch.randint(0, self.num_steps, (batch,), generator=generator, device=gen_device)
        return self.sigmas.to(gen_device)[steps].float().to(device)

    def prior_std(self, sigma):
        return (sigma ** 2 + 1).sqrt()  # x_T ~ N(0, I) in VP coordinates


class ContinuousVP(NoiseProcess):
    """Song et al.'s VP-SDE with linear beta(t) on t in [0, 1]: U-ViT's process.

    ``log(1 + sigma^2) = beta_min t + (beta_max - beta_min) t^2 / 2``. Training
    draws t ~ U(0, 1) (as U-ViT's ``LSimple``); the backbone embeds ``999 t``.
    """

    default_grid = "uniform_t"

    def __init__(self,
                 beta_min: float = 0.1,       # beta(0)
                 beta_max: float = 20.0,      # beta(1)
                 t_min: float = 1e-3,         # smallest t of sampling grids (U-ViT's eps)
                 time_scale: float = 999.0):  # model_time = time_scale * t (U-ViT: 999)
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min}")
        self.beta_min, self.beta_max = beta_min, beta_max
        self.time_scale = time_scale
        self.t_min, self.t_max = t_min, 1.0

    def t_to_sigma(self, t):
        t = torch.as_tensor(t)
        return torch.expm1(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2).sqrt()

    def sigma_to_t(self, sigma):
        # Root of the quadratic, in the cancellation-free form 2L / (b + sqrt(b^2 + 2 d L)).
        log_var = torch.log1p(torch.as_tensor(sigma) ** 2)
        delta = self.beta_max - self.beta_min
        return 2 * log_var / (self.beta_min + (self.beta_min ** 2 + 2 * delta * log_var).sqrt())

    def model_time(self, sigma):
        return self.time_scale * self.sigma_to_t(sigma)

    def model_time_to_sigma(self, time):
        return self.t_to_sigma(torch.as_tensor(time) / self.time_scale)

    def sample_sigma(self, batch, *, generator=None, device=None):
        return self.t_to_sigma(rand((batch,), generator=generator, device=device))

    def beta_dt_at_start(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """beta(t) (t - t_next) with beta read at the step's start t: the Euler–Maruyama step of U-ViT's
        ``sde.py`` (pass as ``beta_dt`` to :func:`vitdiff.sampling.sample_euler_maruyama`)."""
        t, t_next = self.sigma_to_t(sigma), self.sigma_to_t(sigma_next)
        return (self.beta_min + t * (self.beta_max - self.beta_min)) * (t - t_next)

    def prior_std(self, sigma):
        return (sigma ** 2 + 1).sqrt()


class EDM(NoiseProcess):
    """Karras et al. 2022 (EDM): time is sigma itself, log-normal training sigmas.

    With ``prediction="v"`` the denoiser is EDM's preconditioned network
    (c_skip, c_out, c_in = 1/sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma)/4).
    """

    default_grid = "karras"

    def __init__(self,
                 sigma_data: float = 0.5,     # std of the data; sets c_in/c_skip/c_out and the EDM weighting
                 p_mean: float = -1.2,        # mean of ln(sigma) during training
                 p_std: float = 1.2,          # std of ln(sigma) during training
                 sigma_min: float = 0.002,    # smallest sigma of sampling grids
                 sigma_max: float = 80.0,     # largest sigma of sampling grids (the prior's std)
                 time_scale: float = 1.0):    # model_time = time_scale * ln(sigma) / 4; backbones whose sinusoidal
                                              # embedding expects DDPM-like step values may want e.g. 250
        self.sigma_data = sigma_data
        self.p_mean, self.p_std = p_mean, p_std
        self.time_scale = time_scale
        self.t_min, self.t_max = sigma_min, sigma_max

    def t_to_sigma(self, t):
        return torch.as_tensor(t)

    def sigma_to_t(self, sigma):
        return torch.as_tensor(sigma)

    def model_time(self, sigma):
        return self.time_scale * torch.as_tensor(sigma).log() / 4

    def model_time_to_sigma(self, time):
        return (4 * torch.as_tensor(time) / self.time_scale).exp()

    def sample_sigma(self, batch, *, generator=None, device=None):
        return (self.p_mean + self.p_std * randn((batch,), generator=generator, device=device)).exp()

    def prior_std(self, sigma):
        return torch.as_tensor(sigma)  # EDM starts from sigma_max * N(0, I)


PROCESSES: dict[str, Callable[..., NoiseProcess]] = {
    "ddpm-linear": lambda **kw: DiscreteVP(schedule="linear", **kw),
    "ddpm-cosine": lambda **kw: DiscreteVP(schedule="cosine", **kw),
    "vp-sde": ContinuousVP,
    "edm": EDM,
}


def make_process(name: str, **kw) -> NoiseProcess:
    """Build a process by name: "ddpm-linear", "ddpm-cosine", "vp-sde" or "edm"."""
    check_choice("process", name, PROCESSES)
    return PROCESSES[name](**kw)


# --------------------------------------------------------------------------- targets
def _v_coefficients(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out) with x0 = c_skip * x - c_out * v."""
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt()


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, sigma, prediction: str,
                      sigma_data: float = 1.0) -> torch.Tensor:
    """What a network of the given prediction type should output for x = x0 + sigma * noise."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    sigma = _bc(sigma, x0)
    return (sigma_data * noise - sigma / sigma_data * x0) / (sigma ** 2 + sigma_data ** 2).sqrt()


def denoised_from_prediction(output: torch.Tensor, x: torch.Tensor, sigma, prediction: str,
                             sigma_data: float = 1.0) -> torch.Tensor:
    """x0_hat from a network output of the given prediction type at x (VE coordinates)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "x0":
        return output
    sigma = _bc(sigma, x)
    if prediction == "eps":
        return x - sigma * output
    c_skip, c_out = _v_coefficients(sigma, sigma_data)
    return c_skip * x - c_out * output


def convert_prediction(output: torch.Tensor, x: torch.Tensor, sigma, source: str, target: str,
                       sigma_data: float = 1.0) -> torch.Tensor:
    """Re-express a prediction (e.g. an eps checkpoint's output as v). Needs sigma > 0."""
    x0 = denoised_from_prediction(output, x, sigma, source, sigma_data)
    return prediction_target(x0, (x - x0) / _bc(sigma, x), sigma, target, sigma_data)


def loss_weight(sigma: torch.Tensor, prediction: str, weighting: str, *, sigma_data: float = 1.0,
                min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Weight on the target-space MSE that realises the weighting (module docstring).

    Written through ``c2 = (dx0/dF)^2`` and ``r = c2 / sigma^2`` per prediction (eps: sigma^2 and 1;
    x0: 1 and 1/sigma^2; v: c_out^2 and sigma_d^2/(sigma^2+sigma_d^2)), so every finite limit at
    sigma = 0 stays finite.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    if weighting == "uniform":
        return torch.ones_like(sigma)
    if prediction == "eps":
        c2, r = sigma ** 2, torch.ones_like(sigma)
    elif prediction == "x0":
        c2, r = torch.ones_like(sigma), sigma ** -2
    else:
        r = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c2 = sigma ** 2 * r
    if weighting == "min_snr":
        return torch.minimum(r, min_snr_gamma * c2)  # min(1/sigma^2, gamma) * c2
    return (sigma ** 2 + sigma_data ** 2) / sigma_data ** 2 * r


# --------------------------------------------------------------------------- learned variance
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def ddpm_step_variances(sigma: torch.Tensor, sigma_next: torch.Tensor):
    """(beta, beta_tilde) of DDPM's reverse step from noise level sigma to sigma_next (VP coordinates).

    ``beta = 1 - abar / abar_next`` is the forward step's variance ("fixed_large") and
    ``beta_tilde = beta (1 - abar_next) / (1 - abar)`` that of the posterior q(x_next | x, x0)
    ("fixed_small"), with ``abar = 1 / (1 + sigma^2)``. On a respaced grid they are the
    respaced chain's own, as in iDDPM/DiT's ``SpacedDiffusion``.
    """
    beta = (sigma ** 2 - sigma_next ** 2) / (1 + sigma ** 2)
    return beta, (sigma ** 2 - sigma_next ** 2) * sigma_next ** 2 / (sigma ** 2 * (1 + sigma_next ** 2))


def learned_range_log_variance(output: torch.Tensor, log_beta: torch.Tensor,
                               log_beta_tilde: torch.Tensor) -> torch.Tensor:
    """iDDPM's learned range: a variance output v in [-1, 1] moves log Sigma from log beta_tilde to log beta."""
    fraction = (output + 1) / 2
    return fraction * log_beta + (1 - fraction) * log_beta_tilde


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) in the tanh approximation that iDDPM's and DiT's decoder likelihood use."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for 8-bit data scaled to [-1, 1] under N(mean, exp(log_scale)^2) binned to width 2/255;
    the edge bins extend to -inf and +inf (DDPM's decoder L_0)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (x - mean + 1 / 255))
    cdf_minus = _approx_standard_normal_cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_bin = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


# --------------------------------------------------------------------------- denoiser
def _split_output(model: nn.Module, output: torch.Tensor, channels: int):
    """(mean prediction, raw variance channels or None): learn_sigma models output both halves."""
    if getattr(model, "learn_sigma", False):
        return output[:, :channels], output[:, channels:]
    return output, None


class BaseDenoiser:
    """D(x, sigma, cond) -> x0_hat; :meth:`denoise` also hands over a learn_sigma model's variance output."""

    def denoise(self, x: torch.Tensor, sigma, cond=None):
        """(x0_hat, raw variance channels of a learn_sigma model, else None)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        return self.denoise(x, sigma, cond)[0]


def preconditioned_output(model: nn.Module, process: NoiseProcess, x: torch.Tensor, sigma: torch.Tensor, cond=None):
    """The backbone's raw output at noisy ``x``: the input scaled by c_in(sigma), the noise level given as the
    process's model time (EDM's c_in and c_noise); what the denoiser and the loss both read."""
    return model(x * _bc(process.input_scale(sigma), x), process.model_time(sigma), cond)


class Denoiser(BaseDenoiser):
    """D(x, sigma, cond) -> x0_hat: a backbone wrapped with a process and a prediction type."""

    def __init__(self,
                 model: nn.Module,          # backbone: model(x_in, t, cond) -> output (see models/base.py)
                 process: NoiseProcess,     # supplies c_in, model_time and sigma_data
                 prediction: str = "eps"):  # how to read the backbone output: "eps", "x0" or "v"
        check_choice("prediction", prediction, PREDICTIONS)
        self.model, self.process, self.prediction = model, process, prediction

    def denoise(self, x: torch.Tensor, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        output = preconditioned_output(self.model, self.process, x, sigma, cond).to(x.dtype)
        output, variance_output = _split_output(self.model, output, x.shape[1])
        return denoised_from_prediction(output, x, sigma, self.prediction, self.process.sigma_data), variance_output


def make_denoiser(model: nn.Module, process: NoiseProcess, prediction: str = "eps") -> Denoiser:
    return Denoiser(model, process, prediction)


# --------------------------------------------------------------------------- loss
class DiffusionLoss:
    """Per-example denoising loss, ``loss_fn(model, x0, cond) -> (B,)`` float32.

    Draws sigma from the process and eps ~ N(0, I), feeds ``c_in * (x0 + sigma*eps)``
    and ``model_time(sigma)`` to the model, and returns the weighted mean square error
    between its output (mean half if learn_sigma) and the prediction target; for a
    learn_sigma model plus ``vlb_weight * L_vlb`` (iDDPM's hybrid loss, module docstring).
    """

    def __init__(self,
                 process: NoiseProcess,        # noise process: training sigmas and model conditioning
                 prediction: str = "eps",      # network target: "eps", "x0" or "v"
                 weighting: str = "uniform",   # "uniform" (L_simple), "min_snr" (min-SNR-gamma), "edm" (lambda)
                 min_snr_gamma: float = 5.0,   # gamma of min-SNR-gamma; read only when weighting="min_snr"
                 cond_drop_prob: float = 0.0,  # chance of replacing cond by the null condition (trains CFG)
                 vlb_weight: float = 0.001):   # lambda of the hybrid loss for learn_sigma models (iDDPM, DiT: 0.001);
                                               # 0 trains the mean only and leaves the variance channels untrained
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("weighting", weighting, WEIGHTINGS)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must lie in [0, 1), got {cond_drop_prob}")
        if vlb_weight < 0:
            raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight}")
        self.process, self.prediction, self.weighting = process, prediction, weighting
        self.min_snr_gamma, self.cond_drop_prob, self.vlb_weight = min_snr_gamma, cond_drop_prob, vlb_weight

    def draw(self, batch: int, shape, *, generator: torch.Generator | None = None, device=None,
             dtype=torch.float32) -> dict[str, torch.Tensor]:
        """A batch's training randomness, always in this order: noise levels, noise of ``shape`` per example,
        condition-drop flags (drawn even when nothing is dropped, so the order never depends on the config)."""
        return {"sigma": self.process.sample_sigma(batch, generator=generator, device=device),
                "noise": randn((batch, *shape), generator=generator, device=device, dtype=dtype),
                "drop": rand((batch,), generator=generator, device=device) < self.cond_drop_prob}

    def __call__(self, model: nn.Module, x0: torch.Tensor, cond=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        draws = self.draw(x0.shape[0], x0.shape[1:], generator=generator, device=x0.device, dtype=x0.dtype)
        if self.cond_drop_prob > 0:
            if cond is None:
                raise ValueError("cond_drop_prob > 0 but cond is None: condition dropout needs conditions; "
                                 "set cond_drop_prob=0 for unconditional training")
            cond = model.drop_cond(cond, draws["drop"])
        return self.loss_at(model, x0, draws["sigma"], draws["noise"], cond)

    def loss_at(self, model: nn.Module, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                cond=None) -> torch.Tensor:
        """The loss at given noise levels and noise (deterministic; what __call__ averages over)."""
        sigma_data = self.process.sigma_data
        x = x0 + _bc(sigma, x0) * noise
        output = preconditioned_output(model, self.process, x, sigma, cond)
        output, variance_output = _split_output(model, output, x0.shape[1])
        target = prediction_target(x0, noise, sigma, self.prediction, sigma_data)
        mse = (output.float() - target.float()).pow(2).flatten(1).mean(1)
        weight = loss_weight(sigma.float(), self.prediction, self.weighting, sigma_data=sigma_data,
                             min_snr_gamma=self.min_snr_gamma)
        loss = weight * mse
        if variance_output is None or self.vlb_weight == 0:
            return loss
        if not isinstance(self.process, DiscreteVP):
            raise ValueError(f"the hybrid loss of a learn_sigma model needs a discrete process (ddpm-linear or "
                             f"ddpm-cosine, as iDDPM and DiT); {type(self.process).__name__} has none: switch the "
                             "process, or set vlb_weight=0 (diffusion.vlb_weight) to train the mean only")
        # Stop-gradient on the mean: L_vlb trains the variance channels only.
        x0_hat = denoised_from_prediction(output.detach().float(), x.float(), sigma.float(), self.prediction,
                                          sigma_data)
        step_term = self.variational_bound_term(x0.float(), x0_hat, sigma, variance_output.float())
        return loss + self.vlb_weight * self.process.num_steps * step_term  # T L_t estimates L_vlb = sum_t L_t

    def variational_bound_term(self, x0: torch.Tensor, x0_hat: torch.Tensor, sigma: torch.Tensor,
                               variance_output: torch.Tensor) -> torch.Tensor:
        """(B,) L_t in bits per dimension at the process's step t of each sigma: KL(q(x_{t-1} | x_t, x0) ||
        N(mu(x0_hat, x_t), Sigma)) for t > 0, the decoder NLL -log p(x0 | x_1) for t = 0."""
        process = self.process
        step = process.sigma_to_t(sigma.double()).round().long()
        table = process.sigmas.to(step.device)
        sigma_t, sigma_prev = table[step], torch.where(step > 0, table[(step - 1).clamp(min=0)], 0.0)
        beta, beta_tilde = ddpm_step_variances(sigma_t, sigma_prev)
        # beta_tilde is 0 at t = 0: the learned range then starts from beta_tilde at t = 1 (iDDPM's "clipped" log)
        beta_tilde = torch.where(step > 0, beta_tilde, ddpm_step_variances(table[1], table[0])[1])
        log_variance = learned_range_log_variance(variance_output, _bc(beta.log(), x0).float(),
                                                  _bc(beta_tilde.log(), x0).float())
        # posterior means differ by coef (x0 - x0_hat), coef = sqrt(abar_{t-1}) beta_t / (1 - abar_t)
        abar, abar_prev = 1 / (1 + sigma_t ** 2), 1 / (1 + sigma_prev ** 2)
        coef = _bc(abar_prev.sqrt() * beta / (1 - abar), x0).float()
        log_beta_tilde = _bc(beta_tilde.log(), x0).float()
        kl = 0.5 * (log_variance - log_beta_tilde - 1 + torch.exp(log_beta_tilde - log_variance)
                    + (coef * (x0 - x0_hat)) ** 2 * torch.exp(-log_variance))
        decoder_nll = -discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * log_variance)
        per_element = torch.where(_bc(step, x0) == 0, decoder_nll, kl)
        return per_element.flatten(1).mean(1) / math.log(2)


# --------------------------------------------------------------------------- ground truth
class GaussianData:
    """Data x0 ~ N(mean, cov) in d dimensions, as (B, d, 1, 1) images: closed-form ground truth.

    Its noisy marginals are N(mean, cov + sigma^2 I), the optimal denoiser is
    E[x0 | x] = mean + cov (cov + sigma^2 I)^-1 (x - mean), and the probability-flow
    ODE is solved exactly in cov's eigenbasis. Tests, benchmarks and notebooks check
    samplers, losses and likelihoods against it.
    """

    def __init__(self,
                 mean: torch.Tensor,   # (d,) data mean
                 cov: torch.Tensor):   # (d, d) symmetric positive-definite data covariance
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.cov = torch.as_tensor(cov, dtype=torch.float64)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.cov)
        if self.eigenvalues.min() <= 0:
            raise ValueError("cov must be positive definite")
        self.dim = self.mean.numel()

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.dim)

    def _apply(self, x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """mean + U diag(gains) U^T (x - mean), per example; gains (B, d) or (d,)."""
        u = self.eigenvectors.to(x)
        centred = (self._flat(x) - self.mean.to(x)) @ u
        return ((centred * gains.to(x)) @ u.T + self.mean.to(x)).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.mean + (z * self.eigenvalues.sqrt()) @ self.eigenvectors.T
        return x.to(dtype).reshape(n, self.dim, 1, 1)

    def denoiser(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma2 = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1) ** 2
        lam = self.eigenvalues.to(x)
        return self._apply(x, lam / (lam + sigma2))

    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """Exact probability-flow ODE map from sigma_from to sigma_to."""
        lam = self.eigenvalues
        return self._apply(x, ((lam + sigma_to ** 2) / (lam + sigma_from ** 2)).sqrt())

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """(B,) log N(x; mean, cov + sigma^2 I)."""
        noisy_cov = self.cov + sigma ** 2 * torch.eye(self.dim, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(self.mean, noisy_cov)
        return dist.log_prob(self._flat(x).to(torch.float64))

    def as_model(self, process: NoiseProcess, prediction: str = "eps") -> nn.Module:
        """The optimal network for (process, prediction), honouring the backbone interface."""
        return _GaussianOracle(self, process, prediction)


class _GaussianOracle(nn.Module):
    def __init__(self, data: GaussianData, process: NoiseProcess, prediction: str):
        super().__init__()
        self.data, self.process, self.prediction = data, process, prediction
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device and a gradient path
        self.learn_sigma, self.is_conditional = False, False

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = self.process.model_time_to_sigma(t.to(torch.float64)).to(x_in.dtype)
        x = x_in / _bc(self.process.input_scale(sigma), x_in)
        x0 = self.data.denoiser(x, sigma)
        noise = (x - x0) / _bc(sigma, x)
        return prediction_target(x0, noise, sigma, self.prediction, self.process.sigma_data) + self.anchor


__all__ = [
    "PREDICTIONS", "WEIGHTINGS", "PROCESSES", "NoiseProcess", "DiscreteVP", "ContinuousVP", "EDM",
    "make_process", "prediction_target", "denoised_from_prediction", "convert_prediction", "loss_weight",
    "VARIANCES", "ddpm_step_variances", "learned_range_log_variance", "discretized_gaussian_log_likelihood",
    "BaseDenoiser", "Denoiser", "make_denoiser", "DiffusionLoss", "GaussianData",
]
