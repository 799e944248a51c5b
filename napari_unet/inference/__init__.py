"""Sliding-window prediction of whole images, stacks and volumes with a UNet.

``predict`` cuts the image into overlapping tiles, runs the model on batches of tiles and blends the
tile probabilities with a Gaussian window (sigma = 1/8 of the tile, as MONAI and nnU-Net do), so tile
seams do not show. It accepts NumPy, zarr and dask arrays:

- A 2D model predicts a 2D image (Y, X), a multi-channel image (C, Y, X) or a stack (Z, Y, X) /
  (Z, C, Y, X) slice by slice, with tiles of several slices batched together.
- A 3D model predicts a volume (Z, Y, X) or (C, Z, Y, X) with 3D tiles.

Output: probabilities ``(n_classes, *spatial)`` with ``n_classes = max(2, out_channels)``. A binary
model (``out_channels == 1``, sigmoid) gives two channels, background ``1 - p`` and class 1 ``p``; a
multi-class model gives its softmax. The result is float32 in memory, or the dtype of ``out=``.

One module per job, in the order a call goes through them:

- :mod:`.prediction`: ``predict`` and its options; ``probabilities_to_labels``, ``labels_to_instances``.
- :mod:`.layout`: where an input's channels and spatial axes are; reading regions of it.
- :mod:`.normalization`: statistics as the trainer measured them (per slice in 2D, per volume in 3D).
- :mod:`.tiling`: tile and batch sizes; tile positions on the model's pooling grid.
- :mod:`.runner`: the model's prediction copy on a device, precision, TTA, out-of-memory retries.
- :mod:`.sliding_window`: the loop over tile batches of a NumPy or zarr input.
- :mod:`.blending`: the Gaussian window and the accumulators that sum weighted tiles into the result.
- :mod:`.out_of_core`: zarr outputs and dask inputs, for data larger than memory.

Callers import from here (``from napari_unet import inference``). Tests that replace a function
patch it in the submodule that looks it up (``inference.runner._run_batch``), not here.
"""

from .blending import gaussian_window
from .layout import _is_dask as _is_dask  # used by uncertainty.py
from .normalization import volume_statistics
from .prediction import labels_to_instances, predict, probabilities_to_labels
from .runner import DeviceFallbackWarning
from .runner import _lean_model as _lean_model  # used by benchmarks/bench_gpu.py
from .runner import _tta_views as _tta_views  # used by uncertainty.py
from .sliding_window import PredictionCancelled
from .tiling import TilePlan, choose_tiling

__all__ = [
    "DeviceFallbackWarning",
    "PredictionCancelled",
    "TilePlan",
    "choose_tiling",
    "gaussian_window",
    "labels_to_instances",
    "predict",
    "probabilities_to_labels",
    "volume_statistics",
]
