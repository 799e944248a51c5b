"""Reading, checking, normalising and writing images and label maps.

Formats read by :func:`read_image`:

* multi-page TIFF stacks (one page per slice, as in ISBI 2012) and ImageJ/OME hyperstacks;
* a folder of PNG/TIFF/JPEG slices, sorted naturally (``2.png`` before ``10.png``) and stacked;
* ``.npy`` files (memory-mapped when ``lazy=True``);
* zarr arrays: a ``.zarr`` folder holding an array, or a group holding a single array, an array
  called ``"0"`` or an OME-NGFF multiscale image (its full-resolution level is read).

With ``lazy=True`` TIFF, zarr and folder inputs come back as dask arrays, so volumes bigger than the
memory can be viewed and segmented tile by tile. Pixel types are kept as they are (8/16-bit, float).

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

import contextlib
import logging
import math
import os
import re
import shutil
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

DEFAULT_NORMALIZATION: dict[str, Any] = {"method": "percentile", "low": 1.0, "high": 99.8}
NORMALIZATION_METHODS = ("percentile", "minmax", "none")
MAX_CLASSES = 64
# Percentiles are computed on at most this many values, so huge (lazy) volumes stay cheap.
MAX_NORMALIZATION_SAMPLES = 4_000_000

SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
WRITE_SUFFIXES = (".tif", ".tiff", ".zarr", ".npy")

# Resolutions written by screen-oriented software (dots per inch); they say nothing about the sample.
_DISPLAY_DPI = {72.0, 96.0, 150.0, 300.0, 600.0}
_MICROMETRES_PER_UNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # TIFF ResolutionUnit values


class ImageIOError(ValueError):
    """An image or label file cannot be read, used or written; the message says why in plain words."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    """(24, 512, 512) -> '24x512x512'."""
    return "x".join(str(int(size)) for size in shape)


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders '2.png' before '10.png'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


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


def _compact_float(value: float) -> float:
    """Round a pixel size to 6 significant digits (TIFF stores it as a fraction)."""
    return float(f"{float(value):.6g}")


def _zarr_major_version() -> int:
    import zarr

    return int(zarr.__version__.split(".")[0])


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


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


# ---- TIFF -----------------------------------------------------------------------------------------


def _read_tiff(path: Path, *, lazy: bool) -> tuple[Any, tuple | None, str | None]:
    damaged = f"cannot read {path.name}: the TIFF file is corrupt or truncated"
    try:
        with _tiff_warnings() as warnings, tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageIOError(f"{damaged} (it holds no image)")
            series = tif.series[0]
            _check_tiff_complete(tif, series, warnings, damaged)
            scale, unit = _tiff_scale(tif, series.shape, series.axes)
            array = None if lazy else series.asarray()
            _check_tiff_complete(tif, series, warnings, damaged)
    except ImageIOError:
        raise
    except MemoryError:
        raise ImageIOError(f"{path.name} does not fit in memory; open it lazily instead") from None
    except Exception as error:  # tifffile raises TiffFileError, ValueError, struct.error, ... on damage
        raise ImageIOError(f"{damaged} ({error})") from error
    if lazy:
        array = _lazy_tiff(path)
    else:
        array = _native_byte_order(array)
    return array, scale, unit


# tifffile only logs these when a file is cut short; it then returns fewer pages or zeros.
_TIFF_DAMAGE_WARNINGS = ("invalid page offset", "failed to reshape", "truncat", "corrupt")


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tiff_warnings():
    """Collect tifffile's log warnings while a file is read."""
    logger = logging.getLogger("tifffile")
    collector = _WarningCollector()
    logger.addHandler(collector)
    try:
        yield collector.messages
    finally:
        logger.removeHandler(collector)


def _check_tiff_complete(tif: tifffile.TiffFile, series: Any, warnings: list[str], damaged: str) -> None:
    """Refuse a TIFF that tifffile could only read in part (pages missing or cut off)."""
    for message in warnings:
        if any(hint in message.lower() for hint in _TIFF_DAMAGE_WARNINGS):
            raise ImageIOError(f"{damaged} ({message.split('> ')[-1]})")
    file_size = tif.filehandle.size
    for page in series.pages:
        if page is None:
            continue
        ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts) if count]
        if ends and max(ends) > file_size:
            raise ImageIOError(f"{damaged} (its pixel data end before the file does)")


