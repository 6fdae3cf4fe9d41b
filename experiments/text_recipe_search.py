"""One step of the text-to-image recipe search (notebook 07, experiments/README.md): train a text profile's setup
(cpu: 32x32, cpu-64, cpu-128) with some changes for one seed, judge it like the notebook does (val and test captions,
w = 1 and 3, shuffled-caption, shape-shuffled and empty-caption baselines, with counts), and add its rows to
experiments/results/07_text_to_image/recipe_search.csv.

    python experiments/text_recipe_search.py "noise: ln sigma ~ N(-0.2, 1.4)" --steps 1500 \\
        --set 'diffusion.process_kwargs={"p_mean": -0.2, "p_std": 1.4}'
    python experiments/text_recipe_search.py "64x64, wider high-resolution skip" --profile cpu-64 --steps 3600 \\
        --model hires_channels=16 --grid 64x64_hires16_3600

(cpu-64 and cpu-128 now carry the search's pixel path, a conv block and caption FiLM a stage; rows filed before
that record what they changed from the light decoder, and rebuilding them takes
``--model decoder_blocks=0 --model decoder_film=false``.)

Progressive resolution: a 32x32 run (patch 4) grown to 64x64 (patch 8, one more x2 decoder stage), then trained on:

    python experiments/text_recipe_search.py "32x32, to grow from" --steps 3000
    python experiments/text_recipe_search.py "64x64 grown from 32x32" --profile cpu-64 --steps 3600 \\
        --model decoder_channels=[64,32,32] --model hires_channels=16 --model decoder_blocks=1 \\
        --grow-from outputs/07_text_to_image/recipe_search/seed0-<key of the 32x32 run>

(its rows count the 64x64 training only; the source run has rows of its own). The same flag at the source's own
size continues a trained model (a fresh optimiser from its EMA weights), e.g. with and without colour-word dropout
(`vitdiff.text_workbook.word_dropout`), the pair differing in the captions alone:

    python experiments/text_recipe_search.py "64x64 continued, colour words dropped p=0.3" --profile cpu-64 \\
        --steps 5400 --seed 2 --colour-dropout 0.3 --grow-from outputs/07_text_to_image/cpu-64-long/runs/seed2-<key>

A run that exists (same recipe) is read back, with the training time (wall and CPU seconds) measured when it was
trained; more steps extend it from its checkpoint, and the times add up."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml

from vitdiff import text_workbook as tw
from vitdiff.cli import run_command
from vitdiff.workbook import REPO_ROOT, one_thread

RESULTS = REPO_ROOT / "experiments" / "results" / "07_text_to_image" / "recipe_search.csv"


def key_value(text: str) -> tuple[str, object]:
    """One KEY=VALUE argument, the value read as YAML (numbers, lists, mappings)."""
    key, sep, value = text.partition("=")
    if not (key and sep):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (e.g. train.lr=2e-3)")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"the value of {key} is not valid YAML: {value!r}") from error


def record_training_time(path: Path, steps: int, elapsed: float) -> float:
    """Training seconds to reach ``steps``: this call's time plus that of the checkpoint it resumed from (runs are
    extended in place when only the step count changes), kept in ``path`` (steps -> seconds)."""
    times = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
    if steps not in times:
        earlier = [k for k in times if k < steps]
        times[steps] = elapsed + (times[max(earlier)] if earlier else 0.0)
        path.write_text(json.dumps(times))
    return times[steps]


def timed_training(train, steps: int):
    """``train()`` -> (its trainer, wall seconds, CPU seconds to reach ``steps``), recorded in the run directory
    (:func:`record_training_time`). A run stopped by a signal records its time at the step it stopped, so the
    resumed run's times include it."""
    start, start_cpu = time.perf_counter(), time.process_time()

    def record(out_dir: Path, step: int) -> tuple[float, float]:
        return (record_training_time(out_dir / "train_time.json", step, time.perf_counter() - start),
                record_training_time(out_dir / "train_cpu_time.json", step, time.process_time() - start_cpu))

    try:
        trainer = train()
    except tw.TrainingStopped as stopped:
        record(stopped.out_dir, stopped.step)
        raise
    return (trainer, *record(Path(trainer.out_dir), steps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="what this step changes, in words (the table's row label)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="cpu", choices=("cpu", "cpu-64", "cpu-128"),
                        help="the text profile whose setup and recipe the changes apply to")
    parser.add_argument("--set", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help="config override")
    parser.add_argument("--model", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help="backbone switch")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--grid", metavar="NAME",
                        help="also draw the prompt grid at the notebook's guidance (w = 3), as "
                             "recipe_search_NAME_prompt_grid.png beside the table")
    parser.add_argument("--grow-from", type=Path, metavar="RUN_DIR",
                        help="start from this run's model at a smaller image size (progressive resolution)")
    parser.add_argument("--colour-dropout", type=float, default=0.0, metavar="P",
                        help="drop each training caption's colour words with probability P (default 0: none)")
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "outputs" / "07_text_to_image" / "recipe_search")
    args = parser.parse_args()
    # A bad config key or value is one line on stderr (exit 2), as with `vitdiff train`.
    return run_command(parser.prog, lambda: search_step(args))


def search_step(args: argparse.Namespace) -> None:
    config_changes, model_changes = dict(args.set), dict(args.model)
    grown = {"grown_from": str(args.grow_from)} if args.grow_from else {}
    dropout = {"colour_word_dropout": args.colour_dropout} if args.colour_dropout else {}
    setup = tw.TEXT_SETUPS[args.profile]
    tw.TEXT_SETUPS[args.profile] = replace(setup, image_size=args.image_size or setup.image_size,
                                           model={**setup.model, **model_changes})
    profile = tw.text_profile(args.profile, steps=args.steps, seeds=[args.seed]).with_overrides(**config_changes)
    with one_thread():
        trainer, train_s, cpu_s = timed_training(
            lambda: tw.train_text_model(profile, args.seed, args.runs_dir, progress=True, grow_from=args.grow_from,
                                       colour_dropout=args.colour_dropout),
            args.steps)
        rows = [row for split in ("val", "test")
                for row in tw.alignment_rows(trainer.ema.module, trainer.process, trainer.config, split=split,
                                             guidances=(1.0, 3.0), n=profile.eval_n, seed=args.seed)]
        if args.grid:
            figure = tw.prompt_grid_figure(trainer.ema.module, trainer.process, trainer.config, profile,
                                           guidance=tw.VERDICT_GUIDANCE, seed=args.seed)
            figure.savefig(RESULTS.parent / f"recipe_search_{args.grid}_prompt_grid.png", dpi=150)
    frame = pd.DataFrame(rows).assign(recipe=args.recipe, seed=args.seed, steps=args.steps, train_s=train_s,
                                      cpu_s=cpu_s, profile=args.profile,
                                      image_size=tw.TEXT_SETUPS[args.profile].image_size,
                                      noise=json.dumps(profile.process_kwargs),
                                      changes=json.dumps({**config_changes, **model_changes, **grown, **dropout}))
    if RESULTS.is_file():
        old = pd.read_csv(RESULTS)
        # Rows are per (recipe, seed, steps): a second seed joins the first, a longer run keeps the shorter one.
        same = (old["recipe"] == args.recipe) & (old["seed"] == args.seed) & (old["steps"] == args.steps)
        frame = pd.concat([old[~same], frame], ignore_index=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS, index=False, float_format="%.6g")
    print(tw.alignment_summary(frame[frame["recipe"] == args.recipe]).round(3).to_string())


if __name__ == "__main__":
    sys.exit(main())
