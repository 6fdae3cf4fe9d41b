"""Figures of the workbook: the figures of every notebook's results files, sample grids, the style's entry points.

:func:`notebook_figures` draws a notebook's figures from its committed results files alone
(``experiments/results/<notebook>/<profile>.csv``, ``<profile>_curves.csv``, its rows of ``verdicts.csv`` and the
sample grids its runs filed), in the one style of :mod:`vitdiff.workbook.style`; ``python -m vitdiff.report
--figures`` runs it for every real profile, and ``--check`` fails when a committed figure is missing or stale.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import UserError
from . import style
from .profiles import LOSS_SIGMAS, REPO_ROOT, Profile, fd_label, protocol, sigma_column
from .runs import slug
from .style import ONE_COLUMN, TWO_COLUMN, arm_style


def show_conclusion(table) -> None:
    """Display a notebook's verdict rows as its closing, generated statement."""
    from IPython.display import Markdown, display

    from ..findings import conclusion_markdown

    display(Markdown(conclusion_markdown(table)))


# -- the figures of a notebook's results files ----------------------------------------------------
# The arm every other arm of a notebook is measured against (the ``reference`` of its plot_findings call).
REFERENCES = {"02_patch_size_ablation": "p4", "03_ascend_ablation": "enc 4 / dec 3",
              "04_skip_connections": "skip: concat_linear", "05_vit_vs_unet": "IU-ViT"}
METRIC_LABELS = {"loss": "held-out loss (mean over σ)"}


@dataclass
class ResultsFiles:
    """What a notebook filed for one profile: per-run rows, learning curves, verdict rows, protocol line."""
    notebook: str
    profile: str
    runs: "pd.DataFrame"
    curves: "pd.DataFrame | None"
    verdicts: "pd.DataFrame"
    protocol: str
    inputs: list[Path]

    @property
    def fd_name(self) -> str:
        """The Fréchet metric as the protocol names it (e.g. ``FD-fmnist-clf[729629]@500``), else ``FD``."""
        found = re.search(r"\b(FI?D[^\s@]*@\S+)", self.protocol)
        return found.group(1) if found else "FD"

    def style(self, arm: str) -> style.ArmStyle:
        """An arm's look; a sampler notebook's arms ("<sampler> <n> steps") take their sampler's."""
        if "sampler" in self.runs:
            arm = self.runs.loc[self.runs["variant"] == arm, "sampler"].iloc[0]
        return arm_style(arm)

    def label(self, metric: str) -> str:
        return {"fd": self.fd_name}.get(metric) or METRIC_LABELS.get(metric, metric.replace("loss@", "loss at σ="))


def read_results(results: Path, notebook: str, profile: str) -> ResultsFiles:
    """The files of ``results/<notebook>/<profile>*`` and the notebook's rows of ``results/verdicts.csv``."""
    import pandas as pd

    folder = results / notebook
    runs_file, curves_file = folder / f"{profile}.csv", folder / f"{profile}_curves.csv"
    protocol_file, verdicts_file = folder / f"{profile}.json", results / "verdicts.csv"
    if not runs_file.is_file():
        raise UserError(f"no results file {runs_file}: run the notebook with profile {profile} first")
    verdicts = pd.read_csv(verdicts_file) if verdicts_file.is_file() else pd.DataFrame(columns=["notebook", "profile"])
    verdicts = verdicts[(verdicts["notebook"] == notebook) & (verdicts["profile"] == profile)]
    inputs = [f for f in (runs_file, curves_file, protocol_file, verdicts_file) if f.is_file()]
    return ResultsFiles(notebook, profile, pd.read_csv(runs_file),
                        pd.read_csv(curves_file) if curves_file.is_file() else None, verdicts.reset_index(drop=True),
                        json.loads(protocol_file.read_text())["protocol"] if protocol_file.is_file() else "", inputs)


def _verdict_points(files: ResultsFiles) -> list[dict]:
    """Every interval the verdicts state, primary and (where the file has one) secondary, one dict each."""
    points = []
    for row in files.verdicts.to_dict("records"):
        points.append({**row, "role": "primary"})
        secondary = row.get("secondary_metric")
        if isinstance(secondary, str) and secondary:
            points.append({**row, "role": "secondary", "metric": secondary,
                           **{key: row[f"secondary_{key}"] for key in ("mean_diff", "ci_low", "ci_high", "verdict")}})
    return points


