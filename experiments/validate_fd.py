"""Validate the workbook's sample metric, FD-fmnist-clf, before it judges anything (issue 20, point 5).

Five measurements, each written to experiments/results/fd_validation/<name>.csv (and one figure):

- ``degradations``: real Fashion-MNIST test images at 16x16 (the cpu profiles) and 32x32 under known degradations
  of rising strength (Gaussian noise, Gaussian blur, contrast loss, brightness shift, blending two images, k of 10
  classes dropped), scored against the training split at the same size by FD-clf, improved precision / recall on
  the same classifier features (k=3) and classifier confidence; disjoint draws of n test images per level.
- ``floor``: real-vs-real (test draws against the training reference) at each sample count, disjoint draws.
- ``eval_noise``: one checkpoint of the cpu profile's recipe scored with several evaluation seeds (n=500, 1000).
- ``training_seed_sd``: the seed-to-seed sd of ``fd`` in the committed rows of notebooks 02-05 (cpu.csv).
- ``samplers``: notebook 06's samplers at few and many steps on the cpu model (400 steps) and a cpu-long model
  (2400 steps), with image statistics (pixel mean, sd, gradient energy) and FD after blurring the samples:
  what the Heun-5 result is made of.

Every score is given against two references: ``fd``, the workbook's (``classifier_reference_stats_at``, which at
16x16 is the 32x32 training statistics: it reads the set's stored tensor, and the set resizes only per item), and
``fd_resized``, the training split at the images' size as training reads it. ``verdicts.csv`` says, per
degradation, size and n, whether each metric moves monotonically the right way; ``summary.csv`` holds the numbers
the README section quotes. Everything runs on one thread; the two models are trained once under ``--runs`` (not
committed) and read back after.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/validate_fd.py              # all stages, then the figure
    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/validate_fd.py --stages figure
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vitdiff import workbook as wb
from vitdiff.data import make_dataset
from vitdiff.metrics import (
    FeatureStats, classifier_features, classifier_reference_images, classifier_reference_stats_at, feature_stats,
    load_classifier, manifold_precision_recall,
)

ROOT = Path(__file__).resolve().parents[1]
DATASET = "fashion-mnist"
SIZES = (16, 32)
DRAWS = 5                                  # disjoint draws of n test images per degradation level
DEGRADATION_NS = (500, 1000)               # the cpu and cpu-long profiles' eval n
FLOOR_NS = (200, 500, 1000, 2000, 5000)
EVAL_SEEDS = tuple(range(10_000, 10_008))  # 10_000 is the workbook's one evaluation seed
EVAL_NOISE_NS = (500, 1000)
# (name, levels): strength 0 is the clean image; units are those of the image in [-1, 1] / pixels at its size.
DEGRADATIONS = {
    "noise sigma": (0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
    "blur sigma (px)": (0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
    "contrast loss": (0, 0.1, 0.2, 0.3, 0.5, 0.7),
    "brightness shift": (0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "blend with another image": (0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "classes dropped": (0, 1, 2, 3, 5, 7, 9),
}
# Notebook 06's samplers at its fewest and most steps, and its default (dpmpp_2m 20).
SAMPLERS = (("heun", 5), ("heun", 10), ("heun", 50), ("euler_maruyama", 5), ("euler_maruyama", 50),
            ("euler", 5), ("euler", 50), ("dpmpp_2m", 20))
SAMPLER_SEEDS = {"cpu": (10_000, 10_001, 10_002), "cpu-long": (10_000, 10_001)}
SAMPLE_BLURS = (0.5, 1.0)                  # blur sigmas (px) applied to samples


# -- images and scores ----------------------------------------------------------------------------
def real_images(size: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A split at ``size`` read item by item, as training reads it (the set resizes in ``__getitem__``)."""
    data = make_dataset(DATASET, image_size=size, train=train, flip=False)
    return torch.stack([data[i][0] for i in range(len(data))]), data.labels


