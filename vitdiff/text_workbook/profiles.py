"""Notebook 07's profiles: the workbook's profiles resized for text-to-image on the shapes set, what each trains
(:class:`TextSetup`), and the protocol lines that travel with its figures."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Config
from ..text_alignment import fd_shapes_label
from ..workbook import Profile, ProfileChanges, get_profile


@dataclass(frozen=True)
class TextSetup:
    """What a profile trains and measures for text-to-image on the shapes set (besides the Profile's sizes)."""
    preset: str                 # backbone preset
    image_size: int             # shapes are drawn at this size (the judge reads every size at 32x32)
    model: dict                 # backbone switches
    text: dict                  # config ``text`` section (jointly-trained encoder size)
    guidance: tuple[float, ...]  # classifier-free guidance scales to sweep (DiT convention; 1 = none)
    grid_n: int                 # samples per prompt in the prompt -> image grid


def resolution_shifted_noise(noise: dict, image_size: int, reference: int = 32) -> dict:
    """EDM training noise for ``image_size`` from noise tuned at ``reference``: ln sigma's mean moved by
    ln(image_size / reference), i.e. +ln 2 per doubling of the side (sigma scaled by the side: at twice the side
    the same sigma destroys less structure; Hoogeboom et al. 2023, *simple diffusion*). Rounded to 3 decimals."""
    return {**noise, "p_mean": round(noise["p_mean"] + math.log(image_size / reference), 3)}


# EDM with wider, higher training noise (ln sigma ~ N(-0.2, 1.4) instead of N(-1.2, 1.2)): the caption decides
# the scene at high noise, which a short run must reach, and a shape's edges at low noise (experiments/README.md:
# the text recipe search). About 30 minutes of training a seed at 32x32 on one core.
_CPU_TEXT_RECIPE = {"data.dataset": "shapes", "train.steps": 3600, "data.batch_size": 32, "train.lr": 1e-3,
                    "train.warmup_steps": 50, "sample.steps": 20,
                    "diffusion.process_kwargs": {"p_mean": -0.2, "p_std": 1.4}}


def _cpu_text_recipe_at(image_size: int) -> dict:
    """The cpu text recipe (tuned at 32x32) with its training noise shifted for ``image_size``, trained 3x longer
    (10800 steps: the recipe search's best 64x64 run, shape 0.485 against 0.266 shuffled, had 0.346 at 8400)."""
    noise = _CPU_TEXT_RECIPE["diffusion.process_kwargs"]
    return {**_CPU_TEXT_RECIPE, "train.steps": 3 * _CPU_TEXT_RECIPE["train.steps"],
            "diffusion.process_kwargs": resolution_shifted_noise(noise, image_size)}


# What text-to-image changes in each profile: config overrides, then the notebook-level sizes. cpu-64 and cpu-128
# are the cpu profile at 64x64 (the paper's threshold) and 128x128 (beyond it); TEXT_BASE_PROFILES names the
# workbook profile each one changes.
TEXT_PROFILE_CHANGES: ProfileChanges = {
    "smoke": ({"data.dataset": "shapes", "train.steps": 3, "data.batch_size": 4, "sample.steps": 3},
              {"eval_n": 16, "val_n": 16}),
    "cpu": (_CPU_TEXT_RECIPE, {"eval_n": 96, "val_n": 96, "seeds": (0, 1, 2)}),
    "cpu-64": (_cpu_text_recipe_at(64), {"eval_n": 96, "val_n": 96, "seeds": (0, 1, 2)}),
    # cpu-64 trained twice as long (21600 steps): all-correct was still rising at 10800 (experiments/README.md).
    "cpu-64-long": ({**_cpu_text_recipe_at(64), "train.steps": 6 * _CPU_TEXT_RECIPE["train.steps"]},
                    {"eval_n": 96, "val_n": 96, "seeds": (0, 1, 2)}),
    "cpu-128": (_cpu_text_recipe_at(128), {"eval_n": 96, "val_n": 96, "seeds": (0,)}),
    # Paper scale at 64x64 (experiments/shapes64_t2i_ascend_h.yaml).
    # v-prediction: an eps-model's x0 estimate at high noise (x - sigma*eps, sigma up to 152 on vp-sde) is poor.
    "gpu": ({"data.dataset": "shapes", "train.steps": 100_000, "data.batch_size": 128, "train.lr": 2e-4,
             "train.warmup_steps": 5000, "sample.steps": 50, "diffusion.prediction": "v"},
            {"eval_n": 2000, "val_n": 2000}),
}


TEXT_BASE_PROFILES = {"cpu-64": "cpu", "cpu-64-long": "cpu", "cpu-128": "cpu"}


# A profile that differs from another only in its steps continues that profile's seeds where their runs are on this
# machine (:func:`continued_run_dir`): its LR is constant after warm-up and resume is bit-exact, so the continued
# run is the run trained at once (tests/test_t2i_training.py), without training the shorter one's steps again.
TEXT_CONTINUES = {"cpu-64-long": "cpu-64"}


# The lightest pixel decoder: x2 pixel-shuffle stages and the full-resolution skip, no refining blocks, so the
# encoder on 8x8 patches does the work (CPU-sized at 64x64: about a third of the cost of one conv block a stage);
# the 64x64 and 128x128 setups add the pixel path's refining blocks back (_PIXEL_PATH).
_LIGHT_DECODER = {"decoder_block": "conv", "decoder_blocks": 0, "hires_channels": 8}


# At 32x32 a patch of 4 keeps 64 encoder tokens, with two x2 decoder stages; at 128x128 a patch of 16, four stages.
_PATCH4_AT_32 = {"patch_size": 4, "decoder_channels": (64, 32), "hires_channels": 16}


_PATCH16_AT_128 = {"patch_size": 16, "decoder_channels": (64, 32, 16, 8)}


# The pixel path that made 64x64 shapes (recipe search): a refining conv block a stage, FiLM by the pooled caption.
_PIXEL_PATH = {"decoder_blocks": 1, "decoder_film": True}


# The pooled caption on the time embedding and the decoder's condition (Imagen's global text path); notebook 07
# measures what it adds.
_POOLED = {"pooled_text": True}


TEXT_SETUPS: dict[str, TextSetup] = {
    "smoke": TextSetup("ASCEND-H-tiny", 64, {**_LIGHT_DECODER, **_POOLED},
                       {"context_dim": 32, "layers": 1, "heads": 2}, (1.0, 3.0), 2),
    "cpu": TextSetup("ASCEND-H-tiny", 32, {**_PATCH4_AT_32, "decoder_block": "conv", "decoder_blocks": 1, **_POOLED},
                     {"context_dim": 64, "layers": 2, "heads": 4}, (1.0, 2.0, 3.0, 5.0), 6),
    # Patch 8 keeps the encoder's 64 tokens at 64x64 (the preset's three x2 stages); the recipe search's pixel path
    # (one conv block a stage, caption FiLM in every stage). Guidance 1 and 3 only: each scale costs a full
    # evaluation at 64x64, and 3 is the pre-registered one.
    "cpu-64": TextSetup("ASCEND-H-tiny", 64, {**_LIGHT_DECODER, **_PIXEL_PATH, **_POOLED},
                        {"context_dim": 64, "layers": 2, "heads": 4}, (1.0, 3.0), 6),
    "cpu-128": TextSetup("ASCEND-H-tiny", 128, {**_LIGHT_DECODER, **_PATCH16_AT_128, **_PIXEL_PATH, **_POOLED},
                         {"context_dim": 64, "layers": 2, "heads": 4}, (1.0, 3.0), 6),
    "gpu": TextSetup("ASCEND-H-S/8", 64, _POOLED, {"context_dim": 256, "layers": 4, "heads": 4},
                     (1.0, 2.0, 3.0, 5.0), 8),
}
TEXT_SETUPS.update({longer: TEXT_SETUPS[shorter] for longer, shorter in TEXT_CONTINUES.items()})


# The guidance scale (DiT convention) notebook 07's verdicts are read at, fixed before the runs; the prompt grids
# are drawn at it too.
VERDICT_GUIDANCE = 3.0


def text_profile(name: str | None = None, *, dataset: str | None = None, steps: int | None = None,
                 seeds=None) -> Profile:
    """The named profile (``VITDIFF_PROFILE``, else cpu) resized for text-to-image on the shapes set;
    a notebook's overrides (None: keep) apply last. Its :class:`TextSetup` is ``TEXT_SETUPS[profile.name]``."""
    if dataset not in (None, "shapes"):
        raise ValueError(f"text alignment is judged on the shapes set only, got dataset={dataset!r}: "
                         "train other captioned sets with `vitdiff train experiments/cub*_t2i_*.yaml`")
    name = name or os.environ.get("VITDIFF_PROFILE", "cpu")
    if name not in TEXT_PROFILE_CHANGES:
        raise ValueError(f"notebook 07 has no {name!r} profile: use one of {', '.join(TEXT_PROFILE_CHANGES)}")
    base = TEXT_BASE_PROFILES.get(name, name)
    profile = replace(get_profile(base, steps=steps, seeds=seeds, changes={base: TEXT_PROFILE_CHANGES[name]}),
                      name=name)
    return profile.with_overrides(**{"data.image_size": TEXT_SETUPS[name].image_size})


def text_protocol(profile: Profile, what: str | None = None, threads: Mapping[int, float] | None = None) -> str:
    """The line that travels with notebook 07's figures and tables: what was trained (each seed on
    ``threads[seed]`` threads, :func:`text_training_protocol`) and how samples were judged."""
    from ..workbook import sampling_protocol

    what = what or (f"text alignment (shapes judge, {profile.eval_n} captions per split) + "
                    f"{fd_shapes_label(profile.eval_n)}")
    return f"{text_training_protocol(profile, threads)}; {what}; {sampling_protocol(profile)}"


def text_training_protocol(profile: Profile, threads: Mapping[int, float] | None = None) -> str:
    """The training protocol of ``profile``'s seeds, each trained on ``threads[seed]`` threads: one where
    ``threads`` is not given or has no count for the seed (seeds filed before the count was recorded)."""
    from ..workbook import training_protocol

    def count(seed: int) -> int:
        value = (threads or {}).get(seed)
        return 1 if value is None or math.isnan(value) else int(value)

    counts = {seed: count(seed) for seed in profile.seeds}
    protocol = training_protocol(profile)
    if set(counts.values()) == {1}:
        return protocol
    if len(set(counts.values())) == 1:
        return protocol.replace("one thread a run", f"{counts[profile.seeds[0]]} threads a run")
    each = ", ".join(f"seed {seed} on {count}" for seed, count in counts.items())
    return protocol.replace("one thread a run", f"threads a run: {each}")


def make_text_config(profile: Profile, seed: int, out_dir: Path, *, cond_drop_prob: float = 0.1) -> Config:
    """A trainer config for text-to-image on the shapes set: the profile's backbone and diffusion recipe, a
    jointly-trained text encoder, caption dropout for classifier-free guidance."""
    setup = TEXT_SETUPS[profile.name]
    return profile.run_config(f"t2i-{setup.preset}", out_dir, seed, (
        ("model.preset", setup.preset), *((f"model.{key}", value) for key, value in setup.model.items()),
        ("diffusion.cond_drop_prob", cond_drop_prob), ("data.num_workers", 0), ("text.encoder", "jointly-trained"),
        *((f"text.{key}", value) for key, value in setup.text.items())))
