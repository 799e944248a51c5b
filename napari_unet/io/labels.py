"""Reading and validating label maps: class maps, sparse scribbles, and image/labels size agreement.

Label convention
----------------
Labels are integer *class maps* with values ``0..K-1`` (see ARCHITECTURE.md). :func:`read_labels` and
:func:`labels_to_classes` accept:

* binary masks stored as ``{0, 255}``: 255 becomes class 1, 0 class 0. For ISBI 2012, 255 is the cell
  interior (class 1) and the membrane (0) is class 0;
* maps that already hold classes ``0..K-1`` (K up to :data:`MAX_CLASSES`), e.g. ``{0, 1}`` or ``{0, 1, 2}``;
* boolean masks (False = 0, True = 1).

Anything else (fractional or negative values, or sparse large ids such as ``{0, 7, 200}`` from an
instance segmentation) is refused with an :class:`ImageIOError` that names the values found.

Hand-drawn scribbles follow the *sparse* convention of :func:`sparse_labels_to_targets`: 0 means
"not labelled" (weight 0) and a painted value ``v > 0`` means class ``v - 1`` (weight 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._common import ImageIOError, _is_torch_tensor, _shape_text
from .checks import looks_like_rgb
from .readers import read_image

MAX_CLASSES = 64


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a label file and return a class map 0..K-1 (uint8); see the module docstring."""
    path = Path(path).expanduser()
    array = read_image(path, lazy=False)
    return labels_to_classes(array, name=f"the labels in {path.name}")


def labels_to_classes(array: Any, *, name: str = "the labels") -> np.ndarray:
    """Turn a label array into a uint8 class map 0..K-1 ({0,255} -> {0,1}); see the module docstring."""
    array = _as_numpy(array)
    if looks_like_rgb(array):
        array = _gray_labels_from_rgb(array, name)
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind not in "iuf":
        raise ImageIOError(f"{name} have pixel type {array.dtype}; labels must be whole numbers")
    values = _distinct_values(array, name)
    if set(values.tolist()) <= {0, 255} and 255 in values:
        return (array == 255).astype(np.uint8)
    if values.min() >= 0 and values.max() < MAX_CLASSES:
        return array.astype(np.uint8)
    raise ImageIOError(_odd_label_message(name, values))


def _as_numpy(array: Any) -> np.ndarray:
    if _is_torch_tensor(array):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _gray_labels_from_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """Labels saved as grey RGB pictures (all colour channels equal) -> one channel."""
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        return array[..., 0]
    raise ImageIOError(f"{name} are a colour image; save them as a single-channel class map (0, 1, 2, ...)")


def _distinct_values(array: np.ndarray, name: str) -> np.ndarray:
    """Sorted distinct values; refuses non-integral or non-finite values."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ImageIOError(f"{name} contain NaN or infinite values; labels must be whole numbers 0, 1, 2, ...")
        fractional = array[array != np.round(array)]
        if fractional.size:
            examples = ", ".join(f"{v:g}" for v in np.unique(fractional)[:5])
            raise ImageIOError(
                f"{name} contain fractional values ({examples}); labels must be whole numbers: "
                "0, 1, 2, ... (classes) or 0/255 (binary masks)"
            )
    if array.dtype.kind in "iu" and array.size:
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 1 << 16:  # counting is much faster than sorting for small ids
            return np.flatnonzero(np.bincount(array.ravel(), minlength=high + 1))
    return np.unique(array)


def _odd_label_message(name: str, values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
    message = (
        f"{name} hold the values {{{shown}}} ({len(values)} distinct), which is not a supported convention: "
        f"use classes 0, 1, ..., {MAX_CLASSES - 1} or a binary mask with 0 and 255"
    )
    if values.min() < 0:
        message += "; negative values are not allowed"
    elif len(values) > 2:
        message += "; if these are object ids, convert them to a mask first (e.g. labels > 0)"
    return message


def sparse_labels_to_targets(array: Any, *, name: str = "the scribbles") -> tuple[np.ndarray, np.ndarray]:
    """Sparse scribbles -> ``(classes, weights)``: 0 = unlabelled (weight 0), value v > 0 = class v-1.

    ``classes`` is a uint8 class map (unlabelled pixels hold 0), ``weights`` a float32 map of 0/1.
    """
    array = _as_numpy(array)
    if array.dtype.kind == "b":
        array = array.astype(np.uint8) * 2  # True paints class 1 (foreground) as in a binary mask
    if array.dtype.kind not in "iuf":
        raise ImageIOError(f"{name} have pixel type {array.dtype}; they must be whole numbers")
    values = _distinct_values(array, name)
    if values.min() < 0 or values.max() > MAX_CLASSES:
        shown = ", ".join(f"{v:g}" for v in values[:8])
        raise ImageIOError(
            f"{name} hold the values {{{shown}}}; paint with label 1 for class 0, 2 for class 1, ... "
            f"(at most {MAX_CLASSES}), and leave unlabelled pixels at 0"
        )
    labelled = array > 0
    classes = np.where(labelled, array - 1, 0).astype(np.uint8)
    return classes, labelled.astype(np.float32)


def check_pair(
    image_shape: Any,
    labels_shape: Any,
    *,
    channel_axis: int | str | None = "auto",
    image_name: str = "images",
    labels_name: str = "labels",
) -> None:
    """Raise :class:`ImageIOError` unless image and labels cover the same pixels.

    Accepts shapes or arrays. ``channel_axis`` is the image's channel axis, removed before comparing;
    ``"auto"`` accepts an image with one extra axis in first, second or last place ((C,Z,Y,X),
    (Z,C,Y,X) or (Y,X,C)); ``None`` means no channel axis.
    """
    image_shape = tuple(int(s) for s in getattr(image_shape, "shape", image_shape))
    labels_shape = tuple(int(s) for s in getattr(labels_shape, "shape", labels_shape))
    if _spatial_shapes_match(image_shape, labels_shape, channel_axis):
        return
    raise ImageIOError(
        f"{image_name} are {_shape_text(image_shape)} but {labels_name} are {_shape_text(labels_shape)}; "
        "they must have the same size"
    )


def _spatial_shapes_match(image_shape: tuple, labels_shape: tuple, channel_axis: int | str | None) -> bool:
    if channel_axis is None or (channel_axis == "auto" and len(image_shape) == len(labels_shape)):
        return image_shape == labels_shape
    if len(image_shape) != len(labels_shape) + 1:
        return False
    candidates = (0, 1, -1) if channel_axis == "auto" else (int(channel_axis),)
    for axis in candidates:
        without = list(image_shape)
        try:
            del without[axis]
        except IndexError:
            continue
        if tuple(without) == labels_shape:
            return True
    return False
