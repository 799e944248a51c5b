"""Reading, checking, normalising and writing images and label maps.

One module per job: :mod:`.readers` (TIFF stacks via :mod:`.tiff_reader`, folders of slices, ``.npy``,
zarr, with their metadata), :mod:`.checks` (can an image be segmented as it is), :mod:`.labels` (the
label conventions), :mod:`.normalization` and :mod:`.writers`. Callers import from here
(``from napari_unet import io``); the names below are the package's public interface.
"""

from ._common import ImageIOError
from .checks import check_image, looks_like_rgb, rgb_to_grayscale
from .labels import (
    MAX_CLASSES,
    check_pair,
    labels_to_classes,
    read_labels,
    sparse_labels_to_targets,
)
from .normalization import (
    DEFAULT_NORMALIZATION,
    MAX_NORMALIZATION_SAMPLES,
    NORMALIZATION_METHODS,
    apply_normalization,
    compute_normalization,
)
from .readers import (
    SLICE_SUFFIXES,
    TIFF_SUFFIXES,
    list_slice_files,
    read_image,
    read_image_with_metadata,
)
from .writers import (
    WRITE_SUFFIXES,
    default_chunks,
    open_zarr_output,
    write_image,
    write_labels,
)

__all__ = [
    "DEFAULT_NORMALIZATION",
    "MAX_CLASSES",
    "MAX_NORMALIZATION_SAMPLES",
    "NORMALIZATION_METHODS",
    "SLICE_SUFFIXES",
    "TIFF_SUFFIXES",
    "WRITE_SUFFIXES",
    "ImageIOError",
    "apply_normalization",
    "check_image",
    "check_pair",
    "compute_normalization",
    "default_chunks",
    "labels_to_classes",
    "list_slice_files",
    "looks_like_rgb",
    "open_zarr_output",
    "read_image",
    "read_image_with_metadata",
    "read_labels",
    "rgb_to_grayscale",
    "sparse_labels_to_targets",
    "write_image",
    "write_labels",
]
