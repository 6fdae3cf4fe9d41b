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
from .profiles import LOSS_SIGMAS, REPO_ROOT, Profile, protocol, sigma_column


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


def evaluate_run(trainer, profile: Profile, *, fd: bool = True) -> dict[str, float]:
    """The loss by noise level on the profile's ``val_n`` held-out images and (with ``fd``) the sample metrics of
    ``eval_n`` samples of the EMA model: the Fréchet metric (FD-clf on the embedded sets, Inception FID elsewhere)
    against the training split at the run's resolution and, where a pinned classifier exists, improved precision /
    recall and the classifier's confidence on its features (fidelity and coverage apart, which one Fréchet number
    mixes). ``eval_loss_s`` and ``eval_fd_s`` say what each part cost."""
    from ..generate import generate
    from ..metrics import FD_METRIC_NAMES, classifier_confidence, classifier_precision_recall, frechet_metric

    ema = trainer.ema.module
    start = time.perf_counter()
    result = sigma_losses(ema, trainer.loss_fn, trainer.config, profile.val_n)
    result["eval_loss_s"] = time.perf_counter() - start
    if fd:
        start = time.perf_counter()
        images = generate(ema, trainer.process, trainer.config, n=profile.eval_n, seed=10_000,
                          device=trainer.device, batch_size=500)
        result["fd"] = frechet_metric(images, profile.dataset, root=trainer.config.data.root,
                                      device=trainer.device).value
        if profile.dataset in FD_METRIC_NAMES:
            quality = classifier_precision_recall(images, dataset=profile.dataset)
            result.update(precision=quality.precision, recall=quality.recall,
                          confidence=classifier_confidence(images, dataset=profile.dataset))
        result["eval_fd_s"] = time.perf_counter() - start
    return result


# Held-out loss is also measured at these fractions of training (on the same val_n images as at the end): the
# learning curves. The profile's budgets add the Fréchet metric there too (verdicts by budget).
CURVE_FRACTIONS = (0.25, 0.5, 0.75)
SAMPLE_GRID = 10   # samples a run saves as its picture (seed 0 noise: the same for every arm)


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


# The modules whose source defines a run's numbers, besides the model's own (found from its classes): a run is
# read back only while these and its config are unchanged. Checkpoint I/O, the command line, reports, figures and
# findings do not change a run's numbers and are left out.
NUMERIC_MODULES = ("vitdiff.nn", "vitdiff.diffusion", "vitdiff.sampling", "vitdiff.trainer", "vitdiff.data",
                   "vitdiff.metrics", "vitdiff.generate", "vitdiff.build", "vitdiff.config", "vitdiff.precision",
                   "vitdiff.workbook.profiles", "vitdiff.workbook.runs")


def code_key(model: torch.nn.Module, length: int = 12) -> str:
    """A short hash of the code of :data:`NUMERIC_MODULES` and of every vitdiff module defining one of the
    model's layers: the code a run's numbers depend on. Each module counts by its syntax tree without docstrings
    (comments are not in it), so rewording a comment or a docstring keeps the filed runs."""
    import importlib
    import inspect

    modules = set(NUMERIC_MODULES) | {type(m).__module__ for m in model.modules()
                                      if type(m).__module__.startswith("vitdiff.")}
    digest = hashlib.sha1()
    for name in sorted(modules):
        digest.update(name.encode())
        digest.update(_code_without_docs(inspect.getsource(importlib.import_module(name))).encode())
    return digest.hexdigest()[:length]


