"""Findings from ablation runs: a test that fits each claim, chosen before the runs, and a verdict.

Seed s gives every arm of a notebook the same data order, the same noise draws and (where shapes allow)
the same initialisation, so arms are compared through their per-seed *differences* ``arm - reference``: a
paired design that removes most of the between-run noise.

Each :class:`Comparison` names its test (``test``), chosen with the claim it serves:

* ``"superiority"`` ("X beats Y"): a one-sided paired t-test in the direction the claim predicts
  (``direction="lower"``: the arm has the lower metric). **supported** when its p-value, Holm-adjusted over the
  claim's rows, is below 0.025 (one-sided; the same as a 95% two-sided interval excluding 0 for a single row);
  **contradicted** when the one-sided test in the *other* direction is, likewise adjusted.
* ``"equivalence"`` ("X is on par with Y"): two one-sided tests (TOST, Schuirmann 1987; statsmodels'
  ``ttost_paired``) against a margin stated before the runs as a fraction of the reference's mean
  (``margins``). **supported** when the adjusted TOST p is below 0.05 (the 90% interval lies inside
  ``[-margin, +margin]``); **contradicted** when the difference lies significantly *outside* the margin
  (one-sided t-test against ±margin, adjusted, below 0.025). A non-significant superiority test is never
  read as parity.
* ``"rate"`` (accuracies, all-correct: successes among samples): the unit is the sample, not the seed.
  Counts are pooled over the seeds both arms ran; the difference of the two proportions gets Newcombe's
  hybrid score interval and an exact one-sided test (Boschloo's, scipy). A t-interval over per-seed
  proportions, which collapses when the proportions happen to be equal (three seeds of 1 in 96), is never used.
  Pooling assumes the seeds share one effect. That is tested, not assumed, on the scale the verdict is read on:
  each seed's difference of proportions, with Agresti-Caffo's variance (one success and one failure added to
  each group, so never zero), gets Cochran's Q test of one common difference (chi-squared, seeds - 1 df). Where it
  rejects (p < ``HETEROGENEITY_ALPHA``) the seeds disagree, and pooled counts would let one seed's samples vouch
  for another seed's model. The claim is then read seed by seed: "every seed's model lies on the claimed side",
  an intersection-union test (Berger 1982): each seed's own counts get the exact test above, and the row's p is
  the *largest* seed's p (the claim holds only if each seed's test rejects at alpha; no multiplicity correction
  is needed within the row, Holm still runs over the table). Seeds that differ only in how far they lie on the
  same side keep their verdict; seeds on opposite sides decide nothing: **contradicted** likewise needs every
  seed significantly on the other side. The interval runs from the lowest seed's lower Newcombe bound to the
  highest seed's upper one (:func:`every_seed_interval`): it covers every seed's difference at once with about
  95% confidence, so it excludes 0 where each seed alone does on the same side; it is not an interval of the
  seeds' mean, the estimate shown beside it. The verdict then speaks of the seeds run, not of a further seed's
  model, which is all that seeds known to differ can say. ``signs`` lists each seed's counts of both arms and
  says "seeds disagree". The heterogeneity test has little power with 2-3 seeds, so passing it is no evidence
  that they agree; ``signs`` keeps the per-seed counts for the reader either way.
**Multiplicity.** Holm's step-down correction (family-wise error) over the rows of a table that test one paper
claim (rows without a claim form one family, "the notebook's own questions"). Every verdict follows its adjusted
p-value; the interval beside it is not adjusted, and for counts the exact test and Newcombe's interval can
disagree at the margin (an interval just clear of 0 with p just above alpha), so a row's verdict, not its interval
alone, is the finding.

**Confounds.** A comparison that differs in more than the factor its question names carries ``confound`` (what
else differs). It is filed as ``descriptive``: its interval is shown, it gets no verdict and never enters the
claim's family.

**Two metrics.** Each row judges its primary ``metric`` and shows the ``secondary`` metric beside it, with the
same test and margin rule (unadjusted, said so); ``agreement`` says in words whether they agree
("loss supports, fd contradicts").

**Seeds.** A paired test needs at least ``MIN_PAIRED_SEEDS`` (3) seeds. With 2 (one degree of freedom) a verdict
would rest on two differences that happen to agree; such a row shows its interval and MDE, gets no p-value and
stays unresolved, however far its interval lies from zero.

Each row also reports its minimum detectable effect (MDE): the true mean difference a two-sided paired t-test at
0.05 would detect with 80% power given the observed spread, ``(t_0.975 + t_0.80) * sd / sqrt(n)``, and the same as a
fraction of the reference's mean (``mde_rel``). A difference smaller than the MDE going unresolved says little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

VERDICTS = ("supported", "contradicted", "unresolved", "descriptive")
TESTS = ("superiority", "equivalence", "rate")
SUPERIORITY_ALPHA = 0.025  # one-sided: a single row decides as a 95% two-sided interval would
EQUIVALENCE_ALPHA = 0.05   # TOST's usual level: the 90% interval inside the margin
# Equivalence margins stated before the runs, as a fraction of the reference arm's mean: 2% of the held-out loss
# (its seed-to-seed sd at 400 steps was 1-5%); 10% of a Fréchet distance (its evaluation noise alone is a few %).
DEFAULT_MARGINS = {"loss": 0.02, "fd": 0.10}
MIN_PAIRED_SEEDS = 3  # the module docstring's **Seeds**: fewer get an interval, never a verdict
HETEROGENEITY_ALPHA = 0.05  # the module docstring's ``"rate"``: seeds that disagree are judged one by one
_METRIC_STATS = ("mean_diff", "ci_low", "ci_high", "mde", "mde_rel", "p", "verdict")
VERDICT_COLUMNS = ("notebook", "profile", "steps", "paper_claim", "question", "comparison", "test", "metric",
                   "margin", "n_seeds", "mean_diff", "ci_low", "ci_high", "mde", "mde_rel", "p", "p_adj",
                   "correction", "verdict", "signs", "confound", "secondary_metric", "secondary_mean_diff",
                   "secondary_ci_low", "secondary_ci_high", "secondary_p", "secondary_verdict", "agreement")


@dataclass(frozen=True)
class Comparison:
    """One pre-registered comparison of a notebook: ``arm - reference`` on ``metric``, judged by ``test``."""
    question: str        # what the notebook asks, in a sentence
    paper_claim: str     # what the paper (or the baseline's paper) says, with its source; "" when it says nothing
    arm: str             # variant name
    reference: str       # variant name
    metric: str          # the primary metric: a results column (lower is better for loss and FD)
    direction: str = "lower"    # superiority/rate: the claim predicts arm - reference "lower" or "higher" than 0
    test: str = "superiority"   # "superiority" | "equivalence" | "rate" (see the module docstring)
    secondary: str | None = None  # a second metric shown beside the primary (e.g. "fd" beside "loss")
    confound: str = ""          # what else differs besides the question's factor; non-empty: descriptive only
    margins: dict = field(default_factory=lambda: dict(DEFAULT_MARGINS))  # equivalence margin per metric

    def __post_init__(self):
        if self.direction not in ("lower", "higher"):
            raise ValueError(f"direction must be 'lower' or 'higher', got {self.direction!r}")
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {TESTS}, got {self.test!r}")
        if self.test == "equivalence" and self.metric not in self.margins:
            raise ValueError(f"an equivalence test needs a margin for {self.metric!r} (margins={self.margins})")

    @property
    def name(self) -> str:
        return f"{self.arm} - {self.reference}"


def verdict(ci_low: float, ci_high: float, direction: str) -> str:
    """A 95% interval's reading for a single paired superiority row (what its test's verdict reduces to without
    a family correction; count rows follow their exact test, module docstring)."""
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
    table = _by_seed(frame, metric, arm, reference)
    return (table[arm] - table[reference]).dropna()


def _by_seed(frame, column: str, arm: str, reference: str):
    rows = frame[frame["variant"].isin([arm, reference])]
    if column not in rows:
        raise KeyError(f"no column {column!r} in the results (columns: {list(frame.columns)})")
    table = rows.pivot_table(index="seed", columns="variant", values=column, aggfunc="first")
    missing = [name for name in (arm, reference) if name not in table]
    if missing:
        raise KeyError(f"no runs of {missing} in the results (variants: {sorted(set(frame['variant']))})")
    return table.dropna()


def _signs(diffs) -> str:
    return "".join("-" if d < 0 else "+" if d > 0 else "0" for d in diffs)


def _paired_stats(frame, comparison: Comparison, metric: str) -> dict:
    table = _by_seed(frame, metric, comparison.arm, comparison.reference)
    return paired_stats(table[comparison.arm].to_numpy(float), table[comparison.reference].to_numpy(float),
                        comparison, metric)


def paired_stats(arm, reference, comparison: Comparison, metric: str) -> dict:
    """Interval, MDE and the raw one-sided p-values (support, contradict) of one metric's per-seed values
    (``arm[i]`` and ``reference[i]`` from seed i), under the comparison's test."""
    from scipy import stats

    diffs = arm - reference
    n = len(diffs)
    mean = float(diffs.mean()) if n else math.nan
    result = {"n_seeds": n, "mean_diff": mean, "signs": _signs(diffs), "margin": math.nan,
              "ci_low": math.nan, "ci_high": math.nan, "mde": math.nan,
              "mde_rel": math.nan, "p_support": math.nan, "p_contradict": math.nan}
    if n < 2:
        return result
    sd = float(diffs.std(ddof=1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    mde = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * sd / math.sqrt(n)
    scale = abs(float(reference.mean()))
    result.update(ci_low=mean - half, ci_high=mean + half, mde=mde, mde_rel=mde / scale if scale else math.nan)
    if comparison.test == "equivalence":
        result["margin"] = comparison.margins[metric] * abs(reference.mean())
    if sd == 0 or n < MIN_PAIRED_SEEDS:  # no spread to test against, or too few seeds to decide on
        return result
    if comparison.test == "equivalence":
        from statsmodels.stats.weightstats import ttost_paired

        margin = result["margin"]
        p_tost = float(ttost_paired(arm, reference, -margin, margin)[0])
        beyond_upper = stats.ttest_1samp(diffs, margin, alternative="greater").pvalue
        beyond_lower = stats.ttest_1samp(diffs, -margin, alternative="less").pvalue
        result.update(p_support=p_tost, p_contradict=float(min(beyond_upper, beyond_lower)))
    else:
        claimed = "less" if comparison.direction == "lower" else "greater"
        other = "greater" if claimed == "less" else "less"
        result.update(p_support=float(stats.ttest_1samp(diffs, 0.0, alternative=claimed).pvalue),
                      p_contradict=float(stats.ttest_1samp(diffs, 0.0, alternative=other).pvalue))
    return result


def _check_counts(k_arm: int, n_arm: int, k_ref: int, n_ref: int) -> None:
    for k, n in ((k_arm, n_arm), (k_ref, n_ref)):
        if not (0 <= k <= n) or n < 1:
            raise ValueError(f"counts must satisfy 0 <= k <= n and n >= 1, got k={k}, n={n}")


def count_interval(k_arm: int, n_arm: int, k_ref: int, n_ref: int) -> tuple[float, float]:
    """Newcombe's (hybrid score) 95% interval of ``k_arm/n_arm - k_ref/n_ref``."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    _check_counts(k_arm, n_arm, k_ref, n_ref)
    low, high = confint_proportions_2indep(k_arm, n_arm, k_ref, n_ref, method="newcomb", compare="diff",
                                           alpha=0.05)
    return float(low), float(high)


def _count_p_values(k_arm: int, n_arm: int, k_ref: int, n_ref: int, direction: str) -> tuple[float, float]:
    """The exact one-sided Boschloo p-values (support: the claimed direction, contradict: the other)."""
    from scipy import stats

    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    _check_counts(k_arm, n_arm, k_ref, n_ref)
    table = [[k_arm, k_ref], [n_arm - k_arm, n_ref - k_ref]]
    greater = float(stats.boschloo_exact(table, alternative="greater").pvalue)
    less = float(stats.boschloo_exact(table, alternative="less").pvalue)
    return (greater, less) if direction == "higher" else (less, greater)


def compare_counts(k_arm: int, n_arm: int, k_ref: int, n_ref: int, direction: str = "higher") -> dict:
    """Two pooled proportions ``k_arm/n_arm - k_ref/n_ref``: Newcombe's 95% interval of the difference
    (:func:`count_interval`) and the exact one-sided Boschloo p-values for the claimed direction (support) and the
    other (contradict)."""
    support, contradict = _count_p_values(k_arm, n_arm, k_ref, n_ref, direction)
    low, high = count_interval(k_arm, n_arm, k_ref, n_ref)
    return {"mean_diff": k_arm / n_arm - k_ref / n_ref, "ci_low": low, "ci_high": high,
            "p_support": support, "p_contradict": contradict}


def compare_paired_outcomes(arm, reference, direction: str = "higher") -> dict:
    """Two models judged on the same items (same captions and noise), one success or failure each: the
    difference of their success rates with the exact McNemar test, i.e. a binomial test on the discordant items
    (those exactly one model gets right), one-sided for the claimed direction (support) and the other (contradict).
    The 95% interval is conditional on the number of discordant items d of n: Clopper-Pearson's interval of the
    share the arm wins among them, mapped to the difference (2 share - 1) d / n. ``arm``/``reference``: booleans."""
    import numpy as np
    from scipy import stats

    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    arm, reference = np.asarray(arm, dtype=bool), np.asarray(reference, dtype=bool)
    if arm.shape != reference.shape or arm.ndim != 1 or not len(arm):
        raise ValueError(f"paired outcomes need two equal, non-empty 1-d arrays, got {arm.shape} and "
                         f"{reference.shape}")
    n, arm_only, reference_only = len(arm), int((arm & ~reference).sum()), int((reference & ~arm).sum())
    discordant = arm_only + reference_only
    result = {"n": n, "k_arm": int(arm.sum()), "k_ref": int(reference.sum()), "arm_only": arm_only,
              "ref_only": reference_only, "mean_diff": (arm_only - reference_only) / n}
    if not discordant:  # the models agree on every item: no evidence either way
        return {**result, "ci_low": 0.0, "ci_high": 0.0, "p_support": 1.0, "p_contradict": 1.0}
    # The interval from the two-sided test: a one-sided test's proportion_ci is one-sided too.
    low, high = stats.binomtest(arm_only, discordant).proportion_ci(confidence_level=0.95, method="exact")
    greater, less = (float(stats.binomtest(arm_only, discordant, alternative=side).pvalue)
                     for side in ("greater", "less"))
    support, contradict = (greater, less) if direction == "higher" else (less, greater)
    return {**result, "ci_low": (2 * low - 1) * discordant / n, "ci_high": (2 * high - 1) * discordant / n,
            "p_support": support, "p_contradict": contradict}


def _seed_differences(k_arm, n_arm, k_ref, n_ref):
    """Each seed's difference of proportions ``k_arm/n_arm - k_ref/n_ref`` and its variance from Agresti-Caffo's
    adjusted proportions (one success and one failure added to each group), which is never zero."""
    import numpy as np

    k_arm, n_arm, k_ref, n_ref = (np.asarray(values, dtype=float) for values in (k_arm, n_arm, k_ref, n_ref))
    adjusted_arm, adjusted_ref = (k_arm + 1) / (n_arm + 2), (k_ref + 1) / (n_ref + 2)
    variance = adjusted_arm * (1 - adjusted_arm) / (n_arm + 2) + adjusted_ref * (1 - adjusted_ref) / (n_ref + 2)
    return k_arm / n_arm - k_ref / n_ref, variance


def seed_heterogeneity(k_arm, n_arm, k_ref, n_ref) -> float:
    """Cochran's Q test that every seed has the same difference of proportions (:func:`_seed_differences`): the
    inverse-variance weighted squared spread of the seeds' differences around their fixed-effect mean, its p-value
    on a chi-squared with seeds - 1 df; NaN with fewer than two seeds."""
    from scipy import stats

    differences, variance = _seed_differences(k_arm, n_arm, k_ref, n_ref)
    if len(differences) < 2:
        return math.nan
    weights = 1 / variance
    common = (weights * differences).sum() / weights.sum()
    q = float((weights * (differences - common) ** 2).sum())
    return float(stats.chi2.sf(q, len(differences) - 1))


def _seed_counts(k_arm, n_arm, k_ref, n_ref) -> list[tuple[int, int, int, int]]:
    """Each seed's four counts, rounded (a shuffled baseline's count is a mean over derangements), never truncated."""
    seeds = [tuple(int(round(count)) for count in seed) for seed in zip(k_arm, n_arm, k_ref, n_ref)]
    if not seeds:
        raise ValueError("a test over seeds needs at least one seed")
    return seeds


def every_seed_interval(k_arm, n_arm, k_ref, n_ref) -> tuple[float, float]:
    """From the lowest seed's lower :func:`count_interval` bound to the highest seed's upper one: it covers every
    seed's difference at once with about 95% confidence (the seed with the smallest difference lies above the lowest
    bound, the one with the largest below the highest, each with about 97.5%, as far as Newcombe's approximate
    interval holds its tails)."""
    bounds = [count_interval(*seed) for seed in _seed_counts(k_arm, n_arm, k_ref, n_ref)]
    return min(low for low, _ in bounds), max(high for _, high in bounds)


def compare_every_seed(k_arm, n_arm, k_ref, n_ref, direction: str = "higher") -> dict:
    """The module docstring's intersection-union test over seeds that disagree: each seed's own exact test, p = the
    largest seed's (support and contradict alike), :func:`every_seed_interval`, the seeds' mean difference."""
    seeds = _seed_counts(k_arm, n_arm, k_ref, n_ref)
    p_values = [_count_p_values(*seed, direction) for seed in seeds]
    low, high = every_seed_interval(k_arm, n_arm, k_ref, n_ref)
    return {"mean_diff": sum(a / n - r / m for a, n, r, m in seeds) / len(seeds), "ci_low": low, "ci_high": high,
            "p_support": max(support for support, _ in p_values),
            "p_contradict": max(contradict for _, contradict in p_values)}


def _rate_stats(frame, comparison: Comparison, metric: str) -> dict:
    """Pooled counts over the shared seeds (columns ``k_<metric>`` and ``n_<metric>``) -> :func:`compare_counts`;
    where the seeds disagree (:func:`seed_heterogeneity`), :func:`compare_every_seed` instead. A seed where
    either arm judged nothing (n = 0) is left out."""
    arm, reference = comparison.arm, comparison.reference
    k = _by_seed(frame, f"k_{metric}", arm, reference)
    n = _by_seed(frame, f"n_{metric}", arm, reference).loc[k.index]
    judged = (n[arm] > 0) & (n[reference] > 0)
    k, n = k[judged], n[judged]
    counts = [int(round(k[name].sum())) for name in (arm, reference)]
    totals = [int(round(n[name].sum())) for name in (arm, reference)]
    per_seed, per_seed_reference = (" ".join(f"{int(round(a))}/{int(b)}" for a, b in zip(k[name], n[name]))
                                    for name in (arm, reference))
    p_heterogeneity = seed_heterogeneity(k[arm], n[arm], k[reference], n[reference])
    disagree = p_heterogeneity < HETEROGENEITY_ALPHA
    if math.isnan(p_heterogeneity):
        heterogeneity_note = ""
    elif disagree:
        heterogeneity_note = (f"; seeds disagree (heterogeneity p {p_heterogeneity:.2g}): judged seed by seed, "
                              "the interval covers every seed's difference")
    else:
        heterogeneity_note = f"; heterogeneity p {p_heterogeneity:.2g}"
    reference_counts = per_seed_reference if disagree else f"{counts[1]}/{totals[1]}"
    result = {"n_seeds": len(k), "signs": f"{per_seed} vs {reference_counts}{heterogeneity_note}",
              "margin": math.nan, "mde": math.nan}
    if not len(k):
        return {**result, "mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                "p_support": math.nan, "p_contradict": math.nan}
    if disagree:
        return {**result, **compare_every_seed(k[arm], n[arm], k[reference], n[reference], comparison.direction)}
    return {**result, **compare_counts(counts[0], totals[0], counts[1], totals[1], comparison.direction)}


def _metric_stats(frame, comparison: Comparison, metric: str) -> dict:
    if comparison.test == "rate":
        return _rate_stats(frame, comparison, metric)
    return _paired_stats(frame, comparison, metric)


def decide(comparison: Comparison, p_support: float, p_contradict: float) -> str:
    """The module docstring's rule for one row's (adjusted) one-sided p-values."""
    alpha = EQUIVALENCE_ALPHA if comparison.test == "equivalence" else SUPERIORITY_ALPHA
    if math.isfinite(p_support) and p_support < alpha:
        return "supported"
    if math.isfinite(p_contradict) and p_contradict < SUPERIORITY_ALPHA:
        return "contradicted"
    return "unresolved"


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels); NaN stays NaN and is not counted in the family."""
    import numpy as np
    from statsmodels.stats.multitest import multipletests

    values = np.asarray(p_values, dtype=float)
    adjusted = np.full(len(values), np.nan)
    finite = np.isfinite(values)
    if finite.any():
        adjusted[finite] = multipletests(values[finite], method="holm")[1]
    return adjusted.tolist()


