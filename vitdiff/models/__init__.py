"""Backbone registry: ``create_model("U-ViT-S/2")`` and the list of presets.

Each family module exposes ``PRESETS: dict[str, Callable[..., nn.Module]]``;
the registry merges them. Keyword overrides pass through to the constructor,
so ``create_model("IU-ViT-S/2", skip="add")`` builds an ablation variant.
"""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from .base import DiffusionBackbone

_FAMILY_MODULES = ("vit", "ascend", "dit", "unet")


def _collect() -> dict[str, Callable[..., nn.Module]]:
    import importlib

    presets: dict[str, Callable[..., nn.Module]] = {}
    for module_name in _FAMILY_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        for name, builder in module.PRESETS.items():
            if name in presets:
                raise RuntimeError(f"preset {name!r} is defined twice")
            presets[name] = builder
    return presets


PRESETS = _collect()


def list_presets() -> list[str]:
    return list(PRESETS)


def create_model(name: str, **overrides) -> DiffusionBackbone:
    """Build a preset by name; unknown names get the closest matches in the error."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.4)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise KeyError(f"unknown preset {name!r}.{hint} `vitdiff models` lists all {len(PRESETS)} presets.")
    return PRESETS[name](**overrides)


__all__ = ["PRESETS", "DiffusionBackbone", "create_model", "list_presets"]
