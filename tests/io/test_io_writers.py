"""Writing labels and images: round trips, scale metadata, atomic overwrite, errors, zarr outputs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet import io
from napari_unet.io import ImageIOError


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_scale_round_trip_through_write_labels(tmp_path, suffix):
    labels = np.zeros((4, 12, 10), dtype=np.uint8)
    labels[1, 2:5, 3:7] = 1
    written = io.write_labels(tmp_path / f"labels{suffix}", labels, scale=(0.05, 0.004, 0.004))
    array, meta = io.read_image_with_metadata(written)
    np.testing.assert_array_equal(np.asarray(array), labels)
    assert meta["scale"] == pytest.approx((0.05, 0.004, 0.004))
    assert meta["path"] == str(written) and meta["dtype"] == "uint8"


def test_scale_for_spatial_axes_is_padded_for_channel_images(tmp_path, make_stack):
    probabilities = make_stack(shape=(2, 3, 8, 8), dtype=np.float32)
    written = io.write_image(tmp_path / "probs.tif", probabilities, scale=(2.0, 0.5, 0.5))
    array, meta = io.read_image_with_metadata(written)
    np.testing.assert_array_equal(array, probabilities)
    assert meta["scale"] == pytest.approx((1.0, 2.0, 0.5, 0.5))


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".zarr", ".npy"])
def test_write_labels_round_trip(tmp_path, suffix):
    labels = np.random.default_rng(2).integers(0, 3, size=(3, 9, 7)).astype(np.int64)
    written = io.write_labels(tmp_path / f"out{suffix}", labels)
    back = io.read_labels(written)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]  # no temporary left behind


def test_write_labels_overwrites_existing_zarr(tmp_path):
    io.write_labels(tmp_path / "out.zarr", np.ones((2, 4, 4), np.uint8))
    io.write_labels(tmp_path / "out.zarr", np.zeros((3, 5, 5), np.uint8))
    assert io.read_image(tmp_path / "out.zarr").shape == (3, 5, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


def test_write_image_float_probabilities_tiff_is_compressed(tmp_path):
    probabilities = np.zeros((2, 64, 64), np.float32)
    probabilities[:, 10:20, 10:20] = 0.75
    written = io.write_image(tmp_path / "probs.tif", probabilities)
    with tifffile.TiffFile(written) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    np.testing.assert_array_equal(io.read_image(written), probabilities)


def test_write_into_unwritable_place(tmp_path):
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("I am a file, not a folder")
    with pytest.raises(ImageIOError, match=r"cannot write .*a_file.txt/out.tif: "):
        io.write_labels(blocker / "out.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageIOError, match="unsupported file type '.png'"):
        io.write_labels(tmp_path / "out.png", np.zeros((4, 4), np.uint8))


def test_open_zarr_output_streams_tiles(tmp_path):
    output = io.open_zarr_output(tmp_path / "pred.zarr", (2, 3, 16, 16), np.float32, (1, 1, 8, 8), scale=(1, 2, 2))
    output[0, :, :8, :8] = 0.5
    back, meta = io.read_image_with_metadata(tmp_path / "pred.zarr", lazy=True)
    assert back.shape == (2, 3, 16, 16) and back.dtype == np.float32
    assert float(back[0, 1, 3, 3].compute()) == 0.5 and float(back[1, 0, 0, 0].compute()) == 0.0
    assert meta["scale"] == (1.0, 1.0, 2.0, 2.0)
