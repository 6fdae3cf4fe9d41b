"""vitdiff eval CKPT --metric fd-clf|fid|nll: one number, saved with the protocol that produced it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import run_command
from .config import METRICS, ConfigError, check_writable

if TYPE_CHECKING:  # annotations only: `vitdiff eval --help` does not import torch
    import torch

MAX_SAMPLES = 50_000  # FID-50K, the largest standard protocol; the samples are held in memory

DESCRIPTION = """One number for a checkpoint, saved with the protocol that produced it.

  fd-clf  Frechet distance on a small offline classifier's features (FD-fmnist-clf, FD-digits-clf) against the
          data set's training split, or --reference statistics. A CPU proxy with its own name: never FID.
  fid     Inception-v3 FID (local weights only) against --reference statistics (.npz) or the training split.
  nll     bits/dim of the first --n test images through the probability-flow ODE (Hutchinson trace, RK4).

A text-to-image model is sampled with the test split's captions (cycled) and scored for NLL on the test images with
their own captions. Sampling settings default to the checkpoint config's eval section, then its sample section. The
result (metric, value, n, sampler, steps, guidance and its convention, seed, reference set, checkpoint, EMA or not,
step) is appended to --results."""


def main(argv: list[str] | None = None) -> int:
    from .sample_cli import HelpFormatter, add_sampling_arguments

    parser = argparse.ArgumentParser(prog="vitdiff eval", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--metric", choices=METRICS, help="default: the config's eval.metric")
    parser.add_argument("--n", type=int, help="samples (fd-clf, fid) or test images (nll); default: the config's eval.n")
    parser.add_argument("--reference", type=Path,
                        help="reference feature statistics (.npz from vitdiff.metrics); default: the config's "
                             "eval.reference, else the training split")
    parser.add_argument("--results", type=Path, help="JSONL to append to; default: <run dir>/results.jsonl")
    parser.add_argument("--inception-weights", type=Path, help="FID: the local Inception-v3 weights file")
    parser.add_argument("--nll-steps", type=int, default=100, help="nll: RK4 steps of the probability-flow ODE")
    args = parser.parse_args(argv)
    return run_command("vitdiff eval", lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> int:
    from .generate import generate, load_for_inference
    from .metrics import MetricResult, save_result
    from .sample_cli import check_guidance_for, check_sampling_arguments, resolve_device, sampling_config

    if args.n is not None and not 1 <= args.n <= MAX_SAMPLES:
        raise ConfigError(f"--n must lie in 1..{MAX_SAMPLES} (the samples are held in memory), got {args.n}")
    if args.nll_steps < 1:
        raise ConfigError(f"--nll-steps must be >= 1, got {args.nll_steps}")
    check_sampling_arguments(args)
    if args.results is not None:
        check_writable(args.results, "--results", directory=False)
    device = resolve_device(args.device)
    model, process, config, state, checkpoint = load_for_inference(args.checkpoint, ema=args.ema, device=device)
    metric = args.metric or config.eval.metric
    if metric not in METRICS:
        raise ConfigError(f"the config's eval.metric {metric!r} is not one of {METRICS}: pass --metric")
    n = args.n if args.n is not None else config.eval.n
    if n > MAX_SAMPLES:
        raise ConfigError(f"the config's eval.n={n} is above {MAX_SAMPLES} (the samples are held in memory): pass --n")
    sampler = args.sampler or config.eval.sampler or config.sample.sampler
    config = sampling_config(args, config, sampler)
    steps = args.steps or config.eval.steps or config.sample.steps
    guidance = next(g for g in (args.guidance, config.eval.guidance, config.sample.guidance) if g is not None)
    check_guidance_for(model, config, guidance)
    results = args.results or checkpoint.parent / "results.jsonl"
    check_writable(results, "--results", directory=False)
    dataset = config.data.dataset
    reference_file = args.reference or (Path(config.eval.reference) if config.eval.reference else None)
    protocol = dict(sampler=sampler, steps=steps, guidance=guidance,
                    guidance_convention=config.sample.guidance_convention)
    # A text model is sampled with the test split's captions (cycled), the conditions the reference images came with.
    prompts = test_captions(config) if getattr(model, "takes_token_ids", False) else None

    if metric == "nll":
        name, value, reference = "NLL-bpd", nll_on_test_split(model, process, config, n, args, device), f"{dataset}:test"
        protocol = dict(sampler="probability-flow ODE, RK4, Hutchinson trace", steps=args.nll_steps, guidance=None,
                        guidance_convention=None)
    else:
        images = generate(model, process, config, n=n, batch_size=args.batch_size, seed=args.seed, device=device,
                          sampler=sampler, steps=steps, guidance=guidance, prompts=prompts, progress=True)
        if metric == "fd-clf":
            name, value, reference = fd_clf(images, config, reference_file)
        else:
            name, value, reference = fid(images, config, reference_file, args.inception_weights, device)

    result = MetricResult(metric=name, value=float(value), num_samples=n, dataset=dataset, reference=reference,
                          checkpoint=str(checkpoint.resolve()), seed=args.seed,
                          extra={"ema": args.ema, "step": state["step"], "config": config.name,
                                 "batch_size": args.batch_size, "grid": config.sample.grid,
                                 "spacing": config.sample.spacing, "variance": config.sample.variance,
                                 "beta_dt": config.sample.beta_dt, "clip_denoised": config.sample.clip_denoised},
                          **protocol)
    save_result(results, result)
    print(f"{result.label} = {result.value:.4f}  ({dataset}, reference {reference}, {protocol['sampler']} "
          f"{protocol['steps']} steps, seed {args.seed}; saved to {results})")
    return 0


def test_captions(config) -> list[str]:
    from .data import make_dataset
    from .build import caption_corpus

    section = config.data
    test_set = make_dataset(section.dataset, root=section.root, image_size=section.image_size, train=False, flip=False)
    return caption_corpus(test_set)


def fd_clf(images: torch.Tensor, config, reference_file: Path | None) -> tuple[str, float, str]:
    from .metrics import FD_METRIC_NAMES, frechet_metric

    dataset = config.data.dataset
    if dataset not in FD_METRIC_NAMES:
        hint = (" (for shapes, vitdiff.workbook.text_alignment scores FD-shapes-clf and text alignment)"
                if dataset == "shapes" else "")
        raise ConfigError(f"fd-clf has a classifier for {sorted(FD_METRIC_NAMES)} only, and this model "
                         f"was trained on {dataset!r}: use --metric fid (with Inception weights) instead{hint}")
    return frechet_metric(images, dataset, metric="fd-clf", reference=reference_file, root=config.data.root)


def fid(images: torch.Tensor, config, reference_file: Path | None, weights: Path | None,
        device: torch.device) -> tuple[str, float, str]:
    from .metrics import frechet_metric

    return frechet_metric(images, config.data.dataset, metric="fid", reference=reference_file, root=config.data.root,
                          inception_weights=weights, device=device, batch_size=50)


def nll_on_test_split(model, process, config, n: int, args, device) -> float:
    import torch

    from .build import batch_condition
    from .data import make_dataset
    from .likelihood import nll_bits_per_dim

    section = config.data
    test_set = make_dataset(section.dataset, root=section.root, image_size=section.image_size, train=False, flip=False)
    if n > len(test_set):
        raise ConfigError(f"--n {n} exceeds the {len(test_set)} test images of {section.dataset}: pass a smaller --n")
    generator = torch.Generator(device).manual_seed(args.seed)
    total = 0.0
    for start in range(0, n, args.batch_size):
        items = [test_set[i] for i in range(start, min(n, start + args.batch_size))]
        x0 = torch.stack([image for image, _ in items]).to(device)
        cond = batch_condition(model, [target for _, target in items], device)
        bits = nll_bits_per_dim(model, process, x0, prediction=config.diffusion.prediction, cond=cond,
                                steps=args.nll_steps, generator=generator)
        total += float(bits.sum())
    return total / n


if __name__ == "__main__":
    sys.exit(main())
