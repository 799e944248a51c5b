"""The layers the Fine-tune dock reads and adds: raw image data, the confirmed-pixels overlay, the
preview, and the whole image segmented again after fine-tuning.

The overlay and the preview carry ``metadata[ROLE_KEY]`` so that no layer picker offers them as
inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer

from napari_unet._qt.layer_picker import ROLE_KEY
from napari_unet._qt.workers import start_worker

__all__ = [
    "ConfirmedOverlay",
    "PreviewLayer",
    "display",
    "docked_segment_widget",
    "layer_kwargs",
    "raw_image_data",
    "segment_into_layer",
    "source_path",
]


def raw_image_data(layer: Image) -> Any:
    """The full-resolution array behind an image layer (grey if it is RGB)."""
    data = layer.data[0] if layer.multiscale else layer.data
    if getattr(layer, "rgb", False):
        from napari_unet.io import rgb_to_grayscale

        data = rgb_to_grayscale(data)
    return data


def source_path(layer: Layer) -> str:
    """The file the layer was read from ("" if none is known)."""
    path = getattr(getattr(layer, "source", None), "path", None) or layer.metadata.get("napari_unet_source")
    return str(path) if path else ""


def display(layer: Layer, *names: str) -> dict:
    """How a layer is shown, as plain data for a session's manifest."""
    shown = {"name": layer.name}
    for name in ("scale", "translate", "opacity", *names):
        value = getattr(layer, name, None)
        if name == "colormap":
            value = getattr(value, "name", value)
        shown[name] = value.tolist() if hasattr(value, "tolist") else (list(value) if isinstance(value, tuple) else value)
    return shown


def layer_kwargs(shown: dict, ndims: tuple[int, ...], *names: str) -> dict:
    """Keyword arguments for add_image/add_labels from :func:`display`'s dict (what fits ``ndims``)."""
    kwargs = {}
    for name in ("scale", "translate"):
        value = shown.get(name)
        if isinstance(value, list) and len(value) in ndims:
            kwargs[name] = value
    for name in ("opacity", *names):
        if shown.get(name) is not None:
            kwargs[name] = shown[name]
    return kwargs


class ConfirmedOverlay:
    """A yellow image layer over the labels showing the pixels the loss will see."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.layer: Image | None = None

    def show(self, mask: np.ndarray, labels: Labels) -> None:
        """Add the overlay of ``mask`` over ``labels``, or update it."""
        data = mask.astype(np.uint8)
        layer = self.layer
        if layer is None or layer not in self.viewer.layers:
            self.layer = self.viewer.add_image(
                data,
                name=f"{labels.name} confirmed",
                colormap="yellow",
                blending="additive",
                opacity=0.35,
                contrast_limits=(0, 1),
                scale=labels.scale,
                translate=labels.translate,
                metadata={ROLE_KEY: "confirmed"},
            )
        else:
            layer.data = data

    def remove(self) -> None:
        layer, self.layer = self.layer, None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)


class PreviewLayer:
    """A half-transparent labels layer showing the current weights' prediction of the region in view."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.layer: Labels | None = None

    def ensure(self, shape: tuple[int, ...], image_name: str, labels: Labels) -> Labels:
        """The preview layer for labels of ``shape`` (a new, empty one if the shape changed)."""
        layer = self.layer
        if layer is None or layer not in self.viewer.layers or tuple(layer.data.shape) != shape:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_labels(
                np.zeros(shape, np.uint8),
                name=f"{image_name} preview",
                scale=labels.scale,
                translate=labels.translate,
                opacity=0.5,
                metadata={ROLE_KEY: "preview"},
            )
            self.layer = layer
        return layer

    @property
    def shown(self) -> bool:
        return self.layer is not None and self.layer in self.viewer.layers

    def show(self, region: tuple, labels: np.ndarray) -> None:
        """Write a predicted region into the layer."""
        self.layer.data[region] = labels
        self.layer.refresh()


def docked_segment_widget(viewer):
    """The Segment dock of ``viewer``, if one is docked (None otherwise)."""
    try:
        from napari_unet._qt.segment_widget import SegmentWidget
    except ImportError:
        return None
    from qtpy.QtWidgets import QWidget

    window = getattr(viewer, "window", None)
    widgets = getattr(window, "dock_widgets", None) if window is not None else None
    for widget in (widgets or {}).values():
        inner = getattr(widget, "native", widget)
        if isinstance(inner, SegmentWidget):
            return inner
        if isinstance(inner, QWidget):
            found = inner.findChildren(SegmentWidget)
            if found:
                return found[0]
    return None


def segment_into_layer(viewer, model, image_layer: Image, labels_layer: Labels, device: str) -> None:
    """Predict the whole image in a worker into the labels layer "<image> fine-tuned labels"."""
    image = raw_image_data(image_layer)

    def job():
        from napari_unet.inference import predict, probabilities_to_labels

        return probabilities_to_labels(predict(model, image, device=device))

    def show(labels: np.ndarray) -> None:
        name = f"{image_layer.name} fine-tuned labels"
        if name in viewer.layers:
            viewer.layers[name].data = labels
        else:
            viewer.add_labels(labels, name=name, scale=labels_layer.scale, translate=labels_layer.translate)

    start_worker(job, on_return=show, description="Segmenting with the fine-tuned model", device=device)