@functools.lru_cache(maxsize=None)
def resized_reference(size: int) -> FeatureStats:
    """Classifier statistics of the training split at ``size`` as training reads it. The workbook's reference
    (``classifier_reference_stats_at``) reads the set's stored 32x32 tensor instead, so at 16x16 it is the 32x32
    statistics: the script scores against both (``fd``: the workbook's, ``fd_resized``: this one)."""
    return feature_stats(load_classifier(DATASET).features, real_images(size, train=True)[0], batch_size=500)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, edges replicated); sigma 0 returns the images."""
    if sigma == 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1).float() ** 2 / (2 * sigma ** 2))
    taps = taps / taps.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    out = F.conv2d(padded, taps.view(1, 1, 1, -1))
    return F.conv2d(out, taps.view(1, 1, -1, 1))


def degrade(images: torch.Tensor, name: str, strength: float, seed: int) -> torch.Tensor:
    """``images`` in [-1, 1] under one degradation (every one but class dropping, which selects images)."""
    generator = torch.Generator().manual_seed(seed)
    if name == "noise sigma":
        out = images + strength * torch.randn(images.shape, generator=generator)
    elif name == "blur sigma (px)":
        out = gaussian_blur(images, strength)
    elif name == "contrast loss":  # towards each image's own mean
        mean = images.mean((1, 2, 3), keepdim=True)
        out = mean + (1 - strength) * (images - mean)
    elif name == "brightness shift":
        out = images + strength
    elif name == "blend with another image":
        out = (1 - strength) * images + strength * images[torch.randperm(len(images), generator=generator)]
    else:
        raise ValueError(f"unknown degradation {name!r}")
    return out.clamp(-1, 1)


def fd_of(features: torch.Tensor, reference: FeatureStats) -> float:
    return FeatureStats(features.shape[1]).update(features).frechet_distance(reference)


class Scorer:
    """FD-clf, precision / recall (k=3) and confidence of image sets of one size against the training split."""

    def __init__(self, size: int):
        self.size = size
        self.reference = classifier_reference_stats_at(DATASET, size)  # what the workbook's fd column used
        self.resized = resized_reference(size)
        self._real: dict[int, torch.Tensor] = {}

    def real_features(self, n: int) -> torch.Tensor:
        """Features of the n fixed training images that make the real manifold (equal n on both sides)."""
        if n not in self._real:
            self._real[n] = classifier_features(classifier_reference_images(DATASET, self.size, n))[0]
        return self._real[n]

    def score_features(self, features: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
        pr = manifold_precision_recall(features, self.real_features(len(features)))
        return {"fd": fd_of(features, self.reference), "fd_resized": fd_of(features, self.resized),
                "precision": pr.precision, "recall": pr.recall,
                "confidence": probs.max(1).values.mean().item()}

    def score(self, images: torch.Tensor) -> dict[str, float]:
        return self.score_features(*classifier_features(images))


def image_statistics(images: torch.Tensor) -> dict[str, float]:
    """Pixel mean and sd, gradient energy (mean squared difference of neighbouring pixels: high for noise and
    sharp edges, low for smooth images) and the share of background pixels (< -0.9)."""
    dx, dy = images.diff(dim=-1), images.diff(dim=-2)
    return {"pixel_mean": images.mean().item(), "pixel_sd": images.std().item(),
            "gradient_energy": ((dx ** 2).mean() + (dy ** 2).mean()).item() / 2,
            "background": (images < -0.9).double().mean().item()}


def draws_of(pool: int, n: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` index sets of n from range(pool): disjoint where the pool allows, else independent draws."""
    generator = torch.Generator().manual_seed(seed)
    if pool >= n * count:
        order = torch.randperm(pool, generator=generator)
        return list(order[: n * count].split(n))
    return [torch.randperm(pool, generator=generator)[:n] for _ in range(count)]


# -- stages ---------------------------------------------------------------------------------------
def stage_degradations() -> pd.DataFrame:
    rows = []
    for size in SIZES:
        scorer = Scorer(size)
        images, labels = real_images(size, train=False)
        for name, levels in DEGRADATIONS.items():
            for strength in levels:
                if name == "classes dropped":  # the first k classes of a fixed class order are removed
                    dropped = torch.randperm(10, generator=torch.Generator().manual_seed(0))[: int(strength)]
                    keep = ~torch.isin(labels, dropped)
                    features, probs = classifier_features(images[keep])
                else:
                    features, probs = classifier_features(degrade(images, name, strength, seed=1))
                for n in DEGRADATION_NS:
                    for draw, index in enumerate(draws_of(len(features), n, DRAWS, seed=2)):
                        rows.append({"size": size, "degradation": name, "strength": strength, "n": n, "draw": draw,
                                     **scorer.score_features(features[index], probs[index])})
            print(f"degradations {size}x{size}: {name} done", flush=True)
    return pd.DataFrame(rows)


