"""Ablation runs: variants, one (variant, seed) trained and measured on one thread, workers, result files."""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from .profiles import LOSS_SIGMAS, REPO_ROOT, Profile, get_profile, output_dir, protocol, sigma_column


# -- variants -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One arm of an ablation: a model family plus constructor switches (e.g. ``skip="add"``)."""
    name: str
    family: str                 # "U-ViT", "IU-ViT", "ViT", "ASCEND", "ASCEND-H", "DiT", "UNet"
    overrides: dict = field(default_factory=dict)
    preset: str | None = None   # an explicit preset wins over family + profile size

    def preset_for(self, profile: Profile) -> str:
        if self.preset:
            return self.preset
        if profile.size == "tiny":
            return f"{self.family}-tiny"
        return {"UNet": "DDPM-UNet", "ASCEND-H": "ASCEND-H-S/8"}.get(self.family, f"{self.family}-{profile.size}")


def make_config(variant: Variant, profile: Profile, seed: int, out_dir: Path, **diffusion: Any) -> Config:
    """A full trainer config for one (variant, seed) under a profile; ``diffusion`` overrides that section."""
    return profile.run_config(variant.name, out_dir, seed, (
        ("model.preset", variant.preset_for(profile)),
        *((f"model.{key}", value) for key, value in variant.overrides.items()),
        *((f"diffusion.{key}", value) for key, value in diffusion.items())))


def config_key(config: Config, sections: tuple[str, ...] | None = None, length: int = 12) -> str:
    """A short hash of the config's sections (default: all but ``out_dir``), to recognise a run by what it trains."""
    chosen = {k: v for k, v in config.to_dict().items() if (k in sections if sections else k != "out_dir")}
    return hashlib.sha1(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:length]


def model_cost_of(variant: Variant, profile: Profile) -> tuple[int, float]:
    """(parameters, GFLOPs) of a variant under a profile, built on the meta device (no memory, no init cost)."""
    from ..build import build_model

    with torch.device("meta"):
        return model_cost(build_model(make_config(variant, profile, 0, Path("unused"))))


# -- measurement ----------------------------------------------------------------------------------
def model_cost(model: torch.nn.Module) -> tuple[int, float]:
    """(parameters, GFLOPs per batch-1 forward in DiT's convention) of a built model."""
    from ..models.catalog import count_gflops

    return sum(p.numel() for p in model.parameters()), count_gflops(model)


@torch.no_grad()
def sigma_losses(model, loss_fn, config: Config, n: int, *, sigmas=LOSS_SIGMAS, seed: int = 1234) -> dict[str, float]:
    """The training loss of ``model`` on the first n test images at each fixed noise level, with fixed noise (the
    same images, noise and levels for every model and every call), and their mean ``loss``: the workbook's primary,
    low-noise metric. Low sigma measures pixel detail, high sigma global structure."""
    from ..build import batch_condition
    from ..data import make_dataset

    test = make_dataset(config.data.dataset, root=config.data.root, image_size=config.data.image_size, train=False,
                        flip=False)
    n = min(n, len(test))
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(sigmas, 0.0)
    batch_size = 250  # part of the protocol: the noise of a batch is seeded by (seed, level, batch start)
    for start in range(0, n, batch_size):
        items = [test[i] for i in range(start, min(n, start + batch_size))]
        x0 = torch.stack([image for image, _ in items])
        cond = batch_condition(model, [label for _, label in items], "cpu")
        for index, sigma in enumerate(sigmas):
            generator = torch.Generator().manual_seed(seed + 7919 * index + start)
            noise = torch.randn(x0.shape, generator=generator)
            levels = torch.full((len(x0),), float(sigma))
            totals[sigma] += loss_fn.loss_at(model, x0, levels, noise, cond).sum().item()
    model.train(was_training)
    losses = {sigma_column(sigma): total / n for sigma, total in totals.items()}
    return {"loss": sum(losses.values()) / len(losses), **losses}


def evaluate_run(trainer, profile: Profile) -> dict[str, float]:
    """The loss by noise level and the Fréchet metric (FD-clf on the embedded sets, Inception FID elsewhere) of the
    EMA model of a finished run, against the training split at the run's resolution."""
    from ..generate import generate
    from ..metrics import frechet_metric

    ema = trainer.ema.module
    losses = sigma_losses(ema, trainer.loss_fn, trainer.config, profile.val_n)
    images = generate(ema, trainer.process, trainer.config, n=profile.eval_n, seed=10_000, device=trainer.device,
                      batch_size=500)
    return {**losses, "fd": frechet_metric(images, profile.dataset, root=trainer.config.data.root,
                                           device=trainer.device).value}


