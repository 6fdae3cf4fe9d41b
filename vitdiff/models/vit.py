"""Token-based diffusion Transformers: U-ViT, IU-ViT and a vanilla ViT.

Every input is a token (Bao et al., "All are Worth Words", baofff/U-ViT):

    [text tokens?][label?][time][patch tokens]  --+ learned 1-D position embedding
      -> in-blocks ---(long skips, last in, first out)---+
      -> mid-block                                        |
      -> out-blocks, each first fusing one skip  <--------+
      -> LayerNorm -> Linear(D, p*p*C) -> drop the extra tokens -> unpatchify -> 3x3 conv

* ``UViT`` with its defaults is U-ViT exactly (``depth=12`` builds 6 + 1 + 6 blocks;
  parameter names match the official ``libs/uvit.py`` so checkpoints load through
  :func:`vitdiff.models.convert.convert_uvit_state_dict`). The text-to-image U-ViT puts
  the time token first; we always put conditioning tokens first and the converter
  reorders the position embedding.
* IU-ViT (Cao et al., arXiv 2212.13771) is "U-ViT with improvements" whose exact deltas
  are not public; each candidate is a named switch of the same class (``conditioning``,
  ``skip``, ``pos_embed``, ``head``, ``norm``, ``qk_norm``, ``conv_stem``). The IU-ViT
  presets' defaults are *our reconstruction*, not the paper's.
* ViT is the same trunk with ``skip="none"``: a plain stack of ``depth + 1`` blocks.

:class:`TokenBackbone` holds what every token family shares (conditioning tokens, patch
embedding, positions, the block trunk with configurable skip wiring, the linear head);
:mod:`vitdiff.models.ascend` builds its asymmetric encoder-decoders from the same parts.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from ..nn import (Attention, CrossAttention, Mlp, check_choice, make_norm, modulate, sincos_pos_embed_2d,
                  timestep_embedding, unpatchify)
from .base import DiffusionBackbone

CONDITIONINGS = ("token", "adaln", "adaln_zero")
SKIPS = ("none", "add", "concat_linear", "lerp")
POS_EMBEDS = ("learned", "sincos")
HEADS = ("linear", "linear_conv")
NORMS = ("layernorm", "rmsnorm")
TEXT_MODES = ("tokens", "cross_attn")
NORM_EPS = 1e-5  # torch's LayerNorm default, which U-ViT uses


class PatchEmbed(nn.Module):
    """Conv2d(C, D, p, stride p); with ``stem_channels`` a 3x3-conv stem first sees full resolution."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stem_channels: int = 0):
        super().__init__()
        if stem_channels:
            # "Early convolutions help transformers see better" (Xiao et al. 2021): cheap local features
            # before the coarse patchify, so fine detail inside a patch is not a single linear map.
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(stem_channels, stem_channels, 3, padding=1), nn.GELU())
            in_channels = stem_channels
        else:
            self.stem = nn.Identity()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm Transformer block, optionally: long-skip fusion at its input, adaLN(-Zero), cross-attention.

    Args:
        dim, num_heads, mlp_ratio: width, attention heads, MLP hidden width / dim.
        norm, qk_norm, qkv_bias: normalisation kind, QK-norm in attention, bias on the qkv projection.
        skip: how a long skip joins the stream: "none"; "add" (x + s); "concat_linear" (U-ViT:
            Linear(2D -> D) on [x, s]); "lerp" (x + g * (s - x), g a learned per-channel gate, init 0.5).
        skip_dim: width of the skip source (an encoder may be wider than the decoder); defaults to dim.
        modulation: "none" (affine norms), "adaln" (DiT's adaLN: shift and scale from the condition
            vector) or "adaln_zero" (plus zero-initialised residual gates, so each block starts as identity).
        cond_dim: width of the condition vector that drives adaLN.
        cross_attn_dim: >0 adds a cross-attention layer over a context of that width (text).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, norm: str = "layernorm",
                 qk_norm: bool = False, qkv_bias: bool = False, skip: str = "none", skip_dim: int | None = None,
                 modulation: str = "none", cond_dim: int = 0, cross_attn_dim: int = 0):
        super().__init__()
        check_choice("skip", skip, SKIPS)
        check_choice("modulation", modulation, ("none", "adaln", "adaln_zero"))
        skip_dim = skip_dim or dim
        self.skip = skip
        if skip == "concat_linear":
            self.skip_linear = nn.Linear(dim + skip_dim, dim)
        elif skip in ("add", "lerp"):
            self.skip_proj = nn.Linear(skip_dim, dim) if skip_dim != dim else nn.Identity()
            if skip == "lerp":
                self.skip_gate = nn.Parameter(torch.full((dim,), 0.5))
        affine = modulation == "none"
        self.norm1 = make_norm(norm, dim, affine=affine, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm=norm)
        self.has_cross_attn = bool(cross_attn_dim)
        if cross_attn_dim:
            self.norm_cross = make_norm(norm, dim, eps=NORM_EPS)
            self.cross_attn = CrossAttention(dim, cross_attn_dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = make_norm(norm, dim, affine=affine, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = modulation
        if modulation != "none":
            chunks = 6 if modulation == "adaln_zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, chunks * dim))

    def fuse_skip(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if self.skip == "none":
            return x
        if self.skip == "concat_linear":
            return self.skip_linear(torch.cat([x, skip], dim=-1))
        skip = self.skip_proj(skip)
        if self.skip == "add":
            return x + skip
        return torch.lerp(x, skip, self.skip_gate)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, c: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fuse_skip(x, skip)
        if self.modulation == "none":
            x = x + self.attn(self.norm1(x))
            if self.has_cross_attn:
                x = x + self.cross_attn(self.norm_cross(x), context)
            return x + self.mlp(self.norm2(x))
        mods = self.adaLN_modulation(c).chunk(6 if self.modulation == "adaln_zero" else 4, dim=-1)
        shift1, scale1, shift2, scale2 = mods[:4]
        gate1, gate2 = (mods[4][:, None], mods[5][:, None]) if self.modulation == "adaln_zero" else (1.0, 1.0)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.has_cross_attn:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TokenBackbone(DiffusionBackbone):
    """Shared parts of the token families; subclasses call ``_init_trunk`` and a head, then ``initialize_weights``.

    Args (shared by UViT and the ASCEND models; ``dim`` is the width of the tokens the trunk starts with):
        image_size, in_channels, patch_size, learn_sigma: data geometry; learn_sigma doubles output channels.
        num_classes: >0 adds a label Embedding(num_classes + 1, dim); index num_classes is the null label.
        context_dim: >0 takes (B, L, context_dim) text embeddings as the condition.
        context_len: number of text tokens in "tokens" mode (the position embedding covers them; CLIP: 77).
        text_mode: "tokens" (U-ViT: Linear(context_dim, D), prepended) or "cross_attn" (a cross-attention
            layer in every block; any length L).
        pooled_text: also add Linear(mean of the text embeddings) to the time embedding (Imagen's pooled
            caption), a global path for what holds for the whole image (colours, sizes); off in U-ViT.
        conditioning: "token" (U-ViT: time and label are tokens), "adaln" or "adaln_zero" (time MLP + label
            embedding form a vector that modulates every block, as in DiT; no time/label tokens).
        pos_embed: "learned" (U-ViT: 1-D over all tokens, trunc-normal 0.02) or "sincos" (fixed 2-D on the
            patches; extra tokens get none: time and label differ by content, text encoders encode order).
        norm, qk_norm, qkv_bias, mlp_ratio: block options (see :class:`Block`).
        time_mlp: pass the time sinusoid through Linear(D, 4D)-SiLU-Linear(4D, D) (U-ViT's
            ``mlp_time_embed``; off in every released U-ViT config; always on for adaLN conditioning).
        conv_stem, stem_channels: a two-layer 3x3 conv stem before patchify, of that width.
    """

    def __init__(self, *, image_size: int, in_channels: int, patch_size: int, dim: int, learn_sigma: bool = False,
                 num_classes: int = 0, context_dim: int = 0, context_len: int = 77, text_mode: str = "tokens",
                 pooled_text: bool = False, conditioning: str = "token", pos_embed: str = "learned",
                 norm: str = "layernorm", qk_norm: bool = False, qkv_bias: bool = False, mlp_ratio: float = 4.0,
                 time_mlp: bool = False, conv_stem: bool = False, stem_channels: int = 64):
        super().__init__(image_size=image_size, in_channels=in_channels, learn_sigma=learn_sigma,
                         num_classes=num_classes, context_dim=context_dim, patch_size=patch_size)
        check_choice("conditioning", conditioning, CONDITIONINGS)
        check_choice("pos_embed", pos_embed, POS_EMBEDS)
        check_choice("norm", norm, NORMS)
        check_choice("text_mode", text_mode, TEXT_MODES)
        self.embed_dim = dim
        self.conditioning = conditioning
        self.pos_embed_kind = pos_embed
        self.norm_kind = norm
        self.text_mode = text_mode
        self.context_len = context_len
        adaptive = conditioning != "token"
        self.block_options = dict(
            mlp_ratio=mlp_ratio, norm=norm, qk_norm=qk_norm, qkv_bias=qkv_bias, cond_dim=dim,
            modulation="none" if not adaptive else conditioning,
            cross_attn_dim=context_dim if text_mode == "cross_attn" else 0)

        self.patch_embed = PatchEmbed(in_channels, dim, patch_size, stem_channels if conv_stem else 0)
        self.time_embed = (nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
                           if time_mlp or adaptive else nn.Identity())
        if num_classes:
            self.label_emb = nn.Embedding(num_classes + 1, dim)
        text_tokens = context_len if context_dim and text_mode == "tokens" else 0
        if context_dim:
            self.null_context_token = nn.Parameter(torch.zeros(1, 1, context_dim))
            if text_tokens:
                self.context_embed = nn.Linear(context_dim, dim)
            if pooled_text:
                self.pooled_text_embed = nn.Linear(context_dim, dim)
        elif pooled_text:
            raise ValueError("pooled_text=True needs a text model: set context_dim=... (the text encoder's width)")
        self.pooled_text = pooled_text
        self.num_extra_tokens = text_tokens + (0 if adaptive else 1 + bool(num_classes))

        num_patches = (image_size // patch_size) ** 2
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extra_tokens + num_patches, dim))
        else:
            fixed = torch.cat([torch.zeros(self.num_extra_tokens, dim),
                               sincos_pos_embed_2d(dim, image_size // patch_size)])
            self.register_buffer("pos_embed", fixed[None], persistent=False)

    # -- construction helpers ---------------------------------------------------
    def _init_trunk(self, *, encoder_depth: int, decoder_depth: int, encoder_dim: int, decoder_dim: int,
                    encoder_heads: int, decoder_heads: int, skip: str,
                    skip_sources: Sequence[int] | None = None, skip_receivers: Sequence[int] | None = None) -> None:
        """in_blocks (encoder), mid_block, [width bridge], out_blocks (decoder) with long skips.

        Encoder block ``skip_sources[i]`` feeds decoder block ``skip_receivers[-1 - i]``: skips are
        pushed in encoder order and popped last-in-first-out. The defaults mirror U-ViT (every
        encoder block to its mirror decoder block), which needs equal depths.
        """
        check_choice("skip", skip, SKIPS)
        if skip_sources is None:
            if encoder_depth != decoder_depth:
                raise ValueError("U-ViT's mirrored skips need equal encoder and decoder depths; pass skip_sources")
            skip_sources = skip_receivers = range(encoder_depth)
        if skip == "none":
            skip_sources = skip_receivers = ()
        if len(skip_sources) != len(skip_receivers):
            raise ValueError(f"{len(skip_sources)} skip sources but {len(skip_receivers)} receivers")
        self.skip_sources = frozenset(skip_sources)
        self.skip_receivers = frozenset(skip_receivers)
        block = partial(Block, **self.block_options)
        self.in_blocks = nn.ModuleList(block(encoder_dim, encoder_heads) for _ in range(encoder_depth))
        self.mid_block = block(encoder_dim, encoder_heads)
        self.bridge = nn.Linear(encoder_dim, decoder_dim) if encoder_dim != decoder_dim else nn.Identity()
        self.out_blocks = nn.ModuleList(
            block(decoder_dim, decoder_heads, skip=skip if j in self.skip_receivers else "none", skip_dim=encoder_dim)
            for j in range(decoder_depth))

    def _init_linear_head(self, dim: int, head: str) -> None:
        """Norm -> Linear(D, p*p*C_out) -> unpatchify -> optional 3x3 conv (U-ViT's ``final_layer``)."""
        check_choice("head", head, HEADS)
        adaptive = self.conditioning != "token"
        self.norm = make_norm(self.norm_kind, dim, affine=not adaptive, eps=NORM_EPS)
        if adaptive:  # DiT's final layer: shift and scale from the condition vector
            self.head_modulation = nn.Sequential(nn.SiLU(), nn.Linear(self.embed_dim, 2 * dim))
        self.decoder_pred = nn.Linear(dim, self.patch_size ** 2 * self.out_channels)
        self.final_layer = (nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)
                            if head == "linear_conv" else nn.Identity())

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """U-ViT's init: trunc-normal(0.02) Linear weights, zero biases, unit norms; adaLN-Zero as DiT."""
        def base_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

        self.apply(base_init)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.context_dim:
            nn.init.trunc_normal_(self.null_context_token, std=0.02)
        if self.conditioning == "adaln_zero":
            zeroed = [m.adaLN_modulation[-1] for m in self.modules() if isinstance(m, Block)]
            if hasattr(self, "decoder_pred"):  # the linear head; DiT zeroes its final layer too
                zeroed += [self.decoder_pred, self.head_modulation[-1]]
            for linear in zeroed:
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (U-ViT: the learned position embedding)."""
        return {"pos_embed"} if isinstance(self.pos_embed, nn.Parameter) else set()

    def null_context(self, like: torch.Tensor) -> torch.Tensor:
        """The learned null text token, broadcast to ``like``'s (B, L, context_dim) shape."""
        if not self.context_dim:
            raise NotImplementedError(f"{type(self).__name__} takes no text context")
        return self.null_context_token.to(like.dtype).expand(like.shape)

    # -- forward pieces ---------------------------------------------------------
    def embed(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None):
        """Image, time and condition -> (tokens with positions, adaLN condition vector or None, cross-attn context)."""
        tokens = self.patch_embed(x)
        time = self.time_embed(timestep_embedding(t, self.embed_dim).to(tokens.dtype))
        if self.pooled_text:
            time = time + self.pooled_text_embed(cond.mean(dim=1))
        label = self.label_emb(cond) if self.num_classes else None
        extras, context = [], None
        if self.context_dim:
            if self.text_mode == "cross_attn":
                context = cond
            else:
                if cond.shape[1] != self.context_len:
                    raise ValueError(f"{type(self).__name__} was built for {self.context_len} text tokens, got "
                                     f"{cond.shape[1]}: pad/truncate the text or build with context_len={cond.shape[1]}")
                extras.append(self.context_embed(cond))
        if self.conditioning == "token":
            c = None
            if label is not None:
                extras.append(label[:, None])
            extras.append(time[:, None])
        else:
            c = time if label is None else time + label
        tokens = torch.cat([*extras, tokens], dim=1) + self.pos_embed.to(tokens.dtype)
        return tokens, c, context

    def forward_blocks(self, x: torch.Tensor, c: torch.Tensor | None, context: torch.Tensor | None) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.in_blocks):
            x = self.run_block(block, x, None, c, context)
            if i in self.skip_sources:
                skips.append(x)
        x = self.bridge(self.run_block(self.mid_block, x, None, c, context))
        for j, block in enumerate(self.out_blocks):
            x = self.run_block(block, x, skips.pop() if j in self.skip_receivers else None, c, context)
        return x

    def head(self, tokens: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(tokens[:, self.num_extra_tokens:])  # per-token ops: dropping extras first is equivalent
        if c is not None:
            shift, scale = self.head_modulation(c).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        x = unpatchify(self.decoder_pred(x), self.patch_size, self.out_channels)
        return self.final_layer(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, t, cond)
        tokens, c, context = self.embed(x, t, cond)
        return self.head(self.forward_blocks(tokens, c, context), c)


class UViT(TokenBackbone):
    """U-ViT, IU-ViT and ViT. Defaults are U-ViT-S/2 on CIFAR-10 (Bao et al.).

    Args:
        dim, depth, num_heads: width; ``depth`` even, giving depth/2 in-blocks, one mid-block and depth/2
            out-blocks (U-ViT's convention: depth=12 is 13 blocks).
        skip: long-skip fusion, see :class:`Block` ("none" makes a plain ViT).
        head: "linear" or "linear_conv" (U-ViT's extra 3x3 conv; off for its latent models).
        **options: the shared token/conditioning switches of :class:`TokenBackbone`.
    """

    def __init__(self, *, image_size: int = 32, in_channels: int = 3, patch_size: int = 2, dim: int = 512,
                 depth: int = 12, num_heads: int = 8, skip: str = "concat_linear", head: str = "linear_conv",
                 **options):
        super().__init__(image_size=image_size, in_channels=in_channels, patch_size=patch_size, dim=dim, **options)
        if depth % 2:
            raise ValueError(f"depth={depth} must be even (depth/2 in-blocks + mid-block + depth/2 out-blocks)")
        self._init_trunk(encoder_depth=depth // 2, decoder_depth=depth // 2, encoder_dim=dim, decoder_dim=dim,
                         encoder_heads=num_heads, decoder_heads=num_heads, skip=skip)
        self._init_linear_head(dim, head)
        self.initialize_weights()


# IU-ViT defaults = our reconstruction (the paper's deltas are not public): U-ViT's ablation winners
# (time token, concat+linear skips, learned positions, conv head) plus two cheap, widely used fixes:
# QK-norm (bounded attention logits; ViT-22B, SD3) and a conv stem (Xiao et al. 2021).
IUVIT_DEFAULTS = dict(conditioning="token", skip="concat_linear", pos_embed="learned", head="linear_conv",
                      norm="layernorm", qk_norm=True, conv_stem=True)
VIT_DEFAULTS = dict(skip="none")


FAMILY_DEFAULTS = {"U-ViT": {}, "IU-ViT": IUVIT_DEFAULTS, "ViT": VIT_DEFAULTS}


def _preset(family: str, **config):
    def build(**overrides) -> UViT:
        model = UViT(**{**FAMILY_DEFAULTS[family], **config, **overrides})
        model.family = family  # one class, three families: the preset says which one this is
        return model
    return build


_CIFAR = dict(image_size=32, in_channels=3)
_S = dict(dim=512, depth=12, num_heads=8)
_TINY = dict(image_size=32, in_channels=3, patch_size=4, dim=96, depth=4, num_heads=4)
# U-ViT configs follow baofff/U-ViT configs/*.py. Official ImageNet-64 models have 1000 label rows (no null
# label); ours always add the null row, +1 row of D parameters. Latent models see SD-VAE latents, 4x32x32.
_LATENT = dict(image_size=32, in_channels=4)
PRESETS = {
    "U-ViT-S/2": _preset("U-ViT", **_CIFAR, patch_size=2, **_S),                              # CIFAR-10, 44.26M
    "U-ViT-S/4": _preset("U-ViT", image_size=64, in_channels=3, patch_size=4, **_S),          # CelebA 64, 44.29M
    "U-ViT-S/2-deep": _preset("U-ViT", **_LATENT, patch_size=2, dim=512, depth=16, num_heads=8,
                              context_dim=768, context_len=77),                            # MS-COCO t2i, ~58M
    "U-ViT-M/4": _preset("U-ViT", image_size=64, in_channels=3, patch_size=4, dim=768, depth=16, num_heads=12,
                         num_classes=1000),                                                # ImageNet 64, 130.9M
    "U-ViT-L/4": _preset("U-ViT", image_size=64, in_channels=3, patch_size=4, dim=1024, depth=20, num_heads=16,
                         num_classes=1000),                                                # ImageNet 64, 286.8M
    "U-ViT-L/2": _preset("U-ViT", **_LATENT, patch_size=2, dim=1024, depth=20, num_heads=16,
                         num_classes=1000),                                                # ImageNet 256 latent
    "U-ViT-H/2": _preset("U-ViT", **_LATENT, patch_size=2, dim=1152, depth=28, num_heads=16,
                         num_classes=1000, head="linear"),                                 # ImageNet 256, 500.8M
    "IU-ViT-S/2": _preset("IU-ViT", **_CIFAR, patch_size=2, **_S),
    "ViT-S/2": _preset("ViT", **_CIFAR, patch_size=2, **_S),
    "U-ViT-tiny": _preset("U-ViT", **_TINY),
    "IU-ViT-tiny": _preset("IU-ViT", **_TINY, stem_channels=16),
    "ViT-tiny": _preset("ViT", **_TINY),
}
