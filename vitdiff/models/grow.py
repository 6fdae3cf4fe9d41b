"""Progressive resolution: start a model at a larger image size from one trained at a smaller size.

The hierarchical ASCEND keeps its encoder's token grid when the image side and the patch side double together
(32x32 with patch 4 and 64x64 with patch 8 both give 8x8 tokens), so the encoder, its position embedding, the text
encoder and the coarse decoder stages carry over unchanged; the patch embedding carries over as the same filter
spread over the larger patch; what exists only at the larger size (a new x2 decoder stage) starts from its own
initialisation. This is one of the text-to-image recipe candidates of notebook 07 (the issue's "progressive
resolution": the same single model trained at 32x32, then continued at 64x64).
"""
from __future__ import annotations

import torch
from torch import nn

PATCH_EMBEDDING = "patch_embed.proj.weight"


def spread_patch_kernel(kernel: torch.Tensor, factor: int) -> torch.Tensor:
    """A patch embedding's kernel (D, C, p, p) as a (D, C, factor*p, factor*p) kernel that applies it to the
    factor-times average-pooled image: each weight spread over factor x factor pixels, divided by their number."""
    return kernel.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) / factor ** 2


def grow_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, list[str]]]:
    """``model``'s state dict with what ``source`` (the state dict of a trained model of the same family at a
    smaller image size) can give it: tensors of the same name and shape are copied, the patch embedding's kernel
    is spread (:func:`spread_patch_kernel`), every other tensor keeps the model's own initialisation.

    Returns (state, report): report["copied"], ["spread"], ["new"] (in the model only) and ["dropped"] (in the
    source only, or of a shape that cannot carry over) list the tensor names, so a caller can say what grew."""
    state = model.state_dict()
    report: dict[str, list[str]] = {"copied": [], "spread": [], "new": [], "dropped": []}
    for name, target in state.items():
        old = source.get(name)
        if old is None:
            report["new"].append(name)
        elif old.shape == target.shape:
            state[name] = old.to(target.dtype).clone()
            report["copied"].append(name)
        elif name.endswith(PATCH_EMBEDDING) and _spread_factor(old.shape, target.shape):
            state[name] = spread_patch_kernel(old.to(target.dtype), _spread_factor(old.shape, target.shape))
            report["spread"].append(name)
        else:
            report["new"].append(name)
            report["dropped"].append(name)
    report["dropped"] += [name for name in source if name not in state]
    carried = set(report["copied"]) | set(report["spread"])
    encoder_inputs = [name for name in state if name.endswith((PATCH_EMBEDDING, "pos_embed")) and name not in carried]
    if encoder_inputs:
        raise ValueError(f"the source's {', '.join(encoder_inputs)} cannot carry over: grow between models of the "
                         "same preset and widths whose token grids match (double the patch with the image side)")
    return state, report


def _spread_factor(old: torch.Size, new: torch.Size) -> int:
    """The integer factor by which a patch kernel grew (same channels, square kernels), else 0."""
    if len(old) != 4 or old[:2] != new[:2] or new[2] % old[2] or new[3] % old[3]:
        return 0
    factor = new[2] // old[2]
    return factor if factor > 1 and new[3] // old[3] == factor else 0
