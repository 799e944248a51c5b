"""Reading TIFF stacks: pixel types, lazy reads, byte order, damaged files and scale metadata."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet import io
from napari_unet.io import ImageIOError


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_stack_round_trip_keeps_dtype(tmp_path, dtype, make_stack):
    stack = make_stack(dtype=dtype)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    image = io.read_image(tmp_path / "stack.tif")
    assert image.dtype == dtype
    np.testing.assert_array_equal(image, stack)


def test_lazy_tiff_is_dask_and_matches(tmp_path, make_stack):
    stack = make_stack(shape=(5, 16, 20), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    lazy = io.read_image(tmp_path / "stack.tif", lazy=True)
    assert type(lazy).__module__.startswith("dask")
    np.testing.assert_array_equal(lazy[2:4].compute(), stack[2:4])


def test_big_endian_tiff_comes_back_native(tmp_path, make_stack):
    stack = make_stack(dtype=np.uint16)
    tifffile.imwrite(tmp_path / "be.tif", stack, byteorder=">", photometric="minisblack")
    image = io.read_image(tmp_path / "be.tif")
    assert image.dtype.isnative
    np.testing.assert_array_equal(image, stack)


def test_uncalibrated_tiff_has_no_scale(tmp_path, make_stack):
    tifffile.imwrite(tmp_path / "plain.tif", make_stack(), photometric="minisblack")
    _, meta = io.read_image_with_metadata(tmp_path / "plain.tif")
    assert meta["scale"] is None


def test_scale_from_foreign_imagej_file(tmp_path, make_stack):
    tifffile.imwrite(tmp_path / "ij.tif", make_stack(), imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"})
    _, meta = io.read_image_with_metadata(tmp_path / "ij.tif")
    assert meta["scale"] == pytest.approx((1.5, 0.25, 0.25))
    assert meta["unit"] == "um"


@pytest.mark.parametrize("content", [b"this is not a tiff at all", b"II*\x00" + b"\xff" * 40])
def test_corrupt_tiff(tmp_path, content):
    (tmp_path / "bad.tif").write_bytes(content)
    with pytest.raises(ImageIOError, match="bad.tif.*corrupt or truncated"):
        io.read_image(tmp_path / "bad.tif")


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("lazy", [False, True])
def test_truncated_tiff(tmp_path, compression, lazy, make_stack):
    tifffile.imwrite(tmp_path / "full.tif", make_stack(shape=(6, 64, 64)), photometric="minisblack",
                     compression=compression)
    content = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(content[: len(content) // 2])
    with pytest.raises(ImageIOError, match="cut.tif.*corrupt or truncated"):
        io.read_image(tmp_path / "cut.tif", lazy=lazy)
