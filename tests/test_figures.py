"""The figures' specs: print sizes, fonts, one look per arm, files drawn from the results alone and checked."""
from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from vitdiff import report  # noqa: E402
from vitdiff.workbook import figures, style  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(REPO.glob("experiments/results/0[2-6]*/cpu.csv"))
NOTEBOOK = "02_patch_size_ablation"  # a notebook the figures know, with p4 as its reference
ARMS = ("p4", "p2", "p8")
SIGMAS = (0.05, 1.0, 40.0)


def arm_names(csv: Path) -> list[str]:
    """The names a notebook's arms are styled by: the variant, or for the samplers notebook the sampler."""
    frame = pd.read_csv(csv)
    return list(dict.fromkeys(frame["sampler"] if "sampler" in frame else frame["variant"]))


def test_committed_results_exist():
    assert COMMITTED


@pytest.mark.parametrize("csv", COMMITTED, ids=lambda path: path.parent.name)
def test_every_committed_arm_has_its_own_colour_in_its_notebook(csv):
    names = arm_names(csv)
    looks = [style.arm_style(name) for name in names]
    assert style.UNKNOWN not in looks, [n for n, look in zip(names, looks) if look == style.UNKNOWN]
    assert len({look.colour for look in looks}) == len(names)


def test_an_arm_has_one_look_in_every_notebook():
    # The same model under its names in 02, 04 and 05 (identical config and numbers), and 03's ASCEND-H.
    assert style.arm_style("p4") == style.arm_style("skip: concat_linear") == style.arm_style("IU-ViT")
    assert style.arm_style("H: conv blocks + hi-res skip") == style.arm_style("ASCEND-H")
    assert all(target in style.ARMS for target in style.SAME_AS.values())
    looks = [(look.colour.lower(), look.marker) for look in style.ARMS.values()]
    assert len(set(looks)) == len(looks), "two arms share colour and marker"


def _rgb(colour: str):
    return matplotlib.colors.to_rgb(colour)


@pytest.mark.parametrize("csv", COMMITTED, ids=lambda path: path.parent.name)
def test_the_colours_of_a_notebook_are_far_apart(csv):
    # ASCEND-H and the parameter-matched U-Net were two near-identical pinks (RGB distance 0.04).
    colours = [_rgb(style.arm_style(name).colour) for name in arm_names(csv)]
    closest = min(sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5 for x, y in itertools.combinations(colours, 2))
    assert closest > 0.15


def _results(root: Path, *, samples: bool = False) -> Path:
    """A tiny notebook's results files: three arms, two seeds, curves and two verdicts (loss, fd)."""
    folder = root / NOTEBOOK
    folder.mkdir(parents=True)
    runs, curves = [], []
    for (index, arm), seed in itertools.product(enumerate(ARMS), (0, 1)):
        losses = {f"loss@{s:g}": 0.5 + 0.1 * index + 0.01 * seed + 0.02 * s for s in SIGMAS}
        runs.append({"variant": arm, "seed": seed, "params_M": 0.5 + index, "gflops": 0.01 * 2 ** index,
                     "steps": 40, "loss": sum(losses.values()) / len(SIGMAS), **losses,
                     "fd": 100.0 + 10 * index + seed})
        curves += [{"variant": arm, "seed": seed, "step": step, "loss": 1.0 + 0.1 * index - step / 100}
                   for step in (10, 20, 30)]
    pd.DataFrame(runs).to_csv(folder / "cpu.csv", index=False)
    pd.DataFrame(curves).to_csv(folder / "cpu_curves.csv", index=False)
    (folder / "cpu.json").write_text('{"protocol": "tiny; FD-digits-clf[abc]@32 vs train split"}')
    pd.DataFrame([{"notebook": NOTEBOOK, "profile": "cpu", "question": "q", "paper_claim": "", "comparison": c,
                   "metric": m, "n_seeds": 2, "mean_diff": d, "ci_low": d - 1, "ci_high": d + 1, "mde": 1.0,
                   "verdict": "unresolved", "signs": "--"}
                  for c, m, d in (("p2 - p4", "loss", -0.1), ("p2 - p4", "fd", -10.0))]).to_csv(
        root / "verdicts.csv", index=False)
    if samples:
        for arm in ARMS:
            figures.save_samples(torch.rand(4, 1, 8, 8) * 2 - 1, figures.sample_file(root, NOTEBOOK, "cpu", arm, 0))
    return root


