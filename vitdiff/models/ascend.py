"""ASCEND (ASymmetriC ENcoder Decoder; Cao et al., arXiv 2212.13771), in the two readings we support.

The paper's text is not available, so both readings are *our reconstruction* from its abstract
(a stronger encoder improves generation) and a citing paper (HDiT: very large patches at high
resolution, Swin-style windowed attention). Every unknown is a named switch; no default here is
known to be the paper's.

1. ``ASCEND`` (depth-split): a U-ViT whose encoder (in-blocks + mid-block) and decoder (out-blocks)
   have their own depth, width and heads, with a Linear bridge between widths. When depths differ,
   ``skip_wiring`` chooses which encoder blocks feed the decoder:

   * ``"last"``: the last n encoder blocks feed the first n decoder blocks, n = min(depths);
   * ``"every_k"``: n encoder blocks evenly spaced over the encoder (every k-th, k = N_enc / n, ending at
     the last), into n decoder blocks evenly spaced over the decoder (starting at the first);
   * ``"none"``: no long skips; the decoder sees only the encoder output.

   ``max_skips`` caps n, so splits of different depths can be compared at the same number of skips.

   Pairs are joined last-in-first-out, so with equal depths both "last" and "every_k" are U-ViT.

2. ``HierarchicalASCEND``: a global-attention U-ViT encoder on coarse tokens (patch 8 at 64x64, 16 at
   256x256: 64-256 tokens), then a light pixel decoder: log2(p) stages, each upsampling x2 with a 1x1
   conv + pixel shuffle and refining with ``decoder_block`` blocks, either "window" (Swin-style attention
   in w x w windows, shifted by w/2 on every other block) or "conv" (GroupNorm-SiLU-conv residual
   blocks). A shallow conv stem on the noisy input is concatenated in before the full-resolution blocks
   (the high-resolution skip). The decoder is conditioned by its own time MLP (+ the label embedding, + the
   pooled caption with ``pooled_text``): adaLN-Zero shift/scale/gate in window blocks, an added per-channel
   bias in conv blocks (DDPM's way). With ``decoder_film`` every stage also scales and shifts its upsampled
   features by that condition (FiLM, zero-initialised), so the caption reaches the pixel path even with no
   refining blocks. The caption's tokens condition the encoder only.

Both reuse :mod:`vitdiff.models.vit`'s token front end, blocks and skip fusion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..nn import Attention, Mlp, check_choice, modulate, timestep_embedding
from .vit import NORM_EPS, TokenBackbone

SKIP_WIRINGS = ("last", "every_k", "none")
DECODER_BLOCKS = ("window", "conv")


def evenly_spaced(n: int, total: int) -> list[int]:
    """n indices spread over range(total), ending at total - 1 (every k-th for k = total / n)."""
    return [(i + 1) * total // n - 1 for i in range(n)]


def skip_wiring_indices(wiring: str, encoder_depth: int, decoder_depth: int,
                        max_skips: int | None = None) -> tuple[list[int], list[int]]:
    """(encoder blocks that emit a skip, decoder blocks that take one), both in increasing order."""
    check_choice("skip_wiring", wiring, SKIP_WIRINGS)
    if max_skips is not None and max_skips < 0:
        raise ValueError(f"max_skips must be >= 0 (or None: min(encoder_depth, decoder_depth)), got {max_skips}")
    n = min(encoder_depth, decoder_depth, *(() if max_skips is None else (max_skips,)))
    if wiring == "none" or n == 0:
        return [], []
    if wiring == "last":
        return list(range(encoder_depth - n, encoder_depth)), list(range(n))
    receivers = sorted(decoder_depth - 1 - j for j in evenly_spaced(n, decoder_depth))
    return evenly_spaced(n, encoder_depth), receivers


class ASCEND(TokenBackbone):
    """Depth-split ASCEND: an asymmetric U-ViT. Defaults give ASCEND-S/2 (CIFAR-10, ~U-ViT-S/2's size).

    Args:
        encoder_depth, decoder_depth: in-blocks before the mid-block, out-blocks after it.
        encoder_dim, decoder_dim, encoder_heads, decoder_heads: width and heads of each half; the
            mid-block belongs to the encoder, then Linear(encoder_dim, decoder_dim) if they differ.
        skip: skip fusion (see :class:`vitdiff.models.vit.Block`); skip_wiring, max_skips: see the module
            docstring (max_skips None: min(encoder_depth, decoder_depth) long skips).
        head: "linear" or "linear_conv"; **options: shared switches of :class:`TokenBackbone`.
    """

    family = "ASCEND"

    def __init__(self, *, image_size: int = 32, in_channels: int = 3, patch_size: int = 2,
                 encoder_depth: int = 8, decoder_depth: int = 4, encoder_dim: int = 512, decoder_dim: int = 512,
                 encoder_heads: int = 8, decoder_heads: int = 8, skip: str = "concat_linear",
                 skip_wiring: str = "every_k", max_skips: int | None = None, head: str = "linear_conv", **options):
        super().__init__(image_size=image_size, in_channels=in_channels, patch_size=patch_size, dim=encoder_dim,
                         **options)
        sources, receivers = skip_wiring_indices(skip_wiring, encoder_depth, decoder_depth, max_skips)
        self.skip_wiring = skip_wiring
        self._init_trunk(encoder_depth=encoder_depth, decoder_depth=decoder_depth, encoder_dim=encoder_dim,
                         decoder_dim=decoder_dim, encoder_heads=encoder_heads, decoder_heads=decoder_heads,
                         skip=skip, skip_sources=sources, skip_receivers=receivers)
        self._init_linear_head(decoder_dim, head)
        self.initialize_weights()


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ConvResBlock(nn.Module):
    """GroupNorm-SiLU-3x3 conv twice, the condition added as a per-channel bias in between (DDPM)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm1 = _group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, channels))
        self.norm2 = _group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def zero_init(self) -> None:
        nn.init.zeros_(self.conv2.weight)  # each residual block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.cond_proj(c)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class WindowBlock(nn.Module):
    """Swin-style block on a (B, C, H, W) map: attention within w x w windows, MLP, adaLN-Zero modulation.

    With ``shift`` the windows move by w/2 (a cyclic roll) so information crosses window borders.
    We skip Swin's boundary mask: after the roll, windows on the image border join pixels from the
    opposite border (a torus). No relative position bias: the upsampled features already carry position.
    """

    def __init__(self, channels: int, cond_dim: int, window: int, shift: bool, head_dim: int = 32,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.window = window
        self.shift = window // 2 if shift else 0
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(channels, max(1, channels // head_dim), qkv_bias=True)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(channels, int(channels * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * channels))

    def zero_init(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def windowed_attention(self, h: torch.Tensor, height: int) -> torch.Tensor:
        """Attention of a (B, H*W, C) sequence within its windows."""
        grid = rearrange(h, "b (y x) c -> b y x c", y=height)
        if self.shift:
            grid = torch.roll(grid, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = rearrange(grid, "b (ny wy) (nx wx) c -> (b ny nx) (wy wx) c", wy=self.window, wx=self.window)
        grid = rearrange(self.attn(windows), "(b ny nx) (wy wx) c -> b (ny wy) (nx wx) c",
                         b=h.shape[0], ny=height // self.window, wy=self.window)
        if self.shift:
            grid = torch.roll(grid, shifts=(self.shift, self.shift), dims=(1, 2))
        return rearrange(grid, "b y x c -> b (y x) c")

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        h = rearrange(x, "b c y x -> b (y x) c")
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = h + gate1[:, None] * self.windowed_attention(modulate(self.norm1(h), shift1, scale1), height)
        h = h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2))
        return rearrange(h, "b (y x) c -> b c y x", y=height)


class DecoderStage(nn.Module):
    """x2 upsampling (1x1 conv to 4C, pixel shuffle) followed by refining blocks at the new resolution; with
    ``film``, the upsampled features are first scaled and shifted per channel by the condition."""

    def __init__(self, in_channels: int, channels: int, resolution: int, num_blocks: int, block: str,
                 cond_dim: int, window: int, film: bool = False):
        super().__init__()
        self.upsample = nn.Sequential(nn.Conv2d(in_channels, 4 * channels, 1), nn.PixelShuffle(2))
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels)) if film else None
        window = min(window, resolution)
        if resolution % window:
            raise ValueError(f"decoder resolution {resolution} is not divisible by window={window}: "
                             f"choose a window that divides every stage's resolution")
        if block == "window":
            self.blocks = nn.ModuleList(
                WindowBlock(channels, cond_dim, window, shift=bool(i % 2) and window < resolution)
                for i in range(num_blocks))
        else:
            self.blocks = nn.ModuleList(ConvResBlock(channels, cond_dim) for _ in range(num_blocks))

    def modulate(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """FiLM of a (B, C, H, W) map by the condition: h * (1 + scale) + shift (the identity without ``film``)."""
        if self.film is None:
            return h
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + scale) + shift


class HierarchicalASCEND(TokenBackbone):
    """Hierarchical ASCEND: coarse-token global encoder + light windowed/conv pixel decoder. See module docstring.

    Args:
        patch_size: encoder patch, a power of two (one decoder stage per factor of two).
        dim, depth, num_heads, skip: the encoder, a U-ViT trunk (depth/2 + 1 + depth/2 blocks, long skips).
        decoder_channels: channels of each decoder stage, coarse to fine (length log2(patch_size)).
        decoder_blocks: refining blocks per stage; decoder_block: "window" or "conv".
        window: attention window side (clipped to the stage's resolution).
        hires_channels: width of the conv stem whose full-resolution features join the last stage; 0: no
            high-resolution skip (the decoder sees the noisy input only through the encoder's tokens).
        decoder_film: FiLM every stage's upsampled features by the decoder's condition (time, label, pooled
            caption); off: the condition reaches the pixel path only through the refining blocks.
        **options: shared switches of :class:`TokenBackbone` (conditioning, text, positions, ...).
    """

    family = "ASCEND-H"

    def __init__(self, *, image_size: int = 64, in_channels: int = 3, patch_size: int = 8, dim: int = 512,
                 depth: int = 12, num_heads: int = 8, skip: str = "concat_linear",
                 decoder_channels: tuple[int, ...] = (256, 128, 64), decoder_blocks: int = 2,
                 decoder_block: str = "window", window: int = 8, hires_channels: int = 32,
                 decoder_film: bool = False, **options):
        super().__init__(image_size=image_size, in_channels=in_channels, patch_size=patch_size, dim=dim, **options)
        check_choice("decoder_block", decoder_block, DECODER_BLOCKS)
        stages = int(math.log2(patch_size))
        if 2 ** stages != patch_size or len(decoder_channels) != stages:
            raise ValueError(f"patch_size={patch_size} needs to be a power of two with one decoder channel count per "
                             f"x2 stage (log2(patch_size)={math.log2(patch_size):g}), got {list(decoder_channels)}")
        if depth % 2:
            raise ValueError(f"depth={depth} must be even (depth/2 in-blocks + mid-block + depth/2 out-blocks)")
        self._init_trunk(encoder_depth=depth // 2, decoder_depth=depth // 2, encoder_dim=dim, decoder_dim=dim,
                         encoder_heads=num_heads, decoder_heads=num_heads, skip=skip)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.decoder_time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        resolution = image_size // patch_size
        widths = (dim, *decoder_channels)
        self.decoder_stages = nn.ModuleList()
        for i in range(stages):
            resolution *= 2
            self.decoder_stages.append(DecoderStage(widths[i], widths[i + 1], resolution, decoder_blocks,
                                                    decoder_block, dim, window, decoder_film))
        if hires_channels < 0:
            raise ValueError(f"hires_channels must be >= 0 (0: no high-resolution skip), got {hires_channels}")
        self.hires_channels = hires_channels
        if hires_channels:
            self.hires_stem = nn.Sequential(nn.Conv2d(in_channels, hires_channels, 3, padding=1), nn.SiLU(),
                                            nn.Conv2d(hires_channels, hires_channels, 3, padding=1))
            self.hires_fuse = nn.Conv2d(decoder_channels[-1] + hires_channels, decoder_channels[-1], 1)
        self.out = nn.Sequential(_group_norm(decoder_channels[-1]), nn.SiLU(),
                                 nn.Conv2d(decoder_channels[-1], self.out_channels, 3, padding=1))
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        super().initialize_weights()
        for stage in self.decoder_stages:
            for block in stage.blocks:
                block.zero_init()
            if stage.film is not None:  # starts as the identity
                nn.init.zeros_(stage.film[-1].weight)
                nn.init.zeros_(stage.film[-1].bias)

    def decoder_condition(self, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Time (+ label, + pooled caption with ``pooled_text``) for the decoder's conv/window blocks."""
        c = self.decoder_time_embed(timestep_embedding(t, self.embed_dim).to(self.norm.weight.dtype))
        if self.num_classes:
            c = c + self.label_emb(cond)
        if self.pooled_text:
            c = c + self.pooled_text_embed(cond.mean(dim=1))
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, t, cond)
        tokens, c, context = self.embed(x, t, cond)
        tokens = self.norm(self.forward_blocks(tokens, c, context)[:, self.num_extra_tokens:])
        h = rearrange(tokens, "b (y x) d -> b d y x", y=self.image_size // self.patch_size)
        c_dec = self.decoder_condition(t, cond)
        last = len(self.decoder_stages) - 1
        for i, stage in enumerate(self.decoder_stages):
            h = stage.upsample(h)
            if i == last and self.hires_channels:
                h = self.hires_fuse(torch.cat([h, self.hires_stem(x)], dim=1))
            h = stage.modulate(h, c_dec)
            for block in stage.blocks:
                h = self.run_block(block, h, c_dec)
        return self.out(h)


def _depth_split(**config):
    return lambda **overrides: ASCEND(**{**config, **overrides})


def _hierarchical(**config):
    return lambda **overrides: HierarchicalASCEND(**{**config, **overrides})


PRESETS = {
    # 8 + 1 encoder blocks, 4 decoder blocks at U-ViT-S width: 13 blocks like U-ViT-S/2, 4 skips instead of 6.
    "ASCEND-S/2": _depth_split(image_size=32, in_channels=3, patch_size=2),
    "ASCEND-H-S/8": _hierarchical(image_size=64, in_channels=3, patch_size=8),
    "ASCEND-H-S/16-256": _hierarchical(image_size=256, in_channels=3, patch_size=16, dim=384, num_heads=6,
                                       decoder_channels=(256, 128, 64, 32), decoder_blocks=1),
    "ASCEND-tiny": _depth_split(image_size=32, in_channels=3, patch_size=4, encoder_depth=4, decoder_depth=2,
                                encoder_dim=96, decoder_dim=64, encoder_heads=4, decoder_heads=4),
    "ASCEND-H-tiny": _hierarchical(image_size=32, in_channels=3, patch_size=8, dim=96, depth=4, num_heads=4,
                                   decoder_channels=(64, 32, 16), decoder_blocks=2, window=4, hires_channels=16),
}
