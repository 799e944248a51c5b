"""A prediction-only copy of a UNet that needs less memory: same outputs, fewer big tensors alive.

Three rewrites, all exact up to float rounding:

* batch norm after a convolution is folded into the convolution's weights (eval mode: the norm is
  an affine map), so no separate normalised copy of each feature map is made;
* the decoder's ``conv(cat([skip, up]))`` becomes ``conv_skip(skip) + conv_up(up)`` (the kernel split
  along its input channels), so the concatenated map, the biggest tensor of a UNet, is never built;
* the forward pass hands each skip map to its decoder block, which lets go of it once used (a plain
  ``forward`` keeps every skip referenced until it returns), and in 2D ``conv_up`` adds its output in
  two channel chunks, so fewer full-resolution maps are alive at once (peak RSS of a w32 2D stack:
  about 540 -> 485 MiB).

At full resolution in 3D these are the largest maps of the network (one 16-channel 128^3 map is
134 MB), so a sliding-window prediction peaks several of them lower. Training never uses the copy.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .blocks import DoubleConv, Up, _pad_to
from .unet import UNet

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
    if isinstance(lean, UNet):
        lean.forward = types.MethodType(_forward_releasing_skips, lean)
    return lean


def _forward_releasing_skips(self: UNet, x: torch.Tensor) -> torch.Tensor:
    """``UNet.forward`` that passes each skip to its decoder block without keeping a reference."""
    self._check_input(x)
    spatial_shape = x.shape[2:]
    x, padding = self._pad_to_multiple(x)
    skips = [self.inc(x)]
    del x
    for down in self.downs:
        skips.append(down(skips[-1]))
    features = self.bottleneck_dropout(self.bottleneck(skips.pop()))
    for up in self.ups:
        maps = [features, skips.pop()]
        del features
        features = up.forward_owned(maps) if isinstance(up, _SplitUp) else up(*maps)
    logits = self.outc(features)
    del features
    return self._crop(logits, padding, spatial_shape)


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
        # the upsampled half in output-channel chunks: each chunk's result is added at once, so the
        # temporary is small
        self.up_outputs = _chunks(first.out_channels, _UP_CHUNKS[_spatial_dims(first)])
        self.conv_up_chunks = nn.ModuleList(
            _conv_part(first, slice(skip_channels, first.in_channels), with_bias=False, outputs=outputs)
            for outputs in self.up_outputs
        )
        self.rest = nn.Sequential(*layers[1:])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.forward_owned([x1, x2])

    def forward_owned(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """``forward`` on ``[coarser features, skip]``, emptying the list so both can be freed early."""
        low, skip = maps
        maps.clear()
        if self.attention is None:
            features = self.conv_skip(skip)  # first, so the skip is freed before upsampling
            del skip
            upsampled = _pad_to(self.up(low), features.shape[2:])
        else:  # the gate needs the upsampled map to weigh the skip
            upsampled = _pad_to(self.up(low), skip.shape[2:])
            features = self.conv_skip(self.attention(upsampled, skip))
            del skip
        del low
        for conv_chunk, outputs in zip(self.conv_up_chunks, self.up_outputs):
            features[:, outputs].add_(conv_chunk(upsampled))  # in place through the view
        del upsampled
        return self.rest(features)


# Output-channel chunks of conv_up, per spatial dims. Measured (2 cores, w32 2D stack, tile 256, batch 4):
# 2 chunks lowered peak RSS by ~55 MiB at the same speed; in 3D (w16, tile 128) the peak lies elsewhere
# and chunks only cost time (+12%), so 3D adds the whole output at once.
_UP_CHUNKS = {2: 2, 3: 1}


def _spatial_dims(conv: nn.Module) -> int:
    return 3 if isinstance(conv, nn.Conv3d) else 2


def _chunks(channels: int, count: int) -> list[slice]:
    """Up to ``count`` consecutive, nearly equal slices covering ``range(channels)``."""
    bounds = [round(i * channels / min(count, channels)) for i in range(min(count, channels) + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def _conv_part(conv: nn.Module, channels: slice, *, with_bias: bool, outputs: slice | None = None) -> nn.Module:
    """A convolution made of ``conv``'s kernel over the input ``channels`` (and ``outputs``) only."""
    outputs = outputs or slice(0, conv.out_channels)
    part = type(conv)(
        channels.stop - channels.start, outputs.stop - outputs.start, conv.kernel_size,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        bias=with_bias and conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(conv.weight[outputs, channels])
        if part.bias is not None:
            part.bias.copy_(conv.bias[outputs])
    return part.eval()
