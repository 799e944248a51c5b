"""The Segment widget's output layers: a :class:`~napari_unet.segmentation.SegmentResult` shown in the viewer.

Output layers are named after the input (``"<image> probabilities"``, ``"<image> labels"``,
``"<image> instances"``), tagged with :data:`OUTPUT_TAG` (so no picker offers them as inputs),
updated in place on reruns and placed with the input's scale/translate/units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels

from napari_unet._qt.workers import notify_error

if TYPE_CHECKING:
    import napari

    from napari_unet.segmentation import SegmentRequest, SegmentResult

OUTPUT_TAG = "napari_unet_output"  # layer metadata key marking layers the Segment widget created


def show_result(viewer: napari.viewer.Viewer, request: SegmentRequest, result: SegmentResult) -> Image | None:
    """Add or update the output layers (main thread); returns the input layer if it is still there."""
    layer = viewer.layers[request.name] if request.name in viewer.layers else None
    geometry = output_geometry(layer, request, result.labels.ndim)
    outputs = [
        (f"{request.name} probabilities", result.probability, "image"),
        (f"{request.name} labels", result.labels, "labels"),
    ]
    if result.instances is not None:
        outputs.append((f"{request.name} instances", result.instances, "labels"))
    for name, data, kind in outputs:
        _write_output(viewer, name, data, kind, request, geometry)
    return layer


def output_geometry(layer: Image | None, request: SegmentRequest, ndim: int) -> dict[str, tuple]:
    """Scale, translate and units of the output: the input's, minus a channel axis."""
    if layer is None:
        return {"scale": (1.0,) * ndim, "translate": (0.0,) * ndim}
    return {key: request.output_axes(getattr(layer, key), ndim) for key in ("scale", "translate", "units")}


def _write_output(
    viewer: napari.viewer.Viewer, name: str, data: np.ndarray, kind: str, request: SegmentRequest,
    geometry: dict[str, tuple],
) -> None:
    existing = viewer.layers[name] if name in viewer.layers else None
    layer_type = Image if kind == "image" else Labels
    if existing is not None and not isinstance(existing, layer_type):
        notify_error(f"A layer called '{name}' exists and is not a {kind} layer: rename it to keep it.")
        return
    if request.slice_window is not None:
        # a single slice: write it into the existing full-size output (or a new empty one)
        full_shape = request.output_shape
        target = np.asarray(existing.data) if existing is not None else None
        if target is None or target.shape != full_shape or target.dtype != data.dtype:
            target = np.zeros(full_shape, dtype=data.dtype)
        else:
            target = target.copy()
        z = request.slice_window[0] + request.keep_slice
        target[z] = data[0]
        data = target
    if existing is not None:
        # in place: the same layer keeps its place, colours and visibility
        for attribute, value in geometry.items():
            if tuple(getattr(existing, attribute)) != tuple(value):
                setattr(existing, attribute, value)
        existing.data = data
        return
    metadata = {OUTPUT_TAG: True, "source_layer": request.name}
    if kind == "image":
        viewer.add_image(
            data, name=name, **geometry, colormap="magma",
            contrast_limits=(0.0, 1.0), visible=False, metadata=metadata,
        )
    else:
        viewer.add_labels(data, name=name, **geometry, opacity=0.5, metadata=metadata)
