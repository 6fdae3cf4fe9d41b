"""Findings: each claim's test (superiority, equivalence, rates on counts), Holm, confounds, two metrics, the
verdicts file; checked against scipy / statsmodels and on simulated data with a known truth."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vitdiff.findings import (Comparison, answers, compare, compare_counts, compare_every_seed,
                              compare_paired_outcomes, count_interval, decide,
                              every_seed_interval, holm, paired_stats, read_verdicts, seed_heterogeneity,
                              update_verdicts, verdict, verdict_table)


def frame_from(arms: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"variant": name, "seed": seed, "loss": value}
                         for name, values in arms.items() for seed, value in enumerate(values)])


def test_decision_rule():
    assert verdict(-0.3, -0.1, "lower") == "supported"
    assert verdict(0.1, 0.3, "lower") == "contradicted"
    assert verdict(0.1, 0.3, "higher") == "supported"
    assert verdict(-0.1, 0.3, "lower") == "unresolved"
    assert verdict(math.nan, math.nan, "lower") == "unresolved"
    with pytest.raises(ValueError, match="direction"):
        verdict(0, 1, "better")


def test_interval_matches_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    reference = rng.normal(1.0, 0.5, 6)
    arm = reference - 0.1 + rng.normal(0, 0.03, 6)  # a consistent improvement under large between-seed spread
    row = compare(frame_from({"arm": list(arm), "ref": list(reference)}),
                  Comparison("q", "", "arm", "ref", "loss"))
    diffs = arm - reference
    low, high = stats.ttest_rel(arm, reference).confidence_interval(0.95)
    assert row["mean_diff"] == pytest.approx(diffs.mean())
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert row["verdict"] == "supported" and row["signs"] == "------" and row["n_seeds"] == 6
    # Unpaired, the same data would not resolve: the pairing is what the design buys.
    assert stats.ttest_ind(arm, reference).pvalue > 0.05


def test_minimum_detectable_effect_shrinks_with_seeds():
    rng = np.random.default_rng(1)
    rows = {}
    for n in (4, 16):
        noise = rng.normal(0, 1, n)
        rows[n] = compare(frame_from({"a": list(noise), "b": [0.0] * n}), Comparison("q", "", "a", "b", "loss"))
    assert rows[16]["mde"] < rows[4]["mde"]
    sd = 1.0
    expected = (stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * sd / 2
    row = compare(frame_from({"a": [1.0, -1.0, 1.0, -1.0], "b": [0.0] * 4}), Comparison("q", "", "a", "b", "loss"))
    assert row["mde"] == pytest.approx(expected * np.std([1, -1, 1, -1], ddof=1))


def test_only_shared_seeds_are_paired_and_unknown_arms_are_named():
    frame = frame_from({"a": [1.0, 2.0, 3.0], "b": [0.5, 1.0]})
    assert compare(frame, Comparison("q", "", "a", "b", "loss"))["n_seeds"] == 2
    with pytest.raises(KeyError, match="'c'"):
        compare(frame, Comparison("q", "", "c", "b", "loss"))


def test_verdicts_file_replaces_only_its_notebook_and_profile(tmp_path):
    path = tmp_path / "verdicts.csv"
    frame = frame_from({"a": [1.0, 2.0, 3.0], "b": [2.0, 3.1, 4.0]})
    comparison = Comparison("q", "claim", "a", "b", "loss")
    update_verdicts(path, verdict_table(frame, [comparison], notebook="02_x", profile="cpu"))
    update_verdicts(path, verdict_table(frame, [comparison], notebook="03_y", profile="cpu"))
    update_verdicts(path, verdict_table(frame, [comparison, comparison], notebook="02_x", profile="cpu"))
    saved = pd.read_csv(path)
    assert list(saved["notebook"]) == ["02_x", "02_x", "03_y"]
    assert set(saved["verdict"]) == {"supported"}


def two_metric_frame(rng, n, loss_shift, fd_shift):
    rows = []
    for seed in range(n):
        base_loss, base_fd = rng.normal(1.0, 0.2), rng.normal(500, 80)
        rows += [{"variant": "ref", "seed": seed, "loss": base_loss, "fd": base_fd},
                 {"variant": "arm", "seed": seed, "loss": base_loss + loss_shift + rng.normal(0, 0.01),
                  "fd": base_fd + fd_shift + rng.normal(0, 5)}]
    return pd.DataFrame(rows)


def test_superiority_is_a_one_sided_paired_t_test():
    frame = two_metric_frame(np.random.default_rng(3), 4, -0.02, 0.0)
    row = compare(frame, Comparison("q", "c", "arm", "ref", "loss"))
    arm = frame[frame.variant == "arm"].loss.to_numpy()
    ref = frame[frame.variant == "ref"].loss.to_numpy()
    assert row["p"] == pytest.approx(stats.ttest_rel(arm, ref, alternative="less").pvalue)
    assert row["p_adj"] == pytest.approx(row["p"]) and row["correction"] == "holm over 1"
    assert row["verdict"] == "supported"


def test_equivalence_holds_its_false_positive_rate_at_the_margin_and_finds_true_equivalence():
    """Simulated paired differences: at the margin itself (true difference = +margin) TOST may call parity at most
    alpha = 5% of the time; with no true difference and enough seeds it finds parity most of the time."""
    rng = np.random.default_rng(0)
    comparison = Comparison("q", "c", "arm", "ref", "loss", test="equivalence", margins={"loss": 0.02})

    def rate(true_diff, n, trials=1000):
        hits = 0
        for _ in range(trials):
            reference = rng.normal(1.0, 0.1, n)  # mean ~1.0: the margin is ~0.02 in loss units
            arm = reference + true_diff + rng.normal(0, 0.01, n)
            row = paired_stats(arm, reference, comparison, "loss")
            hits += decide(comparison, row["p_support"], row["p_contradict"]) == "supported"
        return hits / trials

    # At the margin (true difference = +margin of a reference mean of 1) TOST calls parity in at most
    # alpha = 5% of runs, within Monte-Carlo error; slightly inside the margin's edge it still must not exceed it.
    assert rate(0.02, 8) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 1000)
    assert rate(0.0, 8) > 0.8
    # A clear difference far beyond the margin is never called parity.
    assert rate(0.08, 8, trials=100) == 0.0
    far = frame_from({"arm": [1.1, 1.12, 1.09, 1.11], "ref": [1.0, 1.01, 0.99, 1.0]})
    assert compare(far, comparison)["verdict"] == "contradicted"


def test_equivalence_is_never_read_from_a_non_significant_superiority_test():
    frame = frame_from({"arm": [1.0, 1.2, 0.8, 1.1], "ref": [1.05, 1.0, 1.0, 1.0]})  # noisy, no clear difference
    superiority = compare(frame, Comparison("q", "c", "arm", "ref", "loss"))
    parity = compare(frame, Comparison("q", "c", "arm", "ref", "loss", test="equivalence"))
    assert superiority["verdict"] == "unresolved" and parity["verdict"] == "unresolved"


def test_count_test_on_three_seeds_of_one_in_96_is_not_supported():
    """Three seeds with 1 of 96 correct each, against a baseline with 0 of 96 each: the per-seed proportions are
    identical, so a t-interval collapses to a point and calls it supported; pooled counts (3 of 288 vs 0 of 288)
    are not evidence of anything."""
    frame = pd.DataFrame([{"variant": name, "seed": seed, "all_correct": k / 96, "k_all_correct": k,
                           "n_all_correct": 96} for name, k in (("arm", 1), ("ref", 0)) for seed in range(3)])
    t_row = compare(frame, Comparison("q", "c", "arm", "ref", "all_correct", direction="higher"))
    assert t_row["ci_low"] == t_row["ci_high"]  # the collapse the count test exists for
    row = compare(frame, Comparison("q", "c", "arm", "ref", "all_correct", direction="higher", test="rate"))
    assert row["verdict"] == "unresolved" and row["ci_low"] < 0 < row["ci_high"]
    assert row["signs"].startswith("1/96 1/96 1/96 vs 0/288; heterogeneity p ")
    assert row["p"] == pytest.approx(stats.boschloo_exact([[3, 0], [285, 288]], alternative="greater").pvalue)
    # The same test does resolve a real difference in counts.
    strong = compare_counts(60, 288, 20, 288, "higher")
    assert strong["ci_low"] > 0 and strong["p_support"] < 0.001 and strong["p_contradict"] > 0.5
    with pytest.raises(ValueError, match="0 <= k <= n"):
        compare_counts(5, 4, 0, 4)


def agresti_caffo(k_arm, n_arm, k_ref, n_ref) -> tuple[np.ndarray, np.ndarray]:
    arm, ref = (np.asarray(k_arm) + 1) / (np.asarray(n_arm) + 2), (np.asarray(k_ref) + 1) / (np.asarray(n_ref) + 2)
    return (np.asarray(k_arm) / np.asarray(n_arm) - np.asarray(k_ref) / np.asarray(n_ref),
            arm * (1 - arm) / (np.asarray(n_arm) + 2) + ref * (1 - ref) / (np.asarray(n_ref) + 2))


def test_seed_heterogeneity_is_cochrans_q_on_the_seeds_differences_of_proportions():
    from statsmodels.stats.meta_analysis import combine_effects

    k_arm, n_arm, k_ref, n_ref = [27, 60, 45], [106, 107, 101], [35, 39, 30], [106, 107, 101]
    reference = combine_effects(*agresti_caffo(k_arm, n_arm, k_ref, n_ref), method_re="dl").test_homogeneity()
    assert seed_heterogeneity(k_arm, n_arm, k_ref, n_ref) == pytest.approx(reference.pvalue, rel=1e-9)
    # Mirror-image seeds (a common odds ratio of exactly 1, where Breslow-Day is undefined) disagree plainly.
    assert seed_heterogeneity([60, 20], [96, 96], [20, 60], [96, 96]) < 1e-10
    # Empty and full cells keep a finite variance; equal seeds do not alarm; one seed has nothing to compare.
    assert 0.3 < seed_heterogeneity([0, 1, 0], [96] * 3, [0, 0, 1], [768] * 3) <= 1.0
    assert seed_heterogeneity([96, 96], [96, 96], [96, 96], [96, 96]) == pytest.approx(1.0)
    assert math.isnan(seed_heterogeneity([3], [10], [1], [10]))


def test_seeds_that_disagree_are_tested_seed_by_seed_and_the_largest_p_decides():
    """The intersection-union test: each seed's own exact test, the row's p the largest seed's, the interval from
    the lowest seed's bound to the highest's, the estimate the seeds' mean."""
    k_arm, k_ref, n = [94, 120, 97], [19, 19, 18], [136, 134, 131]
    seeds = [compare_counts(a, m, r, m, "higher") for a, r, m in zip(k_arm, k_ref, n)]
    row = compare_every_seed(k_arm, n, k_ref, n, "higher")
    assert row["p_support"] == max(seed["p_support"] for seed in seeds)
    assert row["p_contradict"] == max(seed["p_contradict"] for seed in seeds)
    assert (row["ci_low"], row["ci_high"]) == (seeds[0]["ci_low"], seeds[1]["ci_high"])
    assert row["mean_diff"] == pytest.approx(np.mean([a / m - r / m for a, r, m in zip(k_arm, k_ref, n)]))
    lower = compare_every_seed(k_arm, n, k_ref, n, "lower")
    assert (lower["p_support"], lower["p_contradict"]) == (row["p_contradict"], row["p_support"])
    # One seed alone not above its reference keeps the whole claim from holding, however far the others are.
    one_flat = compare_every_seed([94, 120, 20], n, k_ref, n, "higher")
    assert one_flat["p_support"] > 0.3 and one_flat["ci_low"] < 0 < one_flat["ci_high"]
    # Shuffled-baseline counts are stored as numbers; each seed's is rounded to a count, never truncated.
    rounded = compare_counts(94, 136, 19, 136)["p_support"]
    assert compare_every_seed([94.0], [136], [18.6], [136])["p_support"] == rounded
    with pytest.raises(ValueError, match="at least one seed"):
        compare_every_seed([], [], [], [])


