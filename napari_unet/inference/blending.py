"""Blending tiles: the window each tile is weighted by, and the sums the weighted tiles add up to.

Tile probabilities are blended with a Gaussian window (sigma = 1/8 of the tile, as MONAI and nnU-Net
do), shifted to fade to ~0 at the tile's edge, so a tile's end leaves no step and seams do not show.

Memory stays bounded. In memory, the weighted sums accumulate straight in the float32 result
(:class:`_InPlaceAccumulator`); with ``out=`` they live in a float32 slab that rolls along the first
spatial axis, and finished slabs are written to ``out`` (:class:`_RollingAccumulator`; a zarr array
streams them to disk), so peak memory does not grow with the volume. The sum of blending weights
is separable (a product of three 1D sums), so no weight volume is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The smallest window weight; keeps border voxels that only one tile reaches well defined.
_MIN_WINDOW_WEIGHT = 1e-6


def gaussian_window(size: int, blend: str = "gaussian") -> np.ndarray:
    """1D blending weights for a tile side: a Gaussian with sigma = size / 8 (or ones).

    The Gaussian is lowered by its value at the tile's edge (and rescaled to peak 1) so that it
    falls to ~0 there: a tile's contribution then fades out instead of stopping with a small step,
    and no seam is left where it ends. A tiny floor keeps pixels that one tile alone reaches defined.
    """
    if blend == "constant" or size <= 2:
        return np.ones(size, dtype=np.float32)
    sigma = size / 8.0
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    window = np.exp(-0.5 * (offsets / sigma) ** 2)
    edge = np.exp(-0.5 * ((size / 2.0) / sigma) ** 2)  # just outside the tile
    window = (window - edge) / (window.max() - edge)
    return np.maximum(window, _MIN_WINDOW_WEIGHT).astype(np.float32)


def _weight_sums(grid: Sequence[int], tile: Sequence[int], starts_per_axis: Sequence[list[int]],
                 windows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-axis sums of the 1D windows over all tiles; their outer product is the 3D weight sum."""
    sums = []
    for extent, side, starts, window in zip(grid, tile, starts_per_axis, windows):
        total = np.zeros(extent, dtype=np.float64)
        for start in starts:
            lo, hi = max(start, 0), min(start + side, extent)
            total[lo:hi] += window[lo - start:hi - start]
        sums.append(total.astype(np.float32))
    return sums


def window_3d(windows: Sequence[np.ndarray]) -> np.ndarray:
    """The (tz, ty, tx) blending window: the outer product of the per-axis windows."""
    return windows[0][:, None, None] * windows[1][None, :, None] * windows[2][None, None, :]


def add_windowed(sums: np.ndarray, probs: np.ndarray, start: Sequence[int], window: np.ndarray,
                 grid: Sequence[int], origin: Sequence[int] = (0, 0, 0)) -> None:
    """Add one tile's probabilities (C, tz, ty, tx) times ``window`` at ``start`` (Z, Y, X of the
    whole ``grid``) into ``sums``, which holds the grid from ``origin`` on; parts outside the grid
    (reflected pixels) are left out."""
    lo = [max(s, 0) for s in start]
    hi = [min(s + t, n) for s, t, n in zip(start, probs.shape[1:], grid)]
    crop = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    place = (slice(None), *(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin)))
    sums[place] += probs[(slice(None), *crop)] * window[crop]


class _RollingAccumulator:
    """Weighted sum of tile probabilities over a slab [lo, lo + depth) of the Z axis.

    Finished slabs (no later tile reaches them) are divided by the weight sum and written to the
    output, then dropped, so memory is bounded by about one tile row whatever the volume's depth.
    """

    def __init__(self, channels: int, grid: Sequence[int], weight_sums: list[np.ndarray],
                 target: Any, squeeze_z: bool, binary: bool) -> None:
        self.channels = channels
        self.grid = tuple(grid)
        self.weight_sums = weight_sums
        self.target = target
        self.squeeze_z = squeeze_z
        self.binary = binary
        self.lo = 0
        self.buffer = np.zeros((channels, 0, *self.grid[1:]), dtype=np.float32)

    def add(self, probs: np.ndarray, start: Sequence[int], window: np.ndarray) -> None:
        """Add one tile's probabilities (C, tz, ty, tx) times its window at ``start`` (Z, Y, X)."""
        self._ensure(min(start[0] + probs.shape[1], self.grid[0]))
        add_windowed(self.buffer, probs, start, window, self.grid, origin=(self.lo, 0, 0))

    def flush(self, until: int) -> None:
        """Write Z planes [lo, until) to the target: they receive no more tiles."""
        until = min(until, self.grid[0])
        if until <= self.lo:
            return
        count = until - self.lo
        weight = (self.weight_sums[0][self.lo:until, None, None]
                  * self.weight_sums[1][None, :, None] * self.weight_sums[2][None, None, :])
        probs = self.buffer[:, :count] / weight
        if self.binary:
            probs = np.concatenate([1.0 - probs, probs], axis=0)
        region = (slice(None), slice(self.lo, until))
        if self.squeeze_z:
            region, probs = (slice(None),), probs[:, 0]
        self.target[region] = probs.astype(self.target.dtype, copy=False)
        # keep the planes still being summed, at the front of the buffer
        self.buffer = self.buffer[:, count:].copy() if count < self.buffer.shape[1] else \
            self.buffer[:, :0]
        self.lo = until

    def _ensure(self, z_end: int) -> None:
        have = self.lo + self.buffer.shape[1]
        if z_end > have:
            extra = np.zeros((self.channels, z_end - have, *self.grid[1:]), dtype=np.float32)
            self.buffer = np.concatenate([self.buffer, extra], axis=1)


class _InPlaceAccumulator:
    """Sums tile probabilities straight into the (C, Z, Y, X) float32 result, then divides slabs.

    For a binary model channel 1 holds the sum of p; channel 0 becomes 1 - p when a slab is done.
    """

    def __init__(self, result: np.ndarray, weight_sums: list[np.ndarray], binary: bool) -> None:
        self.result = result
        self.sums = result[1:2] if binary else result
        self.weight_sums = weight_sums
        self.binary = binary
        self.lo = 0

    def add(self, probs: np.ndarray, start: Sequence[int], window: np.ndarray) -> None:
        add_windowed(self.sums, probs, start, window, self.result.shape[1:])

    def flush(self, until: int) -> None:
        until = min(until, self.result.shape[1])
        if until <= self.lo:
            return
        weight = (self.weight_sums[0][self.lo:until, None, None]
                  * self.weight_sums[1][None, :, None] * self.weight_sums[2][None, None, :])
        slab = self.sums[:, self.lo:until]
        slab /= weight
        if self.binary:
            np.subtract(1.0, slab[0], out=self.result[0, self.lo:until])
        self.lo = until
