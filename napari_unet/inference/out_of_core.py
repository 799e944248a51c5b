"""Data larger than memory: zarr outputs that finished slabs stream into, and dask inputs predicted
chunk by chunk with ``map_overlap``, so a dask cluster can run them (``distributed.py``).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import io as image_io
from .. import label_offset as offsets
from . import runner
from .blending import _weight_sums, add_windowed, gaussian_window, window_3d
from .layout import _Layout
from .normalization import Statistics, _PlaneStatistics
from .sliding_window import (
    _FLOAT32,
    CancelCallback,
    PredictionCancelled,
    ProgressCallback,
    _batches,
    _read_batch,
)
from .tiling import TilePlan, _axis_multiples, _round_up, _tile_starts


def _prepare_output(out: Any, shape: tuple[int, ...]) -> Any:
    """The array to write into: None (allocate later), a path (new zarr) or a given array."""
    if out is None:
        return None
    if isinstance(out, (str, os.PathLike)):
        return _open_zarr_output(Path(out), shape)
    if tuple(getattr(out, "shape", ())) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(getattr(out, 'shape', ()))}")
    return out


def _open_zarr_output(path: Path, shape: tuple[int, ...]) -> Any:
    """A new float32 zarr array at ``path`` (one plane per chunk, so slabs stream to disk)."""
    return image_io.open_zarr_output(path, shape, dtype="float32")


ModelSource = Callable[[], tuple[nn.Module, torch.device]]


class _ModelHere:
    """The model and device of this process, as a model source for ``_predict_dask``."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    def __call__(self) -> tuple[nn.Module, torch.device]:
        return self.model, self.device


def _predict_dask(
    model: nn.Module, image: Any, layout: _Layout, plan: TilePlan, stats: Statistics,
    overlap: float, blend: str, device: torch.device, precision: str, tta: bool,
    progress: ProgressCallback | None, cancel: CancelCallback | None, target: Any,
    result_dtype: np.dtype = _FLOAT32, offset: Sequence[float] = (),
) -> Any:
    """Prediction of a dask input, chunk by chunk, identical to the in-memory sliding window.

    Computed locally one chunk at a time: torch already uses every core (or the GPU) for one
    chunk, and parallel chunks would only oversubscribe them. (``distributed.py`` runs the same
    graph on a dask.distributed cluster.)
    """
    import dask

    local = {} if dask.config.get("scheduler", None) else {"scheduler": "threads", "num_workers": 1}
    _measure_plane_statistics(image, layout, stats, local)
    result = blended_dask_prediction(_ModelHere(model, device), model, image, layout, plan, stats,
                                     overlap, blend, precision, tta, offset, progress, cancel)
    if target is not None:
        _store(result, target, local)
        return target
    return result.astype(result_dtype).compute(**local)  # cast per chunk, never a float32 whole


def _measure_plane_statistics(image: Any, layout: _Layout, stats: Statistics, compute_options: dict) -> None:
    """A 2D model's per-plane statistics, all measured before any chunk is predicted: chunks cut
    planes, and a plane is normalised as a whole."""
    import dask

    if not isinstance(stats, _PlaneStatistics):
        return
    array = _canonical_dask(image, layout)
    missing = [z for z in range(array.shape[1]) if z not in stats.planes]
    tasks = [dask.delayed(image_io.compute_normalization)(array[:, z], stats.spec) for z in missing]
    stats.planes.update(zip(missing, dask.compute(*tasks, **compute_options)))


def _store(result: Any, target: Any, compute_options: dict) -> None:
    """Write a dask result into ``target``; one dask chunk per whole zarr chunk, so parallel
    writers never share (and race on) a chunk."""
    import dask.array as da

    target_chunks = getattr(target, "chunks", None)
    if target_chunks is not None and len(target_chunks) == result.ndim and not _covers_whole_chunks(
            result.chunks, target_chunks):
        result = result.rechunk(tuple(target_chunks))
    da.store(result, target, lock=target_chunks is None, **compute_options)


def _covers_whole_chunks(dask_chunks: Sequence[Sequence[int]], zarr_chunks: Sequence[int]) -> bool:
    """Every dask chunk boundary falls on a zarr chunk boundary (the array's end aside)."""
    for sizes, side in zip(dask_chunks, zarr_chunks):
        bounds = np.cumsum(sizes)[:-1]
        if np.any(bounds % side):
            return False
    return True


