"""Segment one image with a model: the job behind the Segment widget, shared with ``napari-unet predict``.

:func:`make_request` checks an image against a model and captures where its channels are, which
part to predict ("current slice only") and the prediction settings in a :class:`SegmentRequest`
(plain arrays and values, nothing of napari). :func:`run_segmentation` crops, converts and
predicts it (through :func:`napari_unet.inference.predict`, which takes the same ``progress`` and
``cancel`` callbacks) and returns a :class:`SegmentResult`. :func:`outputs_from_probabilities`
turns probabilities into the outputs (class map, foreground probability, instances); ``napari-unet
predict`` calls it and :func:`instances_from` too, so both make the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import inference
from . import instances as instances_engine
from . import io as image_io

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "NeedsGrayscale",
    "SegmentRequest",
    "SegmentResult",
    "current_slice_window",
    "instances_from",
    "make_request",
    "model_input",
    "outputs_from_probabilities",
    "run_segmentation",
    "volume_statistics",
]


class NeedsGrayscale(ValueError):
    """An RGB image into a 1-channel model, before the user agreed to convert it."""


@dataclass
class SegmentRequest:
    """One image to segment and how: everything :func:`run_segmentation` needs."""

    name: str  # the image's name, in messages (and the widget's output layer names)
    data: Any  # the whole image (numpy, dask or zarr), possibly a lazy view
    rgb: bool  # the data's last axis holds RGB(A) colours
    to_grayscale: bool  # RGB into a 1-channel model: convert first
    channel_axis: int | None  # input axis holding channels (dropped in the output), if any
    slice_window: tuple[int, int] | None  # (start, stop) along the first spatial axis, or all
    keep_slice: int | None  # index within the window to keep ("current slice only")
    tile: int | None
    overlap: float
    tta: bool
    threshold: float
    instances: str  # "none", "components" or "watershed" (napari_unet.instances.METHODS)
    device: str

    @property
    def z_axis(self) -> int:
        """The input axis that is the first spatial one (slices of a stack, planes of a volume)."""
        return 1 if self.channel_axis == 0 else 0

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Spatial shape of the whole input (the output's shape), channel axis dropped."""
        shape = list(self.data.shape)
        if self.rgb:
            shape = shape[:-1]
        elif self.channel_axis is not None:
            del shape[self.channel_axis]
        return tuple(shape)

    def output_axes(self, values: Sequence[Any], ndim: int) -> tuple:
        """Per-axis values of the input (scale, translate, units) for an ``ndim``-axis output."""
        values = list(values)
        if not self.rgb and self.channel_axis is not None and len(values) > ndim:
            del values[self.channel_axis]
        return tuple(values[-ndim:])


@dataclass
class SegmentResult:
    """The outputs of one segmentation (of the kept slice only, for "current slice only")."""

    probability: np.ndarray | None  # foreground probability (binary) or 1 - P(background) (multi-class)
    labels: np.ndarray  # class map 0..K-1
    instances: np.ndarray | None  # one id per cell (components or watershed), if asked for


# ---------------------------------------------------------------------------------- the request


