"""Samplers, sigma grids and classifier-free guidance (after k-diffusion's sampling.py).

Every sampler has one signature and works in sigma-space on a denoiser
``D(x, sigma, cond) -> x0_hat`` (see :mod:`vitdiff.diffusion`)::

    sampler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, progress=True, **opts)

``x`` starts at ``sigmas[0]`` in VE coordinates (``x = x0 + sigma * eps``) and the
sampler walks the decreasing grid ``sigmas`` (usually ending in 0) and returns x at
``sigmas[-1]``. ``callback`` receives ``dict(i, x, sigma, denoised)`` once per step;
``progress=False`` silences the tqdm bar.

Correspondences (all exact, in VE coordinates; tested against diffusers):

* ``ddim`` with eta = 0 *is* ``euler`` without churn (Karras et al. 2022, Sec. 4);
* ``ddpm`` is DDPM's ancestral sampler; with ``variance="fixed_small"`` (default, the
  posterior variance ``beta_tilde``) it is ``ddim`` with eta = 1; ``"fixed_large"`` takes
  ``beta``, ``"learned_range"`` a learn_sigma model's iDDPM variance (DiT's sampler), each
  with beta and beta_tilde of the grid's own (respaced) chain;
* ``dpmpp_2m`` is DPM-Solver++(2M) (Lu et al. 2022) in its multistep midpoint form,
  first order on the first step and on a final step to sigma = 0;
* ``euler_maruyama`` is U-ViT's final-FID sampler, Euler–Maruyama on the reverse
  VP-SDE written in VP coordinates. By default the step's ``beta(t) dt`` is its exact
  integral ``log((1 + sigma^2) / (1 + sigma_next^2))`` (U-ViT's scheme with beta read at
  the step's midpoint), so the sampler needs only sigmas; ``beta_dt=process.beta_dt_at_start``
  (:class:`vitdiff.diffusion.ContinuousVP`; ``sample(..., beta_dt="start")``, the config's
  ``sample.beta_dt: start``) reads beta at the step's start as U-ViT's ``sde.py`` does. The two differ
  by ``beta' dt^2 / 2`` per step, which adds up to a first-order difference of the samples;
  both are first-order weak schemes of the same SDE. As U-ViT, the last step (to sigma = 0)
  adds no noise.

Step counts: ``steps`` grid points plus a final 0, so ``steps`` sampler iterations;
``heun`` costs ``2 * steps - 1`` network evaluations, the others ``steps``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import trange

from .diffusion import (
    VARIANCES, BaseDenoiser, DiscreteVP, NoiseProcess, ddpm_step_variances, learned_range_log_variance, make_denoiser,
    randn,
)

DenoiserFn = Callable[..., torch.Tensor]  # D(x, sigma, cond) -> x0_hat


# --------------------------------------------------------------------------- sigma grids
def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


SPACINGS = ("trailing", "leading", "linspace")  # placements of a discrete uniform_t grid (get_sigmas_uniform_t)


def get_sigmas_uniform_t(process: NoiseProcess, steps: int, *, spacing: str | None = None) -> torch.Tensor:
    """``steps`` points uniform on the process's time axis, from t_max down, then 0.

    Continuous VP: ``t = linspace(1, t_min, steps)`` (U-ViT's Euler–Maruyama grid).
    EDM: uniform in sigma. Discrete VP: integer steps, ``spacing`` as diffusers'
    ``timestep_spacing`` (Lin et al. 2023, Table 2): "trailing" (default; starts at
    T-1), "leading" (DDIM paper; multiples of T//steps, starts below T-1) or
    "linspace" (rounded linspace over [0, T-1]).
    """
    if isinstance(process, DiscreteVP):
        num = process.num_steps
        if steps > num:
            raise ValueError(f"uniform_t on a {num}-step process takes at most {num} steps, got {steps}: "
                             "use fewer steps or a fractional grid (karras, quadratic)")
        spacing = spacing or "trailing"
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        if spacing == "trailing":
            t = torch.arange(num, 0, -num / steps, dtype=torch.float64).round() - 1
        elif spacing == "leading":
            t = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (num // steps)
        else:
            t = torch.linspace(0, num - 1, steps, dtype=torch.float64).round().flip(0)
    elif spacing is not None:
        raise ValueError(f"spacing applies to discrete processes only; {type(process).__name__} has a "
                         "continuous time axis: leave spacing unset")
    else:
        t = torch.linspace(process.t_max, process.t_min, steps, dtype=torch.float64)
    return _append_zero(process.t_to_sigma(t).to(torch.float64))


def get_sigmas_quadratic(process: NoiseProcess, steps: int) -> torch.Tensor:
    """Time quadratic in the step index, dense near t_min (DDIM's "quad" skip), then 0."""
    u = torch.linspace(1, 0, steps, dtype=torch.float64)
    t = process.t_min + (process.t_max - process.t_min) * u ** 2
    return _append_zero(process.t_to_sigma(t).to(torch.float64))


def get_sigmas_karras(process: NoiseProcess, steps: int, *, rho: float = 7.0,
                      sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """EDM's grid: uniform in sigma^(1/rho) between sigma_max and sigma_min (default: the process's), then 0."""
    sigma_min = process.sigma_min if sigma_min is None else sigma_min
    sigma_max = process.sigma_max if sigma_max is None else sigma_max
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras grid needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}; the final 0 is appended anyway, so pass the smallest positive sigma")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    return _append_zero((hi + u * (lo - hi)) ** rho)


GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform_t": get_sigmas_uniform_t,
    "quadratic": get_sigmas_quadratic,
    "karras": get_sigmas_karras,
}


def get_sigmas(process: NoiseProcess, steps: int, grid: str | None = None, **opts) -> torch.Tensor:
    """The named grid (default: the process's ``default_grid``) with ``steps`` points plus a final 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    grid = grid or process.default_grid
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return GRIDS[grid](process, steps, **opts)


# --------------------------------------------------------------------------- helpers
def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _churn(x, sigma, num_steps, generator, s_churn, s_tmin, s_tmax, s_noise):
    """EDM's stochastic "churn": raise sigma to sigma_hat = sigma (1 + gamma) by adding fresh noise.

    Noise is drawn only at steps with gamma > 0 (sigma inside [s_tmin, s_tmax]), as EDM's Algorithm 2;
    k-diffusion draws it at every step and scales it by zero outside the window. Same distribution,
    but with a window the generator is consumed differently, so one seed gives other samples than there.
    """
    gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + _noise_like(x, generator) * s_noise * (sigma_hat ** 2 - sigma ** 2).sqrt(), sigma_hat


def _report(callback, i, x, sigma, denoised) -> None:
    if callback is not None:
        callback(dict(i=i, x=x, sigma=sigma, denoised=denoised))


# --------------------------------------------------------------------------- samplers
@torch.no_grad()
def sample_euler(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None, generator=None,
                 callback=None, progress: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma; optional EDM churn."""
    sigmas = sigmas.to(x)
    for i in trange(len(sigmas) - 1, disable=not progress, desc="euler"):
        x, sigma = _churn(x, sigmas[i], len(sigmas) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma, cond)
        _report(callback, i, x, sigma, denoised)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x


@torch.no_grad()
def sample_heun(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None, generator=None,
                callback=None, progress: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """EDM's Algorithm 2: Heun (trapezoidal) steps, Euler on a final step to sigma = 0; optional churn."""
    sigmas = sigmas.to(x)
    for i in trange(len(sigmas) - 1, disable=not progress, desc="heun"):
        x, sigma = _churn(x, sigmas[i], len(sigmas) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = sigmas[i + 1]
        denoised = denoiser(x, sigma, cond)
        _report(callback, i, x, sigma, denoised)
        slope = (x - denoised) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            slope_next = (x_euler - denoiser(x_euler, sigma_next, cond)) / sigma_next
            x = x + (slope + slope_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_ddim(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None, generator=None,
                callback=None, progress: bool = True, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021): eta = 0 deterministic, eta = 1 DDPM's ancestral sampler.

    In VE coordinates, x_next = x0_hat + sqrt(sigma_next^2 - s_up^2) * eps_hat + s_up * z with
    s_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) (DDIM's sigma_t(eta), rescaled).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigmas = sigmas.to(x)
    for i in trange(len(sigmas) - 1, disable=not progress, desc="ddim"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, cond)
        _report(callback, i, x, sigma, denoised)
        sigma_up = (eta * sigma_next * (1 - sigma_next ** 2 / sigma ** 2).sqrt()).clamp(max=sigma_next)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2).sqrt()
        x = denoised + (x - denoised) / sigma * sigma_down
        if eta > 0 and sigma_next > 0:
            x = x + _noise_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None, generator=None,
                callback=None, progress: bool = True, variance: str = "fixed_small") -> torch.Tensor:
    """DDPM's ancestral sampler (Ho et al. 2020) with iDDPM's reverse variances.

    Each step draws from N(posterior mean of q(x_next | x, x0_hat), Sigma): the mean is
    ``x0_hat + (sigma_next^2 / sigma) eps_hat`` in VE coordinates, Sigma (VP coordinates) is
    beta_tilde ("fixed_small"; DDIM with eta = 1), beta ("fixed_large") or the learned range
    between them ("learned_range"; needs a learn_sigma model, whose variance output the
    denoiser's ``denoise`` returns). The last step (to sigma = 0) adds no noise.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    learned = variance == "learned_range"
    if learned and not isinstance(denoiser, BaseDenoiser):
        raise ValueError("variance='learned_range' needs a model's denoiser (vitdiff.diffusion.Denoiser), "
                         "which hands over the learned variance; use fixed_small or fixed_large here")
    sigmas = sigmas.to(x)
    for i in trange(len(sigmas) - 1, disable=not progress, desc="ddpm"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, variance_output = denoiser.denoise(x, sigma, cond) if learned else (denoiser(x, sigma, cond), None)
        if learned and variance_output is None:
            raise ValueError("variance='learned_range' needs a learn_sigma model (its second half of output "
                             "channels is the variance); this model has none: use fixed_small or fixed_large")
        _report(callback, i, x, sigma, denoised)
        x = denoised + (x - denoised) * (sigma_next / sigma) ** 2
        if sigma_next > 0:
            beta, beta_tilde = ddpm_step_variances(sigma, sigma_next)
            if variance == "fixed_small":
                log_variance = beta_tilde.log()
            elif variance == "fixed_large":
                log_variance = beta.log()
            else:
                log_variance = learned_range_log_variance(variance_output, beta.log(), beta_tilde.log())
            # VP noise of variance Sigma is sqrt(1 + sigma_next^2) times larger in VE coordinates
            x = x + (0.5 * log_variance).exp() * (1 + sigma_next ** 2).sqrt() * _noise_like(x, generator)
    return x


@torch.no_grad()
def sample_euler_maruyama(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None,
                          generator=None, callback=None, progress: bool = True,
                          beta_dt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Euler–Maruyama on the reverse VP-SDE (U-ViT's sampler; see the module docstring).

    In VP coordinates x_vp = x / sqrt(1 + sigma^2), with b = beta dt of the step:
    x_vp_next = (1 + b/2) x_vp + b * score + sqrt(b) z, score = -eps_hat / sqrt(1 - abar).
    ``beta_dt(sigma, sigma_next)`` gives b; default its exact integral over the step.
    """
    sigmas = sigmas.to(x)
    for i in trange(len(sigmas) - 1, disable=not progress, desc="euler_maruyama"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, cond)
        _report(callback, i, x, sigma, denoised)
        if beta_dt is None:
            step_beta = torch.log1p(sigma ** 2) - torch.log1p(sigma_next ** 2)
        else:
            step_beta = beta_dt(sigma, sigma_next).to(x)
        scale = (1 + sigma ** 2).sqrt()             # 1 / alpha
        eps_hat = (x - denoised) / sigma
        # score term: -b * eps_hat / (sigma * alpha) in VP coordinates
        x_vp = (1 + step_beta / 2) * x / scale - step_beta * eps_hat * scale / sigma
        if sigma_next > 0:
            x_vp = x_vp + step_beta.sqrt() * _noise_like(x, generator)
        x = x_vp * (1 + sigma_next ** 2).sqrt()
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None, generator=None,
                    callback=None, progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) in lambda = -log(sigma); x0_hat extrapolated linearly from the last two steps."""
    sigmas = sigmas.to(x)
    previous = None
    for i in trange(len(sigmas) - 1, disable=not progress, desc="dpmpp_2m"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma, cond)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        if previous is not None:
            ratio = (sigmas[i - 1].log() - sigma.log()) / h  # h_last / h
            denoised_2 = (1 + 1 / (2 * ratio)) * denoised - 1 / (2 * ratio) * previous
        else:
            denoised_2 = denoised
        x = sigma_next / sigma * x - torch.expm1(-h) * denoised_2
        previous = denoised
    return x


BETA_DTS = ("exact", "start")  # euler_maruyama's beta dt: its integral over the step, or U-ViT's step-start beta
# Settings read by one sampler only: name -> (that sampler, the value that leaves the setting unset).
SAMPLER_SETTINGS = {"variance": ("ddpm", None), "beta_dt": ("euler_maruyama", "exact")}

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler_maruyama": sample_euler_maruyama,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


# --------------------------------------------------------------------------- guidance
NO_GUIDANCE = {"dit": 1.0, "dit_official": 1.0, "uvit": 0.0}  # convention -> the scale that means no guidance
DIT_OFFICIAL_GUIDED_CHANNELS = 3  # DiT's forward_with_cfg guides eps[:, :3] only, for bitwise reproducibility


def _check_convention(convention: str) -> None:
    if convention not in NO_GUIDANCE:
        raise ValueError(f"unknown guidance_convention {convention!r}; choose one of {', '.join(NO_GUIDANCE)}")


class ClassifierFreeGuidance(BaseDenoiser):
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

    Conventions (``guidance`` is read in the one chosen):

    * ``"dit"`` (default): ``out = uncond + w * (cond - uncond)`` on every channel; w = 1 is no
      guidance. This is the standard rule, which DiT's code mentions but does not run.
    * ``"dit_official"``: what DiT's ``forward_with_cfg`` runs and its FIDs were measured with: the
      same rule on the first 3 channels of the network's raw output only (counted over the data
      channels, then a learned variance's channels), the rest left conditional. With 4 latent
      channels the 4th data channel and the variance stay conditional; with fewer than 3 data
      channels and a learned variance, DiT's slice also guides the first ``3 - C`` variance
      channels, and so does this convention.
    * ``"uvit"``: ``eps = (1 + s) * eps_c - s * eps_u``, i.e. w = 1 + s on every channel; s = 0 is
      no guidance (U-ViT's s = 0.4 equals DiT's w = 1.4).

    The combination is applied to x0_hat. x0_hat is affine in the network output channel by
    channel with the same x (for eps, x0 and v), so this equals guiding the network output as
    DiT and U-ViT do, channel for channel. A learned variance comes from the conditional pass (as
    in DiT), but for the channels ``dit_official`` guides. Conditional and unconditional passes
    share one batched forward.
    """

    def __init__(self,
                 denoiser: BaseDenoiser,                             # the conditional denoiser D(x, sigma, cond)
                 null_cond: Callable[[torch.Tensor], torch.Tensor],  # cond -> its unconditional counterpart
                 guidance: float,                                  # scale, read in `convention`
                 convention: str = "dit"):                         # "dit", "dit_official" (w) or "uvit" (s = w - 1)
        _check_convention(convention)
        self.denoiser, self.null_cond, self.convention = denoiser, null_cond, convention
        self.scale = 1.0 + guidance if convention == "uvit" else guidance

    def denoise(self, x: torch.Tensor, sigma, cond):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        both, variance = self.denoiser.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                               torch.cat([cond, self.null_cond(cond)]))
        channels = x.shape[1]
        official = self.convention == "dit_official"
        guided = self._guide_first(*both.chunk(2), DIT_OFFICIAL_GUIDED_CHANNELS if official else channels)
        if variance is None:
            return guided, None
        # DiT's slice of the raw output, [:, :3], reaches into the variance channels when C < 3
        return guided, self._guide_first(*variance.chunk(2), max(0, DIT_OFFICIAL_GUIDED_CHANNELS - channels)
                                         if official else 0)

    def _guide_first(self, conditional: torch.Tensor, unconditional: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` channels guided, the others conditional."""
        guided = unconditional[:, :count] + self.scale * (conditional[:, :count] - unconditional[:, :count])
        return torch.cat([guided, conditional[:, count:]], dim=1)


class ClipDenoised(BaseDenoiser):
    """Clamps x0_hat to the data range [-1, 1] (DDPM/ADM's clip_denoised), passing a learned variance on."""

    def __init__(self, denoiser: BaseDenoiser):  # the denoiser whose x0 estimates are clamped
        self.denoiser = denoiser

    def denoise(self, x: torch.Tensor, sigma, cond):
        denoised, variance = self.denoiser.denoise(x, sigma, cond)
        return denoised.clamp(-1.0, 1.0), variance


# --------------------------------------------------------------------------- high level
def _beta_dt_function(beta_dt: str | Callable, process: NoiseProcess, sampler: str) -> Callable:
    """The euler_maruyama sampler's ``beta_dt(sigma, sigma_next)`` for :func:`sample`'s ``beta_dt`` other than exact."""
    if sampler != "euler_maruyama":
        raise ValueError(f"beta_dt={beta_dt!r} is read by the euler_maruyama sampler only, not {sampler!r}: pass "
                         "sampler='euler_maruyama' or leave beta_dt unset (sample.beta_dt=exact)")
    if callable(beta_dt):
        return beta_dt
    if beta_dt not in BETA_DTS:
        raise ValueError(f"unknown beta_dt {beta_dt!r}; choose one of {', '.join(BETA_DTS)}")
    if not hasattr(process, "beta_dt_at_start"):
        raise ValueError(f"beta_dt='start' reads the beta(t) of the continuous VP-SDE (vp-sde); "
                         f"{type(process).__name__} has none: use beta_dt='exact'")
    return process.beta_dt_at_start


@torch.no_grad()
def sample(model: torch.nn.Module, process: NoiseProcess, shape, *, sampler: str = "dpmpp_2m", steps: int = 50,
           prediction: str = "eps", cond=None, guidance: float = 1.0, guidance_convention: str = "dit",
           grid: str | None = None, spacing: str | None = None, variance: str | None = None,
           beta_dt: str | Callable | None = None, clip_denoised: bool = False, generator: torch.Generator | None = None,
           progress: bool = True, callback=None, device=None, **sampler_opts) -> torch.Tensor:
    """Draw samples ``shape = (B, C, H, W)``; returns x0 in data space.

    ``grid`` defaults to the process's own (uniform_t for VP, karras for EDM); ``spacing``
    places a discrete process's uniform_t grid: "trailing" (default; t = T-1 ... T/steps - 1),
    "leading" or "linspace" (t = T-1 ... 0; DiT's respacing "250" is linspace, "ddim50" leading).
    ``variance`` is the ddpm sampler's (fixed_small, the default; fixed_large; learned_range).
    ``beta_dt`` is the euler_maruyama sampler's beta dt per step: "exact" (None, the default; its integral
    over the step), "start" (beta read at the step's start, as U-ViT's ``sde.py``; the continuous VP
    process's ``beta_dt_at_start``) or a function ``beta_dt(sigma, sigma_next)``.
    ``clip_denoised`` clamps every x0 estimate to [-1, 1], the data range of pixel models (DDPM's and
    ADM's ``clip_denoised``, diffusers' ``clip_sample``). It rescues young eps-prediction models, whose
    small eps errors at high noise are multiplied by sigma in x0; leave it off for latent models.
    ``sampler_opts`` pass through (e.g. ``eta`` for ddim, ``s_churn`` for heun/euler).
    Put the model in eval mode first.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    _check_convention(guidance_convention)
    if variance is not None:
        if sampler != "ddpm":
            raise ValueError(f"variance={variance!r} is read by the ddpm sampler only, not {sampler!r}: "
                             "pass sampler='ddpm' or leave variance unset (sample.variance=null)")
        sampler_opts["variance"] = variance
    if beta_dt not in (None, "exact"):
        sampler_opts["beta_dt"] = _beta_dt_function(beta_dt, process, sampler)
    guided = guidance != NO_GUIDANCE[guidance_convention]
    if guided and not getattr(model, "is_conditional", False):
        raise ValueError(f"guidance={guidance} asks for classifier-free guidance, but the model is unconditional: "
                         f"pass guidance={NO_GUIDANCE[guidance_convention]} (no guidance in the "
                         f"{guidance_convention!r} convention) or use a class/text-conditional model")
    if guided and cond is None:
        raise ValueError("classifier-free guidance needs cond (labels or text context) to guide towards")
    if spacing is not None and (grid or process.default_grid) != "uniform_t":
        raise ValueError(f"spacing={spacing!r} places the uniform_t grid, not {grid or process.default_grid!r}: "
                         "pass grid='uniform_t' or leave spacing unset")
    sigmas = get_sigmas(process, steps, grid, **({} if spacing is None else {"spacing": spacing}))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    denoiser = make_denoiser(model, process, prediction)
    if guided:
        denoiser = ClassifierFreeGuidance(denoiser, model.null_cond, guidance, guidance_convention)
    if clip_denoised:
        denoiser = ClipDenoised(denoiser)
    x = randn(tuple(shape), generator=generator, device=device) * float(process.prior_std(sigmas[0]))
    return SAMPLERS[sampler](denoiser, x, sigmas.to(device), cond=cond, generator=generator, callback=callback,
                             progress=progress, **sampler_opts)


__all__ = [
    "GRIDS", "SPACINGS", "SAMPLERS", "BETA_DTS", "SAMPLER_SETTINGS", "NO_GUIDANCE", "ClassifierFreeGuidance",
    "ClipDenoised", "get_sigmas",
    "get_sigmas_uniform_t",
    "get_sigmas_quadratic", "get_sigmas_karras", "sample", "sample_ddpm", "sample_ddim", "sample_euler",
    "sample_heun", "sample_euler_maruyama", "sample_dpmpp_2m",
]
