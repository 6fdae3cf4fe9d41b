"""One text seed: trained (resumed, continued from a shorter profile's run, or grown from a smaller image size),
then judged on val and test captions (:func:`run_text_seed`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import copy_atomically, latest_path, load_checkpoint, write_atomically
from ..config import Config
from ..text_alignment import alignment_rows, text_code_key
from ..workbook import Profile, config_key, model_cost, one_thread, save_figure
from .figures import prompt_grid_figure
from .profiles import TEXT_CONTINUES, TEXT_SETUPS, VERDICT_GUIDANCE, make_text_config


# What a checkpoint must share to be resumed: a run directory's name hashes these.
_RUN_SECTIONS = ("model", "diffusion", "data", "text")


def text_run_dir(config: Config, seed: int, runs_dir: Path) -> Path:
    """``runs_dir/seed<seed>-<key>``: the key hashes what a checkpoint must share to be resumed."""
    return runs_dir / f"seed{seed}-{config_key(config, sections=_RUN_SECTIONS, length=8)}"


def train_text_model(profile: Profile, seed: int, runs_dir: Path, *, progress: bool = True,
                     grow_from: Path | None = None, colour_dropout: float = 0.0):
    """Train one seed in ``runs_dir/seed<seed>-<key>`` and return its Trainer. The key hashes what a checkpoint
    must share to be resumed, so a re-run continues (or just reloads) the run, more steps extend it, and a changed
    model or recipe starts a new run instead of failing on the old checkpoint.

    ``grow_from`` (a run directory or checkpoint of the same model at a smaller image size) starts the run from
    that model's EMA weights (:func:`vitdiff.models.grow.grow_state_dict`: progressive resolution); such runs live
    in ``runs_dir/grown-from-<source run>-step<its step>/``, so a source trained on grows a new run.
    ``colour_dropout`` > 0 drops each training caption's colour words with that probability
    (:mod:`.word_dropout`, the recipe search's switch); such runs live in ``colour-word-dropout-<p>/`` below."""
    from ..checkpoint import load_checkpoint
    from ..trainer import Trainer
    from .word_dropout import dropout_runs_dir, dropout_trainer

    source = None
    if grow_from is not None:
        checkpoint = Path(grow_from) / "last.pt" if Path(grow_from).is_dir() else Path(grow_from)
        source = load_checkpoint(checkpoint)
        runs_dir = runs_dir / f"grown-from-{checkpoint.parent.name}-step{source['step']}"
    if colour_dropout:
        runs_dir = dropout_runs_dir(runs_dir, colour_dropout)
    config = make_text_config(profile, seed, runs_dir)
    config.out_dir = str(text_run_dir(config, seed, runs_dir))
    trainer = (dropout_trainer(colour_dropout) if colour_dropout else Trainer)(config, progress=progress)
    if source is not None and trainer.step == 0:  # not again when the grown run resumes
        grow_trainer(trainer, source)
    record = trainer.fit()
    if record.get("stopped_by_signal") is not None:  # saved where it stopped; nothing may be judged as if finished
        raise TrainingStopped(Path(config.out_dir), trainer.step, config.train.steps)
    return trainer


# Written into a run directory started from a shorter profile's run (:func:`continue_shorter_run`): which run, and
# the step it was taken at.
CONTINUED_FROM = "continued_from.json"


def continue_shorter_run(profile: Profile, seed: int, runs_dir: Path) -> None:
    """Where ``profile`` trains another profile's seeds longer (:data:`TEXT_CONTINUES`) and this seed's run has no
    checkpoint yet, start it from that profile's run of the seed on this machine, found in the notebook's layout
    (``runs_dir`` is ``<out>/<profile>/runs``, the other's ``<out>/<other>/runs``): its checkpoint and its log, so
    the training seconds count both parts, and :data:`CONTINUED_FROM`. Nothing where either is missing (the seed
    then trains from step 0, to the same model) or the other run is past the profile's steps."""
    from ..checkpoint import latest_path, load_checkpoint

    shorter_profile = TEXT_CONTINUES.get(profile.name)
    run_dir = text_run_dir(make_text_config(profile, seed, runs_dir), seed, runs_dir)
    if shorter_profile is None or latest_path(run_dir) is not None:
        return
    shorter = runs_dir.parent.parent / shorter_profile / "runs" / run_dir.name
    checkpoint = latest_path(shorter)
    if checkpoint is None or not (shorter / "metrics.jsonl").is_file():
        return
    step = load_checkpoint(checkpoint)["step"]
    if step > profile.steps:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"run": str(shorter.resolve()), "profile": shorter_profile, "step": step}).encode()
    write_atomically(run_dir / CONTINUED_FROM, lambda handle: handle.write(record))
    # Copies, not links: the trainer appends to its log. The checkpoint last: it is what makes the trainer resume.
    copy_atomically(shorter / "metrics.jsonl", run_dir / "metrics.jsonl")
    copy_atomically(checkpoint, run_dir / "last.pt")
    print(f"seed {seed} of {profile.name} continues {shorter} from step {step}")


def continued_from_step(run_dir: Path) -> int:
    """The step a run was started at from a shorter profile's run (:func:`continue_shorter_run`); 0 if it was not."""
    record = Path(run_dir) / CONTINUED_FROM
    return json.loads(record.read_text())["step"] if record.is_file() else 0


class TrainingStopped(RuntimeError):
    """A text run stopped by a signal before its steps: resumable, never to be judged as finished."""

    def __init__(self, out_dir: Path, step: int, steps: int):
        super().__init__(f"text run {out_dir} stopped at step {step} of {steps} (its checkpoint is saved): "
                         "run it again to resume")
        self.out_dir, self.step, self.steps = out_dir, step, steps

    def __reduce__(self):  # rebuilt from its fields when it crosses from a worker process
        return type(self), (self.out_dir, self.step, self.steps)


