"""What the notebooks share: run profiles, ablation runs, result tables and paper figures.

A notebook declares its variants (a name, a model family, switch overrides) and
calls :func:`run_ablation`; every variant is trained with every seed of the
profile through the same :class:`vitdiff.trainer.Trainer` that ``vitdiff train``
uses, then measured with the same protocol:

* ``val_loss``: the training objective on held-out images with *fixed* noise and
  noise levels (seeded), the least noisy signal for short runs;
* ``FD-<data>-clf@n``: Fréchet distance of n EMA samples against the test split,
  on features of the small classifier of :mod:`vitdiff.metrics`. It is *not* FID.

Profiles: ``smoke`` (seconds, for CI: checks that everything runs, says nothing
about quality), ``cpu`` (fashion-mnist, minutes on a 2-core laptop, enough for
orderings), ``gpu`` (the paper-scale configs in ``experiments/``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    name: str
    dataset: str              # a name in vitdiff.data.DATASETS
    size: str                 # preset size suffix: "tiny" or "S/2"-style for the gpu profile
    steps: int                # optimizer steps per run
    batch_size: int
    lr: float
    warmup_steps: int
    seeds: tuple[int, ...]
    eval_n: int               # samples for the Fréchet distance
    val_n: int                # held-out images for val_loss
    sampler: str
    sample_steps: int
    image_size: int | None = None  # training resolution; None: the data set's own (32 for fashion-mnist)
    betas: tuple[float, float] = (0.99, 0.999)  # AdamW's; U-ViT's beta1 = 0.99 averages over ~100 steps
    grid: str = "karras"      # sigma grid for every sampler (DPM-Solver++(2M) is 2nd order on it, ~1.25 on uniform t)
    # The diffusion recipe. gpu: U-ViT's (VP-SDE, eps, uniform). CPU profiles: EDM's preconditioning, because
    # in a 400-step run an eps-model's small eps errors at high noise are multiplied by sigma in x0 and its
    # samples are noise (measured on IU-ViT-tiny, fashion-mnist, 400 steps: FD-fmnist-clf@300 968 with
    # vp-sde/eps, 937 with vp-sde/v, 560 with edm).
    process: str = "edm"
    prediction: str = "v"     # with edm: exactly EDM's c_skip/c_out parameterisation (vitdiff/diffusion.py)
    weighting: str = "edm"
    process_kwargs: dict = field(default_factory=dict)  # e.g. EDM's training-noise {p_mean, p_std}


PROFILES: dict[str, Profile] = {
    # Proves the plumbing in seconds; its numbers mean nothing.
    "smoke": Profile("smoke", dataset="digits", size="tiny", steps=4, batch_size=8, lr=1e-3, warmup_steps=1,
                     seeds=(0,), eval_n=32, val_n=32, sampler="dpmpp_2m", sample_steps=4),
    # Orderings on real data within ~20 minutes a notebook on 2 cores.
    # (IU-ViT-tiny: ~155 ms of one core per step at batch 32, so a run is about a minute.)
    "cpu": Profile("cpu", dataset="fashion-mnist", size="tiny", steps=400, batch_size=32, lr=1e-3, warmup_steps=40,
                   seeds=(0, 1), eval_n=500, val_n=500, sampler="dpmpp_2m", sample_steps=20),
    # The paper's scale: CIFAR-10, U-ViT's recipe (experiments/cifar10_uvit_s2.yaml).
    "gpu": Profile("gpu", dataset="cifar10", size="S/2", steps=500_000, batch_size=128, lr=2e-4, warmup_steps=2500,
                   seeds=(0, 1), eval_n=10_000, val_n=10_000, sampler="dpmpp_2m", sample_steps=50,
                   process="vp-sde", prediction="eps", weighting="uniform"),
}


def get_profile(name: str | None = None, *, dataset: str | None = None, steps: int | None = None,
                seeds=None, changes: dict[str, dict[str, Any]] | None = None) -> Profile:
    """The named profile, changed by a notebook's table (``changes[name]``), then the notebook's overrides
    (None keeps the profile's value).

    ``name=None`` reads ``VITDIFF_PROFILE`` (how the test suite selects ``smoke``), else ``cpu``."""
    name = name or os.environ.get("VITDIFF_PROFILE", "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    profile = replace(PROFILES[name], **(changes or {}).get(name, {}))
    if dataset is not None:
        profile = replace(profile, dataset=dataset)
    if steps is not None:
        profile = replace(profile, steps=int(steps))
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
# cpu: IU-ViT-tiny at 16x16 (patch 4: 16 tokens, 3.5x the steps/s of 32x32): 3000 steps, ~200 s on one idle thread,
# and the classifier labels 0.91 of the guided (w = 3) samples as their class (experiments/results/01_quickstart/).
QUICKSTART_PROFILE_CHANGES: dict[str, dict[str, Any]] = {
    "smoke": {"seeds": (0,)},
    # beta1 0.9, not the profiles' 0.99: with 0.99 the same run ended at loss 0.40 instead of 0.30 and its
    # samples kept visible noise (class accuracy 0.77 on the 100-sample grid, 0.93 on 200 samples with 0.9).
    "cpu": {"image_size": 16, "steps": 3000, "warmup_steps": 100, "betas": (0.9, 0.999), "seeds": (0,)},
    "gpu": {"seeds": (0,)},
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


def _run_sections(profile: Profile, seed: int) -> dict[str, dict]:
    """The config sections every notebook run shares: optimisation, sampling and evaluation of the profile."""
    return {
        "train": {"steps": profile.steps, "lr": profile.lr, "betas": list(profile.betas),
                  "warmup_steps": profile.warmup_steps, "seed": seed,
                  "log_every": max(1, profile.steps // 50), "ckpt_every": profile.steps, "sample_every": 0,
                  "progress": False, "grad_clip": 1.0},
        "sample": {"sampler": profile.sampler, "steps": profile.sample_steps, "grid": profile.grid},
        "eval": {"metric": "fd-clf", "n": profile.eval_n},
    }


def _diffusion_section(profile: Profile) -> dict[str, Any]:
    return {"process": profile.process, "prediction": profile.prediction, "weighting": profile.weighting,
            "process_kwargs": dict(profile.process_kwargs)}


def make_config(variant: Variant, profile: Profile, seed: int, out_dir: Path, **diffusion: Any) -> Config:
    """A full trainer config for one (variant, seed) under a profile; ``diffusion`` overrides that section."""
    raw = {
        "name": variant.name,
        "out_dir": str(out_dir),
        "model": {"preset": variant.preset_for(profile), **variant.overrides},
        "diffusion": {**_diffusion_section(profile), **diffusion},
        "data": {"dataset": profile.dataset, "image_size": profile.image_size, "batch_size": profile.batch_size,
                 "num_workers": 0, "flip": profile.dataset in ("cifar10", "celeba64")},
        **_run_sections(profile, seed),
    }
    return Config.from_dict(raw)


def _config_key(config: Config, sections: tuple[str, ...] | None = None, length: int = 12) -> str:
    """A short hash of the config's sections (default: all but ``out_dir``), to recognise a run by what it trains."""
    chosen = {k: v for k, v in config.to_dict().items() if (k in sections if sections else k != "out_dir")}
    return hashlib.sha1(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:length]


# -- measurement ----------------------------------------------------------------------------------
def model_cost(model: torch.nn.Module) -> tuple[int, float]:
    """(parameters, GFLOPs per batch-1 forward in DiT's convention) of a built model."""
    from .models.catalog import count_gflops

    return sum(p.numel() for p in model.parameters()), count_gflops(model)


@torch.no_grad()
def validation_loss(model, loss_fn, dataset: str, n: int, *, image_size: int | None = None, seed: int = 1234,
                    batch_size: int = 250) -> float:
    """Mean training loss on the first n test images (at ``image_size``; None: the set's own), with noise drawn
    from a fixed seed (same for every model)."""
    from .data import make_dataset

    test = make_dataset(dataset, train=False, image_size=image_size)
    n = min(n, len(test))
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    was_training = model.training
    model.eval()
    for start in range(0, n, batch_size):
        items = [test[i] for i in range(start, min(n, start + batch_size))]
        x0 = torch.stack([image for image, _ in items])
        cond = torch.tensor([label for _, label in items]) if getattr(model, "num_classes", 0) else None
        total += loss_fn(model, x0, cond, generator=generator).sum().item()
    model.train(was_training)
    return total / n


def evaluate_run(trainer, profile: Profile) -> dict[str, float]:
    """val_loss and the classifier Fréchet distance of the EMA model of a finished run."""
    from .metrics import fd_classifier
    from .trainer import generate

    ema = trainer.ema.module
    val = validation_loss(ema, trainer.loss_fn, profile.dataset, profile.val_n, image_size=profile.image_size)
    images = generate(ema, trainer.process, trainer.config, n=profile.eval_n, seed=10_000, device=trainer.device)
    fd = fd_classifier(images, dataset=profile.dataset)
    return {"val_loss": val, "fd": fd}


def fd_label(profile: Profile) -> str:
    short = {"fashion-mnist": "fmnist"}.get(profile.dataset, profile.dataset)
    return f"FD-{short}-clf@{profile.eval_n}"


def training_protocol(profile: Profile) -> str:
    """What was trained: data, diffusion recipe, steps x batch and the seeds by name (for loss curves)."""
    settings = ", ".join(f"{k}={v:g}" for k, v in profile.process_kwargs.items())
    process = f"{profile.process}({settings})" if settings else profile.process
    size = f" {profile.image_size}x{profile.image_size}" if profile.image_size else ""
    seeds = f"seed{'s' if len(profile.seeds) > 1 else ''} {', '.join(map(str, profile.seeds))}"
    return (f"{profile.dataset}{size}, {process}/{profile.prediction}, {profile.steps} steps x batch "
            f"{profile.batch_size}, {seeds}; profile={profile.name}")


def sampling_protocol(profile: Profile) -> str:
    """How samples were drawn (for sample grids)."""
    return f"{profile.sampler} {profile.sample_steps} steps ({profile.grid} grid)"


def protocol(profile: Profile, metric: str | None = None) -> str:
    """One line that travels with every figure and table of measured samples: what was trained and how it was
    measured."""
    metric = metric or fd_label(profile)
    return f"{training_protocol(profile)}; {metric} vs train split, {sampling_protocol(profile)}"


# -- ablations ------------------------------------------------------------------------------------
def run_variant(variant: Variant, profile: Profile, seed: int, runs_dir: Path, *, reuse: bool = True,
                **diffusion: Any) -> dict[str, Any]:
    """Train and evaluate one (variant, seed); a finished run with the same config is read back, not redone."""
    from .trainer import Trainer

    out = runs_dir / variant.name.replace("/", "_") / f"seed{seed}"
    config = make_config(variant, profile, seed, out, **diffusion)
    result_file = out / "result.json"
    key = _config_key(config)
    if reuse and result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved.get("config_key") == key:
            return saved
    start = time.perf_counter()
    trainer = Trainer(config, progress=False)
    last = trainer.fit()
    train_s = time.perf_counter() - start
    params, gflops = model_cost(trainer.model)
    result = {"variant": variant.name, "seed": seed, "preset": config.model.preset, "params_M": params / 1e6,
              "gflops": gflops, "train_loss": last.get("loss"), **evaluate_run(trainer, profile),
              "train_s": train_s, "img_per_s": last.get("img_per_s"), "config_key": key}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def run_ablation(variants: list[Variant], profile: Profile, out_dir: Path, *, progress: bool = True,
                 **diffusion: Any):
    """Every variant x every seed of the profile -> a DataFrame (one row per run); also saved as CSV and JSON."""
    import pandas as pd
    from tqdm.auto import tqdm

    jobs = [(variant, seed) for variant in variants for seed in profile.seeds]
    rows = []
    for variant, seed in tqdm(jobs, desc="runs", disable=not progress):
        rows.append(run_variant(variant, profile, seed, out_dir / "runs", **diffusion))
    return save_results(pd.DataFrame(rows).drop(columns=["config_key"]), profile, out_dir)


def save_results(frame, profile: Profile, out_dir: Path, metric: str | None = None):
    """The raw rows as ``results.csv`` and, with the protocol, ``results.json``; returns the frame."""
    frame.to_csv(out_dir / "results.csv", index=False)
    payload = {"protocol": protocol(profile, metric), "profile": asdict(profile),
               "runs": json.loads(frame.to_json(orient="records"))}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    return frame


def summarize(frame, metrics=("val_loss", "fd"), by: str = "variant"):
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
    from .trainer import generate

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


# -- text-to-image on the shapes set (notebook 07) ------------------------------------------------
@dataclass(frozen=True)
class TextSetup:
    """What a profile trains and measures for text-to-image on the shapes set (besides the Profile's sizes)."""
    preset: str                 # backbone preset
    image_size: int             # shapes are drawn at this size (the judge reads every size at 32x32)
    model: dict                 # backbone switches
    text: dict                  # config ``text`` section (jointly-trained encoder size)
    guidance: tuple[float, ...]  # classifier-free guidance scales to sweep (DiT convention; 1 = none)
    grid_n: int                 # samples per prompt in the prompt -> image grid


# The Profile fields text-to-image changes, and its TextSetup, per profile.
TEXT_PROFILE_CHANGES: dict[str, dict[str, Any]] = {
    "smoke": dict(dataset="shapes", steps=3, batch_size=4, eval_n=16, val_n=16, sample_steps=3),
    # EDM with training noise shifted up (ln sigma ~ N(0.4, 1.0) instead of N(-1.2, 1.2)): the caption decides
    # the scene at high noise, and a short run must spend its steps there. Measured on seed 0 (val captions):
    # with vp-sde/v the caption changed the loss by <1e-4 at 400 steps, with EDM's default noise by ~1% at 600,
    # and alignment stayed at chance; with the shift, colour accuracy 0.15 / 0.32 / 0.45 at 600 / 1500 / 2200
    # steps (chance 0.17; w = 3). Hence 3000 steps: ~0.35 s a step on one CPU core.
    "cpu": dict(dataset="shapes", steps=3000, batch_size=32, lr=1e-3, warmup_steps=50, eval_n=96, val_n=96,
                sample_steps=20, process_kwargs={"p_mean": 0.4, "p_std": 1.0}),
    # Paper scale at 64x64 (experiments/shapes64_t2i_ascend_h.yaml).
    # v-prediction: an eps-model's x0 estimate at high noise (x - sigma*eps, sigma up to 152 on vp-sde) is poor.
    "gpu": dict(dataset="shapes", steps=100_000, batch_size=128, lr=2e-4, warmup_steps=5000, eval_n=2000,
                val_n=2000, sample_steps=50, prediction="v"),
}
# The lightest pixel decoder: x2 pixel-shuffle stages and the full-resolution skip, no refining blocks, so the
# encoder on 8x8 patches does the work (CPU-sized at 64x64: about a third of the cost of one conv block a stage).
_LIGHT_DECODER = {"decoder_block": "conv", "decoder_blocks": 0, "hires_channels": 8}
# At 32x32 a patch of 4 keeps 64 encoder tokens, with two x2 decoder stages.
_PATCH4_AT_32 = {"patch_size": 4, "decoder_channels": (64, 32), "hires_channels": 16}
# The pooled caption on the time embedding and the decoder's condition (Imagen's global text path). Measured in the
# cpu profile (3000 steps, val captions, w = 3): colour accuracy 0.54 and 0.17 for seeds 0 and 1 with text tokens
# alone, 0.55 and 0.65 with the pooled path too (chance 0.17).
_POOLED = {"pooled_text": True}
TEXT_SETUPS: dict[str, TextSetup] = {
    "smoke": TextSetup("ASCEND-H-tiny", 64, {**_LIGHT_DECODER, **_POOLED},
                       {"context_dim": 32, "layers": 1, "heads": 2}, (1.0, 3.0), 2),
    "cpu": TextSetup("ASCEND-H-tiny", 32, {**_PATCH4_AT_32, "decoder_block": "conv", "decoder_blocks": 1, **_POOLED},
                     {"context_dim": 64, "layers": 2, "heads": 4}, (1.0, 2.0, 3.0, 5.0), 6),
    "gpu": TextSetup("ASCEND-H-S/8", 64, _POOLED, {"context_dim": 256, "layers": 4, "heads": 4},
                     (1.0, 2.0, 3.0, 5.0), 8),
}


def text_profile(name: str | None = None, *, dataset: str | None = None, steps: int | None = None,
                 seeds=None) -> Profile:
    """The named profile (``VITDIFF_PROFILE``, else cpu) resized for text-to-image on the shapes set;
    a notebook's overrides (None: keep) apply last. Its :class:`TextSetup` is ``TEXT_SETUPS[profile.name]``."""
    if dataset not in (None, "shapes"):
        raise ValueError(f"text alignment is judged on the shapes set only, got dataset={dataset!r}: "
                         "train other captioned sets with `vitdiff train experiments/cub*_t2i_*.yaml`")
    profile = get_profile(name)
    profile = replace(profile, **TEXT_PROFILE_CHANGES[profile.name])
    if steps is not None:
        profile = replace(profile, steps=int(steps))
    if seeds is not None:
        profile = replace(profile, seeds=tuple(int(seed) for seed in seeds))
    return profile


def make_text_config(profile: Profile, seed: int, out_dir: Path, *, cond_drop_prob: float = 0.1) -> Config:
    """A trainer config for text-to-image on the shapes set: the profile's backbone and diffusion recipe, a
    jointly-trained text encoder, caption dropout for classifier-free guidance."""
    setup = TEXT_SETUPS[profile.name]
    raw = {
        "name": f"t2i-{setup.preset}",
        "out_dir": str(out_dir),
        "model": {"preset": setup.preset, **setup.model},
        "diffusion": {**_diffusion_section(profile), "cond_drop_prob": cond_drop_prob},
        "data": {"dataset": profile.dataset, "image_size": setup.image_size, "batch_size": profile.batch_size,
                 "num_workers": 0},
        "text": {"encoder": "jointly-trained", **setup.text},
        **_run_sections(profile, seed),
    }
    return Config.from_dict(raw)


def train_text_model(profile: Profile, seed: int, runs_dir: Path, *, progress: bool = True):
    """Train one seed in ``runs_dir/seed<seed>-<key>`` and return its Trainer. The key hashes what a checkpoint
    must share to be resumed, so a re-run continues (or just reloads) the run, more steps extend it, and a changed
    model or recipe starts a new run instead of failing on the old checkpoint."""
    from .trainer import Trainer

    config = make_text_config(profile, seed, runs_dir)
    key = _config_key(config, sections=("model", "diffusion", "data", "text"), length=8)
    config.out_dir = str(runs_dir / f"seed{seed}-{key}")
    trainer = Trainer(config, progress=progress)
    trainer.fit()
    return trainer


def fd_shapes_label(n: int) -> str:
    return f"FD-shapes-clf@{n}"


@torch.no_grad()
def shapes_features(images: torch.Tensor, classifier=None, batch_size: int = 256) -> torch.Tensor:
    """The shapes judge's penultimate (256-d) features of images in [-1, 1]: the space of FD-shapes-clf."""
    from .shapes import load_attribute_classifier

    classifier = (classifier or load_attribute_classifier()).eval()
    captured: list[torch.Tensor] = []
    hook = classifier.trunk.register_forward_hook(lambda module, inputs, output: captured.append(output.cpu()))
    try:
        for chunk in images.split(batch_size):
            classifier(chunk.float())
    finally:
        hook.remove()
    return torch.cat(captured)


def fd_shapes(fake: torch.Tensor, real: torch.Tensor, classifier=None) -> float:
    """FD-shapes-clf: Fréchet distance between the judge's features of two image sets. A CPU proxy, not FID."""
    from .metrics import FeatureStats

    fake_stats = FeatureStats(256).update(shapes_features(fake, classifier))
    real_stats = FeatureStats(256).update(shapes_features(real, classifier))
    return fake_stats.frechet_distance(real_stats)


def alignment_chance(attributes: torch.Tensor) -> dict[str, float]:
    """Uniform guessing on these captions: 1/K per attribute, and for all-correct the count (1/2) times 1/K for every
    attribute of every named object, averaged over the captions (two-object captions are harder)."""
    from .shapes import ABSENT, ATTRIBUTES, CHANCE_LEVELS, VOCABULARIES

    one_object = 1.0
    for name in ATTRIBUTES:
        one_object /= len(VOCABULARIES[name])
    objects = (attributes[:, :, 0] != ABSENT).sum(1).double()
    return {**{k: v for k, v in CHANCE_LEVELS.items() if k != "all_correct"},
            "all_correct": float((0.5 * one_object ** objects).mean())}


def text_alignment(model, process, config: Config, *, split: str = "test", guidance: float = 1.0, n: int = 128,
                   seed: int = 0, batch_size: int = 64, classifier=None) -> dict[str, Any]:
    """Sample n images for n captions of a shapes split and judge them.

    ``split``: "test" (every caption names a held-out colour-shape pair, never seen in training) or "val" (new
    scenes of seen pairs). Returns per-attribute accuracy, all-correct, their chance levels (``chance_*``), and
    ``FD-shapes-clf@n`` between the samples and the real images of the same captions, with ``fd_floor``, the FD
    between those real images and n other real scenes of the split (what a perfect generator scores at this n).
    Samples are clipped to [-1, 1] first, as when they are saved as images."""
    from .shapes import ShapesDataset, load_attribute_classifier, text_alignment_accuracy
    from .trainer import data_geometry, generate

    classifier = classifier or load_attribute_classifier()
    _, image_size = data_geometry(config)
    captions = ShapesDataset(split, image_size=image_size, num_samples=n, seed=10_000 + seed)
    images = torch.cat([generate(model, process, config, n=len(chunk), seed=seed * 1000 + i, prompts=chunk,
                                 guidance=guidance).cpu()
                        for i, chunk in enumerate(_chunks(captions.captions, batch_size))]).clamp(-1, 1)
    real = captions.images()
    # Other real scenes of the split: the FD of a perfect generator at this n (the metric's small-n floor).
    other_real = ShapesDataset(split, image_size=image_size, num_samples=n, seed=20_000 + seed).images()
    accuracy = text_alignment_accuracy(images, captions.attributes, classifier)
    chance = alignment_chance(captions.attributes)
    return {"split": split, "guidance": guidance, "n": n, **accuracy,
            **{f"chance_{name}": value for name, value in chance.items()},
            fd_shapes_label(n): fd_shapes(images, real, classifier),
            "fd_floor": fd_shapes(other_real, real, classifier)}


def _chunks(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def alignment_frame_summary(frame, metrics=("all_correct", "shape", "colour", "size", "position", "count")):
    """Mean ± spread over seeds per (split, guidance), in sweep order (:func:`summarize` on those rows)."""
    frame = frame.assign(condition=[f"{split}, w={guidance:g}" for split, guidance in zip(frame["split"],
                                                                                           frame["guidance"])])
    return summarize(frame, metrics=list(metrics), by="condition")


def prompt_grid(model, process, config: Config, prompts: list[str], *, per_prompt: int, guidance: float,
                seed: int = 0) -> torch.Tensor:
    """``per_prompt`` samples of every prompt, prompt after prompt: (len(prompts) * per_prompt, C, H, W)."""
    from .trainer import generate

    repeated = [prompt for prompt in prompts for _ in range(per_prompt)]
    return generate(model, process, config, n=len(repeated), seed=seed, prompts=repeated, guidance=guidance).cpu()


def show_captioned(images: torch.Tensor, captions: list[str], *, per_row: int, title: str):
    """One row of images per caption (``per_row`` images each, in order), the caption above its row."""
    import matplotlib.pyplot as plt

    rows = len(captions)
    fig, axes = plt.subplots(rows, 1, figsize=(1.1 * per_row + 0.5, 1.35 * rows + 0.4), squeeze=False)
    for row, (ax, caption) in enumerate(zip(axes[:, 0], captions)):
        show_grid(images[row * per_row:(row + 1) * per_row], nrow=per_row, title=caption, ax=ax)
    fig.suptitle(title, fontsize=8)
    return fig


def prompt_explorer(model, process, config: Config, *, prompt: str = "a large red circle left of a small blue square",
                    n: int = 4, guidance: float = 3.0):
    """Type a prompt, set guidance and seed, see n samples and what the shapes judge reads (:func:`explorer`)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .shapes import parse_caption, text_alignment_accuracy

    def draw(prompt: str, guidance: float, seed: int):
        images = prompt_grid(model, process, config, [prompt], per_prompt=n, guidance=guidance, seed=seed)
        try:
            asked = parse_caption(prompt).expand(n, -1, -1)
            scores = text_alignment_accuracy(images.clamp(-1, 1), asked)
            verdict = f"judge: {scores['all_correct']:.0%} all-correct"
        except ValueError:
            verdict = "not a shapes caption: the judge cannot score it (unknown words become <unk>)"
        show_captioned(images, [f"{prompt!r}, guidance {guidance:g}, seed {seed}; {verdict}"], per_row=n,
                       title="")
        plt.show()

    return explorer(draw, {
        "prompt": widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="60%")),
        "guidance": widgets.FloatSlider(value=guidance, min=1.0, max=8.0, step=0.5, description="guidance"),
        "seed": widgets.IntText(value=0, description="seed"),
    })


def show_examples(images: torch.Tensor, captions: list[str], *, ncols: int, title: str):
    """Each image with its own caption (wrapped) above it, ``ncols`` to a row."""
    import math
    import textwrap

    import matplotlib.pyplot as plt

    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.7 * ncols, 2.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(textwrap.fill(caption, 24), fontsize=6)
    fig.suptitle(title, fontsize=8)
    return fig
