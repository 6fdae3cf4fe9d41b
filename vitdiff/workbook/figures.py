"""Figures of the workbook: one style, sample grids, the ablation figures."""
from __future__ import annotations

from pathlib import Path

import torch

from .profiles import LOSS_SIGMAS, Profile, fd_label, protocol, sigma_column


def show_conclusion(table) -> None:
    """Display a notebook's verdict rows as its closing, generated statement."""
    from IPython.display import Markdown, display

    from ..findings import conclusion_markdown

    display(Markdown(conclusion_markdown(table)))


def plot_findings(results, curves, table, profile: Profile, out_dir: Path, name: str, *, reference: str):
    """The figure every ablation notebook shows: held-out loss by noise level relative to ``reference`` (mean
    over seeds of the paired difference), the learning curves, and each comparison's paired difference with its
    95% interval and per-seed points. Saved as ``name`` (PDF and PNG); returns the figure."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from ..findings import paired_differences

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    by_sigma = []
    for variant in dict.fromkeys(results["variant"]):
        for sigma in LOSS_SIGMAS:
            diffs = paired_differences(results, sigma_column(sigma), variant, reference)
            by_sigma += [{"variant": variant, "sigma": sigma, "diff": d} for d in diffs]
    sns.lineplot(data=pd.DataFrame(by_sigma), x="sigma", y="diff", hue="variant", marker="o", errorbar=("ci", 95),
                 ax=axes[0])
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set(xscale="log", xlabel="noise level sigma", ylabel=f"held-out loss minus {reference}",
                title="where each arm wins (paired, mean and 95% CI)")
    final = results.assign(step=profile.steps)[["variant", "seed", "step", "loss"]]
    sns.lineplot(data=pd.concat([curves[["variant", "seed", "step", "loss"]], final]), x="step", y="loss",
                 hue="variant", errorbar=("ci", 95), ax=axes[1], legend=False)
    axes[1].set(yscale="log", ylabel="held-out loss (mean over sigma)", title="learning curves")
    rows = list(table.itertuples())
    for y, row in enumerate(rows):
        arm, ref = row.comparison.split(" - ")
        points = paired_differences(results, row.metric, arm, ref)
        axes[2].errorbar(row.mean_diff, y, xerr=[[row.mean_diff - row.ci_low], [row.ci_high - row.mean_diff]],
                         fmt="o", color={"supported": "tab:green", "contradicted": "tab:red"}.get(row.verdict, "grey"))
        axes[2].scatter(points, [y] * len(points), marker="|", color="black", s=60)
    axes[2].axvline(0, color="black", lw=0.8)
    axes[2].set_yticks(range(len(rows)), [f"{r.comparison} ({r.metric})" for r in rows], fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set(xlabel="paired difference (arm - reference)", title="comparisons: mean, 95% CI, seeds")
    axes[0].legend(fontsize=6)
    fig.suptitle(protocol(profile), fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, name)
    return fig


def plot_quality_vs_gflops(results, profile: Profile, out_dir: Path, name: str):
    """Held-out loss and FD of every run against the model's GFLOPs (log scale)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in zip(axes, ["loss", "fd"], ["held-out loss (mean over sigma)", fd_label(profile)]):
        sns.scatterplot(data=results, x="gflops", y=metric, hue="variant", style="variant", ax=ax, s=50)
        ax.set(xscale="log", xlabel="GFLOPs per image (DiT convention)", ylabel=label)
        ax.legend(fontsize=6)
    fig.suptitle(f"quality vs compute\n{protocol(profile)}", fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, name)
    return fig


# -- figures --------------------------------------------------------------------------------------
def paper_style() -> None:
    """One look for every figure: seaborn's paper context, white grid, colour-blind palette."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight",
                         "axes.titlesize": 9, "pdf.fonttype": 42})


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.pdf`` and ``name.png`` (vector for papers, raster for the README)."""
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png"]
    for path in paths:
        fig.savefig(path)
    return paths


def check_outputs(out_dir: Path, figures: list[str]) -> list[Path]:
    """The files a notebook promises: each figure as PDF and PNG, and the raw results. Raises if one is missing."""
    expected = [out_dir / f"{name}.{ext}" for name in figures for ext in ("pdf", "png")]
    expected += [out_dir / "results.csv", out_dir / "results.json"]
    missing = [str(path) for path in expected if not path.is_file() or path.stat().st_size == 0]
    if missing:
        raise FileNotFoundError(f"the notebook did not write: {missing}")
    return expected


def show_grid(images: torch.Tensor, *, nrow: int, title: str, ax=None):
    """Images in [-1, 1] as one grid on a matplotlib axis; returns the figure."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    grid = make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6 * grid.shape[1] / grid.shape[2]))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return ax.figure


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0, 0, ..., 1, 1, ...: ``per_class`` of each class in a row, for :func:`show_class_rows`."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def show_class_rows(images: torch.Tensor, labels: torch.Tensor, *, dataset: str, title: str):
    """One row per class (samples drawn with :func:`class_labels`): the class name on the left, on the right how
    many of the row the data set's classifier (:mod:`vitdiff.metrics`) labels as that class."""
    from torchvision.datasets import FashionMNIST

    from ..metrics import classifier_accuracy

    names = {"fashion-mnist": FashionMNIST.classes}.get(dataset)  # else the label number
    classes = labels.unique(sorted=True)
    per_class = len(labels) // len(classes)
    if not torch.equal(labels, class_labels(len(classes), per_class)):
        raise ValueError("show_class_rows needs labels from class_labels(num_classes, per_class)")
    fig = show_grid(images, nrow=per_class, title=title)
    ax = fig.axes[0]
    size, width = images.shape[-1], per_class * (images.shape[-1] + 1) + 1
    for row, label in enumerate(classes.tolist()):
        rows = labels == label
        correct = round(classifier_accuracy(images[rows], labels[rows], dataset=dataset) * per_class)
        y = 1 + row * (size + 1) + size / 2
        ax.text(-1, y, names[label] if names else str(label), ha="right", va="center", fontsize=8)
        ax.text(width + 1, y, f"{correct}/{per_class}", ha="left", va="center", fontsize=8)
    return fig
