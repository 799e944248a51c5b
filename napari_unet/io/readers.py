"""Reading images: a TIFF stack, a folder of slices, a ``.npy`` file or a zarr array, with their metadata.

Formats read by :func:`read_image`:

* multi-page TIFF stacks (one page per slice, as in ISBI 2012) and ImageJ/OME hyperstacks;
* a folder of PNG/TIFF/JPEG slices, sorted naturally (``2.png`` before ``10.png``) and stacked;
* ``.npy`` files (memory-mapped when ``lazy=True``);
* zarr arrays: a ``.zarr`` folder holding an array, or a group holding a single array, an array
  called ``"0"`` or an OME-NGFF multiscale image (its full-resolution level is read).

With ``lazy=True`` TIFF, zarr and folder inputs come back as dask arrays, so volumes bigger than the
memory can be viewed and segmented tile by tile. Pixel types are kept as they are (8/16-bit, float).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ._common import ImageIOError, _native_byte_order, _shape_text
from .tiff_reader import _read_tiff

SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders '2.png' before '10.png'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_image(path: str | os.PathLike, *, lazy: bool = False) -> Any:
    """Read an image stack or volume; see the module docstring for the formats.

    Returns a numpy array, or with ``lazy=True`` a dask array (TIFF, zarr, folder) or a memory-mapped
    numpy array (``.npy``). Raises :class:`ImageIOError` with a plain message when it cannot.
    """
    array, _ = read_image_with_metadata(path, lazy=lazy)
    return array


def read_image_with_metadata(path: str | os.PathLike, *, lazy: bool = False) -> tuple[Any, dict]:
    """Read an image like :func:`read_image` and return ``(array, meta)``.

    ``meta`` holds ``"path"`` (str), ``"dtype"`` (str), ``"shape"``, ``"format"`` ("tiff", "folder",
    "npy", "zarr" or "image"), ``"scale"`` (voxel size per array axis, from ImageJ/OME/resolution
    metadata or zarr attributes; ``None`` when the file does not say) and ``"unit"`` (str or None).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ImageIOError(f"no such file or folder: {path}")
    if _is_zarr_path(path):
        array, scale, unit = _read_zarr(path, lazy=lazy)
        file_format = "zarr"
    elif path.is_dir():
        array, scale, unit = _read_slice_folder(path, lazy=lazy)
        file_format = "folder"
    elif path.suffix.lower() in TIFF_SUFFIXES:
        array, scale, unit = _read_tiff(path, lazy=lazy)
        file_format = "tiff"
    elif path.suffix.lower() == ".npy":
        array, scale, unit = _read_npy(path, lazy=lazy), None, None
        file_format = "npy"
    elif path.suffix.lower() in SLICE_SUFFIXES:
        array, scale, unit = _read_single_picture(path), None, None
        file_format = "image"
    else:
        raise ImageIOError(
            f"cannot read {path.name}: unsupported file type '{path.suffix}' "
            "(use a TIFF stack, a folder of PNG/TIFF slices, a .npy file or a .zarr folder)"
        )
    if array.size == 0:
        raise ImageIOError(f"{path.name} contains an empty image (shape {tuple(array.shape)})")
    if scale is not None and len(scale) != array.ndim:
        scale = None  # metadata that does not fit the array is worse than none
    meta = {
        "path": str(path),
        "dtype": str(array.dtype),
        "shape": tuple(int(s) for s in array.shape),
        "format": file_format,
        "scale": scale,
        "unit": unit,
    }
    return array, meta


def _read_npy(path: Path, *, lazy: bool) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r" if lazy else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ImageIOError(f"cannot read {path.name}: it is not a valid .npy array file ({error})") from error
    if not isinstance(array, np.ndarray):
        raise ImageIOError(f"cannot read {path.name}: it does not hold a single array")
    return array if lazy else _native_byte_order(array)


def _read_single_picture(path: Path) -> np.ndarray:
    """One PNG/JPEG/BMP picture."""
    import imageio.v3 as iio

    try:
        return np.asarray(iio.imread(path))
    except Exception as error:  # imageio/Pillow raise many unrelated types for damaged files
        raise ImageIOError(f"cannot read {path.name}: the picture is damaged or not an image ({error})") from error


# ---- Folder of slices -----------------------------------------------------------------------------


def list_slice_files(folder: str | os.PathLike) -> list[Path]:
    """Image slices in ``folder`` (PNG/TIFF/JPEG/BMP), natural order, hidden files skipped."""
    folder = Path(folder)
    files = [
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in SLICE_SUFFIXES
    ]
    return sorted(files, key=lambda entry: _natural_key(entry.name))