def grow_trainer(trainer, source: dict) -> dict[str, list[str]]:
    """Load a smaller-resolution run's EMA weights (``source``: its loaded checkpoint) into a fresh trainer's model
    and EMA, grown to its size."""
    from ..models.grow import grow_state_dict

    weights = {name.removeprefix("module."): value for name, value in source["ema"].items()
               if name.startswith("module.")}
    grown, report = grow_state_dict(weights, trainer.model)
    trainer.model.load_state_dict(grown)
    trainer.ema.module.load_state_dict(grown)
    print(f"grown from a step-{source['step']} model: {len(report['copied'])} tensors copied, "
          f"{len(report['spread'])} spread, {len(report['new'])} new, {len(report['dropped'])} of the source's "
          "dropped", flush=True)
    return report


def local_text_model(profile: Profile, seed: int, runs_dir: Path):
    """A seed's run on this machine, finished at the profile's steps (its Trainer, read back), or None where its
    checkpoint is not here (the seed was read back from filed rows) or stopped short (it is never trained on here)."""
    from ..checkpoint import load_checkpoint

    checkpoint = text_run_dir(make_text_config(profile, seed, runs_dir), seed, runs_dir) / "last.pt"
    if not checkpoint.is_file() or load_checkpoint(checkpoint)["step"] != profile.steps:
        return None
    return train_text_model(profile, seed, runs_dir, progress=False)


def seed_keys(config: Config) -> dict[str, str]:
    """What a filed seed's rows must match to be read back: the key of its config and of the code it ran."""
    return {"config_key": config_key(config), "code_key": text_code_key(config)}


# What every alignment row of a seed carries about its run (with its profile, steps, config and code keys).
SEED_FACTS = ("train_s", "threads", "continued_from_step", "params_M", "gflops", "text_params_M")


def run_text_seed(job: tuple) -> dict[str, list[dict]]:
    """Train one seed (:func:`train_text_model`) on ``threads`` threads (one by default) and judge its EMA model on
    val and test captions at every guidance scale of the profile (:func:`alignment_rows`) -> ``{"rows": ...,
    "curve": ...}``: the rows, each with the seed's :data:`SEED_FACTS` and its config and code keys, and the training
    loss by step. Its prompt grid (at :data:`VERDICT_GUIDANCE`) is drawn into its run directory as
    ``prompt_grid.png`` and ``.pdf``."""
    import pandas as pd

    profile, seed, runs_dir, threads = job
    setup = TEXT_SETUPS[profile.name]
    # The keys of the code as it is when the run starts: what trains is what is filed, even if the source is edited
    # while it trains.
    config = make_text_config(profile, seed, runs_dir)
    keys = seed_keys(config)
    with one_thread():
        # More than one only where a 64x64 seed must train within a sitting on a machine of its own; the thread
        # count changes float summation order alone, and the row records it.
        torch.set_num_threads(threads)
        continue_shorter_run(profile, seed, runs_dir)
        run_dir = text_run_dir(config, seed, runs_dir)
        start = load_checkpoint(latest)["step"] if (latest := latest_path(run_dir)) is not None else 0
        trainer = train_text_model(profile, seed, runs_dir, progress=False)
        trained_on = training_threads(run_dir, threads if trainer.step > start else None)
        params, gflops = model_cost(trainer.model.backbone)
        rows = [row for split in ("val", "test")
                for row in alignment_rows(trainer.ema.module, trainer.process, trainer.config, split=split,
                                          guidances=setup.guidance, n=profile.eval_n, seed=seed)]
        grid = prompt_grid_figure(trainer.ema.module, trainer.process, trainer.config, profile,
                                  guidance=VERDICT_GUIDANCE, seed=seed, threads=trained_on)
        save_figure(grid, Path(trainer.out_dir), "prompt_grid")
    log = pd.read_json(Path(trainer.out_dir) / "metrics.jsonl", lines=True)
    facts = {"seed": seed, "profile": profile.name, "steps": profile.steps, "threads": trained_on,
             "continued_from_step": continued_from_step(trainer.out_dir),
             "train_s": logged_training_seconds(log, config.data.batch_size),
             "params_M": params / 1e6, "gflops": gflops,
             "text_params_M": sum(p.numel() for p in trainer.model.text_encoder.parameters()) / 1e6, **keys}
    curve = log[["step", "loss"]]
    return {"rows": [{**facts, **row} for row in rows], "curve": curve.assign(seed=seed).to_dict("records")}


# Written into a run directory by each call that trains it: the threads it trained on (a row records the training's
# threads, not those of a later call that only judges the finished run).
TRAINED_ON = "threads.json"


def training_threads(run_dir: Path, threads: int | None) -> float:
    """The threads a run trained on: ``threads`` (this call trained it), recorded in :data:`TRAINED_ON`; else the
    count recorded by the last call that trained it, NaN for a run trained before the count was recorded."""
    record = Path(run_dir) / TRAINED_ON
    if threads is not None:
        write_atomically(record, lambda handle: handle.write(json.dumps({"threads": threads}).encode()))
        return threads
    return json.loads(record.read_text())["threads"] if record.is_file() else float("nan")


def logged_training_seconds(log, batch_size: int) -> float:
    """The training seconds of a run from its ``metrics.jsonl`` records (each logs its window's images a second):
    kept across resumes, so a run resumed to be judged, or finished over several processes, counts all of them."""
    window_steps = log["step"].diff().fillna(log["step"].iloc[0])
    return float((window_steps * batch_size / log["img_per_s"]).sum())
