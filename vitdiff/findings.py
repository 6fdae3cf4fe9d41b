"""Findings from ablation runs: paired comparisons over seeds, intervals, verdicts.

Seed s gives every arm of a notebook the same data order, the same noise draws and (where shapes
allow) the same initialisation, so arms are compared through their per-seed *differences*: a paired
design that removes most of the between-run noise.

The decision rule, written once (:func:`verdict`): a comparison states the direction the claim
predicts for ``arm - reference`` (``"lower"``: the arm has the lower metric, e.g. the lower loss).

* **supported**: the 95% t-interval of the mean paired difference excludes 0 in the claimed direction;
* **contradicted**: it excludes 0 in the other direction;
* **unresolved**: it contains 0.

Each comparison also reports its minimum detectable effect (MDE): the true mean difference that a
paired t-test at alpha = 0.05 (two-sided) would detect with 80% power, given the observed spread of
the differences, (t_0.975 + t_0.80) * sd / sqrt(n). A difference smaller than the MDE going
unresolved says little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

VERDICTS = ("supported", "contradicted", "unresolved")
VERDICT_COLUMNS = ("notebook", "profile", "question", "paper_claim", "comparison", "metric", "n_seeds", "mean_diff",
                   "ci_low", "ci_high", "mde", "verdict", "signs")


@dataclass(frozen=True)
class Comparison:
    """One pre-registered comparison of a notebook: ``arm - reference`` on ``metric``, expected ``direction``."""
    question: str        # what the notebook asks, in a sentence
    paper_claim: str     # what the paper (or the baseline's paper) says, with its source; "" when it says nothing
    arm: str             # variant name
    reference: str       # variant name
    metric: str          # a results column (lower is better for every metric we report)
    direction: str = "lower"  # the claim predicts arm - reference is "lower" or "higher" than 0


def verdict(ci_low: float, ci_high: float, direction: str) -> str:
    """The decision rule of the module docstring."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "unresolved"
    below, above = ci_high < 0, ci_low > 0
    if not (below or above):
        return "unresolved"
    return "supported" if below == (direction == "lower") else "contradicted"


def paired_differences(frame, metric: str, arm: str, reference: str):
    """Per-seed ``arm - reference`` on the seeds both arms ran (a pandas Series indexed by seed)."""
    rows = frame[frame["variant"].isin([arm, reference])]
    table = rows.pivot_table(index="seed", columns="variant", values=metric, aggfunc="first")
    missing = [name for name in (arm, reference) if name not in table]
    if missing:
        raise KeyError(f"no runs of {missing} in the results (variants: {sorted(set(frame['variant']))})")
    return (table[arm] - table[reference]).dropna()


def compare(frame, comparison: Comparison) -> dict:
    """The verdict row of one comparison: n, mean paired difference, 95% t-interval, MDE, verdict, per-seed signs."""
    from scipy import stats

    diffs = paired_differences(frame, comparison.metric, comparison.arm, comparison.reference)
    n = len(diffs)
    mean = float(diffs.mean()) if n else math.nan
    if n >= 2:
        sd = float(diffs.std(ddof=1))
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        mde = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * sd / math.sqrt(n)
    else:
        half = mde = math.nan
    low, high = mean - half, mean + half
    return {"question": comparison.question, "paper_claim": comparison.paper_claim,
            "comparison": f"{comparison.arm} - {comparison.reference}", "metric": comparison.metric,
            "n_seeds": n, "mean_diff": mean, "ci_low": low, "ci_high": high, "mde": mde,
            "verdict": verdict(low, high, comparison.direction),
            "signs": "".join("-" if d < 0 else "+" if d > 0 else "0" for d in diffs)}


def verdict_table(frame, comparisons: list[Comparison], *, notebook: str, profile: str):
    """Every comparison's verdict row, with the notebook and profile that produced it."""
    import pandas as pd

    rows = [{"notebook": notebook, "profile": profile, **compare(frame, c)} for c in comparisons]
    return pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))


def update_verdicts(path: Path, table) -> None:
    """Replace the rows of (notebook, profile) in the verdicts file with ``table``; other rows are kept."""
    import pandas as pd

    path = Path(path)
    if path.is_file():
        old = pd.read_csv(path)
        keys = set(zip(table["notebook"], table["profile"]))
        old = old[[key not in keys for key in zip(old["notebook"], old["profile"])]]
        table = pd.concat([old, table], ignore_index=True) if len(old) else table
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.sort_values(["notebook", "profile"], kind="stable")
    temporary = path.with_suffix(".tmp")
    table.to_csv(temporary, index=False, float_format="%.6g")
    temporary.replace(path)


def conclusion_markdown(table) -> str:
    """The closing cell of a notebook: for each comparison, the paper's claim, what we measured, the verdict."""
    lines = ["| question | paper's claim | comparison (metric) | n | mean diff [95% CI] | MDE | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in table.itertuples():
        lines.append(f"| {row.question} | {row.paper_claim or '—'} | {row.comparison} ({row.metric}) | {row.n_seeds} "
                     f"| {row.mean_diff:+.4g} [{row.ci_low:+.4g}, {row.ci_high:+.4g}] | {row.mde:.3g} "
                     f"| **{row.verdict}** ({row.signs}) |")
    return "\n".join(lines)
