"""Building blocks of the UNet family, one code path for 2D and 3D.

Every block takes ``spatial_dims`` (2 or 3) and ``norm`` and picks its layers from the small
tables below, so a 3D network is the 2D one with Conv3d / MaxPool3d / BatchNorm3d swapped in.
The structure follows milesial/Pytorch-UNet (``unet_parts.py``) so that parameter counts match it.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("batch", "instance", "group", "none")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_UPSAMPLE_MODE = {2: "bilinear", 3: "trilinear"}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_MAX_GROUPS = 8


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    """Same-size convolution (padding keeps the spatial shape for odd kernels)."""
    _check_dims(spatial_dims)
    return _CONV[spatial_dims](in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def norm_layer(spatial_dims: int, norm: str, channels: int) -> nn.Module:
    """Normalisation layer for ``channels`` feature maps; ``norm`` is one of ``NORMS``."""
    _check_dims(spatial_dims)
    if norm == "batch":
        return _BATCH_NORM[spatial_dims](channels)
    if norm == "instance":
        # affine so that instance norm can learn a scale/shift like the other norms
        return _INSTANCE_NORM[spatial_dims](channels, affine=True)
    if norm == "group":
        # the largest group count <= 8 that divides the channels (1 group = layer norm)
        return nn.GroupNorm(math.gcd(_MAX_GROUPS, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")


def max_pool(spatial_dims: int) -> nn.Module:
    """Halve every spatial side."""
    _check_dims(spatial_dims)
    return _MAX_POOL[spatial_dims](2)


class ConvBlock(Protocol):
    """What Down/Up need from a feature block: ``block(in, out, mid, spatial_dims=, norm=)``."""

    def __call__(
        self, in_channels: int, out_channels: int, mid_channels: int | None = None, *,
        spatial_dims: int = 2, norm: str = "batch",
    ) -> nn.Module: ...


class DoubleConv(nn.Module):
    """(conv 3 => norm => ReLU) * 2."""

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int | None = None, *,
        spatial_dims: int = 2, norm: str = "batch",
    ) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            conv(spatial_dims, in_channels, mid_channels),
            norm_layer(spatial_dims, norm, mid_channels),
            nn.ReLU(inplace=True),
            conv(spatial_dims, mid_channels, out_channels),
            norm_layer(spatial_dims, norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class ResidualBlock(nn.Module):
    """conv 3 => norm => ReLU => conv 3 => norm, plus a shortcut, then ReLU (He et al. 2016).

    The shortcut is the identity when the channel count is unchanged, else a 1x1 conv + norm.
    """

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int | None = None, *,
        spatial_dims: int = 2, norm: str = "batch",
    ) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.residual = nn.Sequential(
            conv(spatial_dims, in_channels, mid_channels),
            norm_layer(spatial_dims, norm, mid_channels),
            nn.ReLU(inplace=True),
            conv(spatial_dims, mid_channels, out_channels),
            norm_layer(spatial_dims, norm, out_channels),
        )
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                conv(spatial_dims, in_channels, out_channels, kernel_size=1),
                norm_layer(spatial_dims, norm, out_channels),
            )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


class Down(nn.Module):
    """Downscaling with max-pool 2 then a feature block (DoubleConv by default)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, spatial_dims: int = 2, norm: str = "batch",
        block: ConvBlock = DoubleConv,
    ) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            max_pool(spatial_dims),
            block(in_channels, out_channels, spatial_dims=spatial_dims, norm=norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al. 2018).

    ``psi = sigmoid(norm(conv1x1(relu(norm(W_g g) + norm(W_x x)))))`` and the output is ``x * psi``:
    the gating signal ``g`` (coarser, decoder features) decides which skip features ``x`` pass.
    ``g`` and ``x`` must have the same spatial shape (the Up block gates after upsampling).
    """

    def __init__(
        self, gate_channels: int, skip_channels: int, inter_channels: int, *,
        spatial_dims: int = 2, norm: str = "batch",
    ) -> None:
        super().__init__()
        self.W_g = nn.Sequential(
            conv(spatial_dims, gate_channels, inter_channels, kernel_size=1),
            norm_layer(spatial_dims, norm, inter_channels),
        )
        self.W_x = nn.Sequential(
            conv(spatial_dims, skip_channels, inter_channels, kernel_size=1),
            norm_layer(spatial_dims, norm, inter_channels),
        )
        self.psi = nn.Sequential(
            conv(spatial_dims, inter_channels, 1, kernel_size=1),
            norm_layer(spatial_dims, norm, 1),
            nn.Sigmoid(),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attention = self.psi(self.relu(self.W_g(g) + self.W_x(x)))
        return x * attention


class Up(nn.Module):
    """Upscaling, (optionally gated) concatenation with the skip, then a feature block.

    As in milesial's UNet: with bilinear/trilinear upsampling the channel count is not reduced by
    the upsampling, so the block's first conv halves it (mid = in // 2); with a transposed conv the
    upsampling itself halves it. ``in_channels`` is the channel count after concatenation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, bilinear: bool = True, *, spatial_dims: int = 2,
        norm: str = "batch", block: ConvBlock = DoubleConv, attention: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        if bilinear:
            self.up: nn.Module = nn.Upsample(
                scale_factor=2, mode=_UPSAMPLE_MODE[spatial_dims], align_corners=True
            )
            self.conv = block(
                in_channels, out_channels, in_channels // 2, spatial_dims=spatial_dims, norm=norm
            )
        else:
            self.up = _CONV_TRANSPOSE[spatial_dims](
                in_channels, in_channels // 2, kernel_size=2, stride=2
            )
            self.conv = block(in_channels, out_channels, spatial_dims=spatial_dims, norm=norm)
        # both the upsampled features and the skip carry in_channels // 2 channels
        half = in_channels // 2
        self.attention: nn.Module | None = (
            AttentionGate(half, half, max(1, half // 2), spatial_dims=spatial_dims, norm=norm)
            if attention else None
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``x1``: coarser decoder features; ``x2``: the encoder skip at twice the resolution."""
        x1 = self.up(x1)
        x1 = _pad_to(x1, x2.shape[2:])
        if self.attention is not None:
            x2 = self.attention(x1, x2)
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to the output channels (logits)."""

    def __init__(self, in_channels: int, out_channels: int, *, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv = conv(spatial_dims, in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _pad_to(x: torch.Tensor, spatial_shape: torch.Size) -> torch.Tensor:
    """Zero-pad ``x`` centrally to ``spatial_shape`` (only when an odd side was pooled)."""
    differences = [int(target) - int(have) for target, have in zip(spatial_shape, x.shape[2:])]
    if not any(differences):
        return x
    padding: list[int] = []
    for difference in reversed(differences):  # F.pad lists the last axis first
        padding += [difference // 2, difference - difference // 2]
    return F.pad(x, padding)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions (they feed ReLUs), zero biases, unit norms; use ``model.apply``."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
                             nn.InstanceNorm2d, nn.InstanceNorm3d)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
