"""The generic UNet encoder-decoder that every registered variant is built from."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBlock, DoubleConv, Down, OutConv, Up, init_weights

_AXES = {2: "(N, C, Y, X)", 3: "(N, C, Z, Y, X)"}


class UNet(nn.Module):
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
        self.name = name
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.width = width
        self.depth = depth
        self.config: dict[str, str | int | float | bool] = {
            "name": name, "in_channels": in_channels, "out_channels": out_channels,
            "width": width, "depth": depth, "norm": norm, "dropout": float(dropout),
            "bilinear": bool(bilinear),
        }

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
        features = self.bottleneck_dropout(skips.pop())
        for up in self.ups:
            features = up(features, skips.pop())
        logits = self.outc(features)
        return self._crop(logits, padding, spatial_shape)

    def _check_input(self, x: torch.Tensor) -> None:
        expected_ndim = self.spatial_dims + 2
        if x.dim() != expected_ndim:
            raise ValueError(
                f"model {self.name!r} is {self.spatial_dims}D and expects "
                f"{_AXES[self.spatial_dims]}; got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            plural = "" if self.in_channels == 1 else "s"
            raise ValueError(
                f"model {self.name!r} expects {self.in_channels} input channel{plural}, "
                f"got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        multiple = 2**self.depth
        if min(x.shape[2:]) < multiple:
            raise ValueError(
                f"model {self.name!r} has depth {self.depth}, so every spatial side must be at "
                f"least 2**{self.depth} = {multiple}; got spatial shape {tuple(x.shape[2:])}. "
                f"Use a smaller depth or a bigger tile."
            )

    def _pad_to_multiple(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Pad every spatial side up to a multiple of ``2**depth``, split evenly before/after.

        Reflect padding mirrors real image content instead of inventing a flat border, and it is
        always allowed here: each pad is < 2**depth <= the side (checked in ``_check_input``).
        """
        multiple = 2**self.depth
        padding: list[int] = []
        for side in reversed(x.shape[2:]):  # F.pad lists the last axis first
            total = (multiple - side % multiple) % multiple
            padding += [total // 2, total - total // 2]
        if any(padding):
            x = F.pad(x, padding, mode="reflect")
        return x, padding

    @staticmethod
    def _crop(x: torch.Tensor, padding: list[int], spatial_shape: torch.Size) -> torch.Tensor:
        """Undo ``_pad_to_multiple`` (a contiguous copy, so callers may ``.view`` the logits)."""
        if not any(padding):
            return x
        befores = padding[0::2][::-1]  # back to axis order
        for axis, (before, size) in enumerate(zip(befores, spatial_shape), start=2):
            x = x.narrow(axis, before, size)
        return x.contiguous()

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items())