def test_the_every_seed_interval_covers_every_seeds_difference_at_least_95_percent_of_the_time():
    """Its coverage, simulated: three seeds with different true differences (the case it is used for), the
    interval counted as covering only when every seed's true difference lies inside it."""
    rng = np.random.default_rng(11)
    true_arm, true_ref, n = np.array([0.45, 0.6, 0.8]), 0.3, 100
    trials, covered = 400, 0
    for _ in range(trials):
        low, high = every_seed_interval(rng.binomial(n, true_arm), [n] * 3, rng.binomial(n, true_ref, 3), [n] * 3)
        covered += bool(low <= (true_arm - true_ref).min() and (true_arm - true_ref).max() <= high)
    assert covered / trials >= 0.95 - 2 * math.sqrt(0.05 * 0.95 / trials)
    # One seed: its own Newcombe interval.
    assert every_seed_interval([30], [100], [20], [100]) == count_interval(30, 100, 20, 100)


def counts_frame(arm_counts: list[int], ref_counts: list[int], n: int = 107) -> pd.DataFrame:
    return pd.DataFrame([{"variant": name, "seed": seed, "shape": k / max(n, 1), "k_shape": k, "n_shape": n}
                         for name, counts in (("arm", arm_counts), ("ref", ref_counts))
                         for seed, k in enumerate(counts)])


