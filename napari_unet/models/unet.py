"""The generic UNet encoder-decoder that every registered variant is built from."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import SegmentationModel
from .blocks import ConvBlock, DoubleConv, Down, OutConv, Up, init_weights


class UNet(SegmentationModel):
    """UNet with ``depth`` poolings and ``width`` features at full resolution (doubled per level).

    The variant picks the feature ``block`` (DoubleConv, ResidualBlock) and whether skips are
    attention-gated. The layout mirrors milesial/Pytorch-UNet (``inc``, ``downs``, ``ups``,
    ``outc``; ``factor = 2 if bilinear``), so ``width=64, depth=4`` reproduces its parameter count.

    Inputs of any spatial size are reflect-padded to a multiple of ``2**depth`` and the logits are
    cropped back, so ``forward`` maps (N, C_in, *spatial) to (N, C_out, *spatial).
    """

    def __init__(
        self, *, name: str, spatial_dims: int, in_channels: int = 1, out_channels: int = 1,
        width: int = 32, depth: int = 4, norm: str = "batch", dropout: float = 0.0,
        bilinear: bool = True, block: ConvBlock = DoubleConv, attention: bool = False,
    ) -> None:
        super().__init__()
        self._record(name=name, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     width=width, depth=depth, norm=norm, dropout=dropout, bilinear=bilinear)

        layer = {"spatial_dims": spatial_dims, "norm": norm}
        channels = [width * 2**level for level in range(depth + 1)]
        # with interpolation the upsampling keeps the channels, so the bottleneck is halved instead
        factor = 2 if bilinear else 1

        self.inc = block(in_channels, width, **layer)
        self.downs = nn.ModuleList(
            Down(channels[level - 1], channels[level] // (factor if level == depth else 1),
                 block=block, **layer)
            for level in range(1, depth + 1)
        )
        # what a variant does to the deepest features (TransUNet: a transformer); no weights here
        self.bottleneck: nn.Module = nn.Identity()
        self.bottleneck_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(
            Up(channels[level], channels[level - 1] // (factor if level > 1 else 1), bilinear,
               block=block, attention=attention, **layer)
            for level in range(depth, 0, -1)
        )
        self.outc = OutConv(width, out_channels, spatial_dims=spatial_dims)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        spatial_shape = x.shape[2:]
        x, padding = self._pad_to_multiple(x)

        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        features = self.bottleneck_dropout(self.bottleneck(skips.pop()))
        for up in self.ups:
            features = up(features, skips.pop())
        logits = self.outc(features)
        return self._crop(logits, padding, spatial_shape)
