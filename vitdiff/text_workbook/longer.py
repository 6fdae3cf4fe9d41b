"""Notebook 07 at two training budgets: a profile and the longer profile that continues its runs
(:data:`TEXT_CONTINUES`), judged on the seeds filed at both, so what changes between the budgets is the training's,
not the seeds'."""
from __future__ import annotations

from pathlib import Path

from ..findings import Comparison, verdict_table
from ..shapes import HELD_OUT_SHAPE
from ..text_alignment import ALIGNMENT_METRICS, alignment_summary, fd_shapes_label
from ..workbook.figures import TEXT_NOTEBOOK, plot_alignment_by_budget
from ..workbook.notebook import verdict_changes
from .profiles import TEXT_CONTINUES, text_profile
from .seeds import filed_text_seeds
from .verdicts import OWN, alignment_arm, alignment_arms, alignment_comparisons, target_checks


def budget_pair(name: str) -> tuple[str, str] | None:
    """(shorter, longer) profile names of the pair ``name`` belongs to, or None."""
    for longer, shorter in TEXT_CONTINUES.items():
        if name in (shorter, longer):
            return shorter, longer
    return None


def rows_at_both_budgets(name: str, folders: list[Path], runs_dir: Path):
    """The alignment rows of both profiles of ``name``'s pair (:func:`budget_pair`) on the seeds filed and current
    at both, each profile read from the first of ``folders`` that files a current seed of it; an empty frame when
    ``name`` has no pair or the pair no common seed."""
    import pandas as pd

    pair = budget_pair(name)
    if pair is None:
        return pd.DataFrame(columns=["seed", "steps"])
    frames = []
    for profile_name in pair:
        profile = text_profile(profile_name)
        rows = next((rows for rows, _ in (filed_text_seeds(folder, profile, runs_dir) for folder in folders)
                     if len(rows)), pd.DataFrame(columns=["seed", "steps"]))
        frames.append(rows)
    common = set(frames[0]["seed"]) & set(frames[1]["seed"])
    return pd.concat([frame[frame["seed"].isin(common)] for frame in frames], ignore_index=True)


def _steps_arm(variant: str, steps: int) -> str:
    return f"{variant} @ {steps} steps"


# Training longer is judged on the samples' own captions: every attribute on val; on test, shape of the held-out objects
# (where composition shows) and all-correct.
_GROWTH = [("val", name) for name in ALIGNMENT_METRICS] + [("test", HELD_OUT_SHAPE), ("test", "all_correct")]


def verdicts_at_both_budgets(rows, guidance: float, image_size: int | None = None):
    """One verdict table (``steps`` column) of the budget pair's common seeds: notebook 07's pre-registered
    comparisons (:func:`alignment_comparisons`) at each budget, then each attribute's accuracy against the samples'
    own captions at the longer budget minus the shorter (the count test of :mod:`vitdiff.findings`, Holm over the rows;
    its profile is "<shorter> -> <longer>"). The two budgets' samples come from different models of the same seeds,
    drawn for the same captions; the test treats them as independent."""
    import pandas as pd

    budgets = rows.groupby("steps")["profile"].first().sort_index()
    tables = [verdict_table(alignment_arms(rows[rows["steps"] == steps]), alignment_comparisons(guidance, image_size),
                            notebook=TEXT_NOTEBOOK, profile=profile, steps=int(steps))
              for steps, profile in budgets.items()]
    (short, short_profile), (long, long_profile) = list(budgets.items())[0], list(budgets.items())[-1]

    def arms_at(steps: int):
        arms = alignment_arms(rows[rows["steps"] == steps])
        return arms.assign(variant=[_steps_arm(variant, int(steps)) for variant in arms["variant"]])

    arms = pd.concat([arms_at(short), arms_at(long)], ignore_index=True)
    growth = [Comparison(f"does training {long / short:g}x as long make samples follow their captions more often?",
                         "", _steps_arm(alignment_arm(split, guidance, OWN), int(long)),
                         _steps_arm(alignment_arm(split, guidance, OWN), int(short)), metric, direction="higher",
                         test="rate")
              for split, metric in _GROWTH]
    tables.append(verdict_table(arms, growth, notebook=TEXT_NOTEBOOK, profile=f"{short_profile} -> {long_profile}",
                                steps=int(long)))
    return pd.concat(tables, ignore_index=True)


