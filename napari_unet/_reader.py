"""napari reader: TIFF stacks, folders of PNG/TIFF slices, ``.npy`` files and zarr arrays.

Big inputs (zarr, and files or folders over :data:`LAZY_BYTES`) open lazily as dask arrays, so
volumes bigger than the memory can be browsed and segmented. A file opens as a Labels layer when
its name says so (``*labels*``, ``*mask*``, ``*annotation*``, ``*ground truth*``, ``*gt*``) or
when it holds whole numbers with only a few distinct values; otherwise as an Image layer. The
voxel size stored in the file (ImageJ, OME, tifffile or zarr metadata) becomes the layer's scale.

No Qt here: the reader returns napari layer-data tuples.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_unet import io as image_io

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]

# Files or folders larger than this open lazily (dask) instead of being read into memory.
LAZY_BYTES = 1 << 30
# An integer file with at most this many distinct values (in a sample) is a label map.
MAX_LABEL_VALUES = 16
# Distinct values are counted on at most this many pixels, so huge files stay cheap to classify.
MAX_SAMPLE_VALUES = 2_000_000
_LABELS_NAME = re.compile(
    r"(label|mask|annotation|ground[ _-]?truth|(^|[^a-z])gt([^a-z]|$))", re.IGNORECASE
)
_FILE_SUFFIXES = (".tif", ".tiff", ".npy", ".png")


def get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]) -> ReaderFunction | None:
    """Return :func:`read_layers` if napari-unet can open ``path`` (or every path of a list)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_can_read(Path(p)) for p in paths):
        return None
    return read_layers


def read_layers(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerData]:
    """Read one or several paths, one layer each (see the module docstring)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [read_layer(Path(p)) for p in paths]


def read_layer(path: Path) -> LayerData:
    """One layer-data tuple for ``path``: ``(data, {"name", "scale", ...}, "image" | "labels")``."""
    array, meta = image_io.read_image_with_metadata(path, lazy=_should_be_lazy(path))
    name = _layer_name(path)
    rgb = image_io.looks_like_rgb(array)
    kwargs: dict[str, Any] = {"name": name, "metadata": {"napari_unet_source": str(path)}}
    scale = meta.get("scale")
    if scale is not None:
        scale = tuple(scale[:-1]) if rgb and len(scale) == array.ndim else tuple(scale)
        kwargs["scale"] = scale
        unit = _napari_unit(meta.get("unit"))
        if unit is not None:
            kwargs["units"] = unit

    if not rgb and is_label_map(array, name):
        return _as_label_data(array), kwargs, "labels"
    return array, kwargs, "image"


def is_label_map(array: Any, name: str = "") -> bool:
    """True if ``array`` should open as Labels: a labels-like name, or few whole-number values."""
    kind = np.dtype(array.dtype).kind
    if kind == "b":
        return True
    if kind not in "iuf":
        return False
    values = _distinct_sample_values(array)
    whole = kind in "iu" or bool(np.all(np.mod(values, 1) == 0))
    if _LABELS_NAME.search(name) and whole:
        return True
    return kind in "iu" and len(values) <= MAX_LABEL_VALUES


def _as_label_data(array: Any) -> Any:
    """Integer label data; a 0/255 binary mask becomes 0/1 (class 1 = foreground, as everywhere)."""
    kind = np.dtype(array.dtype).kind
    if kind == "b" or kind == "f":
        array = array.astype(np.uint8 if kind == "b" else np.int32)
    values = _distinct_sample_values(array)
    if set(values.tolist()) <= {0, 255} and 255 in values:
        array = (array == 255).astype(np.uint8)  # lazy for dask arrays, eager for numpy
    return array


def _distinct_sample_values(array: Any) -> np.ndarray:
    """Distinct values of ``array``, or of a sample of it when it is big or lazy.

    Leading axes are strided (keeping at least 16 slices: chunked files are read slice by
    slice), then a central crop of each slice is taken, so only a few chunks are ever read.
    """
    index: list[slice] = []
    remaining = MAX_SAMPLE_VALUES
    for n in array.shape[:-2]:
        step = 1
        while -(-n // (step * 2)) >= 16 and -(-n // step) * 4 > remaining ** 0.5:
            step *= 2
        index.append(slice(None, None, step))
        remaining = max(1, remaining // -(-n // step))
    side = max(1, int(remaining ** 0.5))
    for n in array.shape[-2:]:
        start = max(0, (n - side) // 2)
        index.append(slice(start, start + side))
    sample = np.asarray(array[tuple(index)])
    if sample.dtype == np.uint8:
        return np.flatnonzero(np.bincount(sample.ravel(), minlength=256))
    return np.unique(sample)


def _can_read(path: Path) -> bool:
    if _is_zarr(path):
        return True
    if path.is_dir():
        try:
            return bool(image_io.list_slice_files(path))
        except OSError:
            return False
    return path.suffix.lower() in _FILE_SUFFIXES and path.is_file()


def _is_zarr(path: Path) -> bool:
    if path.suffix.lower() == ".zarr":
        return True
    markers = (".zarray", ".zgroup", "zarr.json")
    return path.is_dir() and any((path / marker).exists() for marker in markers)


def _should_be_lazy(path: Path) -> bool:
    if _is_zarr(path):
        return True
    if path.is_dir():
        total = sum(f.stat().st_size for f in image_io.list_slice_files(path))
        return total > LAZY_BYTES
    # a single PNG is never big; TIFF and npy are memory-mapped / chunked when lazy
    return path.suffix.lower() != ".png" and path.stat().st_size > LAZY_BYTES


def _layer_name(path: Path) -> str:
    name = path.name.rstrip("/")
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".npy", ".png"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _napari_unit(unit: Any) -> str | None:
    """A unit napari understands (via pint), or None (napari then shows pixels)."""
    if not unit or not isinstance(unit, str):
        return None
    unit = {"micron": "micrometer", "microns": "micrometer", "um": "micrometer"}.get(unit, unit)
    try:
        import pint

        pint.get_application_registry().Unit(unit)
    except Exception:  # noqa: BLE001 - an unknown unit must not stop the file from opening
        return None
    return unit
