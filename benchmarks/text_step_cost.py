"""What a text-to-image training step costs on one CPU thread, by image size and precision: notebook 07's setups
(cpu: 32x32, cpu-64, cpu-128) with the 64x64 recipe search's pixel path (one conv block a stage, caption FiLM),
in fp32 and in bf16 autocast.

    python benchmarks/text_step_cost.py [--steps 4] [--rounds 4] [--json experiments/results/benchmarks/text_step_cost.json]

Every setup is built first; then each round times ``--steps`` steps of each setup in turn, so a load on the machine
falls on all of them alike. Prints each setup's median seconds a step and its ratio to cpu-64 in fp32 (the
recipe's own): compare the ratios, not the seconds, on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from vitdiff import text_workbook as tw
from vitdiff.trainer import Trainer

PIXEL_PATH = {"decoder_blocks": 1, "decoder_film": True}
SETUPS = (("cpu", "fp32"), ("cpu-64", "fp32"), ("cpu-64", "bf16"), ("cpu-128", "fp32"))
REFERENCE = ("cpu-64", "fp32")


def trainer_for(name: str, precision: str, out_dir: Path) -> Trainer:
    setup = tw.TEXT_SETUPS[name]
    tw.TEXT_SETUPS[name] = replace(setup, model={**setup.model, **PIXEL_PATH})
    try:
        config = tw.make_text_config(tw.text_profile(name, seeds=[0]), 0, out_dir)
    finally:
        tw.TEXT_SETUPS[name] = setup
    config.out_dir = str(out_dir / f"{name}-{precision}")
    config.train.precision = precision
    return Trainer(config, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps a setup per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the rows here (the report renders benchmarks/*.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {setup: trainer_for(*setup, Path(scratch)) for setup in SETUPS}
        for trainer in trainers.values():  # warm-up: allocations, autocast caches
            trainer.train_step()
        times: dict[tuple[str, str], list[float]] = {setup: [] for setup in SETUPS}
        for _ in range(args.rounds):
            for setup, trainer in trainers.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                times[setup].append((time.perf_counter() - start) / args.steps)
    median = {setup: statistics.median(values) for setup, values in times.items()}
    rows = [{"setup": name, "image_size": tw.TEXT_SETUPS[name].image_size, "precision": precision,
             "s_per_step": median[(name, precision)], "vs_cpu64_fp32": median[(name, precision)] / median[REFERENCE]}
            for name, precision in SETUPS]
    for row in rows:
        print(f"{row['setup']:>8} {row['image_size']:>4}px {row['precision']}: {row['s_per_step']:.3f} s/step, "
              f"{row['vs_cpu64_fp32']:.2f}x cpu-64 fp32")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
