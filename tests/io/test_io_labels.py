"""The label conventions: class maps, refused values, sparse scribbles, image/labels pairs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet import io
from napari_unet.io import ImageIOError


def test_label_conventions():
    binary = np.array([[0, 255], [255, 255]], np.uint8)
    np.testing.assert_array_equal(io.labels_to_classes(binary), [[0, 1], [1, 1]])
    classes = np.array([[0, 1], [2, 1]], np.int32)
    converted = io.labels_to_classes(classes)
    assert converted.dtype == np.uint8
    np.testing.assert_array_equal(converted, classes)
    np.testing.assert_array_equal(io.labels_to_classes(np.array([[0.0, 1.0]])), [[0, 1]])
    np.testing.assert_array_equal(io.labels_to_classes(np.array([[True, False]])), [[1, 0]])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0, 7, 200], r"values \{0, 7, 200\}.*object ids"),
        ([0, -1, 1], "negative values are not allowed"),
        ([0.0, 0.5, 1.0], r"fractional values \(0.5\)"),
    ],
)
def test_odd_labels_are_refused(values, message):
    with pytest.raises(ImageIOError, match=message):
        io.labels_to_classes(np.array(values))


def test_read_labels_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "ids.tif", np.array([[0, 7], [200, 7]], np.uint8))
    with pytest.raises(ImageIOError, match="ids.tif"):
        io.read_labels(tmp_path / "ids.tif")


def test_sparse_scribbles_to_targets():
    scribbles = np.array([[0, 1], [2, 0]], np.int32)
    classes, weights = io.sparse_labels_to_targets(scribbles)
    np.testing.assert_array_equal(classes, [[0, 0], [1, 0]])
    np.testing.assert_array_equal(weights, [[0, 1], [1, 0]])
    assert weights.dtype == np.float32
    with pytest.raises(ImageIOError, match="leave unlabelled pixels at 0"):
        io.sparse_labels_to_targets(np.array([0, -3]))


def test_check_pair():
    io.check_pair((24, 512, 512), (24, 512, 512))
    io.check_pair((24, 2, 512, 512), (24, 512, 512))  # (Z, C, Y, X) stack
    io.check_pair(np.zeros((2, 4, 8, 8)), np.zeros((4, 8, 8)))  # (C, Z, Y, X) volume
    with pytest.raises(ImageIOError, match="images are 24x512x512 but labels are 24x512x500"):
        io.check_pair((24, 512, 512), (24, 512, 500))
    with pytest.raises(ImageIOError, match="images are 2x8x8 but labels are 3x8x8"):
        io.check_pair((2, 8, 8), (3, 8, 8), channel_axis=None)
