"""The npe2 reader and writer (napari_unet._reader / _writer): formats, labels vs image, scale, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet import io as image_io
from napari_unet._reader import get_reader, is_label_map, read_layers
from napari_unet._writer import write_labels


def read_one(path):
    reader = get_reader(str(path))
    assert reader is not None, f"no reader for {path}"
    (layer_data,) = reader(str(path))
    return layer_data


@pytest.fixture
def em_stack():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, 40, 48), dtype=np.uint8)


def test_tiff_stack_opens_as_image_with_its_voxel_size(tmp_path, em_stack):
    path = image_io.write_image(tmp_path / "stack.tif", em_stack, scale=(50.0, 4.0, 4.0), unit="nm")
    data, kwargs, layer_type = read_one(path)
    assert layer_type == "image"
    assert kwargs["name"] == "stack"
    assert kwargs["scale"] == (50.0, 4.0, 4.0)
    assert kwargs["units"] == "nm"
    np.testing.assert_array_equal(np.asarray(data), em_stack)


def test_uncalibrated_file_has_no_scale(tmp_path, em_stack):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, em_stack)
    _, kwargs, _ = read_one(path)
    assert "scale" not in kwargs


@pytest.mark.parametrize("name", ["train-labels.tif", "cell_mask.tif", "GT_stack.tif", "annotations.tif"])
def test_labels_by_name(tmp_path, name):
    labels = np.random.default_rng(1).integers(0, 60, (3, 20, 20), dtype=np.uint16)  # many ids
    tifffile.imwrite(tmp_path / name, labels)
    data, _, layer_type = read_one(tmp_path / name)
    assert layer_type == "labels"
    np.testing.assert_array_equal(np.asarray(data), labels)  # instance ids are kept as they are


def test_integer_file_with_few_values_is_labels_and_0_255_becomes_0_1(tmp_path):
    mask = np.zeros((3, 20, 20), dtype=np.uint8)
    mask[:, 5:15, 5:15] = 255
    tifffile.imwrite(tmp_path / "isbi_truth.tif", mask)
    data, _, layer_type = read_one(tmp_path / "isbi_truth.tif")
    assert layer_type == "labels"
    np.testing.assert_array_equal(np.asarray(data), mask // 255)


def test_float_and_rich_integer_images_stay_images():
    rng = np.random.default_rng(2)
    assert not is_label_map(rng.random((8, 8)).astype(np.float32), "image")
    assert not is_label_map(rng.integers(0, 256, (32, 32), dtype=np.uint8), "raw")
    assert not is_label_map(rng.random((8, 8)), "mask probabilities")  # fractional: not labels
    assert is_label_map(np.zeros((8, 8), dtype=bool), "whatever")


def test_folder_of_png_slices(tmp_path, em_stack):
    from skimage.io import imsave

    folder = tmp_path / "slices"
    folder.mkdir()
    for i, plane in enumerate(em_stack):
        imsave(folder / f"slice_{i}.png", plane, check_contrast=False)
    (folder / "notes.txt").write_text("not an image")
    data, kwargs, layer_type = read_one(folder)
    assert layer_type == "image" and kwargs["name"] == "slices"
    np.testing.assert_array_equal(np.asarray(data), em_stack)


def test_npy_file(tmp_path, em_stack):
    np.save(tmp_path / "volume.npy", em_stack.astype(np.float32))
    data, kwargs, layer_type = read_one(tmp_path / "volume.npy")
    assert layer_type == "image" and kwargs["name"] == "volume"
    np.testing.assert_array_equal(np.asarray(data), em_stack)


def test_zarr_opens_lazily_with_scale(tmp_path, em_stack):
    import dask.array as da

    path = image_io.write_image(tmp_path / "big.zarr", em_stack, scale=(2.0, 1.0, 1.0))
    data, kwargs, layer_type = read_one(path)
    assert isinstance(data, da.Array)  # nothing read yet: volumes bigger than memory work
    assert layer_type == "image" and kwargs["scale"] == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(data.compute(), em_stack)


def test_rgb_keeps_a_spatial_scale(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb", resolution=(2.0, 2.0),
                     resolutionunit="CENTIMETER")
    data, kwargs, layer_type = read_one(tmp_path / "colour.tif")
    assert layer_type == "image" and data.shape == (30, 40, 3)
    assert len(kwargs.get("scale", (1, 1))) == 2


def test_unsupported_paths_are_declined(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "empty")) is None
    assert get_reader(str(tmp_path / "missing.tif")) is None


def test_several_paths_give_several_layers(tmp_path, em_stack):
    paths = [str(image_io.write_image(tmp_path / f"part{i}.tif", em_stack)) for i in range(2)]
    assert get_reader(paths) is not None
    assert [kwargs["name"] for _, kwargs, _ in read_layers(paths)] == ["part0", "part1"]


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".zarr"])
def test_written_labels_layer_round_trips(tmp_path, suffix):
    from napari.layers import Labels

    classes = np.random.default_rng(4).integers(0, 3, (5, 24, 32), dtype=np.uint8)
    layer = Labels(classes, name="prediction", scale=(50.0, 4.0, 4.0), units="nm")
    data, meta, _ = layer.as_layer_data_tuple()
    (written,) = write_labels(str(tmp_path / f"prediction_labels{suffix}"), data, meta)
    read_data, kwargs, layer_type = read_one(written)
    assert layer_type == "labels"
    np.testing.assert_array_equal(np.asarray(read_data), classes)
    assert kwargs["scale"] == (50.0, 4.0, 4.0)
    assert Labels(np.asarray(read_data), **kwargs).units == layer.units


def test_uncalibrated_labels_are_written_without_inventing_a_scale(tmp_path):
    from napari.layers import Labels

    layer = Labels(np.eye(16, dtype=np.uint8))
    data, meta, _ = layer.as_layer_data_tuple()
    (written,) = write_labels(str(tmp_path / "plain_mask.tif"), data, meta)
    _, kwargs, layer_type = read_one(written)
    assert layer_type == "labels" and "scale" not in kwargs


def test_writer_and_reader_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    classes = np.zeros((3, 16, 16), dtype=np.uint8)
    classes[:, 4:10, 4:10] = 1
    viewer.add_labels(classes, name="corrected", scale=(2.0, 1.0, 1.0))
    path = tmp_path / "corrected.tif"
    written = viewer.layers.save(str(path), selected=False, plugin="napari-unet")
    assert written == [str(path)]
    (layer,) = viewer.open(str(path), plugin="napari-unet")
    assert type(layer).__name__ == "Labels"
    np.testing.assert_array_equal(layer.data, classes)
    np.testing.assert_allclose(layer.scale, (2.0, 1.0, 1.0))


def test_manifest_is_valid_and_declares_everything():
    from pathlib import Path

    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(Path(__file__).parents[1] / "napari_unet" / "napari.yaml")
    assert manifest.name == "napari-unet"
    contributions = manifest.contributions
    assert [w.display_name for w in contributions.widgets] == ["Segment", "Fine-tune", "Correct next"]
    assert {s.key for s in contributions.sample_data} == {"em_membranes", "organelles_3d"}
    assert contributions.readers[0].accepts_directories
    assert set(contributions.writers[0].filename_extensions) == {".tif", ".tiff", ".zarr"}
    assert contributions.writers[0].layer_types == ["labels"]
