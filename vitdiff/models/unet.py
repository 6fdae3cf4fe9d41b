"""The DDPM U-Net (Ho et al., 2020), the convolutional baseline.

As in the released CIFAR-10 model (diffusion/models/unet.py of hojonathanho/diffusion):

* time: sinusoid of width ``channels`` -> Linear(ch, 4ch) -> Swish -> Linear(4ch, 4ch);
  an optional class embedding (``num_classes`` + 1 null row) is added to it;
* 3x3 input conv, then per resolution level ``num_res_blocks`` residual blocks
  (GroupNorm-Swish-conv, time projection added, GroupNorm-Swish-dropout-conv,
  1x1 shortcut when the width changes), self-attention after each block at the
  resolutions in ``attention_resolutions``, and a stride-2 3x3 conv between levels;
* middle: res block, attention, res block;
* decoder: ``num_res_blocks + 1`` res blocks per level, each fed the concatenation
  with one stored encoder activation (last in, first out), nearest-neighbour x2 +
  3x3 conv between levels; GroupNorm-Swish-3x3 conv out.

Weights: Xavier-uniform (TF's ``variance_scaling(1, fan_avg, uniform)``), zero biases,
and zero for the last conv of each residual branch, the attention output and the
output conv, so every residual branch starts switched off.

Two documented deviations, neither changes the parameter count: the time sinusoid is
:func:`vitdiff.nn.timestep_embedding` (``[cos | sin]``, frequencies over ``half``;
DDPM used ``[sin | cos]`` over ``half - 1``), and the attention's q, k, v 1x1 convs
are one fused Linear over the tokens (:class:`vitdiff.nn.Attention`, one head).
The downsampling conv pads right/bottom only, as TF's ``SAME`` padding does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Attention, timestep_embedding
from .base import DiffusionBackbone


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, residual."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.attn = Attention(channels, num_heads=1, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" for stride 2: pad after only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, each optionally followed by attention, then resampling."""

    def __init__(self, res_blocks: list[ResBlock], attention: bool, resample: nn.Module | None, num_groups: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.attn_blocks = nn.ModuleList(
            AttnBlock(block.conv2.out_channels, num_groups) if attention else nn.Identity() for block in res_blocks)
        self.resample = resample


class UNet(DiffusionBackbone):
    family = "U-Net"

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        channels: int = 128,                              # base width; the time MLP is 4x this
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),     # width multiplier per resolution level
        num_res_blocks: int = 2,                          # per encoder level (decoder: one more)
        attention_resolutions: tuple[int, ...] = (16,),   # feature-map sides that get self-attention
        dropout: float = 0.1,
        num_groups: int = 32,                             # GroupNorm groups
        num_classes: int = 0,                             # > 0: label embedding added to the time embedding
        learn_sigma: bool = False,
        context_dim: int = 0,
    ):
        if context_dim:
            raise ValueError("the U-Net takes class labels only; for text conditioning use a transformer "
                             "preset (U-ViT, IU-ViT, DiT) with context_dim=...")
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image size {image_size} cannot be halved {len(channel_mult) - 1} times: "
                             "use fewer channel_mult levels or a multiple of "
                             f"{2 ** (len(channel_mult) - 1)}")
        super().__init__(image_size=image_size, in_channels=in_channels, learn_sigma=learn_sigma,
                         num_classes=num_classes, patch_size=1)
        self.channels = channels
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, num_groups)

        skip_channels, width, resolution = [channels], channels, image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(res(width, channels * mult))
                width = channels * mult
                skip_channels.append(width)
            last = level == len(channel_mult) - 1
            self.down.append(Level(blocks, resolution in attention_resolutions,
                                   None if last else Downsample(width), num_groups))
            if not last:
                skip_channels.append(width)
                resolution //= 2

        self.mid_block1 = res(width, width)
        self.mid_attn = AttnBlock(width, num_groups)
        self.mid_block2 = res(width, width)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(width + skip_channels.pop(), channels * mult))
                width = channels * mult
            self.up.append(Level(blocks, resolution in attention_resolutions,
                                 Upsample(width) if level else None, num_groups))
            resolution *= 2

        self.norm_out = nn.GroupNorm(num_groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, self.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.label_embedding is not None:
            nn.init.normal_(self.label_embedding.weight, std=0.02)
        # Residual branches and the output start at zero (DDPM's init_scale=1e-10).
        zeroed = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zeroed += [m.attn.proj for m in self.modules() if isinstance(m, AttnBlock)]
        for module in zeroed:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, t, cond)
        emb = self.time_mlp(timestep_embedding(t, self.channels).to(self.conv_in.weight.dtype))
        if self.label_embedding is not None:
            emb = emb + self.label_embedding(cond)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for res_block, attn_block in zip(level.res_blocks, level.attn_blocks):
                h = self.run_block(attn_block, self.run_block(res_block, h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.run_block(self.mid_block1, h, emb)
        h = self.run_block(self.mid_attn, h)
        h = self.run_block(self.mid_block2, h, emb)

        for level in self.up:
            for res_block, attn_block in zip(level.res_blocks, level.attn_blocks):
                h = self.run_block(attn_block, self.run_block(res_block, torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _preset(**config):
    def build(**overrides) -> UNet:
        return UNet(**{**config, **overrides})
    return build


PRESETS = {
    # Ho et al.'s CIFAR-10 model (35.7M parameters).
    "DDPM-UNet": _preset(image_size=32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2),
                         num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
    # A CPU-sized model for tests and notebooks.
    "UNet-tiny": _preset(image_size=32, in_channels=3, channels=32, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(16,), dropout=0.1),
}

__all__ = ["UNet", "PRESETS"]
