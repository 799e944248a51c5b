"""Where an input's channels and spatial axes are, and reading regions of it as (C_in, Z, Y, X).

Every input layout that ``predict`` accepts (ARCHITECTURE.md's conventions) is mapped once onto an
internal grid: channels first, then (Z, Y, X), with Z = 1 for a single 2D image. The rest of the
package only ever sees that grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn


@dataclass(frozen=True)
class _Layout:
    """How an input array maps onto the internal (C_in, Z, Y, X) grid, and the output's shape."""

    channel_axis: int | None  # axis of the input holding channels, None without one
    spatial_axes: tuple[int, ...]  # input axes that become (Z, Y, X); 2 axes for a single 2D image
    grid: tuple[int, int, int]  # (Z, Y, X); Z = 1 for a single 2D image
    squeeze_z: bool  # a single 2D image: the output drops Z

    def output_shape(self, n_classes: int) -> tuple[int, ...]:
        spatial = self.grid[1:] if self.squeeze_z else self.grid
        return (n_classes, *spatial)


def _input_layout(image: Any, model: nn.Module) -> _Layout:
    """Work out where channels and spatial axes are, following ARCHITECTURE.md's conventions."""
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    dims = getattr(model, "spatial_dims", None)
    channels = int(getattr(model, "in_channels", 1))
    if dims not in (2, 3):
        raise ValueError("the model must have spatial_dims 2 or 3")
    if not shape or any(s == 0 for s in shape):
        raise ValueError(f"the image is empty (shape {shape})")
    ndim = len(shape)

    if dims == 2:
        if ndim == 2 and channels == 1:
            return _Layout(None, (0, 1), (1, *shape), squeeze_z=True)
        if ndim == 3 and channels > 1 and shape[0] == channels:
            return _Layout(0, (1, 2), (1, *shape[1:]), squeeze_z=True)
        if ndim == 3 and channels == 1:
            return _Layout(None, (0, 1, 2), shape, squeeze_z=False)
        if ndim == 4 and shape[1] == channels:
            return _Layout(1, (0, 2, 3), (shape[0], *shape[2:]), squeeze_z=False)
        raise ValueError(
            f"a 2D model with {channels} input channel(s) takes (Y, X), (C, Y, X), (Z, Y, X) or "
            f"(Z, C, Y, X) with C = {channels}, but the image has shape {shape}"
        )
    if ndim == 3 and channels == 1:
        return _Layout(None, (0, 1, 2), shape, squeeze_z=False)
    if ndim == 4 and shape[0] == channels:
        return _Layout(0, (1, 2, 3), shape[1:], squeeze_z=False)
    raise ValueError(
        f"a 3D model with {channels} input channel(s) takes (Z, Y, X) or (C, Z, Y, X) with "
        f"C = {channels}, but the image has shape {shape}"
    )


def _read_region(image: Any, layout: _Layout, region: Sequence[slice]) -> np.ndarray:
    """Read a (Z, Y, X) region of the raw input as a (C_in, z, y, x) array (raw dtype)."""
    region = tuple(region)
    if layout.squeeze_z:
        region = region[1:]
    index: list[slice] = [slice(None)] * (len(layout.spatial_axes) + (layout.channel_axis is not None))
    for axis, part in zip(layout.spatial_axes, region):
        index[axis] = part
    block = np.asarray(image[tuple(index)])
    if layout.channel_axis is None:
        block = block[np.newaxis]
    else:
        block = np.moveaxis(block, layout.channel_axis, 0)
    if layout.squeeze_z:
        block = block[:, np.newaxis]
    return block


def _is_dask(image: Any) -> bool:
    return type(image).__module__.startswith("dask.")


class _SlabReader:
    """Reads raw (C_in, z, y, x) regions of the input.

    For stored arrays (zarr, anything but NumPy) it keeps the last Z slab it read, whole in Y and X
    and in the raw dtype, so the tiles of one Z row decompress each chunk once instead of once per
    tile. NumPy inputs are sliced directly.
    """

    def __init__(self, image: Any, layout: _Layout) -> None:
        self.image, self.layout = image, layout
        self.cache = not isinstance(image, np.ndarray)
        self.slab: np.ndarray | None = None
        self.z_range = (0, 0)

    def read(self, region: Sequence[slice]) -> np.ndarray:
        if not self.cache:
            return _read_region(self.image, self.layout, region)
        z0, z1 = region[0].start, region[0].stop
        if self.slab is None or not (self.z_range[0] <= z0 and z1 <= self.z_range[1]):
            self.slab = None  # let the old slab go before reading the next
            self.slab = _read_region(self.image, self.layout, [slice(z0, z1), slice(None), slice(None)])
            self.z_range = (z0, z1)
        offset = self.z_range[0]
        return self.slab[:, z0 - offset:z1 - offset, region[1], region[2]]

    def read_plane(self, z: int) -> np.ndarray:
        """Plane ``z`` whole, (C_in, 1, Y, X); for stored arrays usually from the cached slab."""
        return self.read([slice(z, z + 1), slice(None), slice(None)])
