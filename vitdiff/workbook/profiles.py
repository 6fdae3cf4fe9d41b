"""Run profiles: the recipe every notebook runs (an ``experiments/`` YAML plus overrides), its sizes, and the
protocol line that travels with every table and figure."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from ..config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        from ..build import load_experiment

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



# Noise levels of the held-out loss: log-spaced over the range where the data's structure is decided (EDM's
# sigma_data is 0.5; at sigma < 0.05 the pixels are already resolved, above 40 the prior dominates).
LOSS_SIGMAS = (0.05, 0.15, 0.4, 1.0, 2.5, 6.0, 15.0, 40.0)


def sigma_column(sigma: float) -> str:
    return f"loss@{sigma:g}"


def fd_label(profile: Profile) -> str:
    """The Fréchet metric's name with its sample count, e.g. ``FD-fmnist-clf[729629]@500`` or ``FID@10k``."""
    from ..metrics import FD_METRIC_NAMES, count_label

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
