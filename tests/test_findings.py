"""Paired comparisons: the decision rule, intervals against scipy's paired t-test, the verdicts file."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vitdiff.findings import Comparison, compare, update_verdicts, verdict, verdict_table


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
