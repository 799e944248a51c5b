"""Data larger than memory: zarr outputs that finished slabs stream into, and dask inputs predicted
chunk by chunk with ``map_overlap``, so a dask cluster can run them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import io as image_io
from .layout import _Layout
from .normalization import Statistics, _normalize, _PlaneStatistics
from .sliding_window import (
    _FLOAT32,
    CancelCallback,
    PredictionCancelled,
    ProgressCallback,
    _predict_array,
)
from .tiling import TilePlan


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


def _predict_dask(
    model: nn.Module, image: Any, layout: _Layout, plan: TilePlan, stats: Statistics,
    overlap: float, blend: str, device: torch.device, precision: str, tta: bool,
    progress: ProgressCallback | None, cancel: CancelCallback | None, target: Any,
    result_dtype: np.dtype = _FLOAT32, offset: Sequence[float] = (),
) -> Any:
    """Prediction mapped over dask chunks with ``map_overlap``, so a dask cluster can run it.

    Each chunk is predicted with a halo of half a tile (full context for the chunk's own voxels)
    by the same tiled engine; the halo is cropped afterwards. Normalisation statistics are
    measured before any chunk is predicted (a 2D model's per plane, in one pass over the image), so
    a chunk is normalised as the whole image or plane it belongs to.
    """
    import dask
    import dask.array as da

    # Locally one chunk at a time: torch already uses every core (or the GPU) for one chunk, and
    # parallel chunks would only oversubscribe them. A dask.distributed client, when one is set up,
    # is left to spread chunks over its workers.
    local = {} if dask.config.get("scheduler", None) else {"scheduler": "threads", "num_workers": 1}
    array = _canonical_dask(image, layout)  # (C_in, Z, Y, X)
    if isinstance(stats, _PlaneStatistics):  # chunks cut planes: measure every plane whole first
        tasks = [dask.delayed(image_io.compute_normalization)(array[:, z], stats.spec)
                 for z in range(array.shape[1])]
        stats.planes.update(enumerate(dask.compute(*tasks, **local)))
    halo = [0] + [t // 2 if t > 1 else 0 for t in plan.tile]
    # chunks at least one tile (and the halo) wide along tiled axes; channels in one chunk
    chunks: list[tuple[int, ...]] = [(array.shape[0],)]
    for axis, side in enumerate(plan.tile, start=1):
        size = max(max(array.chunks[axis]), side, 2 * halo[axis])
        chunks.append(_chunk_sizes(array.shape[axis], size, minimum=max(halo[axis], 1)))
    array = array.rechunk(tuple(chunks))
    n_classes = max(2, int(model.out_channels))
    out_chunks = ((n_classes,), *array.chunks[1:])
    total = math.prod(len(c) for c in array.chunks)
    counter = {"done": 0}

    def predict_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        if cancel is not None and cancel():
            raise PredictionCancelled("prediction was cancelled")
        location = block_info[0]["chunk-location"]
        numblocks = block_info[0]["num-chunks"]
        inner = _predict_array(model, block, _Layout(0, (1, 2, 3), block.shape[1:], False),
                               plan, None, overlap, blend, device, precision, tta, None, cancel,
                               None, _FLOAT32, offset)
        crop = [slice(None)]
        for axis in range(1, 4):
            before = halo[axis] if location[axis] > 0 else 0
            after = halo[axis] if location[axis] < numblocks[axis] - 1 else 0
            crop.append(slice(before, inner.shape[axis] - after))
        counter["done"] += 1
        if progress is not None:
            progress(counter["done"], total)
        return inner[tuple(crop)]

    normalised = array.map_blocks(_normalize_dask_block, stats, dtype=np.float32)
    result = da.map_overlap(
        predict_block, normalised, depth=tuple(halo), boundary="none", trim=False,
        chunks=out_chunks, dtype=np.float32, meta=np.empty((0, 0, 0, 0), dtype=np.float32),
        allow_rechunk=False,
    )
    if layout.squeeze_z:
        result = result[:, 0]
    if target is not None:
        # one dask chunk per whole zarr chunk: parallel writes never share (and race on) a chunk
        target_chunks = getattr(target, "chunks", None)
        if target_chunks is not None and len(target_chunks) == result.ndim:
            result = result.rechunk(tuple(target_chunks))
        da.store(result, target, lock=target_chunks is None, **local)
        return target
    return result.astype(result_dtype).compute(**local)  # cast per chunk, never a float32 whole


def _normalize_dask_block(block: np.ndarray, stats: Statistics, block_info: dict | None = None) -> np.ndarray:
    """``_normalize`` of one (C, z, y, x) chunk; ``block_info`` (from dask) says where its planes start."""
    first_z = block_info[0]["array-location"][1][0] if block_info else 0
    return _normalize(block, stats, first_z)


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