def test_seeds_that_disagree_are_judged_seed_by_seed_not_pooled_as_samples():
    """Two seeds where the arm wins big, one where it loses big: pooled, the arm is ahead (Boschloo p < 0.001), but
    the samples of one seed say nothing about another seed's model; judged seed by seed it is unresolved. Seeds
    that differ only in how far above the reference they lie keep their verdict (each is far above on its own);
    seeds that agree are pooled."""
    comparison = Comparison("q", "c", "arm", "ref", "shape", direction="higher", test="rate")
    assert compare_counts(125, 321, 80, 321, "higher")["p_support"] < 0.001
    split = compare(counts_frame([60, 10, 55], [20, 40, 20]), comparison)
    assert split["verdict"] == "unresolved" and split["ci_low"] < 0 < split["ci_high"]
    assert "seeds disagree" in split["signs"] and "judged seed by seed" in split["signs"]
    far_apart = compare(counts_frame([100, 70, 60], [10, 12, 11]), comparison)
    assert "seeds disagree" in far_apart["signs"] and far_apart["verdict"] == "supported"
    assert far_apart["p"] == compare_counts(60, 107, 11, 107)["p_support"]  # the weakest seed decides
    steady = compare(counts_frame([60, 58, 55], [20, 22, 20]), comparison)
    assert steady["verdict"] == "supported" and "disagree" not in steady["signs"]
    pooled = compare_counts(173, 321, 62, 321, "higher")
    assert (steady["ci_low"], steady["ci_high"]) == pytest.approx((pooled["ci_low"], pooled["ci_high"]))
    # Every seed far below, by different amounts: contradicted, each seed's reference count listed.
    below = compare(counts_frame([10, 30, 20], [70, 50, 90]), comparison)
    assert "seeds disagree" in below["signs"] and below["verdict"] == "contradicted"
    assert below["signs"].startswith("10/107 30/107 20/107 vs 70/107 50/107 90/107; seeds disagree")


