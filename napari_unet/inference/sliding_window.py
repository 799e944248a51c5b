"""The sliding window over a NumPy or zarr input: tiles read in batches, run, and blended.

The input is read and normalised tile batch by tile batch (never as a whole float copy); tiles
outside the image read reflected pixels. The weighted tile probabilities are summed by an
accumulator of :mod:`.blending`, in the result itself or in a slab that streams to ``out``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import label_offset as offsets
from . import runner
from .blending import (
    _InPlaceAccumulator,
    _RollingAccumulator,
    _weight_sums,
    gaussian_window,
    window_3d,
)
from .layout import _Layout, _SlabReader
from .normalization import Statistics, _normalize
from .tiling import TilePlan, _axis_multiples, _round_up, _tile_starts

ProgressCallback = Callable[[int, int], Any]
CancelCallback = Callable[[], bool]
# the sums' and the default result's type (a default argument must not call np.dtype)
_FLOAT32 = np.dtype(np.float32)


class PredictionCancelled(Exception):
    """``cancel()`` returned True: prediction stopped before finishing."""


def _predict_array(
    model: nn.Module, image: Any, layout: _Layout, plan: TilePlan, stats: Statistics,
    overlap: float, blend: str, device: torch.device, precision: str, tta: bool,
    progress: ProgressCallback | None, cancel: CancelCallback | None, target: Any,
    result_dtype: np.dtype = _FLOAT32, offset: Sequence[float] = (),
) -> Any:
    """Tiled prediction of a NumPy or zarr image into ``target`` (allocated here, of
    ``result_dtype``, when None), each tile moved by the annotation ``offset``."""
    grid = layout.grid
    multiples = _axis_multiples(model, plan.tile)
    # never larger than the (padded) image: dask blocks can be smaller than the planned tile
    tile = tuple(min(t, _round_up(n, m)) for t, n, m in zip(plan.tile, grid, multiples))
    binary = int(model.out_channels) == 1
    n_classes = max(2, int(model.out_channels))

    axis_overlaps = [overlap if t > 1 else 0.0 for t in tile]
    starts_per_axis = [_tile_starts(n, t, o, m)
                       for n, t, o, m in zip(grid, tile, axis_overlaps, multiples)]
    windows = [gaussian_window(t, blend) for t in tile]
    window = window_3d(windows)
    weight_sums = _weight_sums(grid, tile, starts_per_axis, windows)
    if target is None and result_dtype != np.float32:
        # float16: finished slabs stream into the result; the running sums stay float32
        target = np.zeros(layout.output_shape(n_classes), dtype=result_dtype)
    if target is None:
        # in memory, the result array itself holds the running sums: no second full-size buffer
        target = np.zeros(layout.output_shape(n_classes), dtype=np.float32)
        view = target[:, np.newaxis] if layout.squeeze_z else target
        accumulator: _RollingAccumulator | _InPlaceAccumulator = _InPlaceAccumulator(
            view, weight_sums, binary)
    else:
        accumulator = _RollingAccumulator(1 if binary else n_classes, grid, weight_sums, target,
                                          layout.squeeze_z, binary)
    tiles = list(itertools.product(*starts_per_axis))
    runner._prepare_model(model, device)
    dtype = runner._autocast_dtype(model, device, precision)

    reader = _SlabReader(image, layout)
    done = 0
    for batch_tiles in _batches(tiles, plan.batch_size):
        if cancel is not None and cancel():
            raise PredictionCancelled("prediction was cancelled")
        inputs = _read_batch(reader, stats, batch_tiles, tile)
        if model.spatial_dims == 2:
            inputs = inputs[:, :, 0]  # (N, C, 1, Y, X) -> (N, C, Y, X)
        probs = runner._run_batch(model, inputs, device, dtype, tta)
        if any(offset):  # per tile: the blending window hides the repeated tile edge
            probs = offsets.apply_offset(torch.from_numpy(probs), offset).numpy()
        if model.spatial_dims == 2:
            probs = probs[:, :, np.newaxis]
        for start, tile_probs in zip(batch_tiles, probs):
            accumulator.add(tile_probs, start, window)
        done += len(batch_tiles)
        next_z = tiles[done][0] if done < len(tiles) else grid[0]
        accumulator.flush(max(next_z, 0) if done < len(tiles) else grid[0])
        if progress is not None:
            progress(done, len(tiles))
    return target


def _batches(items: list, size: int) -> Iterator[list]:
    for first in range(0, len(items), size):
        yield items[first:first + size]


def _read_batch(reader: _SlabReader, stats: Statistics,
                starts: list[tuple[int, int, int]], tile: Sequence[int]) -> np.ndarray:
    """Normalised float32 tiles (N, C_in, tz, ty, tx), read once for the batch's bounding box.

    Parts of a tile outside the image (where the image is smaller than the tile, or the model's
    pooling grid starts before it) are filled by reflecting the image.
    """
    grid = reader.layout.grid
    box_lo = [min(s[axis] for s in starts) for axis in range(3)]
    box_hi = [max(s[axis] for s in starts) + tile[axis] for axis in range(3)]
    read_lo = [max(lo, 0) for lo in box_lo]
    read_hi = [min(hi, n) for hi, n in zip(box_hi, grid)]
    raw = reader.read([slice(a, b) for a, b in zip(read_lo, read_hi)])
    block = _normalize(raw, stats, read_lo[0], reader.read_plane)
    pads = [(0, 0)] + [(a - lo, hi - b) for lo, hi, a, b in zip(box_lo, box_hi, read_lo, read_hi)]
    if any(before or after for before, after in pads):
        block = np.pad(block, pads, mode="reflect")
    tiles = np.empty((len(starts), block.shape[0], *tile), dtype=np.float32)
    for index, start in enumerate(starts):
        offset = [s - lo for s, lo in zip(start, box_lo)]
        tiles[index] = block[(slice(None), *(slice(o, o + t) for o, t in zip(offset, tile)))]
    return tiles
