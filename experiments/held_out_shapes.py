"""What a text model draws for the held-out colour-shape pairs of notebook 07 (descriptive): the test split's
captions sampled as the notebook judges them (same captions, seed and batch size, so the same images), and for
each held-out pair how often its object came out as each shape (`vitdiff.text_alignment.held_out_shapes_drawn`).
Rows go to experiments/results/07_text_to_image/held_out_shapes.csv, one per (model, pair):

    python experiments/held_out_shapes.py outputs/07_text_to_image/cpu-64-long/runs/seed2-95ed8dae \\
        --name "cpu-64-long seed 2" --seed 2

``--against RUN_DIR --against-name NAME`` also samples a second model on the same captions and noise, tabulates it
too, and compares the two on the held-out objects, item by item (`vitdiff.findings.compare_paired_outcomes`: exact
McNemar, one-sided for "the first draws the asked shape more often"), in held_out_paired.csv. ``-n`` more captions
than the notebook's 96 buys power: the paired rows then describe other samples than the notebook's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from vitdiff.cli import run_command
from vitdiff.workbook import REPO_ROOT, one_thread

RESULTS = REPO_ROOT / "experiments" / "results" / "07_text_to_image" / "held_out_shapes.csv"
PAIRED = RESULTS.with_name("held_out_paired.csv")


class HeldOutSamples(NamedTuple):
    """One model's samples of the test captions: what the judge saw, the captions' attributes, and the model."""
    predicted: torch.Tensor   # (N, 2, 4), vitdiff.shapes.predict_attributes
    attributes: torch.Tensor  # (N, 2, 4), the captions'
    steps: int
    image_size: int


def held_out_samples(run_dir: Path, *, seed: int, n: int, guidance: float) -> HeldOutSamples:
    """The run's EMA model on ``n`` test captions at ``guidance``, judged."""
    from vitdiff.build import data_geometry
    from vitdiff.generate import generate, load_for_inference
    from vitdiff.shapes import ShapesDataset, predict_attributes

    model, process, config, state, _ = load_for_inference(run_dir)
    _, image_size = data_geometry(config)
    # alignment_rows' test captions and sampling (seed, batch size 64): the samples its counts were judged on.
    captions = ShapesDataset("test", image_size=image_size, num_samples=n, seed=10_000 + seed)
    images = generate(model, process, config, n=n, batch_size=64, seed=seed, prompts=captions.captions,
                      guidance=guidance).clamp(-1, 1)
    return HeldOutSamples(predict_attributes(images), captions.attributes, int(state["step"]), image_size)


def held_out_rows(samples: HeldOutSamples, *, name: str, seed: int, guidance: float) -> pd.DataFrame:
    """The held-out objects of ``samples`` tabulated by the shape drawn, one row a held-out pair."""
    from vitdiff.text_alignment import held_out_shapes_drawn

    table = held_out_shapes_drawn(samples.predicted, samples.attributes)
    return table.assign(model=name, steps=samples.steps, image_size=samples.image_size, guidance=guidance,
                        seed=seed, captions=len(samples.attributes))


def asked_shape_drawn(samples: HeldOutSamples) -> torch.Tensor:
    """(objects,) bool: each held-out object drawn as the shape its caption asks for, in caption order."""
    from vitdiff.shapes import held_out_objects

    held_out = held_out_objects(samples.attributes)
    return (samples.predicted[:, :, 0] == samples.attributes[:, :, 0])[held_out]


def paired_row(arm: HeldOutSamples, reference: HeldOutSamples, *, names: tuple[str, str], seed: int, n: int,
               guidance: float) -> dict:
    """The two models on the same held-out objects (:func:`vitdiff.findings.compare_paired_outcomes`)."""
    from vitdiff.findings import Comparison, compare_paired_outcomes, decide

    if not torch.equal(arm.attributes, reference.attributes):
        raise ValueError("the two models were sampled on different captions: give both the same seed and -n")
    comparison = Comparison(question="Does the first model draw the held-out pairs' shapes as asked more often?",
                            paper_claim="", arm=names[0], reference=names[1], metric="held_out_shape",
                            direction="higher", test="rate")
    result = compare_paired_outcomes(asked_shape_drawn(arm).numpy(), asked_shape_drawn(reference).numpy())
    return {"arm": names[0], "reference": names[1], "seed": seed, "captions": n, "guidance": guidance, **result,
            "verdict": decide(comparison, result["p_support"], result["p_contradict"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a text run's directory (or checkpoint file)")
    parser.add_argument("--name", required=True, help="the model's name in the table")
    parser.add_argument("--seed", type=int, required=True, help="the run's seed (picks the captions and noise)")
    parser.add_argument("-n", type=int, default=96, help="test captions (notebook 07: 96)")
    parser.add_argument("--guidance", type=float, default=3.0, help="notebook 07's pre-registered scale: 3")
    parser.add_argument("--against", type=Path, metavar="RUN_DIR", help="a second model, compared item by item")
    parser.add_argument("--against-name", help="the second model's name in the tables")
    args = parser.parse_args()
    if (args.against is None) != (args.against_name is None):
        parser.error("--against and --against-name go together")
    if args.against_name == args.name:
        parser.error("--against-name must differ from --name: the two models' rows are told apart by name")

    def tabulate() -> None:
        models = [(args.name, args.run_dir)] + ([(args.against_name, args.against)] if args.against else [])
        with one_thread():
            samples = {name: held_out_samples(run_dir, seed=args.seed, n=args.n, guidance=args.guidance)
                       for name, run_dir in models}
        frame = pd.concat([held_out_rows(drawn, name=name, seed=args.seed, guidance=args.guidance)
                           for name, drawn in samples.items()], ignore_index=True)
        replace_rows(RESULTS, frame, ["model", "captions"])
        print(frame.to_string(index=False))
        if args.against:
            row = pd.DataFrame([paired_row(samples[args.name], samples[args.against_name],
                                           names=(args.name, args.against_name), seed=args.seed, n=args.n,
                                           guidance=args.guidance)])
            replace_rows(PAIRED, row, ["arm", "reference", "captions"])
            print(row.T.to_string(header=False))

    return run_command(parser.prog, tabulate)


def replace_rows(path: Path, frame: pd.DataFrame, keys: list[str]) -> None:
    """Write ``frame`` into the table at ``path``, in place of the rows it redoes (the same ``keys``); atomically, so
    a killed run never truncates a filed table."""
    from vitdiff.checkpoint import write_atomically

    if path.is_file():
        old = pd.read_csv(path)
        redone = old.set_index(keys).index.isin(frame.set_index(keys).index)
        frame = pd.concat([old[~redone], frame], ignore_index=True)
    write_atomically(path, lambda handle: frame.to_csv(handle, index=False, float_format="%.6g"))


if __name__ == "__main__":
    sys.exit(main())
