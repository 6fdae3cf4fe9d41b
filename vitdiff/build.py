"""From a config to the objects it names: model, diffusion process and loss, tokenizer, batch conditions.

The trainer, ``vitdiff sample``, ``vitdiff eval`` and the workbook all build through
this module, so a checkpoint's config always rebuilds the model it was trained with.
It is also where the config's names are checked against the registries
(:func:`check_names`): :mod:`vitdiff.config` is a schema that imports nothing
else from vitdiff.

``load_experiment`` is the one way from an ``experiments/*.yaml`` file plus
``key=value`` overrides to a config; it resolves ``tiny=true`` (a CPU-sized run
of the same experiment: the family's tiny preset on embedded data) and says what
the profile swapped.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, DataConfig, EvalConfig, TextConfig, load_config


# -- what the data gives the model --------------------------------------------------------------
def data_geometry(config: Config) -> tuple[int, int]:
    """(channels, image_size) of the model input, from the data section."""
    from .data import dataset_info

    info = dataset_info(config.data.dataset)
    return info.channels, config.data.image_size or info.image_size


def dataset_labels(config: Config) -> int | None:
    """Number of classes of the training set (None: unlabelled)."""
    from .data import dataset_info

    return dataset_info(config.data.dataset).num_classes


def takes_text(config: Config) -> bool:
    """Text-to-image: the data set has captions."""
    from .data import dataset_info

    return dataset_info(config.data.dataset).has_captions


def caption_corpus(dataset) -> list[str]:
    """Every training caption of a captioned data set, read without decoding images."""
    from torch.utils.data import Subset

    indices = None
    while isinstance(dataset, Subset):
        indices, dataset = dataset.indices if indices is None else [dataset.indices[i] for i in indices], dataset.dataset
    captions = getattr(dataset, "captions", None)      # vitdiff.shapes: one caption per image
    if captions is None and hasattr(dataset, "targets"):  # captions.jsonl / cub200 text: a list of captions per image
        captions = dataset.targets
    if captions is None or not all(isinstance(c, (str, list, tuple)) for c in captions[:1]):
        raise ConfigError(f"{type(dataset).__name__} yields no captions (class labels?): a text-to-image run needs "
                          "captions, e.g. cub200 with its text_c10/ folder, or the shapes data set")
    if indices is not None:
        captions = [captions[i] for i in indices]
    return [text for item in captions for text in ([item] if isinstance(item, str) else item)]


def batch_condition(model: nn.Module, targets, device: torch.device | str) -> torch.Tensor | None:
    """What ``model(x, t, cond)`` takes for a batch's targets: token ids of its captions (text models), its
    labels (class-conditional models), else None."""
    if getattr(model, "takes_token_ids", False):
        if torch.is_tensor(targets) and targets.dtype == torch.long and targets.ndim == 2:
            return targets.to(device)  # already tokenized by the data set
        if torch.is_tensor(targets):
            raise ConfigError(f"the data set yields {tuple(targets.shape)} {targets.dtype} targets where captions "
                              "were expected: build the data set with captions")
        return model.encode_prompts(list(targets)).to(device)
    if getattr(model, "num_classes", 0):
        return torch.as_tensor(targets).to(device, non_blocking=True)
    return None


# -- text ---------------------------------------------------------------------------------------
def build_tokenizer(config: Config, captions: list[str]):
    """The word tokenizer of a jointly-trained text encoder (None for CLIP, which brings its own)."""
    from .text import WordTokenizer

    if config.text.encoder == "clip":
        return None
    return WordTokenizer.from_corpus(captions, max_length=config.text.max_length, min_count=config.text.min_count)


def tokenizer_to_json(tokenizer) -> str | None:
    """A word tokenizer as a JSON string (a checkpoint stays loadable with weights_only=True); None for CLIP."""
    from .text import WordTokenizer

    if not isinstance(tokenizer, WordTokenizer):
        return None
    return json.dumps({"type": "word", "max_length": tokenizer.max_length, "vocab": tokenizer.vocab})


def tokenizer_from_json(text: str | None):
    from .text import WordTokenizer

    if text is None:
        return None
    state = json.loads(text)
    return WordTokenizer(state["vocab"], state["max_length"])


def _build_text_encoder(config: Config, tokenizer):
    from .text import FrozenCLIPEncoder, TextEncoder

    section = config.text
    if section.encoder == "clip":
        encoder = FrozenCLIPEncoder(section.path, max_length=section.max_length or 77)
        return encoder, encoder.tokenizer
    if tokenizer is None:
        raise ValueError("a jointly-trained text encoder needs the word tokenizer of its training captions: "
                         "build_tokenizer(config, captions), or tokenizer_from_json(checkpoint['text']['tokenizer'])")
    encoder = TextEncoder.for_tokenizer(tokenizer, context_dim=section.context_dim, depth=section.layers,
                                        num_heads=section.heads)
    return encoder, tokenizer


# -- model and diffusion ------------------------------------------------------------------------
def build_model(config: Config, tokenizer=None) -> nn.Module:
    """The preset with the config's overrides; image size and channels always follow the data.

    For captioned data the backbone takes text of the encoder's width and length, wrapped with its
    encoder in :class:`vitdiff.text.TextToImage`; a jointly-trained encoder needs the ``tokenizer``."""
    from .models import create_model

    channels, image_size = data_geometry(config)
    overrides = {"image_size": image_size, "in_channels": channels, **config.model.overrides}
    encoder = None
    if takes_text(config):
        encoder, tokenizer = _build_text_encoder(config, tokenizer)
        overrides.update(context_dim=encoder.context_dim, context_len=tokenizer.max_length)
    try:
        backbone = create_model(config.model.preset, **overrides)
    except TypeError as error:
        raise ConfigError(f"model {config.model.preset!r} rejects the overrides {config.model.overrides} ({error}): "
                          "check the model.* keys against the model class's constructor") from error
    except ValueError as error:
        raise ConfigError(f"model {config.model.preset!r} cannot be built with {overrides}: {error}") from error
    if encoder is None:
        return backbone
    from .text import TextToImage

    return TextToImage(backbone, encoder, tokenizer)


def build_diffusion(config: Config):
    """(process, loss) from the diffusion section."""
    from .diffusion import DiffusionLoss, make_process

    section = config.diffusion
    process = make_process(section.process, **section.process_kwargs)
    loss = DiffusionLoss(process, prediction=section.prediction, weighting=section.weighting,
                         min_snr_gamma=section.min_snr_gamma, cond_drop_prob=section.cond_drop_prob,
                         vlb_weight=section.vlb_weight)
    return process, loss


def check_names(config: Config) -> None:
    """Every registry name in the config exists (preset, data set, process, prediction, weighting, samplers,
    grid, spacing, variance, beta reading, guidance convention), checked before anything is trained or written."""
    from .data import DATASETS
    from .diffusion import PREDICTIONS, PROCESSES, VARIANCES, WEIGHTINGS
    from .models import PRESETS
    from .sampling import BETA_DTS, GRIDS, NO_GUIDANCE, SAMPLERS, SPACINGS

    section_names = [
        ("model.preset", config.model.preset, PRESETS),
        ("data.dataset", config.data.dataset, DATASETS),
        ("diffusion.process", config.diffusion.process, PROCESSES),
        ("diffusion.prediction", config.diffusion.prediction, PREDICTIONS),
        ("diffusion.weighting", config.diffusion.weighting, WEIGHTINGS),
        ("sample.sampler", config.sample.sampler, SAMPLERS),
        ("sample.guidance_convention", config.sample.guidance_convention, NO_GUIDANCE),
        ("sample.beta_dt", config.sample.beta_dt, BETA_DTS),
    ]
    optional = [("sample.grid", config.sample.grid, GRIDS), ("eval.sampler", config.eval.sampler, SAMPLERS),
                ("sample.spacing", config.sample.spacing, SPACINGS), ("sample.variance", config.sample.variance, VARIANCES)]
    section_names += [entry for entry in optional if entry[1] is not None]
    for key, value, choices in section_names:
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(sorted(choices))}")


# -- experiments and the tiny profile -------------------------------------------------------------
def tiny_preset_for(preset: str) -> str:
    """The tiny preset of a preset's family: the longest ``<family>-tiny`` whose family prefixes the name
    (``ASCEND-H-S/8`` -> ``ASCEND-H-tiny``), else one whose family is a dash-separated part (``DDPM-UNet``)."""
    from .models import PRESETS

    if preset.endswith("-tiny"):
        return preset
    families = [name[: -len("-tiny")] for name in PRESETS if name.endswith("-tiny")]
    prefixed = [family for family in families if preset.startswith(family + "-")]
    if prefixed:
        return max(prefixed, key=len) + "-tiny"
    parts = preset.split("-")
    contained = [family for family in families if family in parts]
    if contained:
        return contained[0] + "-tiny"
    raise ConfigError(f"no tiny preset for model {preset!r}; tiny presets: {[f + '-tiny' for f in families]}. "
                      "Set model.preset=<one of them> explicitly.")


def _section(name: str, section) -> dict[str, Any]:
    return {f"{name}.{key}": value for key, value in dataclasses.asdict(section).items()}


def tiny_overrides(config: Config) -> dict[str, Any]:
    """The overrides that shrink an experiment to a CPU-sized run of the same family and switches: the tiny
    preset, embedded data (digits; fashion-mnist where the experiment uses it; the captioned shapes set with a
    small jointly-trained text encoder for text-to-image), a few hundred steps."""
    from .data import dataset_info

    overrides: dict[str, Any] = {"model.preset": tiny_preset_for(config.model.preset)}
    if dataset_info(config.data.dataset).has_captions:
        dataset = "shapes"  # captioned, embedded, with ground truth to judge text alignment
        overrides.update(_section("text", TextConfig(encoder="jointly-trained", context_dim=64, layers=2, heads=4)))
        overrides["sample.prompts"] = None
    else:
        dataset = config.data.dataset if config.data.dataset in ("digits", "fashion-mnist") else "digits"
    overrides.update(_section("data", DataConfig(dataset=dataset, batch_size=32, flip=False, num_workers=0)))
    overrides.update({"train.steps": 300, "train.warmup_steps": 20, "train.accumulate": 1, "train.ema_warmup": True,
                      "train.log_every": 25, "train.ckpt_every": 100, "train.sample_every": 150,
                      "train.compile": False, "train.grad_checkpointing": False,
                      "sample.steps": 20, "sample.n": 16})
    overrides.update(_section("eval", EvalConfig(metric="fd-clf", n=256)))
    return overrides


def _override_key(item: str | tuple[str, Any]) -> str:
    return item[0] if isinstance(item, tuple) else item.partition("=")[0].strip()


def load_experiment(path: str | Path | None = None, overrides: list[str | tuple[str, Any]] | None = None, *,
                    quiet: bool = False) -> Config:
    """An experiment file plus ``key=value`` overrides (``tiny=true`` included), its names checked.

    What the tiny profile swaps (model, data set) is printed to stderr unless ``quiet``."""
    config = load_config(path, overrides, shrink=tiny_overrides)
    check_names(config)
    if config.profile == "tiny" and not quiet:
        explicit = [item for item in overrides or [] if _override_key(item) not in ("tiny", "profile")]
        original = load_config(path, explicit)
        swaps = [f"{what} {before} -> {after}" for what, before, after in (
            ("model", original.model.preset, config.model.preset),
            ("data", original.data.dataset, config.data.dataset)) if before != after]
        if swaps:
            print(f"tiny profile: {'; '.join(swaps)}", file=sys.stderr)
    return config
