"""Where a campaign run's wall time goes: training, the held-out loss at each pause, the sample metrics (sampling,
FD, precision/recall) at each budget, the sample picture, and the start-up of a run and of a worker process.

Reads the filed rows of a long profile (``experiments/results/0[2-5]*/<profile>.csv``: each run records its seconds
by part; a row filed from another notebook's run, ``same_run_as``, is counted where it was trained) and times a
worker's Python start-up (importing vitdiff's workbook, as a spawned worker does) here.

    python benchmarks/campaign_time.py [--profile cpu-long] [--json experiments/results/benchmarks/campaign_time.json]

Prints one row per notebook and the total, each part as a share of the run's wall time; the goal is training
>= 80% of it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from vitdiff.workbook.campaign import own_runs

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train_s", "eval_loss_s", "eval_fd_s", "samples_s", "startup_s")


def worker_start_s(repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter importing the workbook (what each spawned worker pays once)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import vitdiff.workbook"], check=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def breakdown(profile: str) -> list[dict]:
    def shares(notebook: str, frame) -> dict:
        total = frame["wall_s"].sum()
        return {"notebook": notebook, "runs": len(frame), "wall_s_per_run": total / len(frame),
                **{part.replace("_s", "_share"): frame[part].sum() / total for part in PARTS}}

    frames = {path.parent.name: own_runs(pd.read_csv(path))
              for path in sorted((REPO / "experiments" / "results").glob(f"0[2-5]_*/{profile}.csv"))}
    frames = {notebook: frame for notebook, frame in frames.items() if set(PARTS) <= set(frame.columns) and len(frame)}
    rows = [shares(notebook, frame) for notebook, frame in frames.items()]
    return rows + [shares("all", pd.concat(frames.values()))] if rows else rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-long")
    parser.add_argument("--json", type=Path, help="also write the rows here (the report renders benchmarks/*.json)")
    args = parser.parse_args()
    rows = breakdown(args.profile)
    if not rows:
        print(f"no filed {args.profile} rows with their seconds by part yet")
        return 1
    start = worker_start_s()
    for row in rows:
        row["worker_start_s"] = start
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda value: f"{value:.3g}"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