def compare(frame, comparison: Comparison) -> dict:
    """One comparison's row before the family correction (p_adj = p): primary and secondary metric."""
    return verdict_rows(frame, [comparison])[0]


def verdict_rows(frame, comparisons: list[Comparison]) -> list[dict]:
    """Every comparison's row, Holm-adjusted within each claim's family of controlled rows."""
    rows = []
    for comparison in comparisons:
        primary = _metric_stats(frame, comparison, comparison.metric)
        row = {"paper_claim": comparison.paper_claim, "question": comparison.question,
               "comparison": comparison.name, "test": comparison.test, "metric": comparison.metric,
               "margin": primary["margin"], "n_seeds": primary["n_seeds"], "signs": primary["signs"],
               "confound": comparison.confound, **{key: primary.get(key, math.nan) for key in _METRIC_STATS[:5]},
               "p": primary["p_support"], "_p_contradict": primary["p_contradict"], "_comparison": comparison,
               "secondary_metric": comparison.secondary or ""}
        if comparison.secondary:
            second = _metric_stats(frame, comparison, comparison.secondary)
            row.update(secondary_mean_diff=second["mean_diff"], secondary_ci_low=second["ci_low"],
                       secondary_ci_high=second["ci_high"], secondary_p=second["p_support"],
                       secondary_verdict=decide(comparison, second["p_support"], second["p_contradict"]))
        rows.append(row)
    families: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        if not row["confound"]:
            families.setdefault(row["paper_claim"], []).append(index)
    for members in families.values():
        support = holm([rows[i]["p"] for i in members])
        contradict = holm([rows[i]["_p_contradict"] for i in members])
        for i, p_support, p_contradict in zip(members, support, contradict):
            rows[i].update(p_adj=p_support, correction=f"holm over {len(members)}",
                           verdict=decide(rows[i]["_comparison"], p_support, p_contradict))
    for row in rows:
        comparison = row.pop("_comparison")
        row.pop("_p_contradict")
        if row["confound"]:  # neither metric gets a verdict: the factor is not isolated
            row.update(p_adj=math.nan, correction="", verdict="descriptive")
            if comparison.secondary:
                row.update(secondary_verdict="descriptive")
        row["agreement"] = agreement(row, comparison)
    return rows


