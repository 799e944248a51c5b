"""Reading TIFF stacks: refusing damaged files, a lazy dask view, and the voxel size their tags give."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import tifffile

from ._common import ImageIOError, _native_byte_order

# Resolutions written by screen-oriented software (dots per inch); they say nothing about the sample.
_DISPLAY_DPI = {72.0, 96.0, 150.0, 300.0, 600.0}
_MICROMETRES_PER_UNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # TIFF ResolutionUnit values


def _compact_float(value: float) -> float:
    """Round a pixel size to 6 significant digits (TIFF stores it as a fraction)."""
    return float(f"{float(value):.6g}")


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
        except Exception:  # noqa: BLE001 - odd metadata must never stop the image from loading
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
