"""The long budget, chosen by measurement.

A long profile's budget (``cpu-long``: 4000 steps) is only worth its verdicts if the models have learned by then.
Its budget probe (``python -m vitdiff.campaign 04 --probe 8000``: each study's reference and most different arm,
seeds 0 and 1, trained on past the profile's steps) gives learning curves longer than the campaign's. This module
reads a curves file: per arm and measured step the mean held-out loss and Fréchet metric over seeds, and the first
measured step where

* every arm's Fréchet metric is within :data:`NEAR` of its value at the last point (samples near their trained
  quality, as far as the curve can tell), and
* the arms' order by the loss and by the Fréchet metric is the order at every later point.

That step is the budget the curve supports; where no step but the last qualifies, the budget is not settled and
the sentence says by how much the metric still moved over the last interval.
"""
from __future__ import annotations

NEAR = 0.10  # the Fréchet metric's equivalence margin in vitdiff.findings, used here as "near its trained value"


def budget_curves(curves):
    """Mean loss and Fréchet metric over seeds per (step, arm), at the steps where the Fréchet metric was measured,
    with the seeds each mean is over."""
    import pandas as pd

    if "fd" not in curves:
        return pd.DataFrame(columns=["step", "variant", "loss", "fd", "seeds"])
    return (curves[curves["fd"].notna()].groupby(["step", "variant"], sort=True)
            .agg(loss=("loss", "mean"), fd=("fd", "mean"), seeds=("seed", "nunique")).reset_index())


def _order(table, step: int, metric: str) -> tuple[str, ...]:
    return tuple(table[table["step"] == step].sort_values(metric)["variant"])


def settled_budget(table) -> tuple[int | None, str]:
    """(the first settled step or None, a sentence saying why) from :func:`budget_curves` of two or more arms
    measured at the same steps."""
    arms = sorted(set(table["variant"]))
    steps = [step for step in sorted(set(table["step"])) if set(table[table["step"] == step]["variant"]) == set(arms)]
    if len(arms) < 2 or len(steps) < 2:
        return None, "too few measured points to judge the budget (two arms at two steps at least)"
    last = steps[-1]
    final = table[table["step"] == last].set_index("variant")["fd"]
    for step in steps[:-1]:
        here = table[table["step"] == step].set_index("variant")["fd"]
        near = ((here - final).abs() <= NEAR * final).all()
        stable = all(_order(table, later, metric) == _order(table, step, metric)
                     for later in steps if later > step for metric in ("loss", "fd"))
        if near and stable:
            return step, (f"settled at {step} steps: every arm's FD is within {NEAR:.0%} of its value at {last} and "
                          "the arms' order by loss and by FD no longer changes")
    before = steps[-2]
    previous = table[table["step"] == before].set_index("variant")["fd"]
    moves = ", ".join(f"{arm} {(final[arm] - previous[arm]) / previous[arm]:+.0%}" for arm in arms)
    flips = [metric for metric in ("loss", "fd") if _order(table, before, metric) != _order(table, last, metric)]
    names = {"loss": "loss", "fd": "FD"}
    order = (f"the order by {' and '.join(names[m] for m in flips)} changed between {before} and {last}" if flips
             else f"the order by loss and FD held from {before} to {last}")
    return None, f"not settled by {last} steps: FD from {before} to {last}: {moves}; {order}"


def budget_lines(curves) -> list[str]:
    """Markdown: the per-step means of every arm (loss / FD) and the settled-budget sentence."""
    table = budget_curves(curves)
    if table["step"].nunique() < 2:
        return []  # the metric at the end only: no budget to read off
    arms = list(dict.fromkeys(table.sort_values("variant")["variant"]))
    lines = ["| steps | " + " | ".join(f"{arm}: loss / FD" for arm in arms) + " |", "|" + " --- |" * (len(arms) + 1)]
    for step, rows in table.groupby("step"):
        by_arm = rows.set_index("variant")
        cells = [f"{by_arm.loc[arm, 'loss']:.4f} / {by_arm.loc[arm, 'fd']:.1f} ({by_arm.loc[arm, 'seeds']})"
                 if arm in by_arm.index else "—" for arm in arms]
        lines.append(f"| {int(step)} | " + " | ".join(cells) + " |")
    return [*lines, "", f"Means over seeds (count in brackets). Budget: {settled_budget(table)[1]}."]


def show_budget(curves, notebook: str, profile) -> None:
    """A notebook's budget cell: the loss / FD table and the settled-budget sentence of its runs' curves, and of
    its budget probe (``<profile>-probe``, the budget arms trained on) where one is filed."""
    import pandas as pd
    from IPython.display import Markdown, display

    from .profiles import REPO_ROOT

    sections = [(f"The runs of `{profile.name}`", curves)]
    probe = REPO_ROOT / "experiments" / "results" / notebook / f"{profile.name}-probe_curves.csv"
    if probe.is_file():
        sections.append((f"The budget probe (`{profile.name}-probe`: the budget arms, seeds 0 and 1, trained on)",
                         pd.read_csv(probe)))
    for title, frame in sections:
        lines = budget_lines(frame)
        display(Markdown(f"**{title}.** " + ("\n\n" + "\n".join(lines) if lines else
                                             "The Fréchet metric was measured at one budget only.")))
