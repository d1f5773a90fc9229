"""A small Vision Transformer for 28-64 px images.

Non-overlapping ``patch_size`` patches, a class token, a learnable position embedding sized from
``image_size``, pre-norm blocks with multi-head self-attention (via
:func:`torch.nn.functional.scaled_dot_product_attention`) and a GELU MLP; the features are the final
LayerNorm of the class token, so ``feature_dim = dim``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssdd.errors import ConfigError, ShapeError
from ssdd.models.base import Backbone, init_norm, positive_float, positive_int, register_model

INIT_STD = 0.02


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(Backbone):
    """Vision Transformer whose input size is fixed at construction (the position embedding depends on it)."""

    def __init__(
        self,
        name: str,
        num_outputs: int,
        in_channels: int,
        image_size: int,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        patch_size: int = 4,
        mlp_ratio: float = 2.0,
    ):
        super().__init__(name, in_channels, image_size)
        dim = positive_int(name, "dim", dim)
        depth = positive_int(name, "depth", depth)
        heads = positive_int(name, "heads", heads)
        patch_size = positive_int(name, "patch_size", patch_size)
        mlp_ratio = positive_float(name, "mlp_ratio", mlp_ratio)
        if dim % heads:
            raise ConfigError(f"model {name}: dim={dim} must be divisible by heads={heads}")
        if image_size % patch_size:
            raise ShapeError(
                f"model {name}: image_size={image_size} is not divisible by patch_size={patch_size}; "
                f"use an image size that is a multiple of {patch_size} or another patch_size"
            )
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, max(1, round(dim * mlp_ratio))) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.patch_size = patch_size
        self._init_weights()
        self.feature_dim = dim
        self.reset_head(num_outputs)

    def _init_weights(self) -> None:
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                init_norm(module)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens)[:, 0])


@register_model("vit-tiny")
def vit_tiny(
    name: str,
    num_outputs: int,
    in_channels: int,
    image_size: int,
    *,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    patch_size: int = 4,
    mlp_ratio: float = 2.0,
) -> ViT:
    """Tiny ViT for 28-64 px images: 4 px patches, dim 192, 6 blocks of 3 heads, MLP ratio 2;
    ``image_size % patch_size == 0``."""
    return ViT(name, num_outputs, in_channels, image_size, dim, depth, heads, patch_size, mlp_ratio)
