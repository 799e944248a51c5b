"""napari writer: a Labels layer to TIFF (``.tif``/``.tiff``) or zarr (``.zarr``), keeping its scale.

The files read back with napari-unet's reader (and :func:`napari_unet.io.read_image_with_metadata`)
with the same values, shape and voxel size.
"""

from __future__ import annotations

from typing import Any

from napari_unet import io as image_io


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Labels layer's ``data`` to ``path``; returns ``[path]`` as napari expects."""
    scale = meta.get("scale")
    if isinstance(data, (list, tuple)):  # multiscale labels: the full-resolution level
        data = data[0]
    unit = _unit_text(meta.get("units"))
    if scale is not None and unit is None and all(float(s) == 1.0 for s in scale):
        scale = None  # an uncalibrated layer: do not invent a voxel size
    written = image_io.write_labels(path, data, scale=scale, unit=unit)
    return [str(written)]


def _unit_text(units: Any) -> str | None:
    """The layer's spatial unit as text ("nm", "micrometer"), None for pixels or mixed units."""
    if units is None:
        return None
    if isinstance(units, (list, tuple)):
        texts = {str(u) for u in units}
        if len(texts) != 1:
            return None
        units = texts.pop()
    text = str(units)
    # ASCII names: ImageJ TIFF descriptions must be ASCII ("micron" is ImageJ's own spelling)
    unit = {"nanometer": "nm", "micrometer": "micron", "µm": "micron", "millimeter": "mm"}.get(text, text)
    return None if unit in ("pixel", "pixels", "") else unit