def _code_without_docs(source: str) -> str:
    """The module's syntax tree, with every docstring removed, as text."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def pause_points(profile: Profile) -> list[int]:
    """Steps where training pauses to measure: the learning-curve fractions and the budgets, then the end."""
    pauses = {max(1, round(fraction * profile.steps)) for fraction in CURVE_FRACTIONS} | set(profile.budgets)
    return sorted(step for step in pauses if 0 < step < profile.steps) + [profile.steps]


def run_variant(variant: Variant, profile: Profile, seed: int, runs_dir: Path, *, reuse: bool = True,
                **diffusion: Any) -> dict[str, Any]:
    """Train and evaluate one (variant, seed) on one thread; a finished run with the same config and code is read
    back, an interrupted one resumes from its last pause (a checkpoint is written at every pause) unless other code
    began it (then it starts afresh); a run stopped by a signal between pauses raises after saving.

    Training pauses at :func:`pause_points` to measure the EMA model's held-out loss (and at the profile's budgets
    its Fréchet metric): the learning curve. Pausing is a no-op for the optimisation (per-step randomness is a
    function of the step), so the numbers at a budget equal those of a run stopped there."""
    import shutil

    from torchvision.utils import save_image

    from ..generate import generate
    from ..trainer import Trainer

    out = runs_dir / variant.name.replace("/", "_") / f"seed{seed}"
    config = make_config(variant, profile, seed, out, **diffusion)
    result_file, progress_file = out / "result.json", out / "progress.json"
    key = config_key(config)
    if reuse and result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved.get("config_key") == key and saved.get("code_key") == _code_key_of(config):
            return saved
    code = _code_key_of(config)
    if progress_file.exists() and json.loads(progress_file.read_text()).get("code_key") != code:
        shutil.rmtree(out)  # begun by other code: its checkpoints and measurements do not belong to this code
    with one_thread():
        start = time.perf_counter()
        trainer = Trainer(config, progress=False)
        progress = json.loads(progress_file.read_text()) if progress_file.exists() and trainer.step else {}
        curve = [point for point in progress.get("curve", []) if point["step"] <= trainer.step]
        seconds = {"startup_s": 0.0, "train_s": 0.0, "eval_loss_s": 0.0, "eval_fd_s": 0.0,
                   **progress.get("seconds", {})}
        seconds["startup_s"] += time.perf_counter() - start
        last = {}
        for stop in [step for step in pause_points(profile) if step > trainer.step]:
            trainer.config.train.steps = stop
            begin = time.perf_counter()
            record = trainer.fit()
            seconds["train_s"] += time.perf_counter() - begin
            if trainer.step != stop:  # stopped by a signal: its checkpoint is saved, and nothing more is measured
                raise RuntimeError(f"{variant.name} seed {seed} stopped at step {trainer.step} before its pause at "
                                   f"{stop}: run it again to resume")
            last = record if "loss" in record else last
            point = {"step": trainer.step, **evaluate_run(trainer, profile, fd=stop in profile.budgets
                                                          or stop == profile.steps)}
            for name in ("eval_loss_s", "eval_fd_s"):
                seconds[name] += point.pop(name, 0.0)
            curve.append(point)
            _write_json(progress_file, {"curve": curve, "seconds": seconds, "code_key": code,
                                        "train_loss": last.get("loss", progress.get("train_loss"))})
        begin = time.perf_counter()
        images = generate(trainer.ema.module, trainer.process, config, n=SAMPLE_GRID, seed=0, device=trainer.device)
        save_image((images.float().clamp(-1, 1) + 1) / 2, out / "samples.png", nrow=SAMPLE_GRID, padding=1,
                   pad_value=1.0)
        seconds["samples_s"] = time.perf_counter() - begin
        params, gflops = model_cost(trainer.model)
        final = curve[-1]
        result = {"variant": variant.name, "seed": seed, "preset": config.model.preset, "params_M": params / 1e6,
                  "gflops": gflops, "steps": profile.steps, "profile": profile.name,
                  "train_loss": last.get("loss", progress.get("train_loss")),
                  **{k: v for k, v in final.items() if k != "step"}, **seconds,
                  "wall_s": sum(seconds.values()),
                  "img_per_s": last.get("img_per_s"), "threads": torch.get_num_threads(), "curve": curve,
                  "config_key": key, "code_key": code}
    _write_json(result_file, result)
    return result


def _code_key_of(config: Config) -> str:
    """The code key of the model a config builds (built on the meta device: no memory, no init cost)."""
    from ..build import build_model

    with torch.device("meta"):
        return code_key(build_model(config))


def _write_json(path: Path, payload: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    temporary.replace(path)


def _run_job(job: tuple) -> dict[str, Any]:
    variant, profile, seed, runs_dir, diffusion = job
    return run_variant(variant, profile, seed, runs_dir, **diffusion)


def map_runs(run, jobs: list, *, workers: int | None = None, progress: bool = True, on_result=None) -> list:
    """``[run(job) for job in jobs]`` in ``workers`` spawned processes (default: one per core, at most one per job),
    in order; ``on_result(job, result)`` is called as each run finishes (in finishing order). ``run`` must be a
    module-level function (spawned workers import it) that trains on one thread."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    workers = workers or min(len(jobs), os.cpu_count() or 1)
    results: list = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="runs", disable=not progress)
    if workers <= 1:
        for index, job in enumerate(jobs):
            results[index] = run(job)
            if on_result:
                on_result(job, results[index])
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run, job): index for index, job in enumerate(jobs)}
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                if on_result:
                    on_result(jobs[index], results[index])
                bar.update()
    bar.close()
    return results


# Columns of a filed run that are bookkeeping rather than results.
_RUN_ONLY = ("curve",)


def run_rows(rows: list[dict]):
    """(results, curves) DataFrames from run records: one row per run, one per (run, pause)."""
    import pandas as pd

    frame = pd.DataFrame([{k: v for k, v in row.items() if k not in _RUN_ONLY} for row in rows])
    curves = pd.DataFrame([{"variant": row["variant"], "seed": row["seed"], **point}
                           for row in rows for point in row.get("curve", [])])
    return frame, curves