def _draw_verdict_row(ax, y: int, verdict: dict, seeds, look: style.ArmStyle, note: str) -> None:
    """One verdict at height ``y``: each seed's difference (tick), the verdict's interval (bar), its estimate
    (marker) and ``note`` right of the axes."""
    ax.scatter(seeds, [y] * len(seeds), marker="|", s=30, color="#555555", linewidths=0.8, zorder=2)
    low, high = verdict["ci_low"], verdict["ci_high"]
    if math.isfinite(low) and math.isfinite(high):
        ax.hlines(y, low, high, color=look.colour, lw=1.6, zorder=3)
    ax.plot(verdict["mean_diff"], y, marker=look.marker, color=look.colour, markeredgecolor="black",
            markeredgewidth=0.5, ms=5, ls="none", zorder=4)
    ax.annotate(note, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=7)


def _label_verdict_rows(ax, labels: list[str], x_label: str, fontsize: float | None = None) -> None:
    """The axes of :func:`_draw_verdict_row`'s rows: zero marked, one labelled row a verdict, top to bottom."""
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(range(len(labels)), labels, **({} if fontsize is None else {"fontsize": fontsize}))
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel(x_label)
    ax.grid(axis="y", visible=False)


def plot_comparisons(files: ResultsFiles):
    """Each comparison's mean paired difference (arm - reference) with the verdict's own 95% interval and the
    per-seed differences, one panel per metric (a loss and an FD never share an axis), the verdict on the right."""
    from ..findings import paired_differences

    points = _verdict_points(files)
    metrics = list(dict.fromkeys(p["metric"] for p in points))
    counts = [sum(p["metric"] == m for p in points) for m in metrics]
    fig, axes = style.figure(TWO_COLUMN, 0.9 + sum(0.24 * c + 0.45 for c in counts), nrows=len(metrics),
                             squeeze=False, gridspec_kw={"height_ratios": [c + 1.5 for c in counts]})
    for ax, metric in zip(axes[:, 0], metrics):
        mine = [p for p in points if p["metric"] == metric]
        for y, point in enumerate(mine):
            arm, reference = point["comparison"].split(" - ", 1)
            runs = files.runs
            if _is_number(point.get("steps")) and "steps" in runs:  # the runs of the verdict's budget
                runs = runs[runs["steps"] == point["steps"]]
                if not len(runs) and files.curves is not None:  # an earlier budget: the runs' pause there
                    runs = files.curves[files.curves["step"] == point["steps"]]
            budget = f", {int(point['steps'])} steps" if _is_number(point.get("steps")) else ""
            side = "" if point["role"] == "primary" else " (secondary)"
            _draw_verdict_row(ax, y, point, paired_differences(runs, metric, arm, reference), files.style(arm),
                              f"{point['verdict']}{side} ({point['signs']}{budget})")
        _label_verdict_rows(ax, [p["comparison"] for p in mine], f"arm − reference: {files.label(metric)}")
    fig.suptitle("mean paired difference (marker), the verdict's 95% interval (bar), each seed (tick)")
    return fig


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _log_ticks(ax, ticks) -> None:
    """A log x axis labelled at ``ticks`` as plain numbers (no minor labels that collide)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_minor_locator(NullLocator())


def _arms(runs) -> list[str]:
    return list(dict.fromkeys(runs["variant"]))


def _outside_legend(fig, axes, arms: list[str], *, lines: bool) -> None:
    """One legend for the figure, right of the panels, an entry per arm in its colour and marker."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=arm_style(a).colour, marker=arm_style(a).marker, ls="-" if lines else "none",
                      label=a) for a in arms]
    fig.legend(handles=handles, loc="outside right upper")