def _texts(fig):
    fig.canvas.draw()  # tick labels get their text when drawn
    return [text for text in fig.findobj(matplotlib.text.Text) if text.get_visible() and text.get_text().strip()]


def test_every_figure_is_print_sized_with_fonts_of_7_pt_or_more(tmp_path):
    results = _results(tmp_path, samples=True)
    files = figures.read_results(results, NOTEBOOK, "cpu")
    sampler_runs = pd.DataFrame([{"variant": f"{s} {n} steps", "seed": seed, "sampler": s, "steps": n,
                                  "nfe": n, "fd": 100.0 / n + seed} for s in ("heun", "ddim") for n in (5, 50)
                                 for seed in (0, 1)])
    by_budget = dataclasses.replace(files, verdicts=pd.concat([files.verdicts.assign(steps=steps)
                                                               for steps in (20, 40)], ignore_index=True))
    drawn = [figures.plot_comparisons(files), figures.plot_verdicts_by_budget(by_budget),
             figures.plot_loss_by_sigma(files, "p4"),
             figures.plot_learning_curves(files), figures.plot_quality_vs_gflops(files.runs),
             figures.plot_samples(files, results, [list(ARMS)], 0),
             figures.plot_fd_vs_nfe(figures.ResultsFiles(figures.SAMPLERS_NOTEBOOK, "cpu", sampler_runs, None,
                                                         files.verdicts.iloc[:0], "", [])),
             figures.plot_alignment(pd.DataFrame([{"seed": seed, "split": split, "guidance": w, "attribute": name,
                                           "k": 10 + seed, "n_judged": 32, "k_shuffled": 5, "k_empty": 4}
                                          for seed in (0, 1) for split in ("val", "test") for w in (1.0, 3.0)
                                          for name in style.ATTRIBUTE_LOOKS]), "a protocol line")]
    for fig in drawn:
        assert fig.get_figwidth() in (style.ONE_COLUMN, style.TWO_COLUMN)
        sizes = {text.get_text(): text.get_fontsize() for text in _texts(fig)}
        assert sizes and min(sizes.values()) >= style.MIN_FONT_PT, sizes
    comparisons, budgets = drawn[:2]
    assert len(comparisons.axes) == 2  # loss and FD never share an axis
    assert len(budgets.axes) == 2 and [len(line.get_xdata()) for line in budgets.axes[0].lines][0] == 2


def test_notebook_figures_writes_pdf_with_truetype_fonts_and_300_dpi_png(tmp_path):
    results = _results(tmp_path)
    written = figures.notebook_figures(NOTEBOOK, "cpu", results)
    names = {path.name for path in written}
    for name in ("comparisons", "loss_by_sigma", "learning_curves", "quality_vs_gflops"):
        assert {f"cpu_{name}.pdf", f"cpu_{name}.png"} <= names
    for pdf in (path for path in written if path.suffix == ".pdf"):
        data = pdf.read_bytes()
        assert b"/FontFile2" in data and b"/Type3" not in data and b"/CreationDate" not in data
        width = float(re.search(rb"/MediaBox \[\s*[\d.]+ [\d.]+ ([\d.]+)", data).group(1))
        assert width / 72 in (style.ONE_COLUMN, style.TWO_COLUMN)
    for png in (path for path in written if path.suffix == ".png"):
        assert matplotlib.image.imread(png).shape[1] in (style.ONE_COLUMN * 300, style.TWO_COLUMN * 300)