def agreement(row: dict, comparison: Comparison) -> str:
    """Whether the two metrics tell the same story, in words: "loss supports, fd contradicts"."""
    if not comparison.secondary or row["verdict"] == "descriptive":
        return ""
    words = {"supported": "supports", "contradicted": "contradicts", "unresolved": "is unresolved"}
    first, second = words[row["verdict"]], words[row["secondary_verdict"]]
    same = "agree" if first == second else "disagree"
    return f"{comparison.metric} {first}, {comparison.secondary} {second} ({same})"


def verdict_table(frame, comparisons: list[Comparison], *, notebook: str, profile: str, steps: int | None = None):
    """Every comparison's verdict row, with the notebook, profile and training budget (steps) that produced it."""
    import pandas as pd

    rows = [{"notebook": notebook, "profile": profile, "steps": steps, **row}
            for row in verdict_rows(frame, comparisons)]
    return pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))


def update_verdicts(path: Path, table) -> None:
    """Replace the rows of (notebook, profile) in the verdicts file with ``table``; other rows are kept."""
    import pandas as pd

    from .checkpoint import write_atomically

    path = Path(path)
    if path.is_file():
        old = pd.read_csv(path)
        keys = set(zip(table["notebook"], table["profile"]))
        old = old[[key not in keys for key in zip(old["notebook"], old["profile"])]]
        table = pd.concat([old, table], ignore_index=True) if len(old) else table
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.reindex(columns=list(VERDICT_COLUMNS)).sort_values(["notebook", "profile"], kind="stable")
    table["steps"] = table["steps"].astype("Int64")  # "400", whether or not another row has no budget
    write_atomically(path, lambda handle: table.to_csv(handle, index=False, float_format="%.6g"))


