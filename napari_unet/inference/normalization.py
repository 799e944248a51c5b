"""Normalisation of the input as the trainer normalised its samples.

Normalisation repeats the trainer's: statistics by the model's spec (percentiles by default) of each
training sample, which for a 2D model is one slice. So a 3D model's volume is normalised as a whole,
and a 2D model's stack slice by slice, each on its own statistics (measured on first use, so a
tile reads only the planes it needs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from .. import io as image_io


class _PlaneStatistics:
    """Normalisation statistics of each Z plane of a 2D model's input, measured on first use.

    The trainer normalises every training sample on its own statistics, and a 2D model's sample is
    one slice; so a stack is normalised slice by slice here too. One set of statistics for the
    whole stack would move each slice's intensities away from what the model was trained on.
    """

    def __init__(self, spec: dict) -> None:
        self.spec = dict(spec)
        self.planes: dict[int, dict] = {}

    def get(self, z: int, read_plane: Callable[[int], np.ndarray]) -> dict:
        """The statistics of plane ``z``; ``read_plane(z)`` gives its raw pixels when not known yet."""
        if z not in self.planes:
            self.planes[z] = image_io.compute_normalization(read_plane(z), self.spec)
        return self.planes[z]


Statistics = dict | _PlaneStatistics | None


def _normalization_stats(model: nn.Module, image: Any, normalization: dict | bool | None) -> Statistics:
    """How to normalise ``image``: None (already normalised), one set of statistics for all of it,
    or, for a 2D model measuring them itself, statistics per Z plane."""
    if normalization is False:
        return None
    if normalization is True or normalization is None:
        spec = getattr(model, "normalization", None) or image_io.DEFAULT_NORMALIZATION
    elif isinstance(normalization, dict):
        spec = normalization
    else:
        raise ValueError("normalization must be None, False or a dict (a spec or its statistics)")
    if "lo" in spec and "hi" in spec:
        return dict(spec)
    if int(model.spatial_dims) == 2:
        return _PlaneStatistics(spec)
    return image_io.compute_normalization(image, spec)


def volume_statistics(model: nn.Module, image: Any) -> dict | None:
    """A 3D model's normalisation statistics of the whole ``image``, as ``predict`` measures them.

    For a part of a volume (a crop to fine-tune on, a slab to preview or predict), which must be
    normalised as the volume it belongs to. None for a 2D model: its unit, one slice, is whole.
    """
    return _normalization_stats(model, image, None) if int(model.spatial_dims) == 3 else None


def _normalize(block: np.ndarray, stats: Statistics, first_z: int = 0,
               read_plane: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """A raw (C, z, y, x) block as float32, normalised; its planes are ``first_z`` onwards."""
    if stats is None:
        return np.asarray(block, dtype=np.float32)
    if isinstance(stats, dict):
        return image_io.apply_normalization(block, stats)
    result = np.empty(block.shape, dtype=np.float32)
    for index in range(block.shape[1]):
        result[:, index] = image_io.apply_normalization(block[:, index], stats.get(first_z + index, read_plane))
    return result
