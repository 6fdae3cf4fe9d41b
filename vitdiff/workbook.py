"""What the notebooks share: run profiles, ablation runs, result tables, verdicts and paper figures.

A notebook declares its variants (a name, a model family, switch overrides) and
calls :func:`run_ablation`; every variant is trained with every seed of the
profile through the same :class:`vitdiff.trainer.Trainer` that ``vitdiff train``
uses, one thread a run, then measured with the same protocol:

* ``loss`` and ``loss@<sigma>``: the training objective of the EMA model on the
  same held-out images with the same noise at fixed noise levels
  (:data:`LOSS_SIGMAS`), and their mean: the primary, low-noise metric, also
  measured during training (the learning curves);
* ``fd``: the Fréchet distance of n EMA samples at the end only: ``FD-<data>-clf@n`` on
  the features of a pinned small classifier for the embedded sets (it is *not* FID),
  Inception FID from local weights for the others (:func:`vitdiff.metrics.frechet_metric`).

Seed s gives every arm the same data order, noise draws and (where shapes allow)
initialisation, so arms are compared by paired differences (:mod:`vitdiff.findings`).

Profiles: ``smoke`` (seconds, for CI: checks that everything runs, says nothing
about quality), ``cpu`` (fashion-mnist at 16x16, <= 20 minutes a notebook on 2
cores), ``cpu-long`` (the same, longer and with more seeds), ``gpu``
(fashion-mnist at 32x32 at GPU scale) and ``paper`` (CIFAR-10, U-ViT's recipe,
Inception FID).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    """How every notebook runs: a recipe (an ``experiments/`` YAML plus config overrides, the one mechanism
    ``vitdiff train`` uses too) and the notebook-level sizes. A run's config is the recipe plus its variant's
    model and its seed (:func:`make_config`)."""
    name: str
    experiment: str           # experiments/<file>: data, diffusion, optimiser and sampler settings of every run
    overrides: tuple          # (dotted config key, value) pairs applied on top of the experiment, in order
    size: str                 # preset size suffix: "tiny", or "S/2"-style at paper scale
    seeds: tuple[int, ...]
    eval_n: int               # samples for the Fréchet distance
    val_n: int                # held-out test images for the loss at fixed noise levels

    def config(self, extra: tuple = ()) -> Config:
        """The recipe as a config, with ``extra`` (dotted key, value) pairs applied last."""
        from .build import load_experiment

        return load_experiment(REPO_ROOT / "experiments" / self.experiment, [*self.overrides, *extra], quiet=True)

    def run_config(self, name: str, out_dir: Path, seed: int, switches) -> Config:
        """One run's config: the recipe, the run's ``switches`` ((dotted key, value) pairs), its seed, ~50 logged
        points and one checkpoint at the end, and the profile's evaluation size (its metric is the recipe's)."""
        return self.config((("name", name), ("out_dir", str(out_dir)), *switches, ("train.seed", seed),
                            ("train.log_every", max(1, self.steps // 50)), ("train.ckpt_every", self.steps),
                            ("eval.n", self.eval_n)))

    def with_overrides(self, **dotted: Any) -> "Profile":
        """This profile with more config overrides, given as ``**{"train.steps": 10}``."""
        return replace(self, overrides=(*self.overrides, *dotted.items()))

    @cached_property
    def recipe(self) -> Config:
        return self.config()

    # What tables and protocol lines quote, read from the recipe.
    dataset = property(lambda self: self.recipe.data.dataset)
    steps = property(lambda self: self.recipe.train.steps)
    batch_size = property(lambda self: self.recipe.data.batch_size)
    process = property(lambda self: self.recipe.diffusion.process)
    process_kwargs = property(lambda self: self.recipe.diffusion.process_kwargs)
    prediction = property(lambda self: self.recipe.diffusion.prediction)
    weighting = property(lambda self: self.recipe.diffusion.weighting)
    sampler = property(lambda self: self.recipe.sample.sampler)
    sample_steps = property(lambda self: self.recipe.sample.steps)
    grid = property(lambda self: self.recipe.sample.grid)


# Notebook runs checkpoint once at the end, draw no in-loop grids and show one bar for all runs.
_NOTEBOOK_RUN = (("train.sample_every", 0), ("train.progress", False))
# The workbook's CPU recipe: EDM preconditioning, because in a few hundred steps an eps-model's small eps errors at
# high noise are multiplied by sigma in x0 and its samples are noise (experiments/README.md). 16x16 images: a
# quarter of the pixels and, at patch 4, a quarter of the tokens of 32x32, so four times the steps per CPU hour.
_CPU_RECIPE = (("diffusion.process", "edm"), ("diffusion.process_kwargs", {}), ("diffusion.prediction", "v"),
               ("diffusion.weighting", "edm"), ("sample.grid", "karras"), ("train.betas", (0.99, 0.999)),
               ("data.image_size", 16),
               # fp32 always: "auto" decides by a timing probe, which would make a run's numbers depend on the
               # machine's load; bf16 does not pay at these widths on CPU (benchmarks/bench_notebook.py).
               ("train.precision", "fp32"))
PROFILES: dict[str, Profile] = {
    # Proves the plumbing in seconds; its numbers mean nothing.
    "smoke": Profile("smoke", "fmnist_tiny.yaml", (*_NOTEBOOK_RUN, *_CPU_RECIPE, ("data.dataset", "digits"),
                                                   ("train.steps", 4), ("data.batch_size", 8),
                                                   ("train.warmup_steps", 1), ("sample.steps", 4)),
                     size="tiny", seeds=(0,), eval_n=32, val_n=32),
    # Paired comparisons on real data, 4 seeds, two runs at a time (one thread each) on 2 cores.
    "cpu": Profile("cpu", "fmnist_tiny.yaml", (*_NOTEBOOK_RUN, *_CPU_RECIPE, ("train.steps", 400),
                                               ("train.warmup_steps", 40)),
                   size="tiny", seeds=(0, 1, 2, 3), eval_n=500, val_n=500),
    # The headline tables: 6x the steps and twice the seeds of cpu.
    "cpu-long": Profile("cpu-long", "fmnist_tiny.yaml", (*_NOTEBOOK_RUN, *_CPU_RECIPE, ("train.steps", 2400),
                                                         ("train.warmup_steps", 100)),
                        size="tiny", seeds=tuple(range(8)), eval_n=1000, val_n=1000),
    # GPU scale on the same data at 32x32: the tiny families trained 25x longer with a larger batch, 8 seeds.
    "gpu": Profile("gpu", "fmnist_tiny.yaml", (*_NOTEBOOK_RUN, *_CPU_RECIPE, ("data.image_size", 32),
                                               ("train.steps", 30_000), ("data.batch_size", 128),
                                               ("train.lr", 5e-4), ("train.warmup_steps", 500),
                                               ("train.ema_decay", 0.9999)),
                   size="tiny", seeds=tuple(range(8)), eval_n=5000, val_n=2000),
    # The paper's scale: CIFAR-10 with U-ViT's published recipe, unchanged; Inception FID from local weights.
    "paper": Profile("paper", "cifar10_uvit_s2.yaml", _NOTEBOOK_RUN, size="S/2", seeds=(0, 1), eval_n=10_000,
                     val_n=10_000),
}


# A notebook's changes to a profile: config overrides (dotted keys) and notebook-level sizes (seeds, eval_n, val_n).
ProfileChanges = dict[str, tuple[dict[str, Any], dict[str, Any]]]


def get_profile(name: str | None = None, *, dataset: str | None = None, steps: int | None = None,
                seeds=None, changes: ProfileChanges | None = None) -> Profile:
    """The named profile, changed by a notebook's table (``changes[name]``: config overrides, then sizes), then the
    notebook's parameters (None keeps the profile's value).

    ``name=None`` reads ``VITDIFF_PROFILE`` (how the test suite selects ``smoke``), else ``cpu``."""
    name = name or os.environ.get("VITDIFF_PROFILE", "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    if changes is not None and name not in changes:
        raise ValueError(f"this notebook has no {name!r} profile: use one of {', '.join(changes)}")
    overrides, sizes = (changes or {}).get(name, ({}, {}))
    profile = replace(PROFILES[name].with_overrides(**overrides), **sizes)
    if dataset is not None:
        profile = profile.with_overrides(**{"data.dataset": dataset})
    if steps is not None:
        profile = profile.with_overrides(**{"train.steps": int(steps)})
    if seeds is not None:
        profile = replace(profile, seeds=tuple(int(seed) for seed in seeds))
    return profile


def output_dir(notebook: str, profile: Profile, out_dir: str | None = None) -> Path:
    """Where a notebook writes figures and results: ``out_dir``, else $VITDIFF_OUT_DIR/<notebook>, else outputs/."""
    if out_dir:
        path = Path(out_dir)
    else:
        base = Path(os.environ.get("VITDIFF_OUT_DIR", REPO_ROOT / "outputs"))
        path = base / notebook / profile.name
    path.mkdir(parents=True, exist_ok=True)
    return path


# The quick start (notebook 01) trains one class-conditional model and shows it off: its own sizes per profile.
# cpu: IU-ViT-tiny at 16x16 (patch 4: 16 tokens), 3000 steps; beta1 0.9, not the profiles' 0.99, which left visible
# noise in the samples of the same run (the probes in experiments/results/01_quickstart/).
QUICKSTART_PROFILE_CHANGES: ProfileChanges = {
    "smoke": ({}, {"seeds": (0,)}),
    "cpu": ({"train.steps": 3000, "train.warmup_steps": 100, "train.betas": (0.9, 0.999)}, {"seeds": (0,)}),
    "gpu": ({}, {"seeds": (0,)}),
}


def quickstart_profile(name: str | None = None, **overrides) -> Profile:
    """The named profile (``VITDIFF_PROFILE``, else cpu) sized for the quick start; the notebook's overrides
    (``dataset``, ``steps``, ``seeds``; None: keep) apply last."""
    return get_profile(name, changes=QUICKSTART_PROFILE_CHANGES, **overrides)


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
    from .build import build_model

    with torch.device("meta"):
        return model_cost(build_model(make_config(variant, profile, 0, Path("unused"))))


# -- measurement ----------------------------------------------------------------------------------
def model_cost(model: torch.nn.Module) -> tuple[int, float]:
    """(parameters, GFLOPs per batch-1 forward in DiT's convention) of a built model."""
    from .models.catalog import count_gflops

    return sum(p.numel() for p in model.parameters()), count_gflops(model)


# Noise levels of the held-out loss: log-spaced over the range where the data's structure is decided (EDM's
# sigma_data is 0.5; at sigma < 0.05 the pixels are already resolved, above 40 the prior dominates).
LOSS_SIGMAS = (0.05, 0.15, 0.4, 1.0, 2.5, 6.0, 15.0, 40.0)


def sigma_column(sigma: float) -> str:
    return f"loss@{sigma:g}"


@torch.no_grad()
def sigma_losses(model, loss_fn, config: Config, n: int, *, sigmas=LOSS_SIGMAS, seed: int = 1234) -> dict[str, float]:
    """The training loss of ``model`` on the first n test images at each fixed noise level, with fixed noise (the
    same images, noise and levels for every model and every call), and their mean ``loss``: the workbook's primary,
    low-noise metric. Low sigma measures pixel detail, high sigma global structure."""
    from .build import batch_condition
    from .data import make_dataset

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
    from .generate import generate
    from .metrics import frechet_metric

    ema = trainer.ema.module
    losses = sigma_losses(ema, trainer.loss_fn, trainer.config, profile.val_n)
    images = generate(ema, trainer.process, trainer.config, n=profile.eval_n, seed=10_000, device=trainer.device,
                      batch_size=500)
    return {**losses, "fd": frechet_metric(images, profile.dataset, root=trainer.config.data.root,
                                           device=trainer.device).value}


def fd_label(profile: Profile) -> str:
    """The Fréchet metric's name with its sample count, e.g. ``FD-fmnist-clf[729629]@500`` or ``FID@10k``."""
    from .metrics import FD_METRIC_NAMES, count_label

    return f"{FD_METRIC_NAMES.get(profile.dataset, 'FID')}@{count_label(profile.eval_n)}"


def training_protocol(profile: Profile) -> str:
    """What was trained: data, diffusion recipe, steps x batch and the seeds by name (for loss curves)."""
    settings = ", ".join(f"{k}={v:g}" for k, v in profile.process_kwargs.items())
    process = f"{profile.process}({settings})" if settings else profile.process
    size = profile.recipe.data.image_size
    seeds = f"seed{'s' if len(profile.seeds) > 1 else ''} {', '.join(map(str, profile.seeds))}"
    return (f"{profile.dataset}{f' {size}x{size}' if size else ''}, {process}/{profile.prediction}, {profile.steps} "
            f"steps x batch {profile.batch_size}, {seeds}, one thread a run; profile={profile.name}")


def sampling_protocol(profile: Profile) -> str:
    """How samples were drawn (for sample grids)."""
    return f"{profile.sampler} {profile.sample_steps} steps ({profile.grid} grid)"


def protocol(profile: Profile, metric: str | None = None) -> str:
    """One line that travels with every figure and table of measured runs: what was trained and how it was
    measured."""
    return (f"{training_protocol(profile)}; loss = mean held-out loss at sigma in {list(LOSS_SIGMAS)} "
            f"({profile.val_n} test images, fixed noise); {metric or fd_label(profile)} vs train split, "
            f"{sampling_protocol(profile)}")


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
    from .trainer import Trainer

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

    from .metrics import check_frechet_metric

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
    from .findings import conclusion_markdown, update_verdicts, verdict_table

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


def show_conclusion(table) -> None:
    """Display a notebook's verdict rows as its closing, generated statement."""
    from IPython.display import Markdown, display

    from .findings import conclusion_markdown

    display(Markdown(conclusion_markdown(table)))


def plot_findings(results, curves, table, profile: Profile, out_dir: Path, name: str, *, reference: str):
    """The figure every ablation notebook shows: held-out loss by noise level relative to ``reference`` (mean
    over seeds of the paired difference), the learning curves, and each comparison's paired difference with its
    95% interval and per-seed points. Saved as ``name`` (PDF and PNG); returns the figure."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from .findings import paired_differences

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    by_sigma = []
    for variant in dict.fromkeys(results["variant"]):
        for sigma in LOSS_SIGMAS:
            diffs = paired_differences(results, sigma_column(sigma), variant, reference)
            by_sigma += [{"variant": variant, "sigma": sigma, "diff": d} for d in diffs]
    sns.lineplot(data=pd.DataFrame(by_sigma), x="sigma", y="diff", hue="variant", marker="o", errorbar=("ci", 95),
                 ax=axes[0])
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set(xscale="log", xlabel="noise level sigma", ylabel=f"held-out loss minus {reference}",
                title="where each arm wins (paired, mean and 95% CI)")
    final = results.assign(step=profile.steps)[["variant", "seed", "step", "loss"]]
    sns.lineplot(data=pd.concat([curves[["variant", "seed", "step", "loss"]], final]), x="step", y="loss",
                 hue="variant", errorbar=("ci", 95), ax=axes[1], legend=False)
    axes[1].set(yscale="log", ylabel="held-out loss (mean over sigma)", title="learning curves")
    rows = list(table.itertuples())
    for y, row in enumerate(rows):
        arm, ref = row.comparison.split(" - ")
        points = paired_differences(results, row.metric, arm, ref)
        axes[2].errorbar(row.mean_diff, y, xerr=[[row.mean_diff - row.ci_low], [row.ci_high - row.mean_diff]],
                         fmt="o", color={"supported": "tab:green", "contradicted": "tab:red"}.get(row.verdict, "grey"))
        axes[2].scatter(points, [y] * len(points), marker="|", color="black", s=60)
    axes[2].axvline(0, color="black", lw=0.8)
    axes[2].set_yticks(range(len(rows)), [f"{r.comparison} ({r.metric})" for r in rows], fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set(xlabel="paired difference (arm - reference)", title="comparisons: mean, 95% CI, seeds")
    axes[0].legend(fontsize=6)
    fig.suptitle(protocol(profile), fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, name)
    return fig


def plot_quality_vs_gflops(results, profile: Profile, out_dir: Path, name: str):
    """Held-out loss and FD of every run against the model's GFLOPs (log scale)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in zip(axes, ["loss", "fd"], ["held-out loss (mean over sigma)", fd_label(profile)]):
        sns.scatterplot(data=results, x="gflops", y=metric, hue="variant", style="variant", ax=ax, s=50)
        ax.set(xscale="log", xlabel="GFLOPs per image (DiT convention)", ylabel=label)
        ax.legend(fontsize=6)
    fig.suptitle(f"quality vs compute\n{protocol(profile)}", fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, name)
    return fig


# -- figures --------------------------------------------------------------------------------------
def paper_style() -> None:
    """One look for every figure: seaborn's paper context, white grid, colour-blind palette."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight",
                         "axes.titlesize": 9, "pdf.fonttype": 42})


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.pdf`` and ``name.png`` (vector for papers, raster for the README)."""
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png"]
    for path in paths:
        fig.savefig(path)
    return paths


def check_outputs(out_dir: Path, figures: list[str]) -> list[Path]:
    """The files a notebook promises: each figure as PDF and PNG, and the raw results. Raises if one is missing."""
    expected = [out_dir / f"{name}.{ext}" for name in figures for ext in ("pdf", "png")]
    expected += [out_dir / "results.csv", out_dir / "results.json"]
    missing = [str(path) for path in expected if not path.is_file() or path.stat().st_size == 0]
    if missing:
        raise FileNotFoundError(f"the notebook did not write: {missing}")
    return expected


def show_grid(images: torch.Tensor, *, nrow: int, title: str, ax=None):
    """Images in [-1, 1] as one grid on a matplotlib axis; returns the figure."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    grid = make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6 * grid.shape[1] / grid.shape[2]))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return ax.figure


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0, 0, ..., 1, 1, ...: ``per_class`` of each class in a row, for :func:`show_class_rows`."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def show_class_rows(images: torch.Tensor, labels: torch.Tensor, *, dataset: str, title: str):
    """One row per class (samples drawn with :func:`class_labels`): the class name on the left, on the right how
    many of the row the data set's classifier (:mod:`vitdiff.metrics`) labels as that class."""
    from torchvision.datasets import FashionMNIST

    from .metrics import classifier_accuracy

    names = {"fashion-mnist": FashionMNIST.classes}.get(dataset)  # else the label number
    classes = labels.unique(sorted=True)
    per_class = len(labels) // len(classes)
    if not torch.equal(labels, class_labels(len(classes), per_class)):
        raise ValueError("show_class_rows needs labels from class_labels(num_classes, per_class)")
    fig = show_grid(images, nrow=per_class, title=title)
    ax = fig.axes[0]
    size, width = images.shape[-1], per_class * (images.shape[-1] + 1) + 1
    for row, label in enumerate(classes.tolist()):
        rows = labels == label
        correct = round(classifier_accuracy(images[rows], labels[rows], dataset=dataset) * per_class)
        y = 1 + row * (size + 1) + size / 2
        ax.text(-1, y, names[label] if names else str(label), ha="right", va="center", fontsize=8)
        ax.text(width + 1, y, f"{correct}/{per_class}", ha="left", va="center", fontsize=8)
    return fig


def explorer(draw, controls: dict):
    """``draw(**values)`` once with the controls' values as a plain figure, then a panel that redraws on "draw".

    The plain figure is what every viewer shows (GitHub, nbconvert, a headless papermill run: none of them
    runs widgets); in JupyterLab, set the controls and press "draw" for a new grid below them."""
    import ipywidgets as widgets

    draw(**{name: control.value for name, control in controls.items()})
    return widgets.interactive(draw, {"manual": True, "manual_name": "draw"}, **controls)


def sample_explorer(model, process, config: Config, *, n: int = 20, max_steps: int = 100, guidance: float = 1.0):
    """Sample grids by sampler, steps, guidance and seed (:func:`explorer`); for a class-conditional model the
    labels cycle 0, 1, 2, ..., one column per class."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .sampling import SAMPLERS
    from .generate import generate

    num_classes = getattr(model, "num_classes", 0)

    def draw(sampler: str, steps: int, guidance: float, seed: int):
        images = generate(model, process, config, n=n, seed=seed, device=next(model.parameters()).device,
                          sampler=sampler, steps=steps, guidance=guidance if num_classes else 1.0)
        conditioning = f", guidance {guidance:g}" if num_classes else ""
        title = f"{sampler}, {steps} steps{conditioning}, seed {seed}"
        show_grid(images, nrow=num_classes or int(n ** 0.5), title=title)
        plt.show()

    return explorer(draw, {
        "sampler": widgets.Dropdown(options=list(SAMPLERS), value=config.sample.sampler, description="sampler"),
        "steps": widgets.IntSlider(value=config.sample.steps, min=1, max=max_steps, description="steps"),
        "guidance": widgets.FloatSlider(value=guidance, min=1.0, max=8.0, step=0.25, description="guidance",
                                        disabled=not num_classes),
        "seed": widgets.IntText(value=0, description="seed"),
    })
