"""Checking that an image can be segmented as it is (size, axes, pixel type, NaN/inf) and RGB handling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._common import ImageIOError, _is_lazy_array, _is_torch_tensor, _shape_text
from .normalization import _strided_sample


def check_image(array: Any, *, expected_ndim: int | Sequence[int] | None = None, name: str = "image") -> None:
    """Raise :class:`ImageIOError` if ``array`` cannot be segmented as it is.

    Checks: not empty, at least 2D (or ``expected_ndim``), a real-valued pixel type (bool, integers,
    floats) and no NaN/infinite pixels. Lazy (dask/zarr) arrays are checked for NaN/inf on the same
    strided sample that normalisation uses, so a huge volume is not read in full.
    """
    shape = tuple(int(s) for s in array.shape)
    if any(size == 0 for size in shape) or len(shape) == 0:
        raise ImageIOError(f"the {name} is empty (shape {shape})")
    _check_ndim(shape, expected_ndim, name)
    kind = _dtype_kind(array)
    if kind not in "biuf":
        raise ImageIOError(
            f"the {name} has pixel type {array.dtype}, which cannot be segmented; use 8/16-bit integers or floats"
        )
    if kind == "f":
        _check_finite(array, name)


def _dtype_kind(array: Any) -> str:
    """numpy's dtype kind letter ('b', 'i', 'u', 'f', 'c', ...), also for torch tensors."""
    if _is_torch_tensor(array):
        import torch

        if array.dtype == torch.bool:
            return "b"
        if array.is_complex():
            return "c"
        if array.is_floating_point():
            return "f"
        return "u" if array.dtype == torch.uint8 else "i"
    return np.dtype(array.dtype).kind


def _check_ndim(shape: tuple[int, ...], expected_ndim: int | Sequence[int] | None, name: str) -> None:
    if expected_ndim is None:
        if len(shape) < 2:
            raise ImageIOError(f"the {name} has {len(shape)} axis (shape {shape}); an image needs at least 2")
        return
    allowed = (expected_ndim,) if isinstance(expected_ndim, int) else tuple(expected_ndim)
    if len(shape) not in allowed:
        wanted = " or ".join(str(n) for n in allowed)
        raise ImageIOError(f"the {name} has {len(shape)} axes (shape {_shape_text(shape)}) but {wanted} are needed")


def _check_finite(array: Any, name: str) -> None:
    if _is_torch_tensor(array):
        array = array.detach().float().cpu().numpy()
    if _is_lazy_array(array):
        values = _strided_sample(array)
        n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        where = " in a sample of it"
    else:
        n_nan = n_inf = 0
        for part in _slabs(array):  # slab by slab: no full-size boolean mask in memory
            n_nan += int(np.isnan(part).sum())
            n_inf += int(np.isinf(part).sum())
        where = ""
    if n_nan:
        raise ImageIOError(
            f"the {name} contains {n_nan} NaN pixels{where}; replace them (e.g. with 0) before segmenting"
        )
    if n_inf:
        raise ImageIOError(
            f"the {name} contains {n_inf} infinite pixels{where}; replace them (e.g. with 0) before segmenting"
        )


def _slabs(array: np.ndarray, max_values: int = 16_000_000):
    """Views of ``array`` along axis 0 holding at most about ``max_values`` values each."""
    if array.ndim == 0 or array.size <= max_values:
        yield array
        return
    step = max(1, max_values // max(1, array.size // array.shape[0]))
    for start in range(0, array.shape[0], step):
        yield array[start : start + step]


def looks_like_rgb(array: Any) -> bool:
    """True when the last axis has 3 or 4 entries (RGB/RGBA) and the two axes before it are larger."""
    shape = tuple(array.shape)
    return len(shape) >= 3 and shape[-1] in (3, 4) and shape[-2] > shape[-1] and shape[-3] > shape[-1]


def rgb_to_grayscale(array: Any) -> Any:
    """Luminance (ITU-R 709 weights, alpha ignored) with the input's pixel type and value range."""
    if not looks_like_rgb(array):
        raise ImageIOError(f"the image (shape {_shape_text(array.shape)}) is not an RGB image")
    dtype = np.dtype(array.dtype)
    red, green, blue = (array[..., i].astype(np.float32) for i in range(3))
    gray = 0.2125 * red + 0.7154 * green + 0.0721 * blue
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        gray = np.clip(np.round(gray), info.min, info.max)
    elif dtype.kind == "b":
        gray = gray >= 0.5
    return gray.astype(dtype)