def make_request(
    model: nn.Module,
    name: str,
    data: Any,
    *,
    rgb: bool = False,
    convert_rgb: bool = False,
    point: Sequence[float] | None = None,
    tile: int | None = None,
    overlap: float = 0.25,
    tta: bool = False,
    threshold: float = 0.5,
    instances: str = "none",
    device: str = "auto",
) -> SegmentRequest:
    """Check ``data`` against ``model`` and capture the settings (cheap: reads no pixels).

    Args:
        rgb: the last axis of ``data`` holds RGB(A) colours.
        convert_rgb: the user agreed that an RGB image goes into a 1-channel model as its
            luminance; without it such an image raises :class:`NeedsGrayscale`.
        point: "current slice only": a position in ``data``'s coordinates (one value per axis);
            only the slice at it is segmented (a 3D model sees slices around it for context).
            Ignored for a single 2D image; None segments everything.

    Raises:
        NeedsGrayscale, ValueError: one plain sentence on why the image does not fit the model.
    """
    dims = int(model.spatial_dims)
    channels = int(model.in_channels)
    to_grayscale = False
    if rgb and channels == 1:
        if not convert_rgb:
            raise NeedsGrayscale(
                f"'{name}' is an RGB image but the model takes 1 channel: "
                "convert it to grayscale (tick 'Convert RGB to grayscale') or load a 3-channel model."
            )
        to_grayscale = True
    elif rgb and channels != 3:
        raise ValueError(f"'{name}' is an RGB image but the model takes {channels} channels.")

    spatial_ndim = data.ndim - (1 if rgb else 0)
    channel_axis = None
    if rgb and channels == 3:
        channel_axis = -1  # moved to where the engine wants it by model_input
    elif not rgb and channels > 1:
        # ARCHITECTURE.md: a 2D model takes (C, Y, X) or (Z, C, Y, X); a 3D model (C, Z, Y, X)
        channel_axis = 0 if (dims == 3 or data.ndim == 3) else 1
        spatial_ndim -= 1
    if dims == 3 and spatial_ndim < 3:
        raise ValueError(
            f"'{name}' is a single 2D image but the model is 3D "
            f"({model.config.get('name', 'a 3D model')}): pick a 2D variant or a 3D volume."
        )
    if spatial_ndim > 3:
        raise ValueError(
            f"'{name}' has {data.ndim} axes {tuple(data.shape)}; napari-unet segments 2D "
            "images, stacks (Z, Y, X) and volumes: take one time point or channel first."
        )
    if instances not in instances_engine.METHODS:
        raise ValueError(f"Unknown instance method {instances!r}: use one of {', '.join(instances_engine.METHODS)}.")

    request = SegmentRequest(
        name=name, data=data, rgb=rgb, to_grayscale=to_grayscale, channel_axis=channel_axis,
        slice_window=None, keep_slice=None, tile=tile, overlap=overlap, tta=tta,
        threshold=threshold, instances=instances, device=device,
    )
    if point is not None and spatial_ndim == 3:
        n_slices = int(data.shape[request.z_axis])
        z = int(np.clip(round(float(point[request.z_axis])), 0, n_slices - 1))
        request.slice_window, request.keep_slice = current_slice_window(model, n_slices, z)
    return request


def current_slice_window(model: nn.Module, n_slices: int, z: int) -> tuple[tuple[int, int], int]:
    """The z range to predict for "current slice only", and the slice to keep within it."""
    if int(model.spatial_dims) == 2:
        return (z, z + 1), 0
    # a 3D model needs context above and below the slice
    half = max(8, 2 ** int(model.config.get("depth", 4)))
    start, stop = max(0, z - half), min(n_slices, z + half + 1)
    return (start, stop), z - start


# ---------------------------------------------------------------------------------- the run


def run_segmentation(
    model: nn.Module,
    request: SegmentRequest,
    *,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    step: Callable[[str], None] | None = None,
) -> SegmentResult:
    """Check, crop and convert the image, predict it and make the outputs.

    Args:
        progress: ``progress(done_tiles, total_tiles)`` during the prediction (as ``predict``'s).
        cancel: checked before every batch of tiles and between the steps; True raises
            :class:`napari_unet.inference.PredictionCancelled`.
        step: told what runs next, in a few words (``"checking the image"``, ``"making labels"``).

    Raises:
        ValueError: a plain sentence on bad input (NaN, an unreadable array, a bad device, ...).
    """
    _tell(step, "checking the image")
    data = model_input(model, request)
    normalization = volume_statistics(model, request)
    _check_cancel(cancel)
    probabilities = inference.predict(
        model, data, tile=request.tile, overlap=request.overlap, tta=request.tta,
        device=request.device, progress=progress, cancel=cancel, normalization=normalization,
    )
    _check_cancel(cancel)
    made = "labels" if request.instances == "none" else f"labels and instances ({request.instances})"
    _tell(step, f"making {made}")
    keep = None if request.keep_slice is None else slice(request.keep_slice, request.keep_slice + 1)
    result = outputs_from_probabilities(
        np.asarray(probabilities), spatial_dims=int(model.spatial_dims), threshold=request.threshold,
        instances=request.instances, keep=keep,
    )
    _check_cancel(cancel)
    return result