def test_a_row_judged_seed_by_seed_is_holm_adjusted_with_its_family():
    """The seed-by-seed p enters its claim's family like any other: two rows, Holm over 2."""
    frame = pd.concat([counts_frame([100, 70, 60], [10, 12, 11]),
                       counts_frame([50, 52, 49], [40, 41, 39]).assign(variant=lambda f: f["variant"] + "2")])
    comparisons = [Comparison("q", "c", "arm", "ref", "shape", direction="higher", test="rate"),
                   Comparison("q", "c", "arm2", "ref2", "shape", direction="higher", test="rate")]
    table = verdict_table(frame, comparisons, notebook="n", profile="p")
    assert "seeds disagree" in table["signs"].iloc[0] and "disagree" not in table["signs"].iloc[1]
    assert list(table["p_adj"]) == pytest.approx(holm(list(table["p"])))
    assert list(table["correction"]) == ["holm over 2", "holm over 2"]


def test_a_seed_that_judged_nothing_is_left_out_of_a_count_verdict():
    frame = pd.concat([counts_frame([60, 58], [20, 22]), counts_frame([0], [0], n=0).assign(seed=2)])
    row = compare(frame, Comparison("q", "c", "arm", "ref", "shape", direction="higher", test="rate"))
    assert row["n_seeds"] == 2 and row["signs"].startswith("60/107 58/107 vs 42/214")


