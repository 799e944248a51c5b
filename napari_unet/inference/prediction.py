"""``predict``: its options, the device it runs on, and turning its probabilities into labels.

``predict`` checks its options, works out the input's layout, normalisation and tile plan, and runs
the sliding window (:mod:`.sliding_window`, or :mod:`.out_of_core` for dask inputs) on the model's
prediction copy, with the out-of-memory retries of :mod:`.runner`. Afterwards the copy goes back
to the CPU and cached accelerator memory is released, whether the call finished, was cancelled
or failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import devices
from .. import label_offset as offsets
from .layout import _input_layout, _is_dask
from .normalization import _normalization_stats
from .out_of_core import _predict_dask, _prepare_output
from .runner import _lean_model, _run_with_memory_fallback
from .sliding_window import CancelCallback, ProgressCallback, _predict_array
from .tiling import TilePlan, _initial_plan


def predict(
    model: nn.Module,
    image: Any,
    *,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    tta: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    out: Any = None,
    normalization: dict | bool | None = None,
    dtype: str | np.dtype = "float32",
    label_offset: Sequence[float] | None = None,
) -> Any:
    """Predict class probabilities for ``image`` with a sliding window.

    Args:
        model: a 2D or 3D model from ``models.build_model`` (``.spatial_dims``, ``.in_channels``,
            ``.out_channels``; optional ``.normalization`` spec). The model is not moved (its
            prediction copy runs on ``device`` and goes back to the CPU afterwards).
        image: NumPy, zarr or dask array; see the package docstring for accepted layouts.
        tile: tile side (one int for every tiled axis) or per-axis sides ((Y, X) or (Z, Y, X));
            None picks a tile and batch that fit the device's free memory.
        overlap: fraction of the tile shared by neighbouring tiles, in [0, 1).
        blend: ``"gaussian"`` (seamless) or ``"constant"`` (plain average).
        batch_size: tiles per forward pass (None: automatic).
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda[:N]"``, ``"mps"``.
        precision: ``"auto"`` (bf16/fp16 autocast on CUDA; on a CPU bf16 where it has native bf16
            and a quick measurement finds it faster, else fp32), ``"fp32"``, ``"bf16"``, ``"fp16"``.
        tta: average the predictions of all flips of the spatial axes (x, y and, in 3D, z); in 2D
            also of their transposes (the 8 symmetries of a square; 8 views in 2D and in 3D).
        progress: ``progress(done_tiles, total_tiles)``, called after every batch (with a dask
            input: ``progress(done_chunks, total_chunks)`` after every chunk). An out-of-memory
            retry starts counting again.
        cancel: ``cancel()`` is checked before every batch; True raises :class:`PredictionCancelled`.
        out: where to write the result: a zarr array (or any array) of the output shape, or a path
            for a new zarr array. Finished slabs are streamed into it so volumes larger than RAM work.
        normalization: None = the model's spec (``io.DEFAULT_NORMALIZATION`` if it has none) with
            statistics computed on this image (a 2D model: on each of its slices, as in training);
            a dict = that spec, or ready statistics for the whole image when it holds ``lo``/``hi``;
            False = the image is already normalised.
        dtype: ``"float32"`` or ``"float16"``, the returned probabilities' type when ``out`` is None.
            float16 halves the result's memory (tiles are still blended in float32; values to ~5e-4).
        label_offset: pixels per spatial axis to move the probabilities by, to where the training
            annotations sit (``label_offset.py``); None = the model's own ``label_offset`` (none: 0).

    Returns:
        Probabilities ``(n_classes, *spatial)``: a NumPy array of ``dtype``, or ``out`` when given.
        With a dask input and no ``out``, a NumPy array computed over the dask chunks.
    """
    _check_options(overlap, blend, batch_size)
    result_dtype = _result_dtype(dtype)
    layout = _input_layout(image, model)
    stats = _normalization_stats(model, image, normalization)
    offset = (offsets.model_offset(model) if label_offset is None
              else offsets.validate_offset(label_offset, int(model.spatial_dims)))
    torch_device = devices.resolve_device(device)
    plan = _initial_plan(model, layout, tile, batch_size, torch_device)
    n_classes = max(2, int(model.out_channels))
    target = _prepare_output(out, layout.output_shape(n_classes))

    engine = _predict_dask if _is_dask(image) else _predict_array
    lean = _lean_model(model)

    def run(current_plan: TilePlan, current_device: torch.device) -> Any:
        return engine(lean, image, layout, current_plan, stats, overlap, blend, current_device,
                      precision, tta, progress, cancel, target, result_dtype, offset)

    def cpu_plan() -> TilePlan:
        return _initial_plan(model, layout, tile, batch_size, torch.device("cpu"))

    was_training = model.training
    try:
        result = _run_with_memory_fallback(model, run, plan, torch_device, cpu_plan)
    finally:
        model.train(was_training)
        if lean is not model and torch_device.type != "cpu":
            lean.to("cpu")  # no weights of the call stay in accelerator memory
            devices.release_memory(torch_device)
    return result


def probabilities_to_labels(probs: Any, threshold: float = 0.5) -> np.ndarray:
    """Class map from ``predict``'s probabilities ``(C, *spatial)``.

    Two channels (binary model): class 1 where ``probs[1] >= threshold``. More channels: argmax.
    """
    probs = np.asarray(probs)
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise ValueError(
            f"probabilities must have a class axis first with at least 2 classes, got shape {probs.shape}"
        )
    if probs.shape[0] == 2:
        return (probs[1] >= threshold).astype(np.uint8)
    dtype = np.uint8 if probs.shape[0] <= 256 else np.int32
    return np.argmax(probs, axis=0).astype(dtype)


def labels_to_instances(labels: Any, foreground_class: int = 1, *, per_slice: bool = False) -> np.ndarray:
    """Instance labels (1..N, 0 = background) as the connected components of one class.

    For boundary models such as ISBI membranes (class 0 membrane, class 1 interior) the default
    ``foreground_class=1`` gives one instance per cell. Face connectivity keeps cells separated by a
    membrane only one pixel wide apart. ``per_slice=True`` labels a 2D model's (Z, Y, X) stack slice
    by slice. See :mod:`napari_unet.instances` for the seeded watershed, which splits cells that one
    gap in a predicted membrane would merge.
    """
    from ..instances import component_instances

    return component_instances(labels, foreground_class, per_slice=per_slice)


def _result_dtype(dtype: str | np.dtype) -> np.dtype:
    try:
        result = np.dtype(dtype)
    except TypeError:
        result = None
    if result not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    return result


def _check_options(overlap: float, blend: str, batch_size: int | None) -> None:
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