def _lazy_tiff(path: Path) -> Any:
    """A dask array over the TIFF pages; pages are read only when a chunk is computed."""
    import dask.array as da
    import zarr

    try:
        store = tifffile.imread(path, aszarr=True)
        return da.from_zarr(zarr.open(store, mode="r"))
    except Exception as error:
        raise ImageIOError(f"cannot read {path.name}: the TIFF file is corrupt or truncated ({error})") from error


def _tiff_scale(tif: tifffile.TiffFile, shape: Sequence[int], axes: str) -> tuple[tuple | None, str | None]:
    """Voxel size per axis from (in order) our own JSON metadata, ImageJ, OME or resolution tags."""
    for reader in (_scale_from_shaped, _scale_from_imagej, _scale_from_ome, _scale_from_resolution_tags):
        try:
            found = reader(tif, shape, axes)
        except Exception:  # odd metadata must never stop the image from loading
            found = None
        if found is not None:
            scale, unit = found
            return tuple(_compact_float(v) for v in scale), unit
    return None, None


def _scale_from_shaped(tif, shape, axes):
    if not tif.is_shaped or not tif.shaped_metadata:
        return None
    meta = tif.shaped_metadata[0]
    scale = meta.get("scale")
    if scale is None or len(scale) != len(shape):
        return None
    return [float(v) for v in scale], meta.get("unit")


def _pixel_size_from_tag(page, tag_name: str) -> float | None:
    tag = page.tags.get(tag_name)
    if tag is None:
        return None
    numerator, denominator = tag.value
    if numerator == 0:
        return None
    return denominator / numerator


def _scale_from_imagej(tif, shape, axes):
    if not tif.is_imagej:
        return None
    meta = tif.imagej_metadata or {}
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    size_x = _pixel_size_from_tag(page, "XResolution") or 1.0
    size_y = _pixel_size_from_tag(page, "YResolution") or 1.0
    spacing = float(meta.get("spacing", 1.0))
    unit = meta.get("unit")
    if unit in ("pixel", "pixels"):
        unit = None
    if "spacing" not in meta and size_x == 1.0 and size_y == 1.0 and unit is None:
        return None  # an uncalibrated ImageJ file
    sizes = {"X": size_x, "Y": size_y, "Z": spacing}
    return [sizes.get(axis, 1.0) for axis in axes], unit


