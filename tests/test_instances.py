"""Tests for napari_unet.instances: components vs seeded watershed, 2D / 3D / per-slice, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import inference
from napari_unet.instances import (
    METHODS,
    WATERSHED_DEFAULTS,
    InstancesError,
    component_instances,
    instances_from_probabilities,
    instances_slice_by_slice,
    watershed_instances,
)


def two_cells_with_a_gap(size: int = 48, gap: int = 4) -> np.ndarray:
    """Probabilities (2, Y, X): two square cells, the membrane between them has a gap.

    The membrane column is predicted as membrane except for ``gap`` pixels in its middle, where the
    model was unsure (interior probability 0.6, above the 0.5 threshold): the components of the
    thresholded interior run through the gap and merge the cells.
    """
    interior = np.full((size, 2 * size + 1), 0.95, np.float32)
    interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = 0.05, 0.05, 0.05, 0.05  # outer wall
    interior[:, size - 1:size + 2] = 0.05  # the membrane, 3 pixels thick
    middle = size // 2
    interior[middle - gap // 2:middle + gap // 2, size - 1:size + 2] = 0.6  # the gap
    return np.stack([1.0 - interior, interior])


def cells_of(ids: np.ndarray, size: int = 48) -> tuple[set[int], set[int]]:
    """The ids found in the centre of the left and of the right cell."""
    centre = slice(size // 4, 3 * size // 4)
    left = set(np.unique(ids[centre, size // 4:3 * size // 4])) - {0}
    right = set(np.unique(ids[centre, size + size // 4:size + 3 * size // 4])) - {0}
    return left, right


def test_components_merge_through_a_gap_and_watershed_separates():
    probabilities = two_cells_with_a_gap()
    components = instances_from_probabilities(probabilities, "components")
    assert components.max() == 1  # one gap merged the two cells

    ids = watershed_instances(probabilities)
    assert ids.dtype == np.int32 and ids.shape == probabilities.shape[1:]
    left, right = cells_of(ids)
    assert len(left) == len(right) == 1 and left != right
    assert ids.max() == 2  # no over-segmentation of the square cells
    # the split lies on the membrane column, near where the gap was
    boundary_columns = np.flatnonzero((ids[24, :-1] != ids[24, 1:]) & (ids[24, :-1] > 0) & (ids[24, 1:] > 0))
    assert all(44 <= column <= 52 for column in boundary_columns)


def test_watershed_in_3d():
    plane = two_cells_with_a_gap(size=24, gap=2)
    volume = np.repeat(plane[:, None], 24, axis=1)  # (2, Z, Y, X): two boxes side by side
    volume[:, [0, -1]] = np.array([0.95, 0.05], np.float32)[:, None, None, None]  # capped ends
    assert instances_from_probabilities(volume, "components").max() == 1
    ids = watershed_instances(volume)
    assert ids.shape == volume.shape[1:]
    middle = ids[12]
    left, right = cells_of(middle, size=24)
    assert len(left) == len(right) == 1 and left != right
    # in 3D each box is one instance through all its inner planes
    assert set(np.unique(ids[2:22, 12, 6])) == left and set(np.unique(ids[2:22, 12, 30])) == right


def test_per_slice_ids_are_unique_across_the_stack():
    plane = two_cells_with_a_gap(size=24, gap=2)
    stack = np.repeat(plane[:, None], 3, axis=1)  # (2, Z=3, Y, X): a 2D model's prediction
    ids = watershed_instances(stack, per_slice=True)
    per_plane = [set(np.unique(plane_ids)) - {0} for plane_ids in ids]
    assert all(len(found) == 2 for found in per_plane)
    assert not (per_plane[0] & per_plane[1]) and not (per_plane[1] & per_plane[2])
    assert set().union(*per_plane) == set(range(1, 7))

    components = instances_from_probabilities(stack, "components", per_slice=True)
    assert [len(set(np.unique(p)) - {0}) for p in components] == [1, 1, 1]
    assert components.max() == 3
    # labels_to_instances keeps its old behaviour and gains per_slice
    labels = inference.probabilities_to_labels(stack)
    np.testing.assert_array_equal(inference.labels_to_instances(labels, per_slice=True), components)
    assert inference.labels_to_instances(labels).max() == 1  # 3D components join the slices
    # read one slice at a time (what the CLI does on a zarr store): the same ids
    import zarr

    store = zarr.create_array(store={}, shape=stack.shape, chunks=(2, 1, 24, 24), dtype=stack.dtype)
    store[...] = stack
    for method, expected in (("watershed", ids), ("components", components)):
        np.testing.assert_array_equal(instances_slice_by_slice(store, method), expected)
    assert instances_slice_by_slice(store, "none") is None


def test_component_instances_keeps_one_pixel_membranes():
    cells = np.ones((7, 7), np.uint8)
    cells[3, :] = 0
    cells[:, 3] = 0
    assert component_instances(cells).max() == 4


def test_methods_and_empty_input():
    probabilities = two_cells_with_a_gap(size=16)
    assert METHODS == ("none", "components", "watershed")
    assert instances_from_probabilities(probabilities, "none") is None
    # one threshold for both methods: the watershed's seeds follow it unless given their own
    faint = two_cells_with_a_gap() * np.array([1.0, 0.5], np.float32)[:, None, None]  # interior at 0.475
    assert watershed_instances(faint).max() == 0
    assert instances_from_probabilities(faint, "watershed", threshold=0.4).max() == 2
    assert instances_from_probabilities(faint, "watershed", threshold=0.4, seed_threshold=0.5).max() == 0
    no_cells = np.stack([np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32)])
    assert watershed_instances(no_cells).max() == 0
    assert set(WATERSHED_DEFAULTS) == {"seed_threshold", "h", "sigma", "distance_weight", "mask_threshold"}
    # a thin cell with no distance peak of height h still gets a seed: nothing is lost to its neighbours
    thin = np.full((12, 12), 0.05, np.float32)
    thin[5:7, 1:11] = 0.95
    ids = watershed_instances(np.stack([1 - thin, thin]), h=5)
    assert len(set(np.unique(ids[5:7, 1:11])) - {0}) == 1
    # masked: the membrane stays background
    probabilities = two_cells_with_a_gap()
    masked = watershed_instances(probabilities, mask_threshold=0.5)
    assert (masked[probabilities[1] < 0.5] == 0).all() and masked.max() == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: watershed_instances(np.zeros((16, 16), np.float32)), "class axis"),
        (lambda: watershed_instances(np.zeros((1, 16, 16), np.float32)), "class axis"),
        (lambda: watershed_instances(np.zeros((2, 2, 3, 8, 8), np.float32)), "spatial axes"),
        (lambda: watershed_instances(np.zeros((2, 8, 8), np.float32), per_slice=True), "(Z, Y, X)"),
        (lambda: watershed_instances(np.zeros((2, 8, 8), np.uint8)), "floats"),
        (lambda: watershed_instances(np.zeros((2, 8, 8), np.float32), foreground_class=2), "not among"),
        (lambda: watershed_instances(np.zeros((2, 8, 8), np.float32), seed_threshold=1.5), "seed threshold"),
        (lambda: watershed_instances(np.zeros((2, 8, 8), np.float32), h=-1), "negative"),
        (lambda: instances_from_probabilities(np.zeros((2, 8, 8), np.float32), "magic"), "Unknown instance"),
        (lambda: instances_from_probabilities(np.zeros((8, 8), np.float32), "components"), "class axis"),
        (lambda: component_instances(np.zeros((8, 8), np.float32)), "integer class map"),
    ],
)
def test_bad_input_is_one_plain_sentence(call, message):
    with pytest.raises(InstancesError) as info:
        call()
    text = str(info.value)
    assert isinstance(info.value, ValueError) and message in text
    assert "\n" not in text and text.endswith(".")