def test_a_confounded_comparison_carries_no_verdict_and_leaves_the_claims_family():
    frame = two_metric_frame(np.random.default_rng(4), 6, -0.2, -100)
    confounded = Comparison("q", "c", "arm", "ref", "loss", confound="1 vs 3 long skips")
    clean = Comparison("q", "c", "arm", "ref", "loss")
    table = verdict_table(frame, [confounded, clean], notebook="n", profile="p")
    assert list(table["verdict"]) == ["descriptive", "supported"]
    assert table["correction"].iloc[1] == "holm over 1"  # the confounded row is not in the family
    with_fd = [Comparison("q", "c", "arm", "ref", "loss", confound="1 vs 3 long skips", secondary="fd")]
    assert verdict_table(frame, with_fd, notebook="n", profile="p")["secondary_verdict"].iloc[0] == "descriptive"
    assert math.isnan(table["p_adj"].iloc[0]) and table["confound"].iloc[0] == "1 vs 3 long skips"


def test_holm_adjusts_within_each_claims_family():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, float("nan")])[1])
    rng = np.random.default_rng(5)
    frame = two_metric_frame(rng, 4, -0.02, 0.0)
    comparisons = [Comparison("q", "claim A", "arm", "ref", "loss"), Comparison("q", "claim A", "arm", "ref", "loss"),
                   Comparison("q", "claim B", "arm", "ref", "loss")]
    table = verdict_table(frame, comparisons, notebook="n", profile="p")
    assert list(table["correction"]) == ["holm over 2", "holm over 2", "holm over 1"]
    assert table["p_adj"].iloc[0] == pytest.approx(min(1.0, 2 * table["p"].iloc[0]))


def test_the_secondary_metric_is_shown_and_disagreement_is_said():
    frame = two_metric_frame(np.random.default_rng(6), 6, -0.1, +60)  # loss better, FD worse
    row = compare(frame, Comparison("q", "c", "arm", "ref", "loss", secondary="fd"))
    assert row["verdict"] == "supported" and row["secondary_verdict"] == "contradicted"
    assert row["agreement"] == "loss supports, fd contradicts (disagree)"
    assert row["secondary_ci_low"] > 0


