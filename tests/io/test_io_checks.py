"""Checking images (NaN/inf, empty, pixel type, axes) and RGB detection."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import io
from napari_unet.io import ImageIOError


def test_check_image_counts_nan_pixels():
    image = np.zeros((4, 8, 8), np.float32)
    image[0, :3, :4] = np.nan
    with pytest.raises(ImageIOError, match="contains 12 NaN pixels; replace them"):
        io.check_image(image)


def test_check_image_other_problems():
    io.check_image(np.zeros((2, 8, 8), np.uint16), expected_ndim=3)
    io.check_image(np.zeros((8, 8), bool))
    with pytest.raises(ImageIOError, match="infinite"):
        io.check_image(np.full((8, 8), np.inf, np.float32))
    with pytest.raises(ImageIOError, match="empty"):
        io.check_image(np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(ImageIOError, match="pixel type complex64"):
        io.check_image(np.zeros((8, 8), np.complex64))
    with pytest.raises(ImageIOError, match="has 3 axes .* but 2 are needed"):
        io.check_image(np.zeros((2, 8, 8)), expected_ndim=2)


def test_check_image_on_lazy_array_uses_a_sample():
    import dask.array as da

    image = np.zeros((4, 8, 8), np.float32)
    image[:, 0, 0] = np.nan
    with pytest.raises(ImageIOError, match="NaN pixels in a sample"):
        io.check_image(da.from_array(image, chunks=(1, 8, 8)))


def test_rgb_detection_and_grayscale():
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    assert io.looks_like_rgb(rgb) and io.looks_like_rgb(np.zeros((2, 5, 6, 4)))
    assert not io.looks_like_rgb(np.zeros((24, 512, 512))) and not io.looks_like_rgb(np.zeros((3, 5, 3)))
    gray = io.rgb_to_grayscale(rgb)
    assert gray.shape == (5, 6) and gray.dtype == np.uint8
    assert int(gray[0, 0]) == round(0.2125 * 200 + 0.7154 * 100)
