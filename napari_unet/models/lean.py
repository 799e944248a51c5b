"""A prediction-only copy of a UNet that needs less memory: same outputs, fewer big tensors alive.

Two rewrites, both exact up to float rounding:

* batch norm after a convolution is folded into the convolution's weights (eval mode: the norm is
  an affine map), so no separate normalised copy of each feature map is made;
* the decoder's ``conv(cat([skip, up]))`` becomes ``conv_skip(skip) + conv_up(up)`` (the kernel split
  along its input channels), so the concatenated map, the biggest tensor of a UNet, is never built.

At full resolution in 3D these are the largest maps of the network (one 16-channel 128^3 map is
134 MB), so a sliding-window prediction peaks several of them lower. Training never uses the copy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .blocks import DoubleConv, Up, _pad_to

__all__ = ["lean_inference_copy"]

_CONVS = (nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def lean_inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with batch norms folded and decoder concatenations split.

    Models without either pattern come back as an eval-mode copy that computes the same thing.
    """
    lean = copy.deepcopy(model).eval()
    for module in list(lean.modules()):
        if isinstance(module, nn.Sequential):
            _fold_batch_norms(module)
    for name, module in list(lean.named_modules()):
        if isinstance(module, Up) and isinstance(module.conv, DoubleConv):
            _replace(lean, name, _SplitUp(module))
    return lean


def _fold_batch_norms(sequence: nn.Sequential) -> None:
    """Conv then BatchNorm inside ``sequence``: the conv absorbs the norm, the norm becomes Identity."""
    for index in range(len(sequence) - 1):
        conv, norm = sequence[index], sequence[index + 1]
        if isinstance(conv, _CONVS) and isinstance(norm, _BATCH_NORMS) and norm.track_running_stats:
            sequence[index] = fuse_conv_bn_eval(conv, norm)
            sequence[index + 1] = nn.Identity()


def _replace(root: nn.Module, dotted_name: str, new: nn.Module) -> None:
    parent_name, _, child = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class _SplitUp(nn.Module):
    """``Up`` whose first convolution reads the skip and the upsampled map separately."""

    def __init__(self, up: Up) -> None:
        super().__init__()
        self.up = up.up
        self.attention = up.attention
        layers = list(up.conv.double_conv)
        first: nn.Module = layers[0]
        skip_channels = first.in_channels // 2  # cat([skip, upsampled]): half each, in every variant
        self.conv_skip = _conv_part(first, slice(0, skip_channels), with_bias=True)
        self.conv_up = _conv_part(first, slice(skip_channels, first.in_channels), with_bias=False)
        self.rest = nn.Sequential(*layers[1:])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        x1 = _pad_to(x1, x2.shape[2:])
        if self.attention is not None:
            x2 = self.attention(x1, x2)
        features = self.conv_up(x1)
        del x1  # the upsampled map goes before the skip's convolution allocates
        features += self.conv_skip(x2)
        del x2
        return self.rest(features)


def _conv_part(conv: nn.Module, channels: slice, *, with_bias: bool) -> nn.Module:
    """A convolution made of ``conv``'s kernel over the input ``channels`` only."""
    part = type(conv)(
        channels.stop - channels.start, conv.out_channels, conv.kernel_size,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        bias=with_bias and conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(conv.weight[:, channels])
        if part.bias is not None:
            part.bias.copy_(conv.bias)
    return part.eval()
