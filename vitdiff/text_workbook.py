"""Notebook 07's layer: text-to-image on the embedded captioned shapes set.

Its profiles (the workbook's profiles resized for captions), training one seed, and the text-alignment scoring of
samples with the pinned attribute judge (:mod:`vitdiff.shapes`); the shared layer is :mod:`vitdiff.workbook`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .workbook import Profile, ProfileChanges, config_key, explorer, get_profile, show_grid, summarize


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


# What text-to-image changes in each profile: config overrides, then the notebook-level sizes.
TEXT_PROFILE_CHANGES: ProfileChanges = {
    "smoke": ({"data.dataset": "shapes", "train.steps": 3, "data.batch_size": 4, "sample.steps": 3},
              {"eval_n": 16, "val_n": 16}),
    # EDM with training noise shifted up (ln sigma ~ N(0.4, 1.0) instead of N(-1.2, 1.2)): the caption decides
    # the scene at high noise, and a short run must spend its steps there (experiments/README.md: how the text
    # recipe was found).
    "cpu": ({"data.dataset": "shapes", "train.steps": 3000, "data.batch_size": 32, "train.lr": 1e-3,
             "train.warmup_steps": 50, "sample.steps": 20, "diffusion.process_kwargs": {"p_mean": 0.4, "p_std": 1.0}},
            {"eval_n": 96, "val_n": 96}),
    # Paper scale at 64x64 (experiments/shapes64_t2i_ascend_h.yaml).
    # v-prediction: an eps-model's x0 estimate at high noise (x - sigma*eps, sigma up to 152 on vp-sde) is poor.
    "gpu": ({"data.dataset": "shapes", "train.steps": 100_000, "data.batch_size": 128, "train.lr": 2e-4,
             "train.warmup_steps": 5000, "sample.steps": 50, "diffusion.prediction": "v"},
            {"eval_n": 2000, "val_n": 2000}),
}
# The lightest pixel decoder: x2 pixel-shuffle stages and the full-resolution skip, no refining blocks, so the
# encoder on 8x8 patches does the work (CPU-sized at 64x64: about a third of the cost of one conv block a stage).
_LIGHT_DECODER = {"decoder_block": "conv", "decoder_blocks": 0, "hires_channels": 8}
# At 32x32 a patch of 4 keeps 64 encoder tokens, with two x2 decoder stages.
_PATCH4_AT_32 = {"patch_size": 4, "decoder_channels": (64, 32), "hires_channels": 16}
# The pooled caption on the time embedding and the decoder's condition (Imagen's global text path); notebook 07
# measures what it adds.
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
    return get_profile(name, steps=steps, seeds=seeds, changes=TEXT_PROFILE_CHANGES)


def make_text_config(profile: Profile, seed: int, out_dir: Path, *, cond_drop_prob: float = 0.1) -> Config:
    """A trainer config for text-to-image on the shapes set: the profile's backbone and diffusion recipe, a
    jointly-trained text encoder, caption dropout for classifier-free guidance."""
    setup = TEXT_SETUPS[profile.name]
    return profile.run_config(f"t2i-{setup.preset}", out_dir, seed, (
        ("model.preset", setup.preset), *((f"model.{key}", value) for key, value in setup.model.items()),
        ("diffusion.cond_drop_prob", cond_drop_prob), ("data.image_size", setup.image_size),
        ("data.num_workers", 0), ("text.encoder", "jointly-trained"),
        *((f"text.{key}", value) for key, value in setup.text.items())))


def train_text_model(profile: Profile, seed: int, runs_dir: Path, *, progress: bool = True):
    """Train one seed in ``runs_dir/seed<seed>-<key>`` and return its Trainer. The key hashes what a checkpoint
    must share to be resumed, so a re-run continues (or just reloads) the run, more steps extend it, and a changed
    model or recipe starts a new run instead of failing on the old checkpoint."""
    from .trainer import Trainer

    config = make_text_config(profile, seed, runs_dir)
    key = config_key(config, sections=("model", "diffusion", "data", "text"), length=8)
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
    from .build import data_geometry
    from .generate import generate

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
    from .generate import generate

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