def test_samples_figure_needs_the_runs_sample_grids(tmp_path):
    results = _results(tmp_path)
    figures.notebook_figures(NOTEBOOK, "cpu", results)
    record = figures.figures_record(results, NOTEBOOK, "cpu")
    assert "cpu_samples.png" not in record["figures"]
    assert record["samples_missing"] == [f"{NOTEBOOK}/samples/cpu/{arm}_seed0.png" for arm in ARMS]
    figures.save_samples(torch.zeros(4, 1, 8, 8), figures.sample_file(results, NOTEBOOK, "cpu", "p8", 0))
    assert figures.stale_figures(results, NOTEBOOK, "cpu")  # a new sample grid is a new input
    figures.notebook_figures(NOTEBOOK, "cpu", results)
    assert "cpu_samples.png" in figures.figures_record(results, NOTEBOOK, "cpu")["figures"]


def test_slug_of_an_arm_name():
    assert figures.slug("enc 4 / dec 3, 1 skip") == "enc-4-dec-3-1-skip"
    assert figures.slug("U-Net (matched FLOPs)") == "u-net-matched-flops"


def test_regenerating_gives_the_same_bytes_and_check_finds_stale_figures(tmp_path, capsys):
    results = _results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    paths = ["--readme", str(readme), "--results", str(results)]
    assert report.main(paths) == 0
    assert report.main(["--check", *paths]) == 1  # no figures yet
    assert "missing" in capsys.readouterr().err
    assert report.main(["--figures", *paths]) == 0
    first = {path: path.read_bytes() for path in (results / NOTEBOOK / "figures").iterdir()}
    assert report.main(["--figures", *paths]) == 0
    assert {path: path.read_bytes() for path in first} == first
    assert report.main(["--check", *paths]) == 0
    curves = results / NOTEBOOK / "cpu_curves.csv"
    curves.write_text(curves.read_text().replace("0.8", "0.7"))
    assert report.main(["--check", *paths]) == 1
    assert "results files changed" in capsys.readouterr().err
    assert report.main(["--figures", *paths]) == 0
    (results / NOTEBOOK / "figures" / "cpu_comparisons.pdf").unlink()
    assert report.main(["--check", *paths]) == 1
    assert "cpu_comparisons.pdf is missing" in capsys.readouterr().err


def test_every_text_attribute_has_one_look():
    from vitdiff.shapes import HELD_OUT_SHAPE
    from vitdiff.text_workbook import ALIGNMENT_METRICS

    assert tuple(style.ATTRIBUTE_LOOKS) == (*ALIGNMENT_METRICS, HELD_OUT_SHAPE)


def test_the_recipe_search_figure_follows_the_run_trained_to_the_most_budgets():
    rows = pd.DataFrame([{"recipe": recipe, "seed": 0, "steps": steps, "split": split, "guidance": 3.0,
                          "attribute": name, "accuracy": 0.1 * index + steps / 1e4, "k": index + steps // 1000,
                          "n_judged": 96, "shuffled_baseline": 0.2,
                          "shape_shuffled_baseline": 0.25 if name == "shape" else float("nan"),
                          "image_size": 64, "n": 96}
                         for recipe, budgets in (("long run", (1200, 2400, 6000)), ("short run", (900,)))
                         for steps in budgets for split in ("val", "test")
                         for index, name in enumerate(style.ATTRIBUTE_LOOKS)])
    fig = figures.plot_alignment_by_steps(rows)
    assert "long run" in fig._suptitle.get_text() and fig.get_figwidth() == style.TWO_COLUMN
    steps = {tuple(line.get_xdata()) for ax in fig.axes[:2] for line in ax.lines if len(line.get_xdata())}
    assert steps == {(1200, 2400, 6000)}  # the short run's single budget is not drawn
    assert min(text.get_fontsize() for text in _texts(fig)) >= style.MIN_FONT_PT


