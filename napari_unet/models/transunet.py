"""TransUNet-style model (Chen et al. 2021): a UNet whose bottleneck is a small transformer.

TransUNet embeds the CNN encoder's deepest feature map as tokens (one per position, patch size 1
there), adds positions, runs transformer layers and reshapes the tokens back into a map that the
cascaded upsampling decoder takes with the CNN skips. Here the encoder and decoder are our
``unet``'s (DoubleConv blocks, plain PyTorch), the positions are sinusoidal (computed for the
grid each input produces, so any input size works, unlike a learned table), and the transformer's
output is added to the CNN features rather than replacing them: at initialisation the model is
close to the plain UNet, which trains faster from few annotated slices.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import DoubleConv, init_weights
from .unet import UNet


@torch.jit.script_if_tracing  # a traced export then computes the codes for each input's grid
def sinusoidal_positions(features: torch.Tensor) -> torch.Tensor:
    """(positions, channels) codes for the grid of ``features`` (N, C, *grid), in row-major order.

    Each spatial axis gets its share of sin/cos frequencies; channels that do not divide evenly
    among the axes' sin/cos pairs are left zero. A position's code does not depend on the grid's
    size, so tiles of a big image agree.
    """
    channels = features.shape[1]
    grid = features.shape[2:]
    axes = len(grid)
    per_axis = channels // (2 * axes)
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(per_axis, device=features.device, dtype=torch.float32) / max(per_axis, 1)
    )
    parts: list[torch.Tensor] = []
    for axis in range(axes):
        # each position's coordinate along this axis, in row-major order (no modulo: ONNX-friendly)
        view_shape = [1] * axes
        view_shape[axis] = grid[axis]
        coordinate = torch.arange(grid[axis], device=features.device, dtype=torch.float32)
        coordinate = coordinate.reshape(view_shape).expand(grid).reshape(-1)
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    codes = torch.cat(parts, dim=1)
    unused = channels - 2 * axes * per_axis
    codes = torch.nn.functional.pad(codes, [0, unused])
    return codes.to(features.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over (N, L, C) tokens (``scaled_dot_product_attention`` picks a
    memory-efficient kernel, so thousands of tokens of a big tile fit)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, length, channels = tokens.shape
        qkv = self.qkv(tokens).reshape(n, length, 3, self.heads, channels // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, C/heads)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(n, length, channels))


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer: attention then an MLP, each with a residual."""

    def __init__(self, channels: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attention = SelfAttention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, mlp_ratio * channels), nn.GELU(), nn.Linear(mlp_ratio * channels, channels)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class TransformerBottleneck(nn.Module):
    """(N, C, *grid) -> same shape: every position a token, sinusoidal positions, ``layers``
    transformer layers, back to a map added to the input."""

    def __init__(self, channels: int, *, layers: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(channels, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = features.flatten(2).transpose(1, 2)
        tokens = tokens + sinusoidal_positions(features)
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = self.norm(tokens)
        return features + tokens.transpose(1, 2).reshape(features.shape)


class TransUNet(UNet):
    """``unet`` with a ``TransformerBottleneck`` on its deepest features.

    ``transformer_layers`` (default 2) and ``heads`` (default 4; the largest count dividing the
    bottleneck channels is used, so any width works) set the transformer's size.
    """

    def __init__(self, *, transformer_layers: int = 2, heads: int = 4, **unet_options) -> None:
        super().__init__(block=DoubleConv, **unet_options)
        self.config["transformer_layers"] = transformer_layers
        self.config["heads"] = heads
        bottleneck_channels = self.downs[-1].maxpool_conv[1].double_conv[3].out_channels
        self.bottleneck = TransformerBottleneck(
            bottleneck_channels, layers=transformer_layers, heads=math.gcd(heads, bottleneck_channels)
        )
        self.bottleneck.apply(_init_transformer)


def _init_transformer(module: nn.Module) -> None:
    """ViT's initialisation: small truncated-normal linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif not isinstance(module, nn.LayerNorm):
        init_weights(module)