# -- ablations ------------------------------------------------------------------------------------
# Held-out loss is also measured at these fractions of training (on fewer images): the learning curves.
CURVE_FRACTIONS = (0.25, 0.5, 0.75)
CURVE_IMAGES = 200


@contextmanager
def one_thread():
    """Every workbook run trains on one thread: its numbers then do not depend on the machine's core count
    (the thread count alone changes float summation order), and two runs fill two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_variant(variant: Variant, profile: Profile, seed: int, runs_dir: Path, *, reuse: bool = True,
                **diffusion: Any) -> dict[str, Any]:
    """Train and evaluate one (variant, seed) on one thread; a finished run with the same config is read back.

    Training pauses at ``CURVE_FRACTIONS`` of its steps to measure the EMA model's held-out loss (the
    learning curve); pausing is a no-op for the optimisation (per-step randomness is a function of the step)."""
    from ..trainer import Trainer

    out = runs_dir / variant.name.replace("/", "_") / f"seed{seed}"
    config = make_config(variant, profile, seed, out, **diffusion)
    result_file = out / "result.json"
    key = config_key(config)
    if reuse and result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved.get("config_key") == key:
            return saved
    with one_thread():
        start = time.perf_counter()
        trainer = Trainer(config, progress=False)
        curve, last = [], {}
        pauses = sorted({max(1, round(fraction * profile.steps)) for fraction in CURVE_FRACTIONS} - {profile.steps})
        for stop in (*pauses, profile.steps):
            trainer.config.train.steps = stop
            record = trainer.fit()
            last = record if "loss" in record else last
            if stop != profile.steps:
                losses = sigma_losses(trainer.ema.module, trainer.loss_fn, config, min(CURVE_IMAGES, profile.val_n))
                curve.append({"step": trainer.step, **losses})
        train_s = time.perf_counter() - start
        params, gflops = model_cost(trainer.model)
        result = {"variant": variant.name, "seed": seed, "preset": config.model.preset, "params_M": params / 1e6,
                  "gflops": gflops, "steps": profile.steps, "profile": profile.name, "train_loss": last.get("loss"),
                  **evaluate_run(trainer, profile), "train_s": train_s, "img_per_s": last.get("img_per_s"),
                  "threads": torch.get_num_threads(), "curve": curve, "config_key": key}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _run_job(job: tuple) -> dict[str, Any]:
    variant, profile, seed, runs_dir, diffusion = job
    return run_variant(variant, profile, seed, runs_dir, **diffusion)


def map_runs(run, jobs: list, *, workers: int | None = None, progress: bool = True) -> list:
    """``[run(job) for job in jobs]`` in ``workers`` spawned processes (default: one per core, at most one per job),
    in order. ``run`` must be a module-level function (spawned workers import it) that trains on one thread."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [run(job) for job in tqdm(jobs, desc="runs", disable=not progress)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(run, jobs), total=len(jobs), desc="runs", disable=not progress))


def run_ablation(variants: list[Variant], profile: Profile, out_dir: Path, *, notebook: str | None = None,
                 workers: int | None = None, progress: bool = True, **diffusion: Any):
    """Every variant x every seed of the profile -> (results, curves): DataFrames with one row per run and one per
    (run, learning-curve point), saved with :func:`save_results`.

    Runs go to ``workers`` processes of one thread each (default: one per core); any worker count gives the
    same numbers. ``notebook`` (its file stem) also files the rows under
    ``experiments/results/<notebook>/<profile>.csv`` (see :func:`results_dir`)."""
    import pandas as pd

    from ..metrics import check_frechet_metric

    check_frechet_metric(profile.dataset)  # before any training: the final evaluation must be able to run
    jobs = [(variant, profile, seed, out_dir / "runs", diffusion) for variant in variants for seed in profile.seeds]
    rows = map_runs(_run_job, jobs, workers=workers, progress=progress)
    frame = pd.DataFrame(rows).drop(columns=["config_key"])
    curves = pd.DataFrame([{"variant": row["variant"], "seed": row["seed"], **point}
                           for row in rows for point in row.get("curve", [])])
    return save_results(frame.drop(columns=["curve"]), profile, out_dir, notebook=notebook, curves=curves), curves