def model_input(model: nn.Module, request: SegmentRequest) -> Any:
    """The array ``predict`` gets: the window cropped, checked, RGB converted or channels first."""
    data = request.data
    if request.slice_window is not None:
        start, stop = request.slice_window
        index = [slice(None)] * data.ndim
        index[request.z_axis] = slice(start, stop)
        data = data[tuple(index)]
    image_io.check_image(data, name=f"image '{request.name}'")
    if request.to_grayscale:
        return image_io.rgb_to_grayscale(data)
    if request.channel_axis == -1:
        # RGB into a 3-channel model: colours become the channel axis the engine expects
        channels_first = int(model.spatial_dims) == 3 or data.ndim == 3
        return np.moveaxis(data[..., :3], -1, 0 if channels_first else 1)
    return data


def volume_statistics(model: nn.Module, request: SegmentRequest) -> dict | None:
    """The whole volume's normalisation statistics when a 3D model predicts only a slab of it.

    A 3D model was trained on (and normally predicts) whole volumes, each normalised on its own
    statistics: the slab around the current slice must get the same ones, not its own. A 2D
    model's slice is a whole image already (None: predict measures it).
    """
    if request.slice_window is None or int(model.spatial_dims) != 3:
        return None
    volume = image_io.rgb_to_grayscale(request.data) if request.to_grayscale else request.data
    return inference.volume_statistics(model, volume)


# ---------------------------------------------------------------------------------- the outputs


def outputs_from_probabilities(
    probabilities: np.ndarray,
    *,
    spatial_dims: int,
    threshold: float = 0.5,
    instances: str = "none",
    foreground_probability: bool = True,
    keep: slice | None = None,
) -> SegmentResult:
    """The class map, the foreground probability map and the instances of ``predict``'s probabilities.

    Args:
        probabilities: ``(C, *spatial)``, C >= 2 (``inference.predict``'s output, in memory).
        spatial_dims: the model's (2 or 3): a 2D model's stack gets its instances slice by slice.
        threshold: the binary foreground cut-off (also the watershed's seed threshold).
        instances: ``"none"``, ``"components"`` or ``"watershed"``.
        foreground_probability: also return P(class 1) (binary) or 1 - P(background) (multi-class).
        keep: the part of the first spatial axis to return (the kept slice of a window), or all.
    """
    labels = inference.probabilities_to_labels(probabilities, threshold=threshold)
    probability = None
    if foreground_probability:
        probability = probabilities[1] if probabilities.shape[0] == 2 else 1.0 - probabilities[0]
    if keep is not None:
        labels = labels[keep]
        probability = None if probability is None else probability[keep]
    return SegmentResult(
        probability=None if probability is None else probability.astype(np.float32, copy=False),
        labels=labels,
        instances=instances_from(probabilities, instances, spatial_dims=spatial_dims, threshold=threshold,
                                 keep=keep),
    )


def instances_from(
    probabilities: Any,
    method: str,
    *,
    spatial_dims: int,
    threshold: float = 0.5,
    keep: slice | None = None,
) -> np.ndarray | None:
    """Instance ids by ``method`` (None for ``"none"``) from ``(C, *spatial)`` probabilities.

    A 2D model's stack is labelled slice by slice, as it knows nothing about z, reading one slice
    at a time (a zarr store bigger than memory works); ids stay unique in the stack. A 3D model's
    volume (or slab) is labelled whole and then cropped to ``keep``, so the kept slice's cells are
    cut with their 3D context.
    """
    if method == "none":
        return None
    if spatial_dims == 2 and len(probabilities.shape) == 4:
        window = probabilities if keep is None else probabilities[:, keep]
        return instances_engine.instances_slice_by_slice(window, method, threshold=threshold)
    ids = instances_engine.instances_from_probabilities(np.asarray(probabilities[...]), method, threshold=threshold)
    return ids if keep is None else ids[keep]


def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise inference.PredictionCancelled("segmentation was cancelled")


def _tell(step: Callable[[str], None] | None, text: str) -> None:
    if step is not None:
        step(text)
