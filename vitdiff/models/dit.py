"""DiT: a plain ViT conditioned by adaLN-Zero (Peebles & Xie, ICCV 2023).

Architecture as in facebookresearch/DiT ``models.py``:

* condition vector ``c`` = timestep MLP (256-d sinusoid -> Linear -> SiLU -> Linear)
  + label embedding (``num_classes`` + 1 null row for classifier-free guidance);
* patch tokens (Conv2d patch embed) + a *fixed* 2-D sin-cos position embedding;
* blocks: LayerNorm without affine (eps 1e-6) modulated by shift/scale, gated
  residuals; the six vectors come from ``SiLU -> Linear(D, 6D)`` of ``c``;
* final layer: adaLN (shift/scale) + Linear to ``p*p*out_channels``.

adaLN-Zero means the modulation linears and the output linear start at zero, so
every block starts as the identity and the model first predicts zero.

Module names match the official checkpoints (``x_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.N.attn.qkv`` ...),
so :func:`vitdiff.models.convert.convert_dit_state_dict` only drops the fixed
position embedding after checking it.

Text conditioning (not in DiT; vitdiff's extension): with ``context_dim > 0`` the
(B, L, context_dim) context is mean-pooled and projected into ``c`` (adaLN pooling),
and the unconditional context is a learned null token.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import Attention, Mlp, modulate, sincos_pos_embed_2d, timestep_embedding, unpatchify
from .base import DiffusionBackbone


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens, (B, C, H, W) -> (B, N, D)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens: residual adds keep their first operand's strides, so a transposed view
        # here would make every LayerNorm and Linear downstream copy its input.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoid of the noise-conditioning value, then a SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the learned null label for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class ContextEmbedder(nn.Module):
    """Text tokens (B, L, context_dim) -> one vector: mean pool, then Linear (adaLN pooling)."""

    def __init__(self, context_dim: int, dim: int):
        super().__init__()
        self.null_token = nn.Parameter(torch.zeros(context_dim))
        self.proj = nn.Linear(context_dim, dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.proj(context.mean(dim=1))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero: shift/scale before attention and MLP, gates after."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (no gate) then a Linear to the pixels of each patch."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(DiffusionBackbone):
    """Diffusion transformer with adaLN-Zero conditioning; defaults are DiT-XL/2's."""

    family = "DiT"

    def __init__(
        self,
        image_size: int = 32,        # input side (latent side for latent models: 256px / 8)
        in_channels: int = 4,        # 4 for SD-VAE latents, 3 for pixels
        patch_size: int = 2,
        dim: int = 1152,             # token width ("hidden_size")
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,        # > 0: class-conditional, with one extra null label
        context_dim: int = 0,        # > 0: text-conditional through pooled context
        learn_sigma: bool = False,   # True doubles the output channels (iDDPM's learned variance)
    ):
        super().__init__(image_size=image_size, in_channels=in_channels, learn_sigma=learn_sigma,
                         num_classes=num_classes, context_dim=context_dim, patch_size=patch_size)
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        self.x_embedder = PatchEmbed(in_channels, dim, patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim) if num_classes else None
        self.context_embedder = ContextEmbedder(context_dim, dim) if context_dim else None
        # Fixed, recomputed from the config: a buffer kept out of the state dict and the optimiser.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, image_size // patch_size)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        # The patch embedding is a linear map of each flattened patch: initialise it like one.
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.context_embedder is not None:
            nn.init.normal_(self.context_embedder.null_token, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for modulation in [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def null_context(self, like: torch.Tensor) -> torch.Tensor:
        if self.context_embedder is None:
            return super().null_context(like)
        return self.context_embedder.null_token.to(like.dtype).expand_as(like)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, t, cond)
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(cond)
        elif self.context_embedder is not None:
            c = c + self.context_embedder(cond)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, c)
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.out_channels)


# DiT's released configs: width, depth, heads; all for 256px ImageNet latents (4x32x32), 1000 classes.
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_LATENT_256 = dict(image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)


def _preset(**config):
    def build(**overrides) -> DiT:
        return DiT(**{**config, **overrides})
    return build


PRESETS = {
    f"DiT-{size}/{patch}": _preset(dim=dim, depth=depth, num_heads=heads, patch_size=patch, **_LATENT_256)
    for size, (dim, depth, heads) in _SIZES.items() for patch in (2, 4, 8)
}
# A CPU-sized pixel-space model for tests and notebooks.
PRESETS["DiT-tiny"] = _preset(image_size=32, in_channels=3, patch_size=4, dim=64, depth=2, num_heads=2)

__all__ = ["DiT", "DiTBlock", "PRESETS"]
