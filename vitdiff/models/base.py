"""The one interface every backbone honours.

``model(x, t, cond=None) -> Tensor`` shaped like ``x`` (twice the channels when
``learn_sigma`` is on).

* ``x``: (B, C, H, W) noisy image or latent.
* ``t``: (B,) float *noise-conditioning value*, as the diffusion process
  defines it (:mod:`vitdiff.diffusion` maps its time or sigma to this value;
  e.g. U-ViT's continuous VP passes ``999 * t``). Backbones only embed it.
* ``cond``: ``None``; a (B,) long tensor of class labels, where the index
  ``num_classes`` is the learned *null* label used by classifier-free guidance;
  or a (B, L, context_dim) float tensor of text-token embeddings.

Classifier-free guidance and condition dropout never look inside a model: they
call :meth:`DiffusionBackbone.drop_cond`, so each model decides what "no
condition" means (null label, or a learned null text token).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class DiffusionBackbone(nn.Module):
    """Base class: shared input checks, condition dropout and gradient checkpointing."""

    def __init__(self, *, image_size: int, in_channels: int, learn_sigma: bool = False,
                 num_classes: int = 0, context_dim: int = 0, patch_size: int = 1):
        super().__init__()
        if num_classes and context_dim:
            raise ValueError("a backbone takes either class labels (num_classes) or text (context_dim), not both")
        if image_size % patch_size:
            raise ValueError(
                f"image size {image_size} is not divisible by patch size {patch_size}: "
                f"choose a patch size that divides {image_size} (e.g. {[p for p in (1, 2, 4, 8, 16) if image_size % p == 0]})")
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.patch_size = patch_size
        self.gradient_checkpointing = False

    # -- conditioning -------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        return bool(self.num_classes or self.context_dim)

    def null_context(self, like: torch.Tensor) -> torch.Tensor:
        """The unconditional text context; text models override this with a learned token."""
        raise NotImplementedError(f"{type(self).__name__} takes no text context")

    def drop_cond(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Replace the condition of examples where ``drop`` (B,) is True by the null condition."""
        if not self.is_conditional:
            raise ValueError(f"{type(self).__name__} is unconditional: there is no condition to drop "
                             "(build it with num_classes=... or context_dim=... for guidance)")
        if cond.dtype == torch.long:
            return torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        return torch.where(drop[:, None, None], self.null_context(cond).to(cond.dtype), cond)

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of a batch of conditions."""
        return self.drop_cond(cond, torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device))

    # -- checks -------------------------------------------------------------
    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> None:
        """Fail loudly, naming the fix, instead of broadcasting into a silent wrong result."""
        name = type(self).__name__
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}: "
                             f"convert the images to {self.in_channels} channels or build the model with "
                             f"in_channels={x.shape[1] if x.ndim == 4 else '?'}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"{name} was built for {self.image_size}x{self.image_size} inputs, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: resize the data or build the model with "
                             f"image_size={x.shape[-1]}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,)=({x.shape[0]},), got {tuple(t.shape)}")
        if cond is None and self.is_conditional:
            raise ValueError(f"{name} is conditional and needs cond; pass model.null_cond(...) or "
                             "labels = num_classes for unconditional samples")
        if cond is not None:
            if not self.is_conditional:
                raise ValueError(f"{name} is unconditional but got cond: pass cond=None, or build the model "
                                 "with num_classes=... (labels) or context_dim=... (text)")
            if self.num_classes and (cond.dtype != torch.long or cond.shape != (x.shape[0],)):
                raise ValueError(f"{name} expects class labels as a (B,) long tensor, got "
                                 f"{cond.dtype} {tuple(cond.shape)}")
            # A value check reads data: skip it under torch.compile (no graph break) and on meta tensors.
            checks_values = not torch.compiler.is_compiling() and cond.device.type != "meta"
            if self.num_classes and checks_values and ((cond < 0) | (cond > self.num_classes)).any():
                raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label)")
            if self.context_dim and (cond.ndim != 3 or cond.shape[0] != x.shape[0] or cond.shape[2] != self.context_dim):
                raise ValueError(f"{name} expects text context of shape (B, L, {self.context_dim}), "
                                 f"got {tuple(cond.shape)}")

    # -- memory -------------------------------------------------------------
    def set_gradient_checkpointing(self, enabled: bool = True) -> "DiffusionBackbone":
        """Recompute block activations in backward: ~30% slower steps, far less activation memory."""
        self.gradient_checkpointing = enabled
        return self

    def run_block(self, block: nn.Module, *args):
        """Call a block, through activation checkpointing when enabled and training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
