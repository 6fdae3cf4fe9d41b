"""Notebook 07's figures: prompt grids (drawn when a seed is judged, filed beside its rows) and captioned
examples."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..config import Config
from ..workbook import Profile, show_grid
from .profiles import TEXT_SETUPS, text_training_protocol


def prompt_grid(model, process, config: Config, prompts: list[str], *, per_prompt: int, guidance: float,
                seed: int = 0) -> torch.Tensor:
    """``per_prompt`` samples of every prompt, prompt after prompt: (len(prompts) * per_prompt, C, H, W)."""
    from ..generate import generate

    repeated = [prompt for prompt in prompts for _ in range(per_prompt)]
    return generate(model, process, config, n=len(repeated), seed=seed, prompts=repeated, guidance=guidance).cpu()


# The captions of every prompt grid (notebook 07 and the recipe search): one- and two-object captions that between
# them ask for each colour, both sizes, each position word and each shape.
GRID_PROMPTS = ("a small red circle on the left", "a large blue triangle at the top",
                "a large green square left of a small yellow circle",
                "a large red triangle on the right", "a small green circle at the bottom",
                "a large blue square above a small white circle")


def prompt_grid_figure(model, process, config: Config, profile: Profile, *, guidance: float, seed: int,
                       threads: int = 1):
    """:data:`GRID_PROMPTS`, the setup's ``grid_n`` samples of each beside its caption, titled with how they were
    drawn and what the model (of ``seed``, trained on ``threads`` threads) was trained on."""
    setup = TEXT_SETUPS[profile.name]
    images = prompt_grid(model, process, config, list(GRID_PROMPTS), per_prompt=setup.grid_n, guidance=guidance)
    return show_captioned(images, list(GRID_PROMPTS), per_row=setup.grid_n,
                          title=f"guidance {guidance:g}, {profile.sampler} {profile.sample_steps} steps, "
                                f"{setup.image_size}x{setup.image_size}, the model of seed {seed}\n"
                                f"{text_training_protocol(replace(profile, seeds=(seed,)), {seed: threads})}")


def show_captioned(images: torch.Tensor, captions: list[str], *, per_row: int, title: str):
    """One row of images per caption (``per_row`` images each, in order), the caption above its row."""
    import matplotlib.pyplot as plt

    rows = len(captions)
    fig, axes = plt.subplots(rows, 1, figsize=(1.1 * per_row + 0.5, 1.35 * rows + 0.4), squeeze=False)
    for row, (ax, caption) in enumerate(zip(axes[:, 0], captions)):
        show_grid(images[row * per_row:(row + 1) * per_row], nrow=per_row, title=caption, ax=ax)
    fig.suptitle(title, fontsize=8)
    return fig


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


def prompt_grid_file(folder: Path, profile: Profile, seed: int, suffix: str = ".png") -> Path:
    return folder / "samples" / profile.name / f"prompt_grid_seed{seed}{suffix}"


def show_prompt_grid(folder: Path, profile: Profile, seed: int, out_dir: Path) -> Path:
    """Display a filed seed's prompt grid (:func:`file_text_seed`) and copy it to ``out_dir/prompt_grid.png``
    and ``.pdf``."""
    import shutil

    from ..workbook.figures import show_figures

    paths = [shutil.copyfile(prompt_grid_file(folder, profile, seed, suffix), out_dir / f"prompt_grid{suffix}")
             for suffix in (".png", ".pdf")]
    show_figures(paths)
    return paths[0]
