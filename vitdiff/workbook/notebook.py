"""What a notebook of 02-06 calls to read its runs back, judge them and show the answer.

The campaign (:mod:`vitdiff.workbook.campaign`) trains and files the runs; a notebook reads the filed rows that the
current code and config reproduce (:func:`study_runs`), files its verdicts, and closes with generated statements
(:func:`show_verdicts`, :func:`cost_line`).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import write_atomically
from .figures import paper_style
from .profiles import Profile, get_profile, output_dir, protocol
from .runs import results_dir
from .campaign import describe, filed_rows, plan, rows_of, status, train_jobs
from .studies import Study


def study_runs(chosen: Study, profile: Profile, out_dir: Path, *, train: bool | None = None,
               file_results: bool = False, workers: int | None = None):
    """A notebook's runs: the rows filed in ``experiments/results/`` that the current code and config reproduce
    (and rows filed before runs carried keys, read as filed), plus, with ``train``, the missing and stale runs
    trained now (filed under ``out_dir/results/``, or with ``file_results`` in ``experiments/results/``).

    ``train=None`` trains only at ``smoke`` (whose rows are never filed); every other profile is read back and what
    is missing is listed with the command that trains it (the campaign), so the default run of a notebook reproduces
    its committed run and leaves the tree as it was. Returns (results, curves, states)."""
    import pandas as pd

    jobs = plan(chosen.notebook, profile)
    rows = filed_rows(chosen.notebook, profile)
    states = status(jobs, rows)
    train = profile.name == "smoke" if train is None else train
    if states["legacy"]:
        print("rows filed before runs carried keys are read as filed; their FD used a reference at the wrong size "
              "(experiments/results/fd_validation/), so they are judged on the loss alone")
    usable = {(job.arm, job.seed) for job in states["done"] + states["legacy"]}
    results = rows_of(rows, usable)
    curves_path = results_dir(Path(), True) / chosen.notebook / f"{profile.name}_curves.csv"
    curves = rows_of(pd.read_csv(curves_path) if curves_path.is_file()
                     else pd.DataFrame(columns=["variant", "seed", "step"]), usable)
    todo = states["stale"] + states["missing"]
    if train and todo:
        trained, trained_curves = train_jobs(todo, profile, out_dir / "runs", results_dir(out_dir, file_results),
                                             workers=workers)
        results = pd.concat([results, trained], ignore_index=True) if len(results) else trained
        curves = pd.concat([curves, trained_curves], ignore_index=True) if len(curves) else trained_curves
        states = {**states, "done": states["done"] + todo, "stale": [], "missing": [], "trained": todo}
    print(describe(chosen.notebook, profile, states, rows))
    if states["stale"] or states["missing"]:
        print(f"not trained here: python -m vitdiff.campaign {chosen.notebook[:2]} --profile {profile.name}")
    order = {variant.name: index for index, variant in enumerate(chosen.variants)}
    results = results.sort_values(["variant", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c)
    return results.reset_index(drop=True), curves.reset_index(drop=True), states


def rows_folder(states: dict, out_dir: Path, file_results: bool = False) -> Path:
    """Where a notebook's rows were read from: its own results folder when it trained runs (unless it files them
    into ``experiments/results/``), else the committed ``experiments/results/``."""
    return results_dir(out_dir, file_results or not states.get("trained"))


def file_table(frame, notebook: str, profile: Profile, *, protocol_line: str | None = None,
               results: Path | None = None) -> Path:
    """File a notebook's own table (one that is not an ablation's runs, e.g. the quick start's row or the samplers'
    grid) as ``<results>/<notebook>/<profile>.csv`` (default ``experiments/results``) with its protocol (default
    the workbook's); atomic."""
    from dataclasses import asdict

    folder = (results or results_dir(Path(), True)) / notebook
    write_atomically(folder / f"{profile.name}.csv", lambda handle: frame.to_csv(handle, index=False, float_format="%.6g"))
    record = json.dumps({"protocol": protocol_line or protocol(profile), "profile": asdict(profile)}, indent=1)
    write_atomically(folder / f"{profile.name}.json", lambda handle: handle.write(record.encode()))
    return folder / f"{profile.name}.csv"


def file_verdicts(table, folder: Path) -> Path:
    """File a notebook's verdict rows in ``folder/verdicts.csv`` (its other notebooks' rows are kept)."""
    from ..findings import update_verdicts

    path = folder / "verdicts.csv"
    update_verdicts(path, table)
    return path


def cost_line(results, states: dict, started: float) -> str:
    """What the notebook's numbers cost: the runs' own training time (not this notebook's, which reads most back)."""
    import time

    train_s = results["train_s"].sum() if "train_s" in results else 0.0
    return (f"the runs' own training time: {train_s / 3600:.2f} CPU-hours over {len(results)} runs (one thread each); "
            f"trained by this notebook: {len(states.get('trained', []))} run(s); notebook wall time "
            f"{time.perf_counter() - started:.0f} s")


def summary(results):
    """Mean ± sd over seeds per arm of the metrics the rows have (loss, FD, precision, recall)."""
    from .runs import summarize

    if not len(results):
        return results
    return summarize(results, metrics=[m for m in ("loss", "fd", "precision", "recall") if m in results])


def verdict_changes(table) -> list[str]:
    """The comparisons whose verdict changes with the training budget, one sentence each (a finding in itself)."""
    lines = []
    for (question, comparison, metric), rows in table.groupby(["question", "comparison", "metric"], sort=False):
        path = [f"{verdict} at {int(steps)}" for steps, verdict in zip(rows["steps"], rows["verdict"])]
        if rows["verdict"].nunique() > 1:
            lines.append(f"{comparison} ({metric}): " + ", ".join(path))
    return lines


def show_verdicts(table) -> None:
    """A notebook's closing cells: the verdict table (every budget), where verdicts change with the budget, and
    one generated answer per question at the largest and the smallest budget."""
    from IPython.display import Markdown, display

    from ..findings import answers, conclusion_markdown

    if not len(table):
        display(Markdown("No verdicts yet: none of this profile's comparisons has filed runs of both its arms."))
        return
    display(Markdown(conclusion_markdown(table)))
    changes = verdict_changes(table)
    display(Markdown("**Verdicts that change with the budget:** " + ("; ".join(changes) if changes else "none.")))
    budgets = sorted(set(table["steps"]))
    for steps in sorted({budgets[-1], budgets[0]}, reverse=True):
        display(Markdown(f"**Answers at {int(steps)} steps:**\n\n" + "\n".join(
            f"- {sentence}" for sentence in answers(table[table["steps"] == steps]))))


def setup(notebook: str, profile: str | None = None, *, dataset: str | None = None, steps: int | None = None,
          seeds=None, out_dir: str | None = None) -> tuple[Profile, Path]:
    """A notebook's first cell after its parameters: the profile with the notebook's overrides, its output
    folder, the figure style, and the protocol printed."""
    chosen = get_profile(profile, dataset=dataset, steps=steps, seeds=seeds)
    out = output_dir(notebook, chosen, out_dir)
    paper_style()
    print("protocol:", protocol(chosen))
    print("outputs: ", out)
    return chosen, out
