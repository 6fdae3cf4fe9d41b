"""Building blocks shared by every backbone family.

Kept small on purpose: each model file (``models/*.py``) composes these into
its own named blocks, so that a reader sees the architecture in one place.
Parameter names (``qkv``, ``proj``, ``fc1``, ``fc2``) follow timm, which is the
layout the published U-ViT and DiT checkpoints use; that keeps converters thin.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def check_choice(name: str, value, choices) -> None:
    """A named option must be one of its choices; the error lists them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) float tensor, ``[cos | sin]`` halves (U-ViT and DiT order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, dim): half the channels per axis.

    Tokens are in row-major order; the first half of the channels encodes the column (x) index,
    the second the row, exactly as MAE's and DiT's released tables."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(gx), axis(gy)], dim=1).float()


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), channel-last inside a patch (U-ViT/DiT order)."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    side = int(math.isqrt(tokens.shape[1]))
    return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=side, p1=patch_size, p2=patch_size, c=channels)


def make_norm(kind: str, dim: int, affine: bool = True, eps: float = 1e-6) -> nn.Module:
    """``layernorm`` or ``rmsnorm``; ``affine=False`` for adaLN blocks, whose modulation supplies scale and shift."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"unknown norm {kind!r}: use 'layernorm' or 'rmsnorm'")


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_norm: bool = False, norm: str = "layernorm"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        head_dim = dim // num_heads
        # QK-norm keeps attention logits bounded at large width / lr (ViT-22B, SD3).
        self.q_norm = make_norm(norm, head_dim) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from a context sequence (text embeddings)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    """Two-layer GELU MLP; ``approximate='tanh'`` is DiT's choice, ``'none'`` U-ViT's."""

    def __init__(self, dim: int, hidden_dim: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of a (B, N, D) sequence by per-example (B, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]