def _scale_from_ome(tif, shape, axes):
    if not tif.is_ome or not tif.ome_metadata:
        return None
    root = ElementTree.fromstring(tif.ome_metadata)
    pixels = next((element for element in root.iter() if element.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    sizes = {}
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        if value is not None:
            sizes[axis] = float(value)
    if not sizes:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    return [sizes.get(axis, 1.0) for axis in axes], unit


def _scale_from_resolution_tags(tif, shape, axes):
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    unit_tag = page.tags.get("ResolutionUnit")
    unit_code = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    if unit_code not in _MICROMETRES_PER_UNIT:
        return None  # unit NONE: the numbers are not a physical size
    resolution_x = page.tags.get("XResolution")
    if resolution_x is None:
        return None
    numerator, denominator = resolution_x.value
    if denominator == 0 or (unit_code == 2 and numerator / denominator in _DISPLAY_DPI):
        return None
    size_x = _pixel_size_from_tag(page, "XResolution")
    size_y = _pixel_size_from_tag(page, "YResolution") or size_x
    if size_x is None:
        return None
    factor = _MICROMETRES_PER_UNIT[unit_code]
    sizes = {"X": size_x * factor, "Y": size_y * factor}
    return [sizes.get(axis, 1.0) for axis in axes], "µm"


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


# --------------------------------------------------------------------------------------------------
# Checking images
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def compute_normalization(image: Any, spec: dict | None = DEFAULT_NORMALIZATION) -> dict:
    """Return ``spec`` plus ``"lo"`` and ``"hi"`` computed on ``image``.

    Methods: ``"percentile"`` (``low``/``high`` percentiles, default 1 and 99.8), ``"minmax"`` and
    ``"none"`` (lo=0, hi=1: values unchanged). Big or lazy images are measured on a strided sample of
    at most :data:`MAX_NORMALIZATION_SAMPLES` values, so volumes bigger than memory work.
    """
    spec = dict(DEFAULT_NORMALIZATION if spec is None else spec)
    spec.pop("lo", None)
    spec.pop("hi", None)
    method = spec.get("method", "percentile")
    if method not in NORMALIZATION_METHODS:
        raise ImageIOError(f"unknown normalisation method '{method}'; use one of {', '.join(NORMALIZATION_METHODS)}")
    if method == "none":
        return {**spec, "lo": 0.0, "hi": 1.0}
    values = _strided_sample(image).ravel()
    if values.dtype.kind not in "ui":
        values = values.astype(np.float64, copy=False)
        values = values[np.isfinite(values)]
    if values.size == 0:
        raise ImageIOError("the image has no finite pixel values to normalise")
    if method == "minmax":
        lo, hi = float(values.min()), float(values.max())
    else:
        low, high = float(spec.get("low", 1.0)), float(spec.get("high", 99.8))
        if not 0.0 <= low < high <= 100.0:
            raise ImageIOError(f"normalisation percentiles must satisfy 0 <= low < high <= 100 (got {low}, {high})")
        lo, hi = _percentiles(values, (low, high))
    return {**spec, "lo": lo, "hi": hi}


def _percentiles(values: np.ndarray, percents: Sequence[float]) -> list[float]:
    """``np.percentile`` (linear interpolation) of 1D ``values``. For 8- and 16-bit integers it is
    read off a histogram, about 10x faster: a 2D model's stack is normalised slice by slice."""
    if values.dtype.kind not in "ui" or values.dtype.itemsize > 2:
        return [float(v) for v in np.percentile(values.astype(np.float64, copy=False), percents)]
    lowest = int(values.min())
    cumulative = np.cumsum(np.bincount(values.astype(np.int32) - lowest))
    last = int(cumulative[-1]) - 1  # the sorted values' last index

    def sorted_value(index: int) -> int:  # the value at ``index`` of the sorted values
        return int(np.searchsorted(cumulative, index, side="right")) + lowest

    result = []
    for percent in percents:
        position = percent / 100.0 * last
        below = math.floor(position)
        a, b = sorted_value(below), sorted_value(min(below + 1, last))
        result.append(float(a + (b - a) * (position - below)))
    return result


def _strided_sample(image: Any, max_values: int = MAX_NORMALIZATION_SAMPLES) -> np.ndarray:
    """Every k-th slice / pixel of ``image`` as numpy, at most about ``max_values`` values.

    Striding the largest leading axis first (while keeping >= 16 slices) means a lazy volume reads only
    a few of its slices; the rest of the reduction is spread evenly over the other axes.
    """
    if _is_torch_tensor(image):
        image = image.detach().cpu().numpy()
    shape = tuple(int(s) for s in image.shape)
    size = math.prod(shape)
    if size <= max_values:
        return np.asarray(image[...] if not isinstance(image, np.ndarray) else image)
    steps = [1] * len(shape)
    factor = size / max_values
    if len(shape) >= 3:
        leading = max(range(len(shape) - 2), key=lambda axis: shape[axis])
        steps[leading] = max(1, min(math.ceil(factor), shape[leading] // 16))
        factor /= steps[leading]
    other_axes = [axis for axis in range(len(shape)) if steps[axis] == 1]
    per_axis = math.ceil(factor ** (1.0 / max(1, len(other_axes)))) if factor > 1 else 1
    for axis in other_axes:
        steps[axis] = max(1, min(per_axis, shape[axis]))
    selection = tuple(slice(None, None, step) for step in steps)
    sample = image[selection]
    if _is_dask(sample):
        sample = sample.compute()
    return np.asarray(sample)


def apply_normalization(array: Any, stats: dict) -> Any:
    """``(array - lo) / (hi - lo)`` as float32; constant images (hi == lo) become ``array - lo``.

    Works on numpy (returns numpy), torch tensors (returns a tensor on the same device) and dask arrays
    (returns a lazy dask array); other array-likes (zarr) are read into numpy.
    """
    if "lo" not in stats or "hi" not in stats:
        raise ImageIOError("normalisation stats lack 'lo'/'hi'; compute them with compute_normalization first")
    lo, hi = float(stats["lo"]), float(stats["hi"])
    scale = hi - lo if hi > lo else 1.0  # a constant image must not be divided by zero
    if _is_torch_tensor(array):
        import torch

        return (array.to(torch.float32) - lo) / scale
    if _is_dask(array):
        return (array.astype(np.float32) - np.float32(lo)) / np.float32(scale)
    result = np.array(array, dtype=np.float32, copy=True)
    result -= np.float32(lo)
    result /= np.float32(scale)
    return result


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


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
    if temporary.is_dir() or path.is_dir():
        if path.exists():
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
