"""Tests for napari_unet.io: every reader, the label conventions, normalisation and writers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from napari_unet import io
from napari_unet.io import ImageIOError


def _stack(shape=(3, 16, 20), dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


# ---- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_stack_round_trip_keeps_dtype(tmp_path, dtype):
    stack = _stack(dtype=dtype)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    image = io.read_image(tmp_path / "stack.tif")
    assert image.dtype == dtype
    np.testing.assert_array_equal(image, stack)


def test_lazy_tiff_is_dask_and_matches(tmp_path):
    stack = _stack(shape=(5, 16, 20), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    lazy = io.read_image(tmp_path / "stack.tif", lazy=True)
    assert type(lazy).__module__.startswith("dask")
    np.testing.assert_array_equal(lazy[2:4].compute(), stack[2:4])


def test_big_endian_tiff_comes_back_native(tmp_path):
    stack = _stack(dtype=np.uint16)
    tifffile.imwrite(tmp_path / "be.tif", stack, byteorder=">", photometric="minisblack")
    image = io.read_image(tmp_path / "be.tif")
    assert image.dtype.isnative
    np.testing.assert_array_equal(image, stack)


def _write_slices(folder, names, shape=(8, 10)):
    folder.mkdir()
    slices = {}
    for index, name in enumerate(names):
        picture = np.full(shape, index * 10, dtype=np.uint8)
        Image.fromarray(picture).save(folder / name)
        slices[name] = picture
    return slices


def test_folder_of_slices_is_sorted_naturally(tmp_path):
    slices = _write_slices(tmp_path / "slices", ["10.png", "2.png", "1.png"])
    (tmp_path / "slices" / "notes.txt").write_text("not an image")
    (tmp_path / "slices" / ".hidden.png").write_bytes(b"junk")
    stack = io.read_image(tmp_path / "slices")
    assert stack.shape == (3, 8, 10)
    expected = np.stack([slices["1.png"], slices["2.png"], slices["10.png"]])
    np.testing.assert_array_equal(stack, expected)
    lazy = io.read_image(tmp_path / "slices", lazy=True)
    np.testing.assert_array_equal(lazy.compute(), expected)


def test_folder_of_tiff_slices(tmp_path):
    folder = tmp_path / "tifs"
    folder.mkdir()
    planes = [_stack(shape=(6, 7), dtype=np.uint16, seed=i) for i in range(3)]
    for index, plane in enumerate(planes):
        tifffile.imwrite(folder / f"z{index}.tif", plane)
    np.testing.assert_array_equal(io.read_image(folder), np.stack(planes))


def test_npy_eager_and_memory_mapped(tmp_path):
    stack = _stack(dtype=np.float32)
    np.save(tmp_path / "stack.npy", stack)
    eager = io.read_image(tmp_path / "stack.npy")
    lazy = io.read_image(tmp_path / "stack.npy", lazy=True)
    assert isinstance(eager, np.ndarray) and not isinstance(eager, np.memmap)
    assert isinstance(lazy, np.memmap)
    np.testing.assert_array_equal(eager, stack)
    np.testing.assert_array_equal(np.asarray(lazy), stack)


def test_zarr_array_eager_and_lazy(tmp_path):
    stack = _stack(dtype=np.uint16)
    target = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=stack.shape, chunks=(1, 8, 8), dtype=stack.dtype)
    target[...] = stack
    eager = io.read_image(tmp_path / "a.zarr")
    lazy = io.read_image(tmp_path / "a.zarr", lazy=True)
    assert isinstance(eager, np.ndarray)
    assert type(lazy).__module__.startswith("dask")
    np.testing.assert_array_equal(eager, stack)
    np.testing.assert_array_equal(lazy.compute(), stack)


def test_zarr_group_with_array_zero(tmp_path):
    stack = _stack()
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("0", shape=stack.shape, dtype=stack.dtype) if hasattr(group, "create_array") else \
        group.create_dataset("0", shape=stack.shape, dtype=stack.dtype)
    group["0"][...] = stack
    group.create_group("labels")
    np.testing.assert_array_equal(io.read_image(tmp_path / "g.zarr"), stack)


def test_zarr_group_with_several_arrays_is_refused(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    for name in ("raw", "mask"):
        (group.create_array if hasattr(group, "create_array") else group.create_dataset)(
            name, shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(ImageIOError, match="several arrays.*mask, raw"):
        io.read_image(tmp_path / "g.zarr")


def test_single_png_picture(tmp_path):
    picture = _stack(shape=(9, 11))
    Image.fromarray(picture).save(tmp_path / "one.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "one.png"), picture)


# ---- metadata -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_scale_round_trip_through_write_labels(tmp_path, suffix):
    labels = np.zeros((4, 12, 10), dtype=np.uint8)
    labels[1, 2:5, 3:7] = 1
    written = io.write_labels(tmp_path / f"labels{suffix}", labels, scale=(0.05, 0.004, 0.004))
    array, meta = io.read_image_with_metadata(written)
    np.testing.assert_array_equal(np.asarray(array), labels)
    assert meta["scale"] == pytest.approx((0.05, 0.004, 0.004))
    assert meta["path"] == str(written) and meta["dtype"] == "uint8"


def test_scale_for_spatial_axes_is_padded_for_channel_images(tmp_path):
    probabilities = _stack(shape=(2, 3, 8, 8), dtype=np.float32)
    written = io.write_image(tmp_path / "probs.tif", probabilities, scale=(2.0, 0.5, 0.5))
    array, meta = io.read_image_with_metadata(written)
    np.testing.assert_array_equal(array, probabilities)
    assert meta["scale"] == pytest.approx((1.0, 2.0, 0.5, 0.5))


def test_uncalibrated_tiff_has_no_scale(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", _stack(), photometric="minisblack")
    _, meta = io.read_image_with_metadata(tmp_path / "plain.tif")
    assert meta["scale"] is None


def test_scale_from_foreign_imagej_file(tmp_path):
    tifffile.imwrite(tmp_path / "ij.tif", _stack(), imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"})
    _, meta = io.read_image_with_metadata(tmp_path / "ij.tif")
    assert meta["scale"] == pytest.approx((1.5, 0.25, 0.25))
    assert meta["unit"] == "um"


def test_real_isbi_stack(shared_data):
    folder = shared_data / "isbi2012"
    image, meta = io.read_image_with_metadata(folder / "train-volume.tif")
    labels = io.read_labels(folder / "train-labels.tif")
    assert image.shape == (24, 512, 512) and image.dtype == np.uint8
    assert meta["scale"] is None  # the file carries no calibration
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, 1}
    assert labels.mean() == pytest.approx(0.775, abs=0.005)
    io.check_pair(image.shape, labels.shape)


# ---- reading errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImageIOError, match="no such file or folder: .*missing.tif"):
        io.read_image(tmp_path / "missing.tif")


def test_folder_without_slices(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(ImageIOError, match="contains no image slices"):
        io.read_image(tmp_path / "empty")


@pytest.mark.parametrize("lazy", [False, True])
def test_slices_of_different_sizes(tmp_path, lazy):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(folder / "1.png")
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(folder / "2.png")
    with pytest.raises(ImageIOError, match="different sizes: 1.png is 8x10 but 2.png is 8x12"):
        io.read_image(folder, lazy=lazy)


@pytest.mark.parametrize("content", [b"this is not a tiff at all", b"II*\x00" + b"\xff" * 40])
def test_corrupt_tiff(tmp_path, content):
    (tmp_path / "bad.tif").write_bytes(content)
    with pytest.raises(ImageIOError, match="bad.tif.*corrupt or truncated"):
        io.read_image(tmp_path / "bad.tif")


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("lazy", [False, True])
def test_truncated_tiff(tmp_path, compression, lazy):
    tifffile.imwrite(tmp_path / "full.tif", _stack(shape=(6, 64, 64)), photometric="minisblack",
                     compression=compression)
    content = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(content[: len(content) // 2])
    with pytest.raises(ImageIOError, match="cut.tif.*corrupt or truncated"):
        io.read_image(tmp_path / "cut.tif", lazy=lazy)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(ImageIOError, match="unsupported file type '.docx'"):
        io.read_image(tmp_path / "notes.docx")


# ---- checking images ------------------------------------------------------------------------------


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


# ---- labels ---------------------------------------------------------------------------------------


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


# ---- normalisation --------------------------------------------------------------------------------


def test_percentile_normalization_values():
    image = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    stats = io.compute_normalization(image, {"method": "percentile", "low": 1.0, "high": 99.0})
    assert stats["method"] == "percentile" and stats["low"] == 1.0
    assert stats["lo"] == pytest.approx(np.percentile(image, 1.0))
    assert stats["hi"] == pytest.approx(np.percentile(image, 99.0))
    normalised = io.apply_normalization(image, stats)
    assert normalised.dtype == np.float32
    assert normalised.flat[500] == pytest.approx((500 - stats["lo"]) / (stats["hi"] - stats["lo"]), rel=1e-5)


def test_minmax_none_and_default_spec():
    image = np.array([[2.0, 4.0], [6.0, 10.0]], np.float32)
    minmax = io.compute_normalization(image, {"method": "minmax"})
    np.testing.assert_allclose(io.apply_normalization(image, minmax), [[0, 0.25], [0.5, 1]])
    identity = io.compute_normalization(image, {"method": "none"})
    np.testing.assert_array_equal(io.apply_normalization(image, identity), image)
    assert io.compute_normalization(image)["high"] == io.DEFAULT_NORMALIZATION["high"]
    with pytest.raises(ImageIOError, match="unknown normalisation method 'zscore'"):
        io.compute_normalization(image, {"method": "zscore"})


def test_constant_image_does_not_divide_by_zero():
    image = np.full((4, 4), 7, np.uint8)
    stats = io.compute_normalization(image)
    normalised = io.apply_normalization(image, stats)
    assert stats["lo"] == stats["hi"] == 7.0
    assert np.isfinite(normalised).all() and (normalised == 0).all()


def test_normalization_of_torch_tensor_matches_numpy():
    import torch

    image = _stack(shape=(2, 8, 8))
    stats = io.compute_normalization(image)
    from_tensor = io.apply_normalization(torch.from_numpy(image), stats)
    assert isinstance(from_tensor, torch.Tensor) and from_tensor.dtype == torch.float32
    np.testing.assert_allclose(from_tensor.numpy(), io.apply_normalization(image, stats), rtol=1e-6)


def test_big_lazy_image_is_normalised_on_a_subsample(monkeypatch):
    import dask.array as da

    monkeypatch.setattr(io, "MAX_NORMALIZATION_SAMPLES", 20_000)
    rng = np.random.default_rng(1)
    image = rng.normal(100.0, 20.0, size=(40, 64, 64)).astype(np.float32)  # 163,840 values
    full = np.percentile(image, [1.0, 99.8])
    sample = io._strided_sample(image, max_values=20_000)
    assert sample.size <= 20_000 * 1.2
    from_numpy = io.compute_normalization(image)
    from_dask = io.compute_normalization(da.from_array(image, chunks=(1, 64, 64)))
    assert from_dask["lo"] == pytest.approx(from_numpy["lo"])
    assert from_dask["hi"] == pytest.approx(from_numpy["hi"])
    assert from_numpy["lo"] == pytest.approx(full[0], rel=0.05)
    assert from_numpy["hi"] == pytest.approx(full[1], rel=0.05)


# ---- writing --------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int8])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 70)])
def test_integer_percentiles_from_a_histogram_match_numpy(dtype, shape):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(shape[-1])
    image = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    spec = {"method": "percentile", "low": 1.0, "high": 99.8}
    stats = io.compute_normalization(image, spec)
    expected = np.percentile(image.astype(np.float64), [1.0, 99.8])
    np.testing.assert_allclose([stats["lo"], stats["hi"]], expected, rtol=1e-12, atol=1e-9)
    constant = np.full(shape, 7, dtype)
    assert io.compute_normalization(constant, spec)["lo"] == io.compute_normalization(constant, spec)["hi"] == 7.0
