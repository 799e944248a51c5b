"""What every io module shares: the error they raise and small tests of an array's kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ImageIOError(ValueError):
    """An image or label file cannot be read, used or written; the message says why in plain words."""


def _shape_text(shape: Sequence[int]) -> str:
    """(24, 512, 512) -> '24x512x512'."""
    return "x".join(str(int(size)) for size in shape)


def _is_lazy_array(array: Any) -> bool:
    """True for dask/zarr-like arrays that should not be loaded into memory at once."""
    return not isinstance(array, np.ndarray) and hasattr(array, "shape") and hasattr(array, "dtype")


def _is_dask(array: Any) -> bool:
    return type(array).__module__.startswith("dask.")


def _is_torch_tensor(array: Any) -> bool:
    return type(array).__module__.startswith("torch")


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """Big-endian data (some TIFF/npy files) -> native order, which torch and napari need."""
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array