def plot_loss_by_sigma(files: ResultsFiles, reference: str):
    """EDM's loss-by-noise-level view: each arm's held-out loss at every σ (mean over seeds), and the paired
    difference to ``reference`` at every σ with its 95% t-interval."""
    from ..findings import Comparison, compare

    sigmas = [s for s in LOSS_SIGMAS if sigma_column(s) in files.runs]
    arms = _arms(files.runs)
    fig, (absolute, relative) = style.figure(TWO_COLUMN, 2.5, ncols=2)
    for arm in arms:
        look = arm_style(arm)
        rows = files.runs[files.runs["variant"] == arm]
        absolute.plot(sigmas, [rows[sigma_column(s)].mean() for s in sigmas], color=look.colour,
                      marker=look.marker, ms=3)
        if arm == reference or reference not in arms:  # no reference filed yet (a campaign under way): no pairs
            continue
        found = [compare(files.runs, Comparison("", "", arm, reference, sigma_column(s))) for s in sigmas]
        relative.plot(sigmas, [f["mean_diff"] for f in found], color=look.colour, marker=look.marker, ms=3)
        relative.fill_between(sigmas, [f["ci_low"] for f in found], [f["ci_high"] for f in found],
                              color=look.colour, alpha=0.12, lw=0)
    relative.axhline(0, color=arm_style(reference).colour, lw=1.0, ls="--")
    for ax in (absolute, relative):
        _log_ticks(ax, sigmas)
        ax.set_xlabel("noise level σ")
    absolute.set_ylabel("held-out loss (mean over seeds)")
    relative.set_ylabel(f"loss − {reference}\n(paired, mean and 95% CI)")
    _outside_legend(fig, [absolute, relative], arms, lines=True)
    return fig


def plot_learning_curves(files: ResultsFiles):
    """Held-out loss during training (mean over seeds, one thin line per seed) and, marked, each arm's loss at
    every budget the verdicts judge (mean and 95% t-interval over seeds). Every point is on the same held-out
    images."""
    from scipy import stats

    arms = _arms(files.runs)
    budgets = sorted({int(b) for b in files.verdicts.get("steps", files.runs["steps"]) if _is_number(b)})
    fig, ax = style.figure(TWO_COLUMN, 2.6)
    for index, arm in enumerate(arms):
        look = arm_style(arm)
        runs = files.runs[files.runs["variant"] == arm]
        curve = files.curves[files.curves["variant"] == arm] if files.curves is not None else runs.iloc[:0]
        if len(curve):
            for _, seed in curve.groupby("seed"):
                ax.plot(seed["step"], seed["loss"], color=look.colour, lw=0.4, alpha=0.35)
            mean = curve.groupby("step")["loss"].mean()
            ax.plot(mean.index, mean.values, color=look.colour, lw=1.2)
        for step in budgets:
            rows = runs[runs["steps"] == step] if len(runs[runs["steps"] == step]) else curve[curve["step"] == step]
            if not len(rows):
                continue
            half = (stats.t.ppf(0.975, len(rows) - 1) * rows["loss"].std(ddof=1) / math.sqrt(len(rows))
                    if len(rows) > 1 else 0.0)
            x = step * (1 + 0.012 * (index - (len(arms) - 1) / 2))  # side by side, not on top of each other
            ax.errorbar(x, rows["loss"].mean(), yerr=half, color=look.colour, marker=look.marker, ms=4,
                        markeredgecolor="black", markeredgewidth=0.4, capsize=1.5, lw=0.8)
    for budget in budgets:
        ax.axvline(budget, color="black", lw=0.5, ls=":")
    ax.set(xlabel="optimizer step", ylabel="held-out loss (mean over σ)")
    ax.set_title(f"lines: mean and each seed\nmarkers: the verdicts' budgets ({', '.join(map(str, budgets))} steps): "
                 "mean, 95% CI over seeds", loc="left")
    _outside_legend(fig, [ax], arms, lines=True)
    return fig


def plot_quality_vs_gflops(results, profile: Profile | None = None, out_dir: Path | None = None,
                           name: str | None = None, *, metrics=None):
    """Held-out loss and FD of every arm against its GFLOPs per image: the mean over seeds (large,
    edged marker) and each seed (small hollow marker), one panel per metric. Saved as ``name`` when given."""
    metrics = metrics or {"loss": METRIC_LABELS["loss"], "fd": fd_label(profile) if profile else "FD"}
    metrics = {m: label for m, label in metrics.items() if m in results}
    arms = _arms(results)
    fig, axes = style.figure(TWO_COLUMN, 2.5, ncols=len(metrics), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics.items()):
        for arm in arms:
            look, rows = arm_style(arm), results[results["variant"] == arm]
            ax.scatter(rows["gflops"], rows[metric], marker=look.marker, s=12, facecolors="none",
                       edgecolors=look.colour, linewidths=0.7, alpha=0.8)
            ax.scatter(rows["gflops"].mean(), rows[metric].mean(), marker=look.marker, s=45, color=look.colour,
                       edgecolors="black", linewidths=0.6, zorder=3)
        _gflops_axis(ax, results["gflops"])
        ax.set(xlabel="GFLOPs per image (DiT convention)", ylabel=label)
    fig.suptitle("filled: mean over seeds; hollow: one seed")
    _outside_legend(fig, axes[0], arms, lines=False)
    if out_dir is not None:
        save_figure(fig, out_dir, name)
    return fig


