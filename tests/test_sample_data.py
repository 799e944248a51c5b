"""Offline sample data (napari_unet._sample_data): made by the project's code, small, and loadable."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet import _sample_data as samples


@pytest.fixture(scope="module")
def generated():
    return {
        "em_membranes": samples.make_em_membranes(),
        "organelles_3d": samples.make_organelles_3d(),
    }


@pytest.mark.parametrize("kind, files", [("em_membranes", samples.EM_FILES),
                                         ("organelles_3d", samples.ORGANELLES_FILES)])
def test_committed_files_are_what_the_generator_makes(generated, kind, files):
    image, labels = generated[kind]
    stored_image = tifffile.imread(samples.SAMPLE_DIR / files[0])
    stored_labels = tifffile.imread(samples.SAMPLE_DIR / files[1])
    np.testing.assert_array_equal(stored_labels, labels)
    assert stored_image.shape == image.shape and stored_image.dtype == np.uint8
    # floating point may round a pixel differently on another machine, never more than by one
    difference = np.abs(stored_image.astype(np.int16) - image.astype(np.int16))
    assert difference.max() <= 1 and np.mean(difference > 0) < 1e-3


def test_sample_files_are_small():
    total = sum(f.stat().st_size for f in samples.SAMPLE_DIR.glob("*.tif"))
    assert 0 < total < 4e6


def test_em_membranes_look_like_isbi(generated):
    image, labels = generated["em_membranes"]
    assert image.shape == samples.EM_SHAPE and image.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}
    assert 0.55 < labels.mean() < 0.85  # mostly cell interior, a web of membranes
    assert image[labels == 0].mean() < image[labels == 1].mean() - 40  # membranes are dark
    # serial sections: neighbouring slices look alike, far ones less so
    near = np.mean(labels[0] == labels[1])
    far = np.mean(labels[0] == labels[-1])
    assert near > far


def test_organelles_are_bright_blobs_in_3d(generated):
    from scipy import ndimage

    image, labels = generated["organelles_3d"]
    assert image.shape == samples.ORGANELLES_SHAPE
    assert set(np.unique(labels)) == {0, 1}
    assert 0.05 < labels.mean() < 0.35
    _, n_blobs = ndimage.label(labels)
    assert n_blobs >= 8
    assert image[labels == 1].mean() > image[labels == 0].mean() + 15


def test_generators_are_deterministic_and_seeded():
    first = samples.make_em_membranes(shape=(2, 64, 64), seed=5)
    again = samples.make_em_membranes(shape=(2, 64, 64), seed=5)
    other = samples.make_em_membranes(shape=(2, 64, 64), seed=6)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_contributions_give_image_and_ground_truth_with_scale():
    (image, image_kwargs, image_type), (labels, labels_kwargs, labels_type) = samples.em_membranes()
    assert (image_type, labels_type) == ("image", "labels")
    assert image_kwargs["name"] == "EM membranes"
    assert image_kwargs["scale"] == labels_kwargs["scale"] == samples.EM_SCALE
    assert image.shape == labels.shape == samples.EM_SHAPE
    volume, kwargs, _ = samples.organelles_3d()[0]
    assert volume.shape == samples.ORGANELLES_SHAPE and kwargs["scale"] == samples.ORGANELLES_SCALE


def test_missing_files_are_generated_on_the_fly(tmp_path, generated):
    image, labels = samples.load_sample("em_membranes", directory=tmp_path)
    np.testing.assert_array_equal(labels, generated["em_membranes"][1])
    with pytest.raises(ValueError, match="unknown sample"):
        samples.load_sample("nothing")


def test_script_writes_the_same_files(tmp_path):
    import runpy
    import sys

    script = samples.SAMPLE_DIR.parent / "scripts" / "make_sample_data.py"
    argv = sys.argv
    sys.argv = [str(script), "--out", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0
    for name in samples.EM_FILES + samples.ORGANELLES_FILES:
        np.testing.assert_array_equal(tifffile.imread(tmp_path / name),
                                      tifffile.imread(samples.SAMPLE_DIR / name))
