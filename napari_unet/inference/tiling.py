"""Tile and batch sizes, and where the tiles go.

Tiles sit on the model's own pooling grid (multiples of ``2**depth`` from where the model would pad
the whole image), so a tile pools the same pixels as a forward pass over the whole image does.
Tiled predictions therefore agree with a single whole-image pass away from the context a tile cuts
off. Automatic tiles and batches fit the device's free memory (half of it; a fixed budget where the
device cannot tell).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import devices
from .layout import _Layout

# Default tile sides (before fitting to the image and memory) and the largest automatic batch.
_DEFAULT_TILE = {2: 512, 3: 128}
_MAX_AUTO_BATCH = {("cpu", 2): 4, ("cpu", 3): 1, ("gpu", 2): 16, ("gpu", 3): 4}
# Rough bytes of activations per voxel of a tile and per feature of width (UNet forward, fp32).
_ACTIVATION_BYTES_PER_VOXEL_PER_WIDTH = 48
# Host memory assumed for tiles when the device cannot report its free memory (CPU, MPS).
_DEFAULT_BUDGET_BYTES = 2 * 2**30


@dataclass(frozen=True)
class TilePlan:
    """Tile shape over the spatial grid (Z, Y, X) and how many tiles run in one forward pass.

    For a 2D model the Z side is 1 (tiles are 2D slices of the stack).
    """

    tile: tuple[int, int, int]
    batch_size: int


def choose_tiling(
    model: nn.Module, grid: Sequence[int], device: torch.device, *, tile: Any = None,
    batch_size: int | None = None,
) -> TilePlan:
    """Tile and batch for ``model`` on a (Z, Y, X) grid, fitting ``device``'s free memory.

    Tile sides are multiples of ``2**depth`` (the model would pad anyway) and no bigger than the
    image (rounded up to that multiple); the batch fills the memory budget up to a small maximum.
    """
    dims = int(model.spatial_dims)
    multiple = _size_multiple(model)
    if tile is None:
        requested = (_DEFAULT_TILE[dims],) * dims
    else:
        requested = _tile_sides(tile, dims)
    tiled_grid = tuple(grid[-dims:])
    sides = [min(_round_up(side, multiple), _round_up(extent, multiple))
             for side, extent in zip(requested, tiled_grid)]

    budget = _memory_budget(device)
    bytes_per_voxel = _ACTIVATION_BYTES_PER_VOXEL_PER_WIDTH * _model_width(model)
    if tile is None:
        # shrink the largest side until one tile fits in the budget
        while math.prod(sides) * bytes_per_voxel > budget and max(sides) > multiple:
            axis = int(np.argmax(sides))
            sides[axis] = max(multiple, _round_up(sides[axis] // 2, multiple))
    full_tile = (1, *sides) if dims == 2 else tuple(sides)

    if batch_size is None:
        kind = "cpu" if device.type == "cpu" else "gpu"
        fits = max(1, int(budget // max(1, math.prod(sides) * bytes_per_voxel)))
        tiles_total = math.prod(len(_tile_starts(n, t, 0.25, m)) for n, t, m
                                in zip(grid, full_tile, _axis_multiples(model, full_tile)))
        batch_size = max(1, min(fits, _MAX_AUTO_BATCH[(kind, dims)], tiles_total))
    return TilePlan(tile=full_tile, batch_size=int(batch_size))


def _initial_plan(model: nn.Module, layout: _Layout, tile: Any, batch_size: int | None,
                  device: torch.device) -> TilePlan:
    if tile is not None:
        _tile_sides(tile, int(model.spatial_dims))  # validate early with a plain message
    return choose_tiling(model, layout.grid, device, tile=tile, batch_size=batch_size)


def _size_multiple(model: nn.Module) -> int:
    depth = getattr(model, "depth", None) or getattr(model, "config", {}).get("depth", 0)
    return 2 ** int(depth)


def _model_width(model: nn.Module) -> int:
    return int(getattr(model, "width", None) or getattr(model, "config", {}).get("width", 32))


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _tile_sides(tile: Any, dims: int) -> tuple[int, ...]:
    sides = (tile,) * dims if np.isscalar(tile) else tuple(tile)
    if len(sides) != dims or any(isinstance(s, bool) or int(s) < 1 for s in sides):
        raise ValueError(f"tile must be a positive int or {dims} positive ints, got {tile!r}")
    return tuple(int(s) for s in sides)


def _memory_budget(device: torch.device) -> int:
    free = devices.free_memory(device)
    return int(free * 0.5) if free else _DEFAULT_BUDGET_BYTES


def _tile_starts(extent: int, tile: int, overlap: float, multiple: int = 1) -> list[int]:
    """Tile starts along one axis, spread evenly so neighbours overlap by about ``overlap``.

    Tiles sit on the grid the model itself would use on the whole image: the extent is padded to a
    multiple of ``multiple`` (2**depth), split evenly before and after as the model pads, and every
    start is a multiple of it from there. So each tile pools the same pixels together as a forward
    pass over the whole image would, and tiled and whole predictions agree. Starts below 0 or tiles
    past the end read reflected pixels.
    """
    padded = _round_up(extent, multiple)
    offset = -((padded - extent) // 2)
    if tile >= padded:
        return [offset - (tile - padded) // 2]
    # a stride that is a multiple too, so snapping the evenly spread starts never widens a gap
    stride = max(multiple, int(tile * (1 - overlap)) // multiple * multiple)
    count = math.ceil((padded - tile) / stride) + 1
    spread = np.linspace(0, padded - tile, count) / multiple
    return sorted({offset + round(s) * multiple for s in spread})


def _axis_multiples(model: nn.Module, tile: Sequence[int]) -> list[int]:
    """Per (Z, Y, X) axis, the size multiple the model pools over (1 for the Z of 2D models)."""
    multiple = _size_multiple(model)
    return [1 if side == 1 and model.spatial_dims == 2 else multiple for side in tile]
