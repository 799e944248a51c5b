"""Reading images through the dispatch: folders of slices, .npy, zarr, single pictures, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from napari_unet import io
from napari_unet.io import ImageIOError


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


def test_folder_of_tiff_slices(tmp_path, make_stack):
    folder = tmp_path / "tifs"
    folder.mkdir()
    planes = [make_stack(shape=(6, 7), dtype=np.uint16, seed=i) for i in range(3)]
    for index, plane in enumerate(planes):
        tifffile.imwrite(folder / f"z{index}.tif", plane)
    np.testing.assert_array_equal(io.read_image(folder), np.stack(planes))


def test_npy_eager_and_memory_mapped(tmp_path, make_stack):
    stack = make_stack(dtype=np.float32)
    np.save(tmp_path / "stack.npy", stack)
    eager = io.read_image(tmp_path / "stack.npy")
    lazy = io.read_image(tmp_path / "stack.npy", lazy=True)
    assert isinstance(eager, np.ndarray) and not isinstance(eager, np.memmap)
    assert isinstance(lazy, np.memmap)
    np.testing.assert_array_equal(eager, stack)
    np.testing.assert_array_equal(np.asarray(lazy), stack)


def test_zarr_array_eager_and_lazy(tmp_path, make_stack):
    stack = make_stack(dtype=np.uint16)
    target = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=stack.shape, chunks=(1, 8, 8), dtype=stack.dtype)
    target[...] = stack
    eager = io.read_image(tmp_path / "a.zarr")
    lazy = io.read_image(tmp_path / "a.zarr", lazy=True)
    assert isinstance(eager, np.ndarray)
    assert type(lazy).__module__.startswith("dask")
    np.testing.assert_array_equal(eager, stack)
    np.testing.assert_array_equal(lazy.compute(), stack)


def test_zarr_group_with_array_zero(tmp_path, make_stack):
    stack = make_stack()
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


def test_single_png_picture(tmp_path, make_stack):
    picture = make_stack(shape=(9, 11))
    Image.fromarray(picture).save(tmp_path / "one.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "one.png"), picture)


def test_real_isbimake_stack(shared_data, make_stack):
    folder = shared_data / "isbi2012"
    image, meta = io.read_image_with_metadata(folder / "train-volume.tif")
    labels = io.read_labels(folder / "train-labels.tif")
    assert image.shape == (24, 512, 512) and image.dtype == np.uint8
    assert meta["scale"] is None  # the file carries no calibration
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, 1}
    assert labels.mean() == pytest.approx(0.775, abs=0.005)
    io.check_pair(image.shape, labels.shape)


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


def test_unsupported_file_type(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(ImageIOError, match="unsupported file type '.docx'"):
        io.read_image(tmp_path / "notes.docx")