def run_ablation(variants: list[Variant], profile: Profile, out_dir: Path, *, notebook: str | None = None,
                 workers: int | None = None, progress: bool = True, file_results: bool = False, **diffusion: Any):
    """Every variant x every seed of the profile -> (results, curves): one row per run and one per (run, pause).

    Runs go to ``workers`` processes of one thread each (default: one per core); any worker count gives the same
    numbers. Each run's row is filed as it finishes (:func:`file_run`): in ``out_dir/results/<notebook>/``, or with
    ``file_results`` in the committed ``experiments/results/<notebook>/``."""
    from ..metrics import check_frechet_metric

    check_frechet_metric(profile.dataset)  # before any training: the final evaluation must be able to run
    jobs = [(variant, profile, seed, out_dir / "runs", diffusion) for variant in variants for seed in profile.seeds]
    target = results_dir(out_dir, file_results)

    def file(job, row):
        if notebook is not None:
            file_run(row, target / notebook, profile, Path(job[3]))

    rows = map_runs(_run_job, jobs, workers=workers, progress=progress, on_result=file)
    return run_rows(rows)


def results_dir(out_dir: Path, file_results: bool = False) -> Path:
    """Where rows and verdicts go: the committed ``experiments/results/`` when asked (the campaign, or a notebook
    run with ``file_results=True``), else the notebook's own output folder (``out_dir/results``)."""
    return REPO_ROOT / "experiments" / "results" if file_results else out_dir / "results"


def file_run(row: dict, folder: Path, profile: Profile, runs_dir: Path) -> None:
    """File one finished run under ``folder`` (a notebook's results folder): its row in ``<profile>.csv`` and its
    pauses in ``<profile>_curves.csv`` (replacing an earlier row of the same variant and seed), its sample picture
    in ``samples/<profile>/``, and the protocol in ``<profile>.json``. Each file is replaced atomically, so a run
    killed at any point loses no filed row."""
    import shutil

    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    frame, curves = run_rows([row])
    for path, new in ((folder / f"{profile.name}.csv", frame), (folder / f"{profile.name}_curves.csv", curves)):
        if path.is_file():
            old = pd.read_csv(path)
            keep = ~((old["variant"] == row["variant"]) & (old["seed"] == row["seed"]))
            new = pd.concat([old[keep], new], ignore_index=True)
        new = new.sort_values(["variant", "seed"] + (["step"] if "step" in new else []), kind="stable")
        temporary = path.with_suffix(".tmp")
        new.to_csv(temporary, index=False, float_format="%.6g")
        temporary.replace(path)
    picture = runs_dir / row["variant"].replace("/", "_") / f"seed{row['seed']}" / "samples.png"
    if picture.is_file():
        (folder / "samples" / profile.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(picture, folder / "samples" / profile.name / f"{slug(row['variant'])}_seed{row['seed']}.png")
    _write_json(folder / f"{profile.name}.json", {"protocol": protocol(profile), "profile": asdict(profile)})


def slug(name: str) -> str:
    """A file-name form of an arm's name: lowercase, every run of other characters as one '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def save_results(frame, profile: Profile, out_dir: Path, *, protocol_line: str | None = None):
    """The raw rows as ``results.csv`` and, with the protocol (default :func:`protocol`), ``results.json`` in
    ``out_dir``. Returns the frame."""
    frame.to_csv(out_dir / "results.csv", index=False)
    payload = {"protocol": protocol_line or protocol(profile), "profile": asdict(profile),
               "runs": json.loads(frame.to_json(orient="records"))}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    return frame


def judge(frame, comparisons, *, notebook: str, profile: Profile, out_dir: Path, steps: int | None = None,
          file_results: bool = False):
    """The verdict rows of comparisons (:mod:`vitdiff.findings`), filed in ``<results_dir>/verdicts.csv``;
    returns the table and the markdown of the notebook's closing cell."""
    from ..findings import conclusion_markdown, update_verdicts, verdict_table

    table = verdict_table(frame, comparisons, notebook=notebook, profile=profile.name, steps=steps)
    update_verdicts(results_dir(out_dir, file_results) / "verdicts.csv", table)
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
def match_flops(variant: Variant, profile: Profile, target: float, dims, *, tolerance: float = 0.10) -> Variant:
    """``variant`` with the width among ``dims`` (``dim`` of a Transformer, whose head count stays the preset's,
    or ``channels`` of a U-Net) whose GFLOPs come closest to ``target``; raises if none lies within ``tolerance``
    (relative), so a "matched compute" arm is matched or absent. Cost grows with width, so the search bisects."""
    def gflops_at(dim: int) -> tuple[float, Variant]:
        width = {"channels": dim} if variant.family == "UNet" else {"dim": dim}
        candidate = replace(variant, overrides={**variant.overrides, **width})
        return model_cost_of(candidate, profile)[1], candidate

    dims = sorted(dims)
    low, high = 0, len(dims) - 1
    while high - low > 1:  # invariant: the closest width lies in dims[low..high]
        middle = (low + high) // 2
        if gflops_at(dims[middle])[0] < target:
            low = middle
        else:
            high = middle
    gflops, best = min((gflops_at(dims[index]) for index in {low, high}), key=lambda item: abs(item[0] - target))
    if abs(gflops - target) > tolerance * target:
        raise ValueError(f"no width in {dims[0]}..{dims[-1]} brings {variant.name} within {tolerance:.0%} of "
                         f"{target:.4f} GFLOPs (closest: {gflops:.4f}); widen the search")
    return best
