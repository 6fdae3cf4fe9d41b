"""What a text-to-image training step costs on CPU, by image size, precision and threads: notebook 07's setups
(cpu: 32x32, cpu-64, cpu-128) on one thread in fp32, cpu-64 also in bf16 autocast and on two threads.

    python benchmarks/text_step_cost.py [--steps 4] [--rounds 4] [--json experiments/results/benchmarks/text_step_cost.json]

Every setup is built first; then each round times ``--steps`` steps of each setup in turn, so a load on the machine
falls on all of them alike. Prints each setup's median seconds a step and its ratio to cpu-64 in fp32 on one thread
(how the campaign trains): compare the ratios, not the seconds, on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitdiff import text_workbook as tw
from vitdiff.trainer import Trainer

# (profile, precision, threads)
SETUPS = (("cpu", "fp32", 1), ("cpu-64", "fp32", 1), ("cpu-64", "fp32", 2), ("cpu-64", "bf16", 1),
          ("cpu-128", "fp32", 1))
REFERENCE = ("cpu-64", "fp32", 1)


def trainer_for(name: str, precision: str, threads: int, out_dir: Path) -> Trainer:
    config = tw.make_text_config(tw.text_profile(name, seeds=[0]), 0, out_dir)
    config.out_dir = str(out_dir / f"{name}-{precision}-{threads}")
    config.train.precision = precision
    return Trainer(config, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps a setup per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the rows here (the report renders benchmarks/*.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {setup: trainer_for(*setup, Path(scratch)) for setup in SETUPS}
        for (_, _, threads), trainer in trainers.items():  # warm-up: allocations, autocast caches
            torch.set_num_threads(threads)
            trainer.train_step()
        times: dict[tuple[str, str], list[float]] = {setup: [] for setup in SETUPS}
        for _ in range(args.rounds):
            for setup, trainer in trainers.items():
                torch.set_num_threads(setup[2])
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                times[setup].append((time.perf_counter() - start) / args.steps)
    median = {setup: statistics.median(values) for setup, values in times.items()}
    rows = [{"setup": name, "image_size": tw.TEXT_SETUPS[name].image_size, "precision": precision,
             "threads": threads, "s_per_step": median[setup],
             "vs_cpu64_fp32_1_thread": median[setup] / median[REFERENCE]}
            for setup in SETUPS for name, precision, threads in [setup]]
    for row in rows:
        print(f"{row['setup']:>8} {row['image_size']:>4}px {row['precision']} {row['threads']} thread(s): "
              f"{row['s_per_step']:.3f} s/step, {row['vs_cpu64_fp32_1_thread']:.2f}x cpu-64 fp32 on 1 thread")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