def _gflops_axis(ax, gflops) -> None:
    """GFLOPs on a log axis labelled at 1, 2, 5 x 10^k where they span a factor of 3 or more, else on a linear
    axis with a few plain ticks (a log axis over a narrow range labels its minor ticks on top of each other)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plain = FuncFormatter(lambda x, _: f"{x:.3g}")
    if gflops.max() >= 3 * gflops.min():
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.margins(x=0.15)
    ax.xaxis.set_major_formatter(plain)


def sample_file(results: Path, notebook: str, profile: str, arm: str, seed: int) -> Path:
    """Where a run files its sample grid: ``<results>/<notebook>/samples/<profile>/<arm-slug>_seed<seed>.png``."""
    return results / notebook / "samples" / profile / f"{slug(arm)}_seed{seed}.png"


def save_samples(images: torch.Tensor, path: Path, *, nrow: int = 8) -> Path:
    """Images in [-1, 1] as one PNG grid (1 px white gaps), for :func:`sample_file`."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=1, pad_value=1.0)
    return path


def plot_samples(files: ResultsFiles, results: Path, grid: list[list[str]], seed: int):
    """The sample grids of the arms in ``grid`` (rows of arm names) at ``seed``: every arm from the same initial
    noise. A missing file is an empty panel that says so."""
    import matplotlib.image as mpimg

    ncols = max(len(row) for row in grid)
    images = {arm: mpimg.imread(path) for row in grid for arm in row
              if (path := sample_file(results, files.notebook, files.profile, arm, seed)).is_file()}
    aspect = min(image.shape[0] / image.shape[1] for image in images.values())
    panel = TWO_COLUMN / ncols
    fig, axes = style.figure(TWO_COLUMN, len(grid) * (panel * aspect + 0.22) + 0.25, nrows=len(grid),
                             ncols=ncols, squeeze=False)
    for ax_row, arms in zip(axes, grid):
        for ax, arm in zip(ax_row, arms + [None] * (ncols - len(arms))):
            ax.set_axis_off()
            if arm is None:
                continue
            if arm in images:
                ax.imshow(images[arm], interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(arm, color=files.style(arm).colour)
    fig.suptitle(f"seed {seed}: every panel from the same model seed and the same initial noise")
    return fig


SAMPLERS_NOTEBOOK = "06_samplers"
TEXT_NOTEBOOK = "07_text_to_image"  # figures from its alignment rows; its prompt grids need the model


def plot_fd_vs_nfe(files: ResultsFiles):
    """Each sampler's FD against its number of model calls: the mean over seeds joined by a line, each seed a
    small hollow marker."""
    fig, ax = style.figure(ONE_COLUMN, 3.0)
    for sampler, rows in files.runs.groupby("sampler", sort=False):
        look = arm_style(sampler)
        mean = rows.groupby("nfe")["fd"].mean()
        ax.scatter(rows["nfe"], rows["fd"], marker=look.marker, s=8, facecolors="none", edgecolors=look.colour,
                   linewidths=0.5, alpha=0.7)
        ax.plot(mean.index, mean.values, color=look.colour, marker=look.marker, ms=4, label=sampler,
                ls="--" if sampler == "euler" else "-")
    _log_ticks(ax, [5, 10, 20, 50, 100])
    ax.set(xlabel="model calls per sample (NFE)", ylabel=files.fd_name)
    fig.legend(loc="outside lower center", ncol=3)
    return fig


def notebook_figures(notebook: str, profile: str, results: Path | None = None) -> list[Path]:
    """Every figure of ``notebook``'s ``profile``, drawn from its results files alone, as
    ``<results>/<notebook>/figures/<profile>_<name>.{pdf,png}``, with a record of the inputs they were drawn from
    (``<profile>_figures.json``, read by :func:`stale_figures`). Returns the files written."""
    import matplotlib.pyplot as plt

    results = Path(results) if results is not None else REPO_ROOT / "experiments" / "results"
    files = read_results(results, notebook, profile)
    out = results / notebook / "figures"
    written, samples = [], _sample_layout(files)
    for name, draw in _figure_makers(files, results, samples).items():
        fig = draw()
        written += style.save(fig, out, f"{profile}_{name}")
        plt.close(fig)
    record = {"inputs": _digests(files.inputs + _sample_files(files, results, samples), files),
              "code": _code_digest(),
              "figures": {path.name: _sha256(path.read_bytes()) for path in written},
              "samples_missing": [str(path.relative_to(results))
                                  for path in _sample_files(files, results, samples, present=False)]}
    (out / f"{profile}_figures.json").write_text(json.dumps(record, indent=1) + "\n")
    return written


def plot_verdicts_by_budget(files: ResultsFiles):
    """Each comparison's paired difference against training steps: the mean and the verdict's own 95% interval
    at every budget it was judged at, one row per comparison and one column per metric (the primary, then the
    secondary), the verdict's initial beside each point (S supported, C contradicted, U unresolved, E equivalent,
    D descriptive). Where a verdict changes with the budget, this is the picture of it."""
    points = [p for p in _verdict_points(files) if _is_number(p.get("steps"))]
    comparisons = list(dict.fromkeys(p["comparison"] for p in points))
    metrics = list(dict.fromkeys(p["metric"] for p in points))
    budgets = sorted({int(p["steps"]) for p in points})
    fig, axes = style.figure(TWO_COLUMN, 0.5 + 1.15 * len(comparisons), nrows=len(comparisons), ncols=len(metrics),
                             squeeze=False, sharex=True)
    for row, comparison in enumerate(comparisons):
        look = files.style(comparison.split(" - ", 1)[0])
        for column, metric in enumerate(metrics):
            ax = axes[row, column]
            mine = sorted((p for p in points if p["comparison"] == comparison and p["metric"] == metric),
                          key=lambda p: p["steps"])
            steps = [p["steps"] for p in mine]
            means = [p["mean_diff"] for p in mine]
            low = [m - p["ci_low"] if math.isfinite(p["ci_low"]) else 0.0 for m, p in zip(means, mine)]
            high = [p["ci_high"] - m if math.isfinite(p["ci_high"]) else 0.0 for m, p in zip(means, mine)]
            ax.errorbar(steps, means, yerr=[low, high], color=look.colour, marker=look.marker, ms=4, lw=1.0,
                        capsize=2, markeredgecolor="black", markeredgewidth=0.4)
            for point in mine:
                ax.annotate(str(point["verdict"])[:1].upper(), (point["steps"], point["mean_diff"]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.axhline(0, color="black", lw=0.6)
            _log_ticks(ax, budgets)
            if row == 0:
                ax.set_title(files.label(metric), loc="left")
            if column == 0:
                ax.set_ylabel(comparison.replace(" - ", "\n− "), fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer steps (budget)")
    fig.suptitle("arm − reference by training budget: mean paired difference and the verdict's 95% interval")
    return fig


_SPLIT_TITLES = {"val": "val: new scenes, seen pairs", "test": "test: held-out colour-shape pairs"}
# The baselines an alignment panel draws beside the own-caption accuracy: rate column, line style, legend label.
_ALIGNMENT_BASELINES = (("shuffled_baseline", ":", "shuffled captions"),
                        ("shape_shuffled_baseline", "--", "shape word shuffled"))


def _alignment_panels(frame, x: str, *, x_label: str, y_label: str, empty_at_zero: bool):
    """One panel per split: each attribute's accuracy against its own captions by ``x``, from the counts pooled
    over the rows at each ``x`` (the counts the rate verdicts test), with its 95% Wilson interval, beside the same
    samples judged against the baselines that were filed (:data:`_ALIGNMENT_BASELINES`) and, with
    ``empty_at_zero``, the empty caption's samples (hollow marker at x = 0)."""
    from matplotlib.lines import Line2D
    from statsmodels.stats.proportion import proportion_confint

    fig, axes = style.figure(style.TWO_COLUMN, 3.0, ncols=2, sharey=True)
    # A baseline's rate is a mean over derangements: pooled as rate x n, unrounded, like the rate verdicts pool it,
    # over the rows that have it.
    baselines = [column for column, _, _ in _ALIGNMENT_BASELINES if column in frame]
    frame = frame.assign(**{column: frame[column] * frame["n_judged"] for column in baselines},
                         **{f"{column}_n": frame["n_judged"].where(frame[column].notna(), 0) for column in baselines})
    counts = ["k", "n_judged", *baselines, *(f"{column}_n" for column in baselines),
              *(["k_empty"] if empty_at_zero else [])]
    drawn = set()
    for ax, split in zip(axes, ("val", "test")):
        rows = frame[frame["split"] == split]
        for name, look in style.ATTRIBUTE_LOOKS.items():
            pooled = rows[rows["attribute"] == name].groupby(x)[counts].sum(min_count=1)
            if not len(pooled):
                continue  # held_out_shape on val (no held-out objects), or rows filed before it existed
            accuracy = pooled["k"] / pooled["n_judged"]
            low, high = proportion_confint(pooled["k"], pooled["n_judged"], alpha=0.05, method="wilson")
            # At 0 or all correct a Wilson bound equals the rate up to rounding, which can leave it a hair outside.
            error = [(accuracy - low).clip(lower=0), (high - accuracy).clip(lower=0)]
            ax.errorbar(pooled.index, accuracy, yerr=error, color=look.colour,
                        marker=look.marker, ms=3.5, capsize=2, lw=1.0)
            for column, line_style, _ in _ALIGNMENT_BASELINES:
                if column in pooled and pooled[column].notna().any():
                    ax.plot(pooled.index, pooled[column] / pooled[f"{column}_n"], color=look.colour, ls=line_style,
                            lw=1.0)
                    drawn.add(column)
            if empty_at_zero:
                ax.plot([0], [pooled["k_empty"].sum() / pooled["n_judged"].sum()], color=look.colour,
                        marker=look.marker, markerfacecolor="none", ls="none")
        ax.set_title(_SPLIT_TITLES[split], loc="left")
        ax.set_xlabel(x_label)
    axes[0].set_ylabel(y_label)
    handles = [Line2D([], [], color=look.colour, marker=look.marker, label=name)
               for name, look in style.ATTRIBUTE_LOOKS.items() if name in set(frame["attribute"])]
    handles.append(Line2D([], [], color="grey", marker="o", label="own caption, 95% CI"))
    handles += [Line2D([], [], color="grey", ls=line_style, label=label)
                for column, line_style, label in _ALIGNMENT_BASELINES if column in drawn]
    if empty_at_zero:
        handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", ls="none",
                              label="empty caption (at w = 0)"))
    fig.legend(handles=handles, loc="outside right lower")
    return fig


def plot_alignment(frame, protocol: str):
    """Notebook 07's seeds pooled: each attribute's accuracy by guidance (:func:`_alignment_panels`), with the
    empty caption's samples at w = 0. ``protocol``: the line the figure carries
    (:func:`vitdiff.text_workbook.text_protocol`, or the results file's)."""
    fig = _alignment_panels(frame, "guidance", x_label="guidance w (DiT convention)",
                            y_label="judge accuracy (pooled over seeds)", empty_at_zero=True)
    fig.suptitle(textwrap.fill(protocol, 95))
    return fig


def plot_rate_verdicts(arms, verdicts, title: str = ""):
    """Notebook 07's count verdicts seed by seed: each comparison's rate difference (own captions minus its
    baseline) for every seed (tick), the verdict's 95% interval (bar; pooled counts, or where the seeds disagree
    the span that covers every seed's difference, so the bar reaches past the outer ticks) and its estimate
    (marker), the verdict on the right. ``arms``: :func:`vitdiff.text_workbook.alignment_arms` of the rows;
    ``verdicts``: the profile's verdict rows."""
    from ..findings import paired_differences

    rows = verdicts.to_dict("records")
    fig, ax = style.figure(TWO_COLUMN, 0.9 + 0.26 * len(rows))
    labels = []
    for y, row in enumerate(rows):
        arm, reference = row["comparison"].split(" - ", 1)
        labels.append(f"{arm.split(',')[0]} {row['metric']} − {reference.split(': ', 1)[-1]}")
        disagree = " — seeds disagree" if "seeds disagree" in str(row["signs"]) else ""
        _draw_verdict_row(ax, y, row, paired_differences(arms, row["metric"], arm, reference),
                          style.ATTRIBUTE_LOOKS.get(row["metric"], style.UNKNOWN),
                          f"{row['verdict']} ({int(row['n_seeds'])} seeds{disagree})")
    ax.set_xlim(-1.05, 1.05)
    _label_verdict_rows(ax, labels, "accuracy with own captions − with the baseline's captions (same samples)",
                        fontsize=7)
    heading = ("each seed (tick), the verdict's 95% interval (bar: pooled counts; where the seeds disagree, "
               "covering every seed), its estimate (marker)")
    fig.suptitle(textwrap.fill(f"{title}: {heading}" if title else heading, 110))
    return fig


RECIPE_SEARCH = "recipe_search"  # notebook 07's recipe-search rows (experiments/text_recipe_search.py)


def plot_alignment_by_steps(frame, guidance: float = 3.0):
    """The recipe-search run trained to the most budgets (one seed): each attribute's accuracy by training steps
    at ``guidance`` (:func:`_alignment_panels`)."""
    budgets = frame.groupby(["recipe", "seed"])["steps"].nunique()
    recipe, seed = budgets.idxmax()
    run = frame[(frame["recipe"] == recipe) & (frame["seed"] == seed)]
    size = int(run["image_size"].iloc[0])
    title = (f"text recipe search, {size}x{size}, one seed: {recipe}; {int(run['n'].iloc[0])} captions per split, "
             "judged like notebook 07")
    return plot_alignment_by_budget(run, guidance, title)


def plot_alignment_by_budget(frame, guidance: float, title: str):
    """Alignment rows of runs judged at several budgets (``steps``), their seeds pooled: each attribute's accuracy
    by training steps at ``guidance`` (:func:`_alignment_panels`), under ``title``."""
    rows = frame[frame["guidance"] == guidance]
    seeds = sorted(int(seed) for seed in rows["seed"].unique())
    fig = _alignment_panels(rows, "steps", x_label="training steps", empty_at_zero=False,
                            y_label=f"judge accuracy (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}, "
                                    f"w = {guidance:g})")
    fig.suptitle(textwrap.fill(title, 95))
    return fig


def _sample_layout(files: ResultsFiles) -> tuple[list[list[str]], int]:
    """The arms of the sample figure (rows of names) and the seed it shows (the first)."""
    seed = int(min(files.runs["seed"]))
    if files.notebook == TEXT_NOTEBOOK:
        return [], seed  # its samples are prompt grids, drawn by the notebook from the model
    if files.notebook == SAMPLERS_NOTEBOOK:
        return [list(dict.fromkeys(rows["variant"])) for _, rows in files.runs.groupby("sampler", sort=False)], seed
    arms = _arms(files.runs)
    ncols = 4
    return [arms[i:i + ncols] for i in range(0, len(arms), ncols)], seed


def _figure_makers(files: ResultsFiles, results: Path, samples) -> dict:
    if files.notebook == TEXT_NOTEBOOK and files.profile == RECIPE_SEARCH:
        return {"alignment_by_steps": lambda: plot_alignment_by_steps(files.runs)}
    if files.notebook == TEXT_NOTEBOOK:
        from ..text_workbook.verdicts import alignment_arms

        makers = {"alignment_vs_guidance": lambda: plot_alignment(files.runs, files.protocol)}
        if len(files.verdicts):
            makers["verdicts_by_seed"] = lambda: plot_rate_verdicts(alignment_arms(files.runs), files.verdicts,
                                                                    f"notebook 07, profile {files.profile}")
        return makers
    makers = {}
    if len(files.verdicts):
        makers["comparisons"] = lambda: plot_comparisons(files)
        if "steps" in files.verdicts and files.verdicts["steps"].nunique() > 1:
            makers["verdicts_by_budget"] = lambda: plot_verdicts_by_budget(files)
    if files.notebook == SAMPLERS_NOTEBOOK:
        makers["fd_vs_nfe"] = lambda: plot_fd_vs_nfe(files)
    else:
        reference = REFERENCES.get(files.notebook, _arms(files.runs)[0])
        makers["loss_by_sigma"] = lambda: plot_loss_by_sigma(files, reference)
        makers["learning_curves"] = lambda: plot_learning_curves(files)
        if "gflops" in files.runs:
            makers["quality_vs_gflops"] = lambda: plot_quality_vs_gflops(
                files.runs, metrics={"loss": METRIC_LABELS["loss"], "fd": files.fd_name})
    if _sample_files(files, results, samples):
        makers["samples"] = lambda: plot_samples(files, results, *samples)
    return makers


def _sample_files(files: ResultsFiles, results: Path, samples, *, present: bool = True) -> list[Path]:
    """The sample grids the samples figure shows that are filed (``present``), or those that are missing."""
    grid, seed = samples
    paths = [sample_file(results, files.notebook, files.profile, arm, seed) for row in grid for arm in row]
    return [path for path in paths if path.is_file() == present]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digests(inputs: list[Path], files: ResultsFiles) -> dict[str, str]:
    """The inputs' digests; of the shared verdicts file only this notebook's rows count."""
    digests = {path.name: _sha256(path.read_bytes()) for path in inputs if path.name != "verdicts.csv"}
    digests["verdicts"] = _sha256(files.verdicts.to_csv(index=False).encode())
    return digests


def _code_digest() -> str:
    """The figure code's digest: a figure drawn by other code is stale too."""
    here = Path(__file__).parent
    return _sha256(b"".join((here / name).read_bytes() for name in ("figures.py", "style.py")))


def figure_profiles(results: Path) -> list[tuple[str, str]]:
    """Every (notebook, profile) with figures: the real profiles' results files of the notebooks above."""
    found = []
    for notebook in [*REFERENCES, SAMPLERS_NOTEBOOK, TEXT_NOTEBOOK]:
        for table in sorted((results / notebook).glob("*.csv")):
            if "_" not in table.stem and table.stem != "smoke":
                found.append((notebook, table.stem))
    if (results / TEXT_NOTEBOOK / f"{RECIPE_SEARCH}.csv").is_file():
        found.append((TEXT_NOTEBOOK, RECIPE_SEARCH))
    return found


def figures_record(results: Path, notebook: str, profile: str) -> dict | None:
    """What :func:`notebook_figures` last recorded for (notebook, profile): inputs' and figures' digests, the
    sample grids it found missing; None before it ran."""
    path = results / notebook / "figures" / f"{profile}_figures.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stale_figures(results: Path, notebook: str, profile: str) -> list[str]:
    """Why the committed figures of (notebook, profile) are not what the results files give; [] when current."""
    record = figures_record(results, notebook, profile)
    if record is None:
        return [f"{notebook}/figures/{profile}_figures.json is missing: no figures drawn"]
    files = read_results(results, notebook, profile)
    samples = _sample_layout(files)
    problems = []
    if record["inputs"] != _digests(files.inputs + _sample_files(files, results, samples), files):
        problems.append(f"{notebook}/{profile}: the results files changed since the figures were drawn")
    if record["code"] != _code_digest():
        problems.append(f"{notebook}/{profile}: the figure code changed since the figures were drawn")
    for name, digest in record["figures"].items():
        path = results / notebook / "figures" / name
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            problems.append(f"{notebook}/figures/{name} is missing or not the one drawn")
    return problems


def screen_png(path: Path, dpi: int = 100) -> bytes:
    """A figure's 300-dpi PNG at ``dpi`` (a notebook shows that; the file itself stays at print resolution)."""
    from io import BytesIO

    from PIL import Image

    with Image.open(path) as image:
        scale = dpi / style.PNG_DPI
        small = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    buffer = BytesIO()
    small.convert("RGB").quantize(colors=256).save(buffer, format="PNG", optimize=True)  # a palette: small files
    return buffer.getvalue()


def show_figures(paths: list[Path]) -> None:
    """Display in a notebook the PNGs among ``paths`` (e.g. :func:`notebook_figures`'s), each under its name."""
    from IPython.display import Image, display

    for path in (path for path in paths if path.suffix == ".png"):
        print(path.name)
        display(Image(data=screen_png(path)))


# -- the notebooks' earlier calls -----------------------------------------------------------------
def plot_findings(results, curves, table, profile: Profile, out_dir: Path, name: str, *, reference: str):
    """A notebook's findings from its frames: the comparisons (saved as ``name``), loss by noise level
    (``name``_loss_by_sigma) and learning curves (``name``_learning_curves); returns the comparisons figure."""
    import matplotlib.pyplot as plt

    files = ResultsFiles(str(table["notebook"].iloc[0]) if len(table) else "", profile.name, results, curves,
                         table, protocol(profile), [])
    fig = plot_comparisons(files)
    save_figure(fig, out_dir, name)
    for suffix, draw in (("loss_by_sigma", lambda: plot_loss_by_sigma(files, reference)),
                         ("learning_curves", lambda: plot_learning_curves(files))):
        other = draw()
        save_figure(other, out_dir, f"{name}_{suffix}")
        plt.close(other)
    return fig


# -- figures --------------------------------------------------------------------------------------
def paper_style() -> None:
    """The workbook's one figure style (:mod:`vitdiff.workbook.style`) for the figures drawn after it."""
    style.apply()


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.pdf`` and ``name.png`` (vector for papers, raster for the README), as :func:`style.save`."""
    return style.save(fig, out_dir, name)


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