def _read_slice(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        array, _, _ = _read_tiff(path, lazy=False)
        return array
    return _read_single_picture(path)


def _slice_shape(path: Path) -> tuple[int, ...]:
    """Shape of one slice, read from its header only (used for lazy folders)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                return tuple(tif.series[0].shape)
        except Exception as error:
            raise ImageIOError(f"cannot read {path.name}: the TIFF file is corrupt or truncated ({error})") from error
    from PIL import Image

    try:
        with Image.open(path) as picture:
            bands = len(picture.getbands())
            width, height = picture.size
    except Exception as error:
        raise ImageIOError(f"cannot read {path.name}: the picture is damaged or not an image ({error})") from error
    return (height, width) if bands == 1 else (height, width, bands)


def _read_slice_folder(folder: Path, *, lazy: bool) -> tuple[Any, None, None]:
    files = list_slice_files(folder)
    if not files:
        raise ImageIOError(
            f"the folder {folder} contains no image slices (expected .png, .tif, .tiff or .jpg files)"
        )
    if lazy:
        return _lazy_slice_stack(files), None, None
    slices = [_read_slice(file) for file in files]
    _check_same_slice_shapes(files, [s.shape for s in slices], folder)
    return np.stack(slices), None, None


def _check_same_slice_shapes(files: list[Path], shapes: list[tuple], folder: Path) -> None:
    for file, shape in zip(files, shapes):
        if tuple(shape) != tuple(shapes[0]):
            raise ImageIOError(
                f"the slices in {folder} have different sizes: {files[0].name} is {_shape_text(shapes[0])} "
                f"but {file.name} is {_shape_text(shape)}"
            )


def _lazy_slice_stack(files: list[Path]) -> Any:
    import dask
    import dask.array as da

    first = _read_slice(files[0])
    shapes = [first.shape] + [_slice_shape(file) for file in files[1:]]
    _check_same_slice_shapes(files, shapes, files[0].parent)
    chunks = [da.from_array(first, chunks=first.shape)]
    for file in files[1:]:
        delayed_slice = dask.delayed(_read_slice)(file)
        chunks.append(da.from_delayed(delayed_slice, shape=first.shape, dtype=first.dtype))
    return da.stack(chunks)


# ---- zarr -----------------------------------------------------------------------------------------


def _is_zarr_path(path: Path) -> bool:
    if path.suffix.lower() == ".zarr":
        return True
    return path.is_dir() and any((path / marker).exists() for marker in (".zarray", ".zgroup", "zarr.json"))


def _open_zarr_node(path: Path) -> Any:
    import zarr

    try:
        return zarr.open(str(path), mode="r")
    except Exception as error:  # zarr 2 and 3 raise different types for a folder that is not zarr
        raise ImageIOError(f"cannot read {path.name}: it is not a readable zarr array or group ({error})") from error


def _pick_zarr_array(node: Any, path: Path) -> tuple[Any, tuple | None]:
    """The array inside a zarr group, plus the scale an OME-NGFF group gives it."""
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        return node, None
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        dataset = multiscales[0]["datasets"][0]
        scale = next(
            (t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"), None
        )
        return node[dataset["path"]], scale
    names = sorted(node.array_keys())
    if "0" in names:
        return node["0"], None
    if len(names) == 1:
        return node[names[0]], None
    if not names:
        raise ImageIOError(f"the zarr group {path.name} holds no array")
    raise ImageIOError(
        f"the zarr group {path.name} holds several arrays ({', '.join(names)}); open the one you want, "
        f"e.g. {path / names[0]}"
    )


def _read_zarr(path: Path, *, lazy: bool) -> tuple[Any, tuple | None, str | None]:
    node = _open_zarr_node(path)
    array, scale = _pick_zarr_array(node, path)
    attrs = dict(array.attrs)
    if scale is None:
        scale = attrs.get("scale")
    scale = tuple(float(v) for v in scale) if scale is not None else None
    if lazy:
        import dask.array as da

        return da.from_zarr(array), scale, attrs.get("unit")
    try:
        data = np.asarray(array[...])
    except MemoryError:
        raise ImageIOError(f"{path.name} does not fit in memory; open it lazily instead") from None
    except Exception as error:
        raise ImageIOError(f"cannot read {path.name}: the zarr data are damaged ({error})") from error
    return _native_byte_order(data), scale, attrs.get("unit")