def test_answers_give_one_sentence_per_question_at_the_largest_budget(tmp_path):
    frame = two_metric_frame(np.random.default_rng(7), 4, -0.1, -50)
    comparisons = [Comparison("does it help?", "c", "arm", "ref", "loss", secondary="fd")]
    early = verdict_table(frame, comparisons, notebook="n", profile="p", steps=400)
    late = verdict_table(frame, comparisons, notebook="n", profile="p", steps=4000)
    both = pd.concat([early, late])
    [sentence] = answers(both)
    assert sentence.startswith("*does it help?* at 4000 steps: arm - ref (superiority): **supported** on loss")
    path = tmp_path / "verdicts.csv"
    update_verdicts(path, both)
    assert list(read_verdicts(path)["steps"]) == [400, 4000]


def test_two_seeds_get_an_interval_but_never_a_verdict():
    comparison = Comparison("q", "", "arm", "ref", "loss", secondary="fd")
    reference = [0.50, 0.52, 0.51]
    arm = [0.40, 0.4205, 0.4102]  # the same -0.1 on every seed, to within 3%: decisive from 3 seeds
    rows = {n: compare(frame_from({"arm": arm[:n], "ref": reference[:n]}).assign(fd=lambda f: f["loss"]), comparison)
            for n in (2, 3)}
    assert rows[3]["verdict"] == rows[3]["secondary_verdict"] == "supported"
    assert rows[2]["verdict"] == rows[2]["secondary_verdict"] == "unresolved"
    assert rows[2]["ci_high"] < 0 and math.isfinite(rows[2]["mde"]) and math.isnan(rows[2]["p"])


def test_paired_outcomes_are_mcnemars_exact_test_on_the_discordant_items():
    from statsmodels.stats.contingency_tables import mcnemar

    arm = np.array([1] * 30 + [1] * 14 + [0] * 4 + [0] * 52, dtype=bool)
    reference = np.array([1] * 30 + [0] * 14 + [1] * 4 + [0] * 52, dtype=bool)
    result = compare_paired_outcomes(arm, reference)
    counts = tuple(result[key] for key in ("n", "k_arm", "k_ref", "arm_only", "ref_only"))
    assert counts == (100, 44, 34, 14, 4)
    assert result["mean_diff"] == pytest.approx(0.10)
    two_sided = mcnemar([[30, 14], [4, 52]], exact=True).pvalue
    assert min(1.0, 2 * min(result["p_support"], result["p_contradict"])) == pytest.approx(two_sided)
    assert result["p_support"] == pytest.approx(stats.binom.sf(13, 18, 0.5))  # P(X >= 14 of 18)
    assert result["ci_low"] < result["mean_diff"] < result["ci_high"]
    # Swapping the arms mirrors everything; "lower" swaps the two p-values.
    swapped = compare_paired_outcomes(reference, arm)
    assert (swapped["ci_low"], swapped["ci_high"]) == pytest.approx((-result["ci_high"], -result["ci_low"]))
    lower = compare_paired_outcomes(arm, reference, direction="lower")
    assert (lower["p_support"], lower["p_contradict"]) == (result["p_contradict"], result["p_support"])
    same = compare_paired_outcomes(arm, arm)
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["p_support"]) == (0, 0, 0, 1)
    with pytest.raises(ValueError, match="equal, non-empty"):
        compare_paired_outcomes(arm, reference[:-1])


def test_the_paired_interval_covers_the_true_difference_at_least_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    # Correlated models: both right on 35% of the items, the arm alone on 12%, the reference alone on 6%.
    truth, covered, trials = 0.12 - 0.06, 0, 400
    for _ in range(trials):
        cell = rng.choice(4, size=120, p=[0.35, 0.12, 0.06, 0.47])
        result = compare_paired_outcomes(np.isin(cell, (0, 1)), np.isin(cell, (0, 2)))
        covered += result["ci_low"] <= truth <= result["ci_high"]
    assert covered / trials >= 0.93  # nominal 95%; 400 trials put the estimate within about 1.1% (1 s.e.)
