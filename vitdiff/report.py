"""``python -m vitdiff.report [--figures] [--check]``: the result tables of experiments/README.md and the notebooks'
figures, generated from the results files.

The notebooks file one row per (variant, seed) in ``experiments/results/<notebook>/<profile>.csv`` and their
comparisons in ``experiments/results/verdicts.csv`` (:mod:`vitdiff.findings`). This command writes the tables
those files give between the README's ``<!-- report:begin -->`` and ``<!-- report:end -->`` markers, so no
result number in the README is typed by hand. ``--figures`` (``make figures``) draws every notebook's figures for
every real profile from the same files into ``experiments/results/<notebook>/figures/``
(:func:`vitdiff.workbook.notebook_figures`). ``--check`` changes nothing and exits 1 when the README differs from
what the files give or a committed figure is missing or stale (CI runs it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
DEFAULT_README = REPO_ROOT / "experiments" / "README.md"
# Columns of a results file that summarise a run, in table order; loss@<sigma> columns follow "loss".
SUMMARY = (("loss", "held-out loss"), ("fd", "FD"))


def _mean_sd(values) -> str:
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4g} ± {sd:.2g}"


def results_table(frame) -> list[str]:
    """One row per variant, in the notebook's order: size, cost, and mean ± sample sd over seeds of each metric."""
    order = list(dict.fromkeys(frame["variant"]))
    sigma_columns = [c for c in frame.columns if c.startswith("loss@")]
    metrics = [(c, label) for c, label in SUMMARY if c in frame]
    header = ["variant", "params (M)", "GFLOPs", "seeds", *[label for _, label in metrics],
              *[c.replace("loss@", "σ=") for c in sigma_columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant in order:
        rows = frame[frame["variant"] == variant]
        cost = [f"{rows[column].iloc[0]:.{digits}f}" if column in rows else "—"
                for column, digits in (("params_M", 3), ("gflops", 4))]
        cells = [variant, *cost, str(len(rows))]
        cells += [_mean_sd(rows[c]) for c, _ in metrics]
        cells += [f"{rows[c].mean():.3g}" for c in sigma_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def alignment_table(frame) -> list[str]:
    """Text alignment rows (one per seed, split, guidance and attribute; notebook 07): per (recipe if any, split,
    guidance) and attribute, the mean over seeds of the accuracy against the samples' own captions / against
    shuffled captions (— where a split has no such row: held_out_shape is judged on test only), and FD beside the
    same captions redrawn (where measured) and other real scenes of the split."""
    keys = [key for key in ("recipe", "steps", "split", "guidance") if key in frame]
    attributes = list(dict.fromkeys(frame["attribute"]))
    redrawn = "fd_redrawn" in frame
    header = [*keys, "seeds", *attributes, "empty caption: all_correct",
              "FD (captions redrawn / other scenes)" if redrawn else "FD (other scenes)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for group_key, rows in frame.groupby(keys, sort=False):
        by_attribute = rows.groupby("attribute", sort=False)[["accuracy", "shuffled_baseline",
                                                              "empty_caption_baseline"]].mean()
        cells = [str(value) if not isinstance(value, float) else f"{value:g}" for value in group_key]
        cells.append(str(rows["seed"].nunique()))
        cells += [f"{by_attribute.loc[name, 'accuracy']:.3f} / {by_attribute.loc[name, 'shuffled_baseline']:.3f}"
                  if name in by_attribute.index else "—" for name in attributes]
        cells.append(f"{by_attribute.loc['all_correct', 'empty_caption_baseline']:.3f}")
        references = [rows[column].mean() for column in ("fd_redrawn", "fd_floor") if column in rows]
        cells.append(f"{rows['fd'].mean():.4g} ({' / '.join(f'{value:.4g}' for value in references)})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def held_out_shapes_table(frame) -> list[str]:
    """What each model drew for each held-out colour-shape pair (``experiments/held_out_shapes.py``): the objects
    drawn as each shape, of those the captions name, one row per (model, captions sampled)."""
    pairs = list(dict.fromkeys(frame["pair"]))
    header = ["model", "captions", *[f"{pair}: as asked (circle, square, triangle, absent)" for pair in pairs]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (model, captions), rows in frame.groupby(["model", "captions"], sort=False):
        by_pair = rows.set_index("pair")
        cells = [str(model), str(int(captions))]
        for pair in pairs:
            if pair not in by_pair.index:
                cells.append("—")
                continue
            row = by_pair.loc[pair]
            drawn = ", ".join(str(int(row[shape])) for shape in ("circle", "square", "triangle", "absent"))
            asked_shape = pair.split()[-1]  # the filed count of objects drawn as the pair's shape
            cells.append(f"{int(row[asked_shape])}/{int(row['n'])} ({drawn})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_outcomes_table(frame) -> list[str]:
    """Two models on the same items (``experiments/held_out_shapes.py --against``): each one's successes, the items
    one model alone got right, the difference with its 95% interval, the one-sided p and the verdict."""
    header = ["arm", "reference", "seed", "captions", "guidance", "items", "arm right", "reference right",
              "arm alone / reference alone", "difference [95% CI]", "p (arm higher)", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in frame.itertuples():
        cells = [row.arm, row.reference, str(row.seed), str(row.captions), f"{row.guidance:g}", str(row.n),
                 str(row.k_arm), str(row.k_ref), f"{row.arm_only} / {row.ref_only}",
                 f"{row.mean_diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]", f"{row.p_support:.3g}",
                 row.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


VALIDATION_KEYS = ("monotone ", "floor fd_resized 16x16", "eval seeds fd", "training seeds fd")


def validation_table(summary) -> list[str]:
    """The headline figures of the sample-metric validation: how many degradation cases each metric ranks
    monotonically, the real-vs-real floor by n, evaluation noise by evaluation seed, training seeds' spread."""
    rows = summary[summary["key"].str.startswith(VALIDATION_KEYS)]
    return ["| measurement | value | from |", "| --- | --- | --- |",
            *[f"| {row.key} | {_number(row.value)} | {row.source} |" for row in rows.itertuples()]]


def _number(value) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return str(value)


def claims_block(verdicts) -> list[str]:
    """The paper's claims as claims, each with the workbook's current verdicts: per (notebook, profile) at its
    largest budget, how many controlled rows support, contradict or leave it unresolved, and on how many seeds
    (the fewest and most of its rows)."""
    if verdicts is None or not len(verdicts):
        return ["No verdicts are filed yet."]
    lines = ["| claim (source) | notebook, profile, budget | seeds | controlled rows: supported / contradicted / "
             "unresolved | descriptive rows |", "| --- | --- | --- | --- | --- |"]
    claimed = verdicts[verdicts["paper_claim"] != ""]
    for claim, rows in claimed.groupby("paper_claim", sort=False):
        for (notebook, profile), mine in rows.groupby(["notebook", "profile"], sort=False):
            if "steps" in mine and mine["steps"].notna().any():
                mine = mine[mine["steps"] == mine["steps"].max()]
            steps = f"{int(mine['steps'].iloc[0])} steps" if mine["steps"].notna().any() else "final"
            counts = mine["verdict"].value_counts()
            controlled = " / ".join(str(counts.get(name, 0)) for name in ("supported", "contradicted", "unresolved"))
            fewest, most = int(mine["n_seeds"].min()), int(mine["n_seeds"].max())
            seeds = f"{fewest}" if fewest == most else f"{fewest}–{most}"
            lines.append(f"| {claim} | {notebook}, {profile}, {steps} | {seeds} | {controlled} | "
                         f"{counts.get('descriptive', 0)} |")
    return lines


def update_claims(readme: Path, results: Path, *, check: bool) -> bool:
    """The claims table between ``<!-- claims:begin -->`` and ``<!-- claims:end -->`` of the top-level README."""
    from .findings import read_verdicts

    text = readme.read_text()
    begin, end = "<!-- claims:begin -->", "<!-- claims:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} block: add the two markers where the claims go")
    head, rest = text.split(begin, 1)
    path = results / "verdicts.csv"
    block = claims_block(read_verdicts(path) if path.is_file() else None)
    new = head + "\n".join([begin, *block, end]) + rest.split(end, 1)[1]
    if new != text and not check:
        readme.write_text(new)
    return new == text


def benchmark_table(rows: list[dict]) -> list[str]:
    """A benchmark's JSON rows (one dict each, same keys) as a table; floats to 3 significant digits."""
    keys = list(rows[0])
    cell = lambda value: f"{value:.3g}" if isinstance(value, float) else ("—" if value is None else str(value))
    return ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys),
            *["| " + " | ".join(cell(row[key]) for key in keys) + " |" for row in rows]]


def verdict_lines(verdicts) -> list[str]:
    from .findings import conclusion_markdown

    return conclusion_markdown(verdicts).splitlines()


def render(results: Path) -> str:
    """The generated block: per notebook and profile, the protocol line, the results table and the verdicts."""
    import json

    import pandas as pd

    from .findings import read_verdicts
    from .workbook.budget import budget_curves, budget_lines, settled_budget

    verdicts = read_verdicts(results / "verdicts.csv") if (results / "verdicts.csv").is_file() else None
    lines = [BEGIN, "", "_Generated by `python -m vitdiff.report` from `experiments/results/`; do not edit by hand._"]
    folders = sorted(p for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
    for benchmark in sorted((results / "benchmarks").glob("*.json")) if results.is_dir() else []:
        lines += ["", f"### benchmark `{benchmark.stem}` (`benchmarks/`)", "", *benchmark_table(json.loads(benchmark.read_text()))]
    probes = sorted(results.glob("*/*-probe_curves.csv")) if results.is_dir() else []
    if probes:
        lines += ["", "### the long budget, read off the budget probes (`python -m vitdiff.campaign NN --probe STEPS`)",
                  "", "Each notebook's reference and most different arm, seeds 0 and 1, trained past the long "
                  "profile's steps; the rule is in `vitdiff/workbook/budget.py`.", ""]
        lines += [f"- {path.parent.name} (`{path.name.removesuffix('_curves.csv')}`): "
                  f"{settled_budget(budget_curves(pd.read_csv(path)))[1]}." for path in probes]
    validation = results / "fd_validation" / "summary.csv"
    if validation.is_file():
        lines += ["", "### the sample metric, validated (`experiments/validate_fd.py`; `fd_validation/`)", "",
                  "`fd` is FD-clf against the reference as it was read before the fix (the stored 32x32 images), "
                  "`fd_resized` against the training split at the samples' size, as the workbook reads it now.", "",
                  *validation_table(pd.read_csv(validation))]
    for folder in folders:
        for table in sorted(folder.glob("*.csv")):
            if table.stem.endswith("_curves"):
                continue
            frame = pd.read_csv(table)
            if {"attribute", "accuracy", "shuffled_baseline"} <= set(frame.columns):
                render_rows = alignment_table
            elif {"variant", "seed"} <= set(frame.columns):
                render_rows = results_table
            elif {"pair", "asked", "model"} <= set(frame.columns):
                render_rows = held_out_shapes_table
            elif {"arm", "reference", "arm_only", "ref_only"} <= set(frame.columns):
                render_rows = paired_outcomes_table
            else:
                continue  # not a notebook's per-run rows (e.g. a record of probes): not a results table
            lines += ["", f"### {folder.name} — `{table.stem}`", ""]
            protocol = table.with_suffix(".json")
            if protocol.is_file():
                lines += [f"Protocol: {json.loads(protocol.read_text())['protocol']}", ""]
            if render_rows is results_table:  # the protocol's seeds are the plan; what the table holds so far:
                lines += [filed_line(frame), ""]
                if "code_key" not in frame and "fd" in frame:
                    lines += [LEGACY_FD, ""]
            if render_rows is alignment_table:
                lines += ["Each cell: accuracy against the samples' own captions / the same samples against shuffled "
                          "captions (mean over seeds).", ""]
            lines += render_rows(frame)
            curves = folder / f"{table.stem}_curves.csv"
            budget = budget_lines(pd.read_csv(curves)) if render_rows is results_table and curves.is_file() else []
            if budget:
                lines += ["", "Held-out loss / FD at each budget the FD was measured at "
                          "(`vitdiff/workbook/budget.py` reads the budget off these):", "", *budget]
            if verdicts is not None:
                mine = verdicts[(verdicts["notebook"] == folder.name) & (verdicts["profile"] == table.stem)]
                if len(mine):
                    lines += ["", *verdict_lines(mine)]
    return "\n".join(lines + ["", END])


# Under a results table whose rows were filed before runs carried code keys (02-05 at cpu): its protocol line is
# today's, its FD is not.
LEGACY_FD = ("These rows were filed before runs carried code keys: their FD was measured against the reference read "
             "at 32x32, not the training split at the samples' size (`fd_validation/`), so it is not comparable "
             "with FD elsewhere, and their verdicts use the loss alone.")


def filed_line(frame) -> str:
    """How many runs a results table holds: runs, arms, seeds an arm, and which seeds."""
    if not len(frame):
        return "Filed: no runs yet."
    per_arm = frame.groupby("variant")["seed"].nunique()
    spread = f"{per_arm.min()}" if per_arm.min() == per_arm.max() else f"{per_arm.min()}–{per_arm.max()}"
    seeds = ", ".join(str(seed) for seed in sorted(frame["seed"].unique()))
    return (f"Filed: {len(frame)} runs of {len(per_arm)} arms, {spread} seed{'s' if per_arm.max() > 1 else ''} "
            f"an arm (seeds {seeds}).")


def draw_figures(results: Path) -> None:
    """Every notebook's figures for every real profile; prints the files and the sample grids still missing."""
    from .workbook.figures import figure_profiles, figures_record, notebook_figures

    for notebook, profile in figure_profiles(results):
        written = notebook_figures(notebook, profile, results)
        print(f"{notebook}/{profile}: {', '.join(sorted({path.stem for path in written}))}")
        missing = figures_record(results, notebook, profile)["samples_missing"]
        if missing:
            print(f"  no samples figure: {len(missing)} sample grid(s) missing, e.g. {missing[0]}")


def stale_figures(results: Path) -> list[str]:
    """Why the committed figures are not what the results files give, for every (notebook, real profile)."""
    from .workbook.figures import figure_profiles, stale_figures as stale

    return [problem for notebook, profile in figure_profiles(results) for problem in stale(results, notebook, profile)]


def update(readme: Path, results: Path, *, check: bool) -> bool:
    """Write (or with ``check`` only compare) the generated block; True when the README already matched."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block: add the two markers where the tables go")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + render(results) + tail
    if new == text:
        return True
    if not check:
        readme.write_text(new)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitdiff.report", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the README or a committed figure differs from what the results files give")
    parser.add_argument("--figures", action="store_true",
                        help="draw every notebook's figures from the results files (experiments/results/*/figures/)")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "experiments" / "results")
    parser.add_argument("--root-readme", type=Path,
                        help="the README whose claims block lists the paper's claims with their verdicts (default: "
                             "README.md when --readme is experiments/README.md)")
    args = parser.parse_args(argv)
    if args.figures and not args.check:
        draw_figures(args.results)
        return 0
    matched = update(args.readme, args.results, check=args.check)
    # The claims go to the top-level README only with the committed tables (or where asked): a report of other
    # results (a test's, a notebook's own) leaves the README alone.
    root_readme = args.root_readme or (REPO_ROOT / "README.md" if args.readme == DEFAULT_README else None)
    if root_readme is not None:
        matched &= update_claims(root_readme, args.results, check=args.check)
    if args.check:
        problems = stale_figures(args.results)
        if not matched:
            problems.insert(0, f"{args.readme} differs from what {args.results} gives: run `python -m vitdiff.report`")
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("figures: run `make figures` (python -m vitdiff.report --figures)", file=sys.stderr)
            return 1
        print(f"{args.readme} and the figures: up to date")
        return 0
    print(f"{args.readme}: {'up to date' if matched else 'tables regenerated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