def read_verdicts(path: Path):
    """The verdicts file, with empty text cells as "" (not NaN)."""
    import pandas as pd

    return _with_all_columns(pd.read_csv(path, dtype={column: str for column in _TEXT_COLUMNS}))


def _interval(mean: float, low: float, high: float) -> str:
    if not math.isfinite(low):
        return f"{mean:+.4g}"
    return f"{mean:+.4g} [{low:+.4g}, {high:+.4g}]"


def conclusion_markdown(table) -> str:
    """A notebook's verdict rows as a table: claim, comparison, test, the primary metric's interval and verdict
    (Holm-adjusted p), MDE, and the secondary metric beside it."""
    table = _with_all_columns(table)
    lines = ["| steps | question | paper's claim | comparison | test | primary: diff [95% CI] | p (Holm) | MDE "
             "| verdict | secondary: diff [95% CI] | metrics |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in table.itertuples():
        steps = "" if _missing(row.steps) else f"{int(row.steps)}"
        margin = f", margin ±{row.margin:.3g}" if math.isfinite(row.margin) else ""
        p = "—" if not math.isfinite(row.p) else (f"{row.p:.2g}" if not math.isfinite(row.p_adj)
                                                  else f"{row.p:.2g} ({row.p_adj:.2g})")
        mde = "—" if not math.isfinite(row.mde) else f"{row.mde:.3g} ({row.mde_rel:.1%})"
        confound = f" (confound: {row.confound})" if row.confound else ""
        secondary = ("—" if not row.secondary_metric else
                     f"{row.secondary_metric}: {_interval(row.secondary_mean_diff, row.secondary_ci_low, row.secondary_ci_high)}")
        lines.append(f"| {steps} | {row.question} | {row.paper_claim or '—'} | {row.comparison} | {row.test}{margin} "
                     f"| {row.metric}: {_interval(row.mean_diff, row.ci_low, row.ci_high)} | {p} | {mde} "
                     f"| **{row.verdict}**{confound} ({row.signs}) | {secondary} | {row.agreement or '—'} |")
    return "\n".join(lines)


_TEXT_COLUMNS = ("paper_claim", "signs", "confound", "secondary_metric", "secondary_verdict", "agreement",
                 "correction", "test")


def _with_all_columns(table):
    """A verdict table with every column of :data:`VERDICT_COLUMNS` (a file written before a column existed reads
    as NaN there, "" for text)."""
    table = table.reindex(columns=list(VERDICT_COLUMNS))
    text = table[list(_TEXT_COLUMNS)].astype(object)  # a text column read back all empty comes as float NaN
    return table.assign(**text.where(text.notna(), "").to_dict("series"))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def answers(table) -> list[str]:
    """One generated sentence per question of a verdict table (at its largest budget when it has several):
    what the controlled rows say, with the MDE as a share of the reference's metric and the other metric's view."""
    table = _with_all_columns(table)
    if table["steps"].notna().any():
        table = table[table["steps"] == table["steps"].max()]
    sentences = []
    for question, rows in table.groupby("question", sort=False):
        parts = []
        for row in rows.itertuples():
            if row.verdict == "descriptive":
                parts.append(f"{row.comparison}: descriptive only (confound: {row.confound}), "
                             f"{row.metric} {_interval(row.mean_diff, row.ci_low, row.ci_high)}")
                continue
            mde = f", MDE {row.mde_rel:.1%} of the {row.metric}" if math.isfinite(row.mde_rel) else ""
            extra = f"; {row.agreement}" if row.agreement else ""
            parts.append(f"{row.comparison} ({row.test}): **{row.verdict}** on {row.metric} "
                         f"{_interval(row.mean_diff, row.ci_low, row.ci_high)}{mde}{extra}")
        steps = "" if _missing(rows["steps"].iloc[0]) else f" at {int(rows['steps'].iloc[0])} steps"
        sentences.append(f"*{question}*{steps}: " + "; ".join(parts) + ".")
    return sentences