def test_alignment_panels_draw_rates_of_none_and_all_correct():
    # k = 0 and k = n: the Wilson bound meets the rate up to rounding; the error bars must not turn negative.
    rows = pd.DataFrame([{"seed": 0, "split": split, "guidance": w, "attribute": name, "k": k, "n_judged": 96,
                          "k_shuffled": 5, "k_empty": 4}
                         for split in ("val", "test") for w in (1.0, 3.0)
                         for name, k in zip(style.ATTRIBUTE_LOOKS, (0, 96, 95, 1, 48, 96))])
    fig = figures.plot_alignment(rows, "a protocol line")
    assert len(fig.axes) == 2


def test_the_composition_row_is_drawn_on_the_test_panel_alone():
    rows = pd.DataFrame([{"seed": 0, "split": split, "guidance": w, "attribute": name, "k": 40, "n_judged": 96,
                          "k_empty": 4, "shuffled_baseline": 0.3,
                          "shape_shuffled_baseline": 0.3 if "shape" in name else float("nan")}
                         for split in ("val", "test") for w in (1.0, 3.0)
                         for name in [*style.ATTRIBUTE_LOOKS][:6 if split == "val" else 7]])
    fig = figures.plot_alignment(rows, "a protocol line")
    colour = matplotlib.colors.to_rgba(style.ATTRIBUTE_LOOKS["held_out_shape"].colour)
    drawn = [sum(matplotlib.colors.to_rgba(line.get_color()) == colour for line in ax.lines) for ax in fig.axes]
    assert drawn[0] == 0 and drawn[1] > 0
    assert "held_out_shape" in [text.get_text() for text in fig.legends[0].get_texts()]


def test_rate_verdicts_show_every_seed_and_an_interval_covering_seeds_that_disagree():
    """Two seeds that disagree on a held-out row: one tick a seed, the verdict's bar spanning both seeds' intervals
    (so wider than the ticks), and the verdict labelled as the seeds disagreeing; a row whose seeds agree is not."""
    from vitdiff.findings import Comparison, verdict_table
    from vitdiff.text_workbook.verdicts import alignment_arms

    rows = pd.DataFrame([{"seed": seed, "split": "test", "guidance": 3.0, "attribute": name, "accuracy": k / 107,
                          "k": k, "n_judged": 107, "shuffled_baseline": 0.3, "k_shuffled": 32,
                          "shape_shuffled_baseline": 0.3, "k_shape_shuffled": 32}
                         for seed, held_out in ((0, 10), (1, 70)) for name, k in (("held_out_shape", held_out),
                                                                                   ("shape", 60))])
    arms = alignment_arms(rows)
    comparisons = [Comparison("q", "c", "test, w=3: own captions", f"test, w=3: {baseline}", metric,
                              direction="higher", test="rate")
                   for metric, baseline in (("shape", "shuffled captions"), ("held_out_shape", "shape word shuffled"))]
    table = verdict_table(arms, comparisons, notebook=figures.TEXT_NOTEBOOK, profile="p")
    disagreeing = table.iloc[1]
    assert "seeds disagree" in disagreeing["signs"]
    assert disagreeing["ci_low"] < 10 / 107 - 0.3 < 70 / 107 - 0.3 < disagreeing["ci_high"]
    fig = figures.plot_rate_verdicts(arms, table, "a title")
    ax = fig.axes[0]
    ticks = [collection.get_offsets() for collection in ax.collections if len(collection.get_offsets()) == 2]
    assert sorted(point[1] for offsets in ticks for point in offsets) == [0, 0, 1, 1]  # both seeds, both rows
    bars = {int(bar[0][1]): (bar[0][0], bar[1][0]) for collection in ax.collections
            if isinstance(collection, matplotlib.collections.LineCollection) for bar in collection.get_segments()}
    for row in (0, 1):  # the bar is the verdict's interval, agreeing seeds' and disagreeing seeds' alike
        assert bars[row] == pytest.approx((table["ci_low"].iloc[row], table["ci_high"].iloc[row]))
    labels = [text.get_text() for text in ax.texts]
    assert labels[1].endswith("seeds disagree)") and "disagree" not in labels[0]
    assert min(text.get_fontsize() for text in _texts(fig)) >= style.MIN_FONT_PT
