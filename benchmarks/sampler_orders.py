"""Sampler error vs step count on Gaussian data, where the truth is known in closed form.

Data: x0 ~ N(mean, cov) in 3 dimensions (cov eigenvalues 0.43, 0.049, 0.0062), the
optimal denoiser E[x0 | x_sigma] in closed form (vitdiff.diffusion.GaussianData).

* ODE samplers (deterministic): RMS distance, over 2000 draws of the initial noise, between
  the sampler's state at sigma_min and the exact probability-flow ODE solution from the
  same noise; ``steps`` steps from sigma_max to sigma_min on the grid named in the table.
* Stochastic samplers: 2-Wasserstein distance between the Gaussian fitted to N samples and
  the data distribution, on the process's default grid down to sigma = 0. The Monte Carlo
  floor (the same distance for N exact data samples) is printed with the table.

The order is the least-squares slope of -log(error) against log(steps) over 10/20/50/100.

    python benchmarks/sampler_orders.py [--samples 100000]
"""
from __future__ import annotations

import argparse
import math

import torch

from vitdiff.diffusion import GaussianData, make_process
from vitdiff.sampling import SAMPLERS, get_sigmas

STEPS = (10, 20, 50, 100)


def gaussian_data() -> GaussianData:
    q = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.2, -0.3, 0.93]], dtype=torch.float64)
    return GaussianData(torch.tensor([0.3, -0.2, 0.1]), q @ torch.diag(torch.tensor([0.3, 0.08, 0.01]).double()) @ q.T)


def _sqrtm(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def wasserstein2(samples: torch.Tensor, data: GaussianData) -> float:
    """W2 between N(sample mean, sample cov) and the data Gaussian."""
    flat = samples.flatten(1).double()
    mean, cov = flat.mean(0), torch.cov(flat.T)
    root = _sqrtm(data.cov)
    cross = _sqrtm(root @ cov @ root)
    return math.sqrt(max(float((mean - data.mean).pow(2).sum() + torch.trace(cov + data.cov - 2 * cross)), 0.0))


def order(errors) -> float:
    n, e = torch.tensor(STEPS, dtype=torch.float64).log(), torch.tensor(errors, dtype=torch.float64).log()
    return -float(((n - n.mean()) * (e - e.mean())).sum() / ((n - n.mean()) ** 2).sum())


def ode_row(data, process_name, grid, sampler, **opts):
    process = make_process(process_name)
    noise = torch.randn(2000, data.dim, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in STEPS:
        sigmas = get_sigmas(process, steps + 1, grid)[:-1]  # `steps` steps, ending at sigma_min
        x = noise * float(process.prior_std(sigmas[0]))
        out = SAMPLERS[sampler](data.denoiser, x, sigmas, progress=False, **opts)
        exact = data.ode_solution(x, float(sigmas[0]), float(sigmas[-1]))
        errors.append((out - exact).pow(2).flatten(1).sum(1).mean().sqrt().item())
    return errors


def sde_row(data, process_name, sampler, samples, **opts):
    process = make_process(process_name)
    errors = []
    for steps in STEPS:
        generator = torch.Generator().manual_seed(0)
        sigmas = get_sigmas(process, steps)
        x = torch.randn(samples, data.dim, 1, 1, dtype=torch.float64, generator=generator)
        out = SAMPLERS[sampler](data.denoiser, x * float(process.prior_std(sigmas[0])), sigmas, generator=generator,
                                progress=False, **opts)
        errors.append(wasserstein2(out, data))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples per stochastic-sampler run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = gaussian_data()
    header = "| sampler | process / grid | metric | " + " | ".join(f"{n} steps" for n in STEPS) + " | order |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    def emit(name, where, metric, errors):
        cells = " | ".join(f"{e:.2e}" for e in errors)
        print(f"| {name} | {where} | {metric} | {cells} | {order(errors):.2f} |", flush=True)

    for process_name, grid in (("edm", "karras"), ("vp-sde", "uniform_t")):
        for name, opts in (("euler", {}), ("ddim", {"eta": 0.0}), ("heun", {}), ("dpmpp_2m", {})):
            label = name + (" (eta=0)" if name == "ddim" else "")
            emit(label, f"{process_name} / {grid}", "ODE RMS error", ode_row(data, process_name, grid, name, **opts))
    for process_name in ("edm", "vp-sde"):
        grid = make_process(process_name).default_grid
        for name, opts in (("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler_maruyama", {}), ("heun", {"s_churn": 10.0})):
            label = name + "".join(f" ({k}={v})" for k, v in opts.items())
            errors = sde_row(data, process_name, name, args.samples, **opts)
            emit(label, f"{process_name} / {grid}", "W2 to data", errors)
    floor = wasserstein2(data.sample(args.samples, torch.Generator().manual_seed(1)), data)
    print(f"\nMonte Carlo floor of W2 with {args.samples} exact samples: {floor:.2e}")


if __name__ == "__main__":
    main()
