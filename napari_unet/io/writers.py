"""Writing images and label maps atomically to TIFF, zarr or ``.npy``, and zarr outputs to stream into."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ._common import ImageIOError, _is_dask, _is_lazy_array, _is_torch_tensor

WRITE_SUFFIXES = (".tif", ".tiff", ".zarr", ".npy")


def _zarr_major_version() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


def write_labels(
    path: str | os.PathLike, labels: Any, *, scale: Sequence[float] | None = None, unit: str | None = None
) -> Path:
    """Write a label / class map to ``.tif``/``.tiff`` (zlib, ImageJ), ``.zarr`` or ``.npy``, atomically.

    Integer labels are stored in the smallest unsigned type that holds them (uint8 for class maps).
    ``scale`` (voxel size per axis) is stored so :func:`read_image_with_metadata` gives it back.
    """
    array = _materialise(labels)
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.dtype.kind not in "iu":
        raise ImageIOError(f"cannot write {Path(path).name}: labels must be whole numbers, not {array.dtype}")
    if array.size and array.min() < 0:
        raise ImageIOError(f"cannot write {Path(path).name}: labels contain negative values")
    array = array.astype(_smallest_unsigned(int(array.max()) if array.size else 0), copy=False)
    return _write_array(Path(path), array, scale=scale, unit=unit)


def write_image(
    path: str | os.PathLike, array: Any, *, scale: Sequence[float] | None = None, unit: str | None = None
) -> Path:
    """Write an image (e.g. float32 probabilities) to ``.tif``/``.tiff``, ``.zarr`` or ``.npy``, atomically."""
    path = Path(path)
    if _is_dask(array) and path.suffix.lower() == ".zarr":
        return _write_array(path, array, scale=scale, unit=unit)  # streamed chunk by chunk
    data = _materialise(array)
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind not in "iuf":
        raise ImageIOError(f"cannot write {path.name}: pixel type {data.dtype} is not supported")
    return _write_array(path, data, scale=scale, unit=unit)


def _materialise(array: Any) -> np.ndarray:
    if _is_torch_tensor(array):
        return array.detach().cpu().numpy()
    if _is_dask(array):
        return np.asarray(array.compute())
    return np.asarray(array[...] if _is_lazy_array(array) else array)


def _smallest_unsigned(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _write_array(path: Path, array: Any, *, scale: Sequence[float] | None, unit: str | None) -> Path:
    path = path.expanduser()
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ImageIOError(
            f"cannot write {path}: unsupported file type '{path.suffix}' (use .tif, .tiff, .zarr or .npy)"
        )
    scale = _full_scale(scale, array.ndim, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
        try:
            if suffix == ".zarr":
                _write_zarr(temporary, array, scale=scale, unit=unit)
            elif suffix == ".npy":
                np.save(temporary, array, allow_pickle=False)
            else:
                _write_tiff(temporary, array, scale=scale, unit=unit)
            _replace(temporary, path)
        finally:
            _remove(temporary)
    except ImageIOError:
        raise
    except OSError as error:
        raise ImageIOError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def _full_scale(scale: Sequence[float] | None, ndim: int, path: Path) -> tuple[float, ...] | None:
    """Scale for every axis; a scale for the last (spatial) axes only is padded with 1.0 in front."""
    if scale is None:
        return None
    scale = tuple(float(v) for v in scale)
    if len(scale) > ndim or any(not math.isfinite(v) or v <= 0 for v in scale):
        raise ImageIOError(f"cannot write {path.name}: the scale {scale} does not fit an array with {ndim} axes")
    return (1.0,) * (ndim - len(scale)) + scale


def _imagej_unit(unit: str) -> str:
    """ImageJ descriptions are ASCII: spell micrometres as ImageJ does and drop other non-ASCII."""
    if unit.strip().lower() in ("µm", "μm", "um", "micrometer", "micrometre", "micron", "microns"):
        return "micron"
    return unit.encode("ascii", "ignore").decode() or "micron"


def _write_tiff(path: Path, array: np.ndarray, *, scale: tuple | None, unit: str | None) -> None:
    imagej_ok = array.ndim in (2, 3) and array.dtype in (np.uint8, np.uint16, np.float32)
    if imagej_ok:
        # ImageJ layout: Fiji, napari and tifffile all read the calibration back.
        metadata: dict[str, Any] = {"axes": "YX" if array.ndim == 2 else "ZYX"}
        resolution = None
        if scale is not None:
            resolution = (1.0 / scale[-1], 1.0 / scale[-2])
            if array.ndim == 3:
                metadata["spacing"] = scale[0]
            if unit:
                metadata["unit"] = _imagej_unit(unit)
        tifffile.imwrite(
            path, array, imagej=True, metadata=metadata, resolution=resolution, compression="zlib",
            photometric="minisblack",
        )
    else:
        # tifffile's JSON description keeps the shape and the scale of every axis.
        metadata = {} if scale is None else {"scale": list(scale), "unit": unit}
        tifffile.imwrite(path, array, metadata=metadata, compression="zlib", photometric="minisblack")


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """One slice deep, up to 1024x1024 in plane: cheap to browse slice by slice in napari."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return tuple(max(1, s) for s in shape)
    return (1,) * (len(shape) - 2) + (max(1, min(shape[-2], 1024)), max(1, min(shape[-1], 1024)))


def _create_zarr_array(path: Path, shape, dtype, chunks, *, fill_value=0) -> Any:
    import zarr

    options: dict[str, Any] = {}
    if _zarr_major_version() >= 3:
        options["zarr_format"] = 2  # readable by zarr 2 and zarr 3 alike
    return zarr.open_array(
        store=str(path), mode="w", shape=tuple(shape), dtype=dtype, chunks=tuple(chunks),
        fill_value=fill_value, **options,
    )


def _write_zarr(path: Path, array: Any, *, scale: tuple | None, unit: str | None) -> None:
    target = _create_zarr_array(path, array.shape, array.dtype, default_chunks(array.shape))
    if _is_dask(array):
        import dask.array as da

        da.store(array.rechunk(target.chunks), target, lock=False)
    else:
        target[...] = array
    _set_scale_attrs(target, scale, unit)


def _set_scale_attrs(target: Any, scale: tuple | None, unit: str | None) -> None:
    if scale is not None:
        target.attrs["scale"] = list(scale)
    if unit is not None:
        target.attrs["unit"] = unit


def open_zarr_output(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None = None,
    *,
    scale: Sequence[float] | None = None,
    fill_value: float = 0,
) -> Any:
    """Create (or overwrite) an on-disk zarr array to stream predictions into, tile by tile."""
    path = Path(path).expanduser()
    chunks = default_chunks(shape) if chunks is None else chunks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_dir():
            raise ImageIOError(f"cannot write {path}: a file with that name already exists")
        target = _create_zarr_array(path, shape, np.dtype(dtype), chunks, fill_value=fill_value)
    except ImageIOError:
        raise
    except OSError as error:
        raise ImageIOError(f"cannot write {path}: {error.strerror or error}") from error
    _set_scale_attrs(target, _full_scale(scale, len(shape), path), None)
    return target


def _replace(temporary: Path, path: Path) -> None:
    """Move the finished file or folder over ``path`` (folders cannot be replaced in one step)."""
    if (temporary.is_dir() or path.is_dir()) and path.exists():
        backup = path.with_name(f".old-{uuid.uuid4().hex[:8]}-{path.name}")
        os.replace(path, backup)
        os.replace(temporary, path)
        _remove(backup)
        return
    os.replace(temporary, path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