def stage_floor() -> pd.DataFrame:
    rows = []
    for size in SIZES:
        scorer = Scorer(size)
        features, probs = classifier_features(real_images(size, train=False)[0])
        for n in FLOOR_NS:
            for draw, index in enumerate(draws_of(len(features), n, min(10, len(features) // n), seed=3)):
                scores = (scorer.score_features(features[index], probs[index]) if n <= 2000 else
                          {"fd": fd_of(features[index], scorer.reference),
                           "fd_resized": fd_of(features[index], scorer.resized)})  # k-NN at 5000 costs 200 MB a matrix
                rows.append({"size": size, "n": n, "draw": draw, **scores})
    return pd.DataFrame(rows)


def trained_model(profile_name: str, runs: Path):
    """The EMA model of the profile's IU-ViT recipe, seed 0 (the workbook's notebook-06 model), trained on one
    thread once and read back from ``runs`` after."""
    from vitdiff.generate import load_for_inference
    from vitdiff.trainer import Trainer

    profile = wb.get_profile(profile_name)
    out = runs / f"IU-ViT_{profile_name}_seed0"
    if not (out / "last.pt").exists():
        config = wb.make_config(wb.Variant("IU-ViT", "IU-ViT"), profile, seed=0, out_dir=out)
        start = time.perf_counter()
        with wb.one_thread():
            Trainer(config, progress=False).fit()
        print(f"trained {out} in {time.perf_counter() - start:.0f} s", flush=True)
    model, process, config, _, _ = load_for_inference(out)
    return model, process, config, profile


def samples(model, process, config, n: int, seed: int, sampler: str | None = None, steps: int | None = None):
    from vitdiff.generate import generate

    with wb.one_thread():
        return generate(model, process, config, n=n, seed=seed, sampler=sampler, steps=steps, batch_size=500)


def stage_eval_noise(runs: Path) -> pd.DataFrame:
    model, process, config, profile = trained_model("cpu", runs)
    scorer = Scorer(config.data.image_size)
    rows = []
    for n in EVAL_NOISE_NS:
        for seed in EVAL_SEEDS:
            rows.append({"model": f"IU-ViT {profile.name} seed 0 ({profile.steps} steps)",
                         "sampler": config.sample.sampler,
                         "steps": config.sample.steps, "n": n, "eval_seed": seed,
                         **scorer.score(samples(model, process, config, n, seed))})
    return pd.DataFrame(rows)


def stage_training_seed_sd() -> pd.DataFrame:
    rows = []
    for path in sorted((ROOT / "experiments" / "results").glob("0[2-5]*/cpu.csv")):
        frame = pd.read_csv(path)
        for variant, group in frame.groupby("variant", sort=False):
            rows.append({"notebook": path.parent.name, "variant": variant, "seeds": len(group),
                         "fd_mean": group.fd.mean(), "fd_sd": group.fd.std(ddof=1)})
    return pd.DataFrame(rows)


def stage_samplers(runs: Path) -> pd.DataFrame:
    rows = []
    for profile_name, seeds in SAMPLER_SEEDS.items():
        model, process, config, profile = trained_model(profile_name, runs)
        size = config.data.image_size
        scorer = Scorer(size)
        label = f"IU-ViT {profile_name} seed 0 ({profile.steps} steps)"
        real = real_images(size, train=False)[0][:500]
        rows.append({"model": label, "sampler": "real test images", "steps": 0, "nfe": 0, "eval_seed": None,
                     "blur": 0.0, **scorer.score(real), **image_statistics(real)})
        for sampler, steps in SAMPLERS:
            for seed in seeds:
                images = samples(model, process, config, 500, seed, sampler, steps)
                for blur in (0.0, *SAMPLE_BLURS):
                    blurred = gaussian_blur(images, blur).clamp(-1, 1)
                    rows.append({"model": label, "sampler": sampler, "steps": steps,
                                 "nfe": 2 * steps - 1 if sampler == "heun" else steps, "eval_seed": seed,
                                 "blur": blur, **scorer.score(blurred), **image_statistics(blurred)})
            print(f"samplers {label}: {sampler} {steps} done", flush=True)
    return pd.DataFrame(rows)


# -- verdicts and figure --------------------------------------------------------------------------
# The direction each metric should move as a degradation strengthens.
EXPECTED = {"fd": +1, "fd_resized": +1, "precision": -1, "recall": -1, "confidence": -1}


def verdicts(degradations: pd.DataFrame) -> pd.DataFrame:
    """Per (size, degradation, n, metric): is the mean over draws monotone in the expected direction, how many
    steps go the wrong way, and how many steps are smaller than the draws' sd (not resolved at this n)."""
    rows = []
    means = degradations.groupby(["size", "degradation", "n", "strength"]).agg(["mean", "std"])
    for (size, name, n), group in means.groupby(level=[0, 1, 2], sort=False):
        group = group.droplevel([0, 1, 2]).sort_index()
        for metric, sign in EXPECTED.items():
            steps = sign * np.diff(group[(metric, "mean")].to_numpy())
            noise = group[(metric, "std")].to_numpy()[1:]
            rows.append({"size": size, "degradation": name, "n": n, "metric": metric,
                         "monotone": bool((steps > 0).all()), "steps": len(steps),
                         "wrong_way_steps": int((steps <= 0).sum()),
                         "steps_within_draw_sd": int((np.abs(steps) < noise).sum()),
                         "clean": group[(metric, "mean")].iloc[0], "strongest": group[(metric, "mean")].iloc[-1]})
    return pd.DataFrame(rows)


def summary(results: Path) -> pd.DataFrame:
    """The headline numbers the README section quotes, each with the file and rows it comes from."""
    rows = []

    def add(key: str, value, source: str) -> None:
        rows.append({"key": key, "value": f"{value:.4g}" if isinstance(value, float) else value, "source": source})

    floor = pd.read_csv(results / "floor.csv")
    for (size, n), group in floor.groupby(["size", "n"]):
        for metric in ("fd", "fd_resized"):
            add(f"floor {metric} {size}x{size} n={n} mean", group[metric].mean(), f"floor.csv size={size} n={n}")
            add(f"floor {metric} {size}x{size} n={n} sd", group[metric].std(ddof=1), f"floor.csv size={size} n={n}")
    degradations = pd.read_csv(results / "degradations.csv")
    for name in ("noise sigma", "classes dropped"):  # the two that are not monotone for fd
        picked = degradations[(degradations["size"] == 16) & (degradations.n == 500)
                              & (degradations.degradation == name)]
        for strength, group in picked.groupby("strength"):
            for metric in ("fd", "fd_resized", "recall"):
                add(f"16x16 n=500 {name} {strength:g} {metric}", group[metric].mean(),
                    f"degradations.csv, mean of {len(group)} draws")
    checks = pd.read_csv(results / "verdicts.csv")
    for metric, group in checks.groupby("metric", sort=False):
        add(f"monotone {metric}", f"{int(group.monotone.sum())} of {len(group)}",
            "verdicts.csv (size x degradation x n)")
    noise = pd.read_csv(results / "eval_noise.csv")
    for n, group in noise.groupby("n"):
        for metric in ("fd", "fd_resized", "precision", "recall"):
            add(f"eval seeds {metric} n={n} mean", group[metric].mean(), f"eval_noise.csv n={n}")
            add(f"eval seeds {metric} n={n} sd", group[metric].std(ddof=1), f"eval_noise.csv n={n}, {len(group)} seeds")
    seed_sd = pd.read_csv(results / "training_seed_sd.csv").fd_sd
    for name, value in (("median", seed_sd.median()), ("min", seed_sd.min()), ("max", seed_sd.max())):
        add(f"training seeds fd sd {name}", value, f"training_seed_sd.csv ({len(seed_sd)} variants of 02-05)")
    sampler_rows = pd.read_csv(results / "samplers.csv")
    means = sampler_rows.groupby(["model", "sampler", "steps", "blur"], sort=False)[
        ["fd", "fd_resized", "precision", "recall", "confidence", "gradient_energy"]].mean()
    for (model, sampler, steps, blur), row in means.iterrows():
        if sampler == "real test images" or (sampler in ("heun", "euler_maruyama") and steps in (5, 50)) or (
                sampler, steps) == ("dpmpp_2m", 20):
            name = sampler if sampler == "real test images" else f"{sampler} {steps}"
            for metric, value in row.items():
                add(f"{model}: {name} blur {blur:g} {metric}", value, "samplers.csv, mean over eval seeds")
    return pd.DataFrame(rows)


def figure(results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "font.size": 7, "axes.titlesize": 7,
                         "axes.labelsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7})
    degradations = pd.read_csv(results / "degradations.csv")
    floor = pd.read_csv(results / "floor.csv")
    eval_noise = pd.read_csv(results / "eval_noise.csv")
    seed_sd = pd.read_csv(results / "training_seed_sd.csv")
    sampler_rows = pd.read_csv(results / "samplers.csv")

    fig, axes = plt.subplots(2, 4, figsize=(7, 4.3), layout="constrained")
    colours = dict(zip(DEGRADATIONS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    # Top row: each metric against the normalised strength of every degradation, 16x16 at n=500.
    picked = degradations[(degradations["size"] == 16) & (degradations.n == 500)]
    for ax, metric in zip(axes[0], ("fd", "fd_resized", "precision", "recall")):
        for name, group in picked.groupby("degradation", sort=False):
            stats = group.groupby("strength")[metric].agg(["mean", "std"])
            x = stats.index / stats.index.max()
            ax.errorbar(x, stats["mean"], yerr=stats["std"], color=colours[name], marker="o", markersize=2,
                        linewidth=0.8, capsize=1.5, label=name)
        ax.set_title(f"{metric} (16x16, n=500)")
        ax.set_xlabel("strength / strongest level")
        if metric.startswith("fd"):
            ax.set_yscale("log")
    axes[0, 0].set_ylabel("FD-clf (log)")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper center", ncol=6, frameon=False,
               handlelength=1.2, columnspacing=1.0)
    # Floor against n, both sizes, with the draws' sd.
    ax = axes[1, 0]
    for (size, metric), style in {(16, "fd"): "C0", (16, "fd_resized"): "C1", (32, "fd"): "C2"}.items():
        stats = floor[floor["size"] == size].groupby("n")[metric].agg(["mean", "std"])
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", markersize=2, capsize=1.5,
                    color=style, label=f"{metric}, {size}x{size}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(FLOOR_NS, [str(n) for n in FLOOR_NS], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("n (real test images)")
    ax.set_ylabel("FD-clf, real vs train")
    ax.set_title("real-vs-real floor")
    ax.legend(frameon=False, fontsize=7, loc="center right")
    # Evaluation-seed sd against the training-seed sd of the committed rows.
    ax = axes[1, 1]
    ax.hist(seed_sd.fd_sd.dropna(), bins=12, color="0.6", label="training seeds\n(02-05 cpu rows)")
    for n, group in eval_noise.groupby("n"):
        ax.axvline(group.fd.std(ddof=1), color="C3" if n == 500 else "C4", linestyle="-" if n == 500 else "--",
                   label=f"eval seeds, n={n}")
    ax.set_xlabel("sd of FD-clf")
    ax.set_ylabel("variants")
    ax.set_title("evaluation vs seed noise")
    ax.legend(frameon=False, fontsize=7)
    # Samplers: both references' FD against gradient energy (high-frequency content), real images marked.
    for ax, metric in zip(axes[1, 2:], ("fd", "fd_resized")):
        for (model, blur), group in sampler_rows[sampler_rows.sampler != "real test images"].groupby(["model", "blur"]):
            if blur:
                continue
            mean = group.groupby(["sampler", "steps"])[[metric, "gradient_energy"]].mean()
            ax.scatter(mean.gradient_energy, mean[metric], s=8, label=model.split(" (")[0].replace("IU-ViT ", ""),
                       marker="o" if "long" not in model else "s")
            for (sampler, steps), row in mean.iterrows():
                if (sampler, steps) in (("heun", 5), ("heun", 50), ("euler_maruyama", 5)):
                    name = sampler.replace("euler_maruyama", "EM")
                    ax.annotate(f"{name} {steps}", (row.gradient_energy, row[metric]), fontsize=7,
                                xytext=(-3, 3), textcoords="offset points", ha="right")
        real = sampler_rows[sampler_rows.sampler == "real test images"].iloc[0]
        ax.scatter([real.gradient_energy], [real[metric]], marker="*", s=30, color="k", label="real test")
        ax.set_xlabel("gradient energy")
        ax.set_title(f"samplers: {metric} (n=500)")
        ax.set_xscale("log")
    axes[1, 3].set_yscale("log")
    axes[1, 3].legend(frameon=False, fontsize=7, loc="lower right")
    out = results / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"fd_validation.{ext}" for ext in ("pdf", "png")]
    for path in paths:
        fig.savefig(path, dpi=200)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "fd_validation")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "fd_validation",
                        help="where the two models are trained once and read back")
    stages = ("degradations", "floor", "eval_noise", "training_seed_sd", "samplers", "summary", "figure")
    parser.add_argument("--stages", nargs="+", choices=stages, default=list(stages))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    run = {"degradations": stage_degradations, "floor": stage_floor, "training_seed_sd": stage_training_seed_sd,
           "eval_noise": lambda: stage_eval_noise(args.runs), "samplers": lambda: stage_samplers(args.runs),
           "summary": lambda: summary(args.out)}
    for stage in args.stages:
        if stage == "figure":
            print("wrote", *figure(args.out))
            continue
        start = time.perf_counter()
        frame = run[stage]()
        frame.to_csv(args.out / f"{stage}.csv", index=False, float_format="%.6g")
        if stage == "degradations":
            verdicts(frame).to_csv(args.out / "verdicts.csv", index=False, float_format="%.6g")
        print(f"{stage}: {len(frame)} rows in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
