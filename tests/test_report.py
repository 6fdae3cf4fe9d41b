"""The README's result tables are generated from the results files, and --check catches hand edits."""
import json
from pathlib import Path

import pandas as pd

from vitdiff import report

ROOT = Path(__file__).resolve().parents[1]


def write_results(results: Path) -> None:
    folder = results / "02_x"
    folder.mkdir(parents=True)
    pd.DataFrame([{"variant": v, "seed": s, "params_M": 0.5, "gflops": 0.01, "loss": loss, "loss@1": loss, "fd": 9.0}
                  for v, losses in {"a": [1.0, 1.2], "b": [2.0, 2.1]}.items() for s, loss in enumerate(losses)]
                 ).to_csv(folder / "cpu.csv", index=False)
    (folder / "cpu.json").write_text(json.dumps({"protocol": "digits, 3 steps"}))
    (results / "benchmarks").mkdir()
    (results / "benchmarks" / "speed.json").write_text(json.dumps([{"model": "m", "peer": None, "ratio": 1.23456}]))
    pd.DataFrame([{"notebook": "02_x", "profile": "cpu", "question": "q?", "paper_claim": "", "comparison": "a - b",
                   "metric": "loss", "n_seeds": 2, "mean_diff": -0.95, "ci_low": -1.5, "ci_high": -0.3, "mde": 0.4,
                   "verdict": "supported", "signs": "--"}]).to_csv(results / "verdicts.csv", index=False)


def test_generate_then_check(tmp_path):
    results, readme = tmp_path / "results", tmp_path / "README.md"
    write_results(results)
    readme.write_text(f"intro\n{report.BEGIN}\nstale\n{report.END}\noutro\n")
    args = ["--readme", str(readme), "--results", str(results)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "| a | 0.500 | 0.0100 | 2 | 1.1 ± 0.14 | 9 ± 0 | 1.1 |" in text
    assert "**supported** (--)" in text and "Protocol: digits, 3 steps" in text
    assert "| model | peer | ratio |" in text and "| m | — | 1.23 |" in text  # benchmark rows, as measured
    assert report.main([*args, "--check"]) == 0
    readme.write_text(text.replace("1.1 ± 0.14", "1.0 ± 0.14"))  # a hand edit
    assert report.main([*args, "--check"]) == 1


def test_the_committed_readme_matches_the_committed_results():
    assert report.main(["--check"]) == 0


def test_a_results_table_says_how_many_runs_it_holds_beside_the_protocols_plan():
    import pandas as pd

    from vitdiff.report import filed_line

    frame = pd.DataFrame({"variant": ["a", "a", "b"], "seed": [0, 1, 0]})
    assert filed_line(frame) == "Filed: 3 runs of 2 arms, 1–2 seeds an arm (seeds 0, 1)."
    assert filed_line(frame.iloc[[0, 2]]) == "Filed: 2 runs of 2 arms, 1 seed an arm (seeds 0)."
    assert filed_line(frame.iloc[:0]) == "Filed: no runs yet."


def test_an_alignment_table_marks_the_rows_a_split_does_not_have():
    rows = [{"seed": 0, "split": split, "guidance": 3.0, "attribute": name, "accuracy": 0.5, "shuffled_baseline": 0.25,
             "empty_caption_baseline": 0.1, "fd": 100.0, "fd_redrawn": 30.0, "fd_floor": 200.0}
            for split in ("val", "test") for name in ("all_correct", "shape", *(["held_out_shape"] if split == "test"
                                                                                else []))]
    header, _, val, test = report.alignment_table(pd.DataFrame(rows))
    assert header.endswith("| held_out_shape | empty caption: all_correct | FD (captions redrawn / other scenes) |")
    assert val == "| val | 3 | 1 | 0.500 / 0.250 | 0.500 / 0.250 | — | 0.100 | 100 (30 / 200) |"
    assert test.endswith("| 0.500 / 0.250 | 0.100 | 100 (30 / 200) |")
    # Rows filed before the redrawn captions were measured keep the old column.
    assert report.alignment_table(pd.DataFrame(rows).drop(columns="fd_redrawn"))[0].endswith("| FD (other scenes) |")


def test_the_claims_table_says_how_many_seeds_each_verdict_rests_on():
    verdicts = pd.DataFrame([{"notebook": "07", "profile": profile, "steps": None, "paper_claim": "draws captions",
                              "verdict": verdict, "n_seeds": seeds}
                             for profile, seeds in (("long", 1), ("short", 3))
                             for verdict in ("supported", "unresolved")])
    verdicts.loc[3, "n_seeds"] = 2  # a comparison short of a seed
    header, _, long, short = report.claims_block(verdicts)
    assert header.startswith("| claim (source) | notebook, profile, budget | seeds |")
    assert long == "| draws captions | 07, long, final | 1 | 1 / 0 / 1 | 0 |"
    assert short == "| draws captions | 07, short, final | 2–3 | 1 / 0 / 1 | 0 |"


def test_held_out_tables_show_each_pairs_shapes_and_the_paired_comparison(tmp_path):
    folder = tmp_path / "07_text_to_image"
    folder.mkdir()
    pd.DataFrame([{"pair": "blue square", "n": 26, "circle": 22, "square": 1, "triangle": 3, "absent": 0,
                   "asked": 1 / 26, "seen_with_colour": 25 / 26, "model": "m", "steps": 10, "image_size": 64,
                   "guidance": 3, "seed": 2, "captions": 96}]).to_csv(folder / "held_out_shapes.csv", index=False)
    pd.DataFrame([{"arm": "dropout", "reference": "control", "seed": 2, "captions": 384, "guidance": 3.0, "n": 400,
                   "k_arm": 120, "k_ref": 100, "arm_only": 40, "ref_only": 20, "mean_diff": 0.05, "ci_low": 0.01,
                   "ci_high": 0.09, "p_support": 0.0067, "p_contradict": 0.996, "verdict": "supported"}]
                 ).to_csv(folder / "held_out_paired.csv", index=False)
    text = report.render(tmp_path)
    assert "| m | 96 | 1/26 (22, 1, 3, 0) |" in text
    assert "| dropout | control | 2 | 384 | 3 | 400 | 120 | 100 | 40 / 20 | +0.050 [+0.010, +0.090] | 0.0067 | " \
           "supported |" in text