def blended_dask_prediction(
    source: ModelSource, model: nn.Module, image: Any, layout: _Layout, plan: TilePlan,
    stats: Statistics, overlap: float, blend: str, precision: str, tta: bool,
    offset: Sequence[float] = (), progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None, chunk_sides: Sequence[int] | None = None,
) -> Any:
    """The lazy (n_classes, *spatial) probabilities of a dask input, in two ``map_overlap`` passes.

    The tiles are those of the in-memory sliding window over the whole image (same grid, windows
    and weight sums), each computed once: by the chunk its start falls in. Pass 1 (halo: the next
    chunk's first tile - 1 voxels) sums a chunk's own tiles times their windows over the chunk and
    the tile - 1 voxels after it; pass 2 (halo: the previous chunk's spill) adds the neighbours'
    spill to each chunk and divides by the weight sums. So the result equals in-memory
    ``predict`` up to float rounding, and no tile is computed twice. ``source()`` gives the model
    and device where the chunk runs (loaded once per worker on a cluster); ``model`` is the same
    model here, for its shape. ``stats`` must be complete (``_measure_plane_statistics``).
    """
    import dask.array as da

    array = _canonical_dask(image, layout)  # (C_in, Z, Y, X), raw
    grid = tuple(int(n) for n in array.shape[1:])
    multiples = _axis_multiples(model, plan.tile)
    tile = tuple(min(t, _round_up(n, m)) for t, n, m in zip(plan.tile, grid, multiples))
    starts = [_tile_starts(n, t, overlap if t > 1 else 0.0, m)
              for n, t, m in zip(grid, tile, multiples)]
    windows = [gaussian_window(t, blend) for t in tile]
    weight_sums = _weight_sums(grid, tile, starts, windows)
    spill = [t - 1 for t in tile]

    # chunks at least a tile (so a halo of tile - 1 comes from one neighbour); channels whole
    chunks: list[tuple[int, ...]] = [(array.shape[0],)]
    for axis, side in enumerate(tile):
        wanted = side if chunk_sides is None else max(side, int(chunk_sides[axis]))
        size = max(max(array.chunks[axis + 1]), wanted)
        chunks.append(_chunk_sizes(grid[axis], size, minimum=side))
    array = array.rechunk(tuple(chunks))
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int).tolist() for c in array.chunks[1:]]

    binary = int(model.out_channels) == 1
    summed_channels = 1 if binary else int(model.out_channels)
    n_classes = max(2, int(model.out_channels))
    spilled_chunks = tuple(tuple(min(hi + s, n) - lo for lo, hi in zip(b[:-1], b[1:]))
                           for b, s, n in zip(bounds, spill, grid))
    tile_job = _ChunkTiles(source, grid, tile, starts, windows, bounds, stats, plan.batch_size,
                           precision, tta, tuple(offset), summed_channels, cancel)
    total = math.prod(len(c) for c in array.chunks[1:])
    counter = {"done": 0}

    def own_tiles(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        sums = tile_job(block, block_info[0]["chunk-location"][1:])
        counter["done"] += 1
        if progress is not None:
            progress(counter["done"], total)
        return sums

    sums = da.map_overlap(
        own_tiles, array, depth={0: 0, **{a + 1: (0, s) for a, s in enumerate(spill)}},
        boundary="none", trim=False, chunks=((summed_channels,), *spilled_chunks), dtype=np.float32,
        meta=np.empty((0, 0, 0, 0), dtype=np.float32), allow_rechunk=False,
    )
    blend_job = _SpillBlend(bounds, spill, weight_sums, binary)
    result = da.map_overlap(
        lambda block, block_info=None: blend_job(block, block_info[0]["chunk-location"][1:]),
        sums, depth={0: 0, **{a + 1: (s, 0) for a, s in enumerate(spill)}},
        boundary="none", trim=False, chunks=((n_classes,), *array.chunks[1:]), dtype=np.float32,
        meta=np.empty((0, 0, 0, 0), dtype=np.float32), allow_rechunk=False,
    )
    return result[:, 0] if layout.squeeze_z else result


class _ChunkTiles:
    """Pass 1 of ``blended_dask_prediction`` for one chunk: the windowed sum of the tiles it owns.

    A tile belongs to the chunk holding its start (clamped into the image). The block holds the
    chunk and the ``tile - 1`` voxels after it; the sums cover the same region.
    """

    def __init__(self, source: ModelSource, grid: tuple[int, ...], tile: tuple[int, ...],
                 starts: list[list[int]], windows: list[np.ndarray], bounds: list[list[int]],
                 stats: Statistics, batch_size: int, precision: str, tta: bool,
                 offset: tuple[float, ...], channels: int, cancel: CancelCallback | None) -> None:
        self.source, self.grid, self.tile, self.starts = source, grid, tile, starts
        self.window = window_3d(windows)
        self.bounds, self.stats, self.batch_size = bounds, stats, batch_size
        self.precision, self.tta, self.offset, self.channels = precision, tta, offset, channels
        self.cancel = cancel

    def __call__(self, block: np.ndarray, location: Sequence[int]) -> np.ndarray:
        lo = [b[i] for b, i in zip(self.bounds, location)]
        hi = [b[i + 1] for b, i in zip(self.bounds, location)]
        sums = np.zeros((self.channels, *block.shape[1:]), dtype=np.float32)
        owned = [[s for s in starts if a <= min(max(s, 0), n - 1) < b]
                 for starts, a, b, n in zip(self.starts, lo, hi, self.grid)]
        tiles = list(itertools.product(*owned))
        if not tiles:
            return sums
        model, device = self.source()
        runner._prepare_model(model, device)
        dtype = runner._autocast_dtype(model, device, self.precision)
        reader = _BlockReader(block, lo, self.grid)
        for batch_tiles in _batches(tiles, self.batch_size):
            if self.cancel is not None and self.cancel():
                raise PredictionCancelled("prediction was cancelled")
            inputs = _read_batch(reader, self.stats, batch_tiles, self.tile)
            if model.spatial_dims == 2:
                inputs = inputs[:, :, 0]
            probs = runner._run_batch(model, inputs, device, dtype, self.tta)
            if any(self.offset):
                probs = offsets.apply_offset(torch.from_numpy(probs), self.offset).numpy()
            if model.spatial_dims == 2:
                probs = probs[:, :, np.newaxis]
            for start, tile_probs in zip(batch_tiles, probs):
                add_windowed(sums, tile_probs, start, self.window, self.grid, origin=lo)
        return sums


class _SpillBlend:
    """Pass 2 of ``blended_dask_prediction`` for one chunk: its own sums plus the spill of the
    chunks before it (the block's halo), divided by the weight sums; a binary model's
    probability p becomes the two channels (1 - p, p)."""

    def __init__(self, bounds: list[list[int]], spill: list[int], weight_sums: list[np.ndarray],
                 binary: bool) -> None:
        self.bounds, self.spill, self.weight_sums, self.binary = bounds, spill, weight_sums, binary

    def __call__(self, block: np.ndarray, location: Sequence[int]) -> np.ndarray:
        lo = [b[i] for b, i in zip(self.bounds, location)]
        hi = [b[i + 1] for b, i in zip(self.bounds, location)]
        sides = [b - a for a, b in zip(lo, hi)]
        parts_per_axis = []
        for index, side, spill in zip(location, sides, self.spill):
            halo = spill if index > 0 else 0
            parts = [(slice(halo, halo + side), slice(0, side))]  # the chunk's own sums
            if halo:
                parts.append((slice(0, halo), slice(0, halo)))  # what the chunk before spilled
            parts_per_axis.append(parts)
        total = np.zeros((block.shape[0], *sides), dtype=np.float32)
        for parts in itertools.product(*parts_per_axis):
            source = (slice(None), *(p[0] for p in parts))
            total[(slice(None), *(p[1] for p in parts))] += block[source]
        weight = (self.weight_sums[0][lo[0]:hi[0], None, None]
                  * self.weight_sums[1][None, lo[1]:hi[1], None]
                  * self.weight_sums[2][None, None, lo[2]:hi[2]])
        total /= weight
        if self.binary:
            total = np.concatenate([1.0 - total, total], axis=0)
        return total


class _BlockReader:
    """``_read_batch``'s reader over a dask block that starts at ``origin`` of the whole grid."""

    def __init__(self, block: np.ndarray, origin: Sequence[int], grid: tuple[int, ...]) -> None:
        self.block, self.origin = block, list(origin)
        self.layout = _Layout(0, (1, 2, 3), grid, False)

    def read(self, region: Sequence[slice]) -> np.ndarray:
        return self.block[(slice(None), *(slice(r.start - o, r.stop - o)
                                          for r, o in zip(region, self.origin)))]

    def read_plane(self, z: int) -> np.ndarray:
        raise RuntimeError("plane statistics must be measured before the chunks are predicted")


def _chunk_sizes(extent: int, size: int, minimum: int) -> tuple[int, ...]:
    """Chunks of ``size`` along an axis, the last one merged into its neighbour if below ``minimum``."""
    sizes = [size] * (extent // size) + ([extent % size] if extent % size else [])
    if len(sizes) > 1 and sizes[-1] < minimum:
        last = sizes.pop()
        sizes[-1] += last
    return tuple(sizes)


def _canonical_dask(image: Any, layout: _Layout) -> Any:
    """The dask input as (C_in, Z, Y, X)."""
    array = image
    if layout.channel_axis is None:
        array = array[None]
    else:
        array = array.transpose(layout.channel_axis,
                                *(a for a in range(array.ndim) if a != layout.channel_axis))
    if layout.squeeze_z:
        array = array[:, None]
    return array