def results_dir(profile: Profile, out_dir: Path) -> Path:
    """Where a notebook files its result rows and verdicts: the committed ``experiments/results/`` for real
    profiles, the notebook's own output folder for ``smoke`` (whose numbers mean nothing)."""
    return out_dir / "results" if profile.name == "smoke" else REPO_ROOT / "experiments" / "results"


def save_results(frame, profile: Profile, out_dir: Path, *, notebook: str | None = None, curves=None,
                 protocol_line: str | None = None):
    """The raw rows as ``results.csv`` and, with the protocol (default :func:`protocol`), ``results.json`` in
    ``out_dir``; with ``notebook`` also ``<results_dir>/<notebook>/<profile>.csv`` (and ``<profile>_curves.csv``).
    Returns the frame."""
    frame.to_csv(out_dir / "results.csv", index=False)
    payload = {"protocol": protocol_line or protocol(profile), "profile": asdict(profile),
               "runs": json.loads(frame.to_json(orient="records"))}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    if notebook is not None:
        filed = results_dir(profile, out_dir) / notebook
        filed.mkdir(parents=True, exist_ok=True)
        frame.to_csv(filed / f"{profile.name}.csv", index=False, float_format="%.6g")
        (filed / f"{profile.name}.json").write_text(json.dumps({"protocol": payload["protocol"],
                                                                "profile": payload["profile"]}, indent=1))
        if curves is not None:
            curves.to_csv(filed / f"{profile.name}_curves.csv", index=False, float_format="%.6g")
    return frame


def judge(frame, comparisons, *, notebook: str, profile: Profile, out_dir: Path):
    """The verdict rows of a notebook's comparisons (vitdiff.findings), filed in ``<results_dir>/verdicts.csv``;
    returns the table and the markdown of the notebook's closing cell."""
    from ..findings import conclusion_markdown, update_verdicts, verdict_table

    table = verdict_table(frame, comparisons, notebook=notebook, profile=profile.name)
    update_verdicts(results_dir(profile, out_dir) / "verdicts.csv", table)
    return table, conclusion_markdown(table)


def summarize(frame, metrics=("loss", "fd"), by: str = "variant"):
    """Mean ± spread (sample std over seeds; 0 with one seed) per variant, in the variants' order."""
    import pandas as pd

    order = list(dict.fromkeys(frame[by]))
    grouped = frame.groupby(by, sort=False)
    table = pd.DataFrame(index=order)
    for column in ("params_M", "gflops"):
        if column in frame:
            table[column] = grouped[column].first().reindex(order).round(3)
    for metric in metrics:
        mean, std = grouped[metric].mean().reindex(order), grouped[metric].std(ddof=1).fillna(0).reindex(order)
        table[metric] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(mean, std)]
    table["seeds"] = grouped.size().reindex(order)
    return table


# -- what notebooks share -------------------------------------------------------------------------
def setup(notebook: str, profile: str | None = None, *, dataset: str | None = None, steps: int | None = None,
          seeds=None, out_dir: str | None = None) -> tuple[Profile, Path]:
    """A notebook's first cell after its parameters: the profile with the notebook's overrides, its output
    folder, the figure style, and the protocol printed."""
    chosen = get_profile(profile, dataset=dataset, steps=steps, seeds=seeds)
    out = output_dir(notebook, chosen, out_dir)
    from .figures import paper_style

    paper_style()
    print("protocol:", protocol(chosen))
    print("outputs: ", out)
    return chosen, out


def match_flops(variant: Variant, profile: Profile, target: float, dims, *, tolerance: float = 0.10) -> Variant:
    """``variant`` with the width among ``dims`` (``dim`` of a Transformer, whose head count stays the preset's,
    or ``channels`` of a U-Net) whose GFLOPs come closest to ``target``; raises if none lies within ``tolerance``
    (relative), so a "matched compute" arm is matched or absent."""
    def gflops_at(dim: int) -> tuple[float, Variant]:
        width = {"channels": dim} if variant.family == "UNet" else {"dim": dim}
        candidate = replace(variant, overrides={**variant.overrides, **width})
        return model_cost_of(candidate, profile)[1], candidate

    measured = [gflops_at(dim) for dim in dims]
    gflops, best = min(measured, key=lambda item: abs(item[0] - target))
    if abs(gflops - target) > tolerance * target:
        raise ValueError(f"no width in {list(dims)} brings {variant.name} within {tolerance:.0%} of {target:.4f} "
                         f"GFLOPs (closest: {gflops:.4f}); widen the search")
    return best
