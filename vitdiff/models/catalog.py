"""``vitdiff models``: every preset with its size and cost.

Parameters and GFLOPs are *measured*, never typed in: each preset is built on the
``meta`` device (shapes only, no memory, so DiT-XL costs nothing) and one batch-1
forward is traced by :class:`torch.utils.flop_counter.FlopCounterMode`.

GFLOPs follow DiT's convention: a multiply-add counts once (the flop counter counts
two, so its total is halved). Attention matmuls are included; norms, activations and
the label lookup are not. With this convention DiT-XL/2 measures 118.62 GFLOPs
(paper: 118.64).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import PRESETS


def family_of(model: torch.nn.Module) -> str:
    return getattr(model, "family", type(model).__name__)


def build_on_meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return PRESETS[name]()


def count_gflops(model: torch.nn.Module) -> float:
    """Batch-1 forward GFLOPs (DiT convention) of a model, traced on a meta-device copy.

    The copy matters for models that hold real weights: on the CPU the flop counter does not see the
    fused attention kernel, on meta it does; a meta model is traced as it is."""
    on_meta = all(p.device.type == "meta" for p in model.parameters())
    model = model if on_meta else copy.deepcopy(model).to("meta")
    with torch.device("meta"):
        x = torch.zeros(1, model.in_channels, model.image_size, model.image_size)
        t = torch.zeros(1)
        if model.num_classes:
            cond = torch.zeros(1, dtype=torch.long)
        elif model.context_dim:
            # The model's own text length (CLIP's 77 by default); the attended cost scales with it.
            cond = torch.zeros(1, getattr(model, "context_len", 77), model.context_dim)
        else:
            cond = None
    was_training = model.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x, t, cond)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def measure(name: str) -> dict:
    """Build preset ``name`` on the meta device and count its parameters and batch-1 forward GFLOPs."""
    model = build_on_meta(name)
    return {
        "name": name,
        "family": family_of(model),
        "image_size": model.image_size,
        "in_channels": model.in_channels,
        "patch_size": model.patch_size,
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": count_gflops(model),
    }


def format_table(rows: list[dict]) -> str:
    name_w = max([4] + [len(row["name"]) for row in rows])
    family_w = max([6] + [len(row["family"]) for row in rows])
    header = f"{'name':<{name_w}}  {'family':<{family_w}}  {'size':>4}  {'ch':>2}  {'patch':>5}  {'params':>8}  {'GFLOPs':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['name']:<{name_w}}  {row['family']:<{family_w}}  {row['image_size']:>4}  "
                     f"{row['in_channels']:>2}  {row['patch_size']:>5}  {row['params'] / 1e6:>7.2f}M  {row['gflops']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitdiff models", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--family", help="only this family (e.g. DiT, U-ViT, IU-ViT, ASCEND, U-Net); case-insensitive")
    args = parser.parse_args(argv)
    names = list(PRESETS)
    if args.family:
        family = {name: family_of(build_on_meta(name)) for name in names}
        names = [name for name in names if family[name].lower() == args.family.lower()]
        if not names:
            parser.error(f"no preset of family {args.family!r}; families: {', '.join(sorted(set(family.values())))}")
    rows = [measure(name) for name in names]
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