def longer_training_lines(rows, table, guidance: float) -> list[str]:
    """What training longer changed, one sentence each, from :func:`rows_at_both_budgets` and
    :func:`verdicts_at_both_budgets`: the seeds, the targets at each budget, each pre-registered verdict that changes
    between the budgets (:func:`vitdiff.workbook.notebook.verdict_changes`, or that none does), each growth
    row, and FD-shapes at each budget."""
    short, long = sorted(int(steps) for steps in rows["steps"].unique())
    seeds = sorted(int(seed) for seed in rows["seed"].unique())
    lines = [f"seeds judged at both budgets: {len(seeds)} ({', '.join(map(str, seeds))}); every line below is on "
             "them alone"]
    growth = table["profile"].str.contains(" -> ")
    judged = {steps: table[~growth & (table["steps"] == steps)] for steps in (short, long)}
    checks = {steps: target_checks(rows[rows["steps"] == steps], judged[steps], guidance) for steps in (short, long)}
    for (target, _, met_short), (_, measured, met_long) in zip(checks[short], checks[long]):
        lines.append(f"target {target}: {'met' if met_short else 'not met'} at {short} steps, "
                     f"**{'met' if met_long else 'not met'}** at {long} ({measured})")
    changed = verdict_changes(table[~growth])
    lines += changed or ["no pre-registered verdict changes with the budget"]
    accuracy = {steps: alignment_summary(rows[rows["steps"] == steps])["accuracy"] for steps in (short, long)}
    by_seed = rows[rows["guidance"] == guidance].pivot_table(index=["split", "attribute", "seed"], columns="steps",
                                                             values="accuracy")
    for row in table[growth].itertuples():
        split = row.comparison.split(",", 1)[0]
        key = (split, guidance, row.metric)
        # Each seed's own change beside the test's interval (pooled, or seed by seed where the seeds disagree).
        changes = (by_seed.loc[(split, row.metric)][long] - by_seed.loc[(split, row.metric)][short]).dropna()
        seeds = "; by seed: " + ", ".join(f"{int(seed)} {change:+.3f}" for seed, change in changes.items()) \
            if len(changes) > 1 else ""
        lines.append(f"{split} {row.metric}: {accuracy[short][key]:.3f} at {short} steps -> {accuracy[long][key]:.3f} "
                     f"at {long}, {row.mean_diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}] ({row.signs}{seeds}): "
                     f"**{row.verdict}**")
    # FD has one value a seed and split: a mean beside real images against real ones, not tested.
    fd = rows[rows["guidance"] == guidance].drop_duplicates(["seed", "split", "steps"])
    for split, by_steps in fd.groupby("split", sort=False):
        mean = by_steps.groupby("steps")[["fd", "fd_redrawn", "fd_floor"]].mean()
        lines.append(f"{fd_shapes_label(int(rows['n'].iloc[0]))} on {split} at w = {guidance:g}, mean over the "
                     f"seeds: {mean.loc[short, 'fd']:.0f} at {short} steps -> {mean.loc[long, 'fd']:.0f} at {long}; "
                     f"the same captions drawn again score {mean.loc[long, 'fd_redrawn']:.0f}, other real scenes "
                     f"{mean.loc[long, 'fd_floor']:.0f} (descriptive)")
    return lines


def plot_both_budgets(rows, guidance: float):
    """Each attribute's accuracy at the two budgets of :func:`rows_at_both_budgets`, beside its baselines."""
    pair = " -> ".join(rows.groupby("steps")["profile"].first().sort_index())
    return plot_alignment_by_budget(rows, guidance, f"notebook 07, the same seeds at two budgets ({pair}); "
                                                    f"{int(rows['n'].iloc[0])} captions per split")


def file_growth_verdicts(table, out_dir: Path, file_results: bool = False) -> None:
    """File the growth rows of :func:`verdicts_at_both_budgets` (profile "<shorter> -> <longer>") in the verdicts
    file of the run's results (with ``file_results``, the committed one). The pre-registered rows at each budget are
    not filed here: each profile's own run files them, on all of its seeds."""
    from ..findings import update_verdicts
    from ..workbook import results_dir

    growth = table[table["profile"].str.contains(" -> ")]
    update_verdicts(results_dir(out_dir, file_results) / "verdicts.csv", growth)


def show_longer_training(rows, table, guidance: float) -> None:
    """Display the verdict table of both budgets and :func:`longer_training_lines`, the notebook's generated
    statement of what training longer changed."""
    from IPython.display import Markdown, display

    from ..findings import conclusion_markdown

    display(Markdown(conclusion_markdown(table)))
    display(Markdown("\n".join(f"* {line}" for line in longer_training_lines(rows, table, guidance))))
