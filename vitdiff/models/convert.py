"""Converters from published checkpoints' state dicts to vitdiff's layouts.

Each function maps a *loaded* state dict (``torch.load(path)``; nothing is downloaded)
to one that ``model.load_state_dict`` accepts for the matching preset, checking what
it drops instead of silently ignoring it.
"""
from __future__ import annotations

import torch


def _add_null_label_row(state: dict[str, torch.Tensor], key: str, num_classes: int | None) -> None:
    """Append the null label's row (zeros: read only when guidance asks for it) to a label table that has
    ``num_classes`` rows; one that already has ``num_classes + 1`` is kept."""
    table = state.get(key)
    if table is None or num_classes is None or table.shape[0] == num_classes + 1:
        return
    if table.shape[0] != num_classes:
        raise ValueError(f"label table has {table.shape[0]} rows, expected {num_classes} or {num_classes + 1} "
                         f"for num_classes={num_classes}")
    state[key] = torch.cat([table, table.new_zeros(1, table.shape[1])])


def convert_dit_state_dict(sd: dict[str, torch.Tensor], num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT (``DiT-XL-2-256x256.pt`` etc.) -> :class:`vitdiff.models.dit.DiT`.

    vitdiff's DiT uses the official module names, so only two things change:

    * ``pos_embed`` is a fixed sin-cos table that vitdiff recomputes (a non-persistent
      buffer); it is checked against ours and dropped;
    * a checkpoint trained without label dropout has no null-label row: pass
      ``num_classes`` and a zero row is appended (read only when guidance asks for the
      unconditional output). Released DiTs have it (1001 rows).

    Accepts a bare state dict or a training checkpoint holding one under ``"ema"`` or ``"model"``.
    """
    from ..nn import sincos_pos_embed_2d

    for key in ("ema", "model"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    known = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "final_layer.", "pos_embed")
    unknown = [k for k in sd if not k.startswith(known)]
    if unknown:
        raise KeyError(f"not a DiT state dict: unexpected keys {unknown[:5]}")
    out = dict(sd)
    if "pos_embed" in out:
        pos_embed = out.pop("pos_embed").float().reshape(-1, sd["x_embedder.proj.weight"].shape[0])
        grid = int(round(pos_embed.shape[0] ** 0.5))
        expected = sincos_pos_embed_2d(pos_embed.shape[1], grid)
        if not torch.allclose(pos_embed, expected, atol=1e-5):
            raise ValueError("the checkpoint's pos_embed is not DiT's fixed 2-D sin-cos table, which vitdiff "
                             "recomputes; this checkpoint needs a model with a learned position embedding")
    _add_null_label_row(out, "y_embedder.embedding_table.weight", num_classes)
    return out


UVIT_KEY_PREFIXES = ("patch_embed.", "time_embed.", "label_emb.", "context_embed.", "pos_embed", "in_blocks.",
                     "mid_block.", "out_blocks.", "norm.", "decoder_pred.", "final_layer.")


def convert_uvit_state_dict(sd: dict[str, torch.Tensor], num_classes: int | None = None,
                            context_len: int = 77) -> dict[str, torch.Tensor]:
    """baofff/U-ViT (``libs/uvit.py``, ``libs/uvit_t2i.py``; ``nnet.pth``/``nnet_ema.pth``) -> :class:`vitdiff.models.vit.UViT`.

    vitdiff's U-ViT keeps the official module names (``patch_embed.proj``, ``label_emb``,
    ``pos_embed``, ``in_blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``mid_block``,
    ``out_blocks.N.skip_linear``, ``norm``, ``decoder_pred``, ``final_layer``), so only this changes:

    * the ImageNet-64 configs have no null-label row (``num_classes=1000`` there, 1001 for ImageNet-256):
      pass ``num_classes`` and a zero row is appended (read only when guidance asks for it);
    * text-to-image checkpoints (``context_embed`` present) order tokens [time][text][patches]; ours are
      [text][time][patches], so the position-embedding rows are reordered (``context_len`` text tokens);
    * our learned ``null_context_token`` has no counterpart: the official text models use the CLIP
      embedding of the empty prompt as their null condition, so pass that embedding as ``cond`` instead.
    """
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    unknown = [k for k in sd if not k.startswith(UVIT_KEY_PREFIXES)]
    if unknown:
        raise KeyError(f"not a U-ViT state dict: unexpected keys {unknown[:5]}")
    out = dict(sd)
    if "context_embed.weight" in out:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos[:, 1:1 + context_len], pos[:, :1], pos[:, 1 + context_len:]], dim=1)
    _add_null_label_row(out, "label_emb.weight", num_classes)
    return out


def load_uvit_pretrained(path: str, preset: str, **overrides):
    """Build ``preset`` and load an official U-ViT checkpoint file from ``path`` into it (strictly)."""
    from . import create_model

    model = create_model(preset, **overrides)
    sd = convert_uvit_state_dict(torch.load(path, map_location="cpu", weights_only=True),
                                 num_classes=model.num_classes or None, context_len=model.context_len)
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd and k != "null_context_token"]
    unexpected = [k for k in sd if k not in ours]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in sd.items()
                  if k in ours and v.shape != ours[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint {path} does not fit preset {preset!r}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {mismatched[:5]} (check the preset and overrides "
                         "such as image_size=, head=, num_classes=, context_dim=)")
    model.load_state_dict(sd, strict=False)  # only null_context_token may be absent
    return model
