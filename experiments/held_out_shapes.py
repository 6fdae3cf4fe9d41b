"""What a text model draws for the held-out colour-shape pairs of notebook 07 (descriptive): the test split's
captions sampled as the notebook judges them (same captions, seed and batch size, so the same images), and for
each held-out pair how often its object came out as each shape (`vitdiff.text_alignment.held_out_shapes_drawn`).
Rows go to experiments/results/07_text_to_image/held_out_shapes.csv, one per (model, pair):

    python experiments/held_out_shapes.py outputs/07_text_to_image/cpu-64-long/runs/seed2-95ed8dae \\
        --name "cpu-64-long seed 2" --seed 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from vitdiff.cli import run_command
from vitdiff.workbook import REPO_ROOT, one_thread

RESULTS = REPO_ROOT / "experiments" / "results" / "07_text_to_image" / "held_out_shapes.csv"


def held_out_rows(run_dir: Path, *, name: str, seed: int, n: int, guidance: float) -> pd.DataFrame:
    """The run's EMA model on ``n`` test captions at ``guidance``, the held-out objects tabulated."""
    from vitdiff.build import data_geometry
    from vitdiff.generate import generate, load_for_inference
    from vitdiff.shapes import ShapesDataset, predict_attributes
    from vitdiff.text_alignment import held_out_shapes_drawn

    model, process, config, state, _ = load_for_inference(run_dir)
    _, image_size = data_geometry(config)
    # alignment_rows' test captions and sampling (seed, batch size 64): the samples its counts were judged on.
    captions = ShapesDataset("test", image_size=image_size, num_samples=n, seed=10_000 + seed)
    images = generate(model, process, config, n=n, batch_size=64, seed=seed, prompts=captions.captions,
                      guidance=guidance).clamp(-1, 1)
    table = held_out_shapes_drawn(predict_attributes(images), captions.attributes)
    return table.assign(model=name, steps=int(state["step"]), image_size=image_size, guidance=guidance, seed=seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a text run's directory (or checkpoint file)")
    parser.add_argument("--name", required=True, help="the model's name in the table")
    parser.add_argument("--seed", type=int, required=True, help="the run's seed (picks the captions and noise)")
    parser.add_argument("-n", type=int, default=96, help="test captions (notebook 07: 96)")
    parser.add_argument("--guidance", type=float, default=3.0, help="notebook 07's pre-registered scale: 3")
    args = parser.parse_args()

    def tabulate() -> None:
        with one_thread():
            frame = held_out_rows(args.run_dir, name=args.name, seed=args.seed, n=args.n, guidance=args.guidance)
        if RESULTS.is_file():
            old = pd.read_csv(RESULTS)
            frame = pd.concat([old[old["model"] != args.name], frame], ignore_index=True)
        frame.to_csv(RESULTS, index=False, float_format="%.6g")
        print(frame[frame["model"] == args.name].to_string(index=False))

    return run_command(parser.prog, tabulate)


if __name__ == "__main__":
    sys.exit(main())
