"""UNet++ (Zhou et al. 2018): the encoder and decoder joined by nested, dense skip pathways."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import SegmentationModel
from .blocks import (
    _CONV_TRANSPOSE,
    _UPSAMPLE_MODE,
    DoubleConv,
    Down,
    OutConv,
    _pad_to,
    init_weights,
)


def _key(level: int, column: int) -> str:
    return f"{level}_{column}"


class UNetPlusPlus(SegmentationModel):
    """UNet++: node ``X[i][j]`` (level ``i``, ``j``-th node of that level's skip pathway) convolves
    the concatenation of every earlier node of its level, ``X[i][0..j-1]``, with the upsampled
    ``X[i+1][j-1]``. ``X[i][0]`` is the plain encoder; ``X[0][depth]`` feeds the output.

    ``deep_supervision``: one 1x1 head on each top node ``X[0][1..depth]`` and the logits are their
    mean (the paper's "accurate mode"), so the shallow sub-networks get gradient directly.
    Upsampling is bilinear/trilinear (channels kept) or, with ``bilinear=False``, a transposed
    convolution halving the channels. Any input size: padded to ``2**depth`` and cropped back.
    """

    def __init__(
        self, *, name: str, spatial_dims: int, in_channels: int = 1, out_channels: int = 1,
        width: int = 32, depth: int = 4, norm: str = "batch", dropout: float = 0.0,
        bilinear: bool = True, deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        self._record(name=name, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     width=width, depth=depth, norm=norm, dropout=dropout, bilinear=bilinear,
                     deep_supervision=bool(deep_supervision))
        self.deep_supervision = deep_supervision

        layer = {"spatial_dims": spatial_dims, "norm": norm}
        channels = [width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, width, **layer)]
            + [Down(channels[level - 1], channels[level], **layer) for level in range(1, depth + 1)]
        )
        self.bottleneck_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.upsample = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for column in range(1, depth + 1):
            for level in range(depth - column + 1):
                coarser = channels[level + 1]
                if bilinear:
                    up: nn.Module = nn.Upsample(
                        scale_factor=2, mode=_UPSAMPLE_MODE[spatial_dims], align_corners=True
                    )
                    up_channels = coarser
                else:
                    up_channels = coarser // 2
                    up = _CONV_TRANSPOSE[spatial_dims](coarser, up_channels, kernel_size=2, stride=2)
                self.upsample[_key(level, column)] = up
                self.nodes[_key(level, column)] = DoubleConv(
                    column * channels[level] + up_channels, channels[level], **layer
                )
        heads = depth if deep_supervision else 1
        self.heads = nn.ModuleList(
            OutConv(width, out_channels, spatial_dims=spatial_dims) for _ in range(heads)
        )
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        spatial_shape = x.shape[2:]
        x, padding = self._pad_to_multiple(x)

        # grid[level] lists that level's nodes X[level][0], X[level][1], ...
        grid: list[list[torch.Tensor]] = [[self.encoder[0](x)]]
        for level in range(1, self.depth + 1):
            grid.append([self.encoder[level](grid[level - 1][0])])
        grid[self.depth][0] = self.bottleneck_dropout(grid[self.depth][0])
        for column in range(1, self.depth + 1):
            for level in range(self.depth - column + 1):
                key = _key(level, column)
                up = _pad_to(self.upsample[key](grid[level + 1][column - 1]), grid[level][0].shape[2:])
                grid[level].append(self.nodes[key](torch.cat([*grid[level], up], dim=1)))

        top = grid[0][1:] if self.deep_supervision else grid[0][-1:]
        logits = torch.stack([head(node) for head, node in zip(self.heads, top)]).mean(dim=0)
        return self._crop(logits, padding, spatial_shape)
