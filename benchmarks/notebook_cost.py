"""What each notebook's study costs at each profile: runs, training FLOPs, CPU-hours as measured, GPU-hours estimated.

    python benchmarks/notebook_cost.py [--json experiments/results/benchmarks/notebook_cost.json]

For every study of notebooks 02-05 (:mod:`vitdiff.workbook.studies`) and every workbook profile: the number of
runs the profile plans (arms x its seeds: what the notebook costs run as it is), the training FLOPs of all of them
(3 x the forward GFLOPs of each arm, DiT's convention, x batch x steps; evaluation not included), the runs filed
(more where seeds were added, e.g. 03 at cpu with 8), the CPU-hours those filed runs record (``wall_s``, else
``train_s`` for rows filed before runs recorded their wall time; a row filed from another notebook's run,
``same_run_as``, counts where it was trained; blank where nothing is filed), and an
**estimate** of GPU-hours from the FLOPs alone at an assumed sustained rate (``--tflops``, default 200: a fifth of an
H100's dense bf16 peak). The tiny models are launch-bound on a GPU, so for them the estimate is a lower bound.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from vitdiff import workbook as wb
from vitdiff.workbook import studies
from vitdiff.workbook.campaign import own_runs

REPO = Path(__file__).resolve().parents[1]


def cost_rows(tflops: float) -> list[dict]:
    rows = []
    for name, profile in wb.PROFILES.items():
        for key in studies.STUDIES:
            study = studies.study(key, profile)
            gflops = sum(wb.model_cost_of(variant, profile)[1] for variant in study.variants)
            runs = len(study.variants) * len(profile.seeds)
            train_pflops = 3 * gflops * len(profile.seeds) * profile.batch_size * profile.steps / 1e6
            filed = REPO / "experiments" / "results" / study.notebook / f"{name}.csv"
            cpu_hours, filed_runs = None, 0
            if filed.is_file():
                frame = pd.read_csv(filed)
                column = "wall_s" if "wall_s" in frame else "train_s"
                cpu_hours, filed_runs = own_runs(frame)[column].sum() / 3600, len(frame)
            rows.append({"notebook": study.notebook, "profile": name, "runs": runs, "filed_runs": filed_runs,
                         "steps": profile.steps, "batch": profile.batch_size, "train_PFLOPs": train_pflops,
                         "cpu_hours_filed (measured)": cpu_hours,
                         f"gpu_hours_at_{tflops:g}_TFLOPs (estimate)": train_pflops * 1e3 / tflops / 3600})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=200.0, help="assumed sustained GPU rate for the estimate")
    parser.add_argument("--json", type=Path, help="also write the rows here (the report renders benchmarks/*.json)")
    args = parser.parse_args()
    rows = cost_rows(args.tflops)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda value: f"{value:.3g}"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
