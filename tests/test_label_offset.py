"""Tests for napari_unet.label_offset: shifting maps and finding where the labels sit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_unet.label_offset import apply_offset, estimate_offset, model_offset, shift_maps, validate_offset


@pytest.mark.parametrize("offset", [(-0.5, 0.25), (1.0, -0.75), (0.0, 0.5), (-1.0, 0.0)])
def test_shift_maps_matches_scipy_linear_shift_2d(offset):
    maps = np.random.default_rng(0).random((2, 3, 9, 11)).astype(np.float32)
    shifted = shift_maps(torch.from_numpy(maps.copy()), offset).numpy()
    expected = ndi.shift(maps, (0, 0, *offset), order=1, mode="nearest")
    np.testing.assert_allclose(shifted, expected, atol=1e-6)


def test_shift_maps_matches_scipy_linear_shift_3d():
    maps = np.random.default_rng(1).random((1, 2, 5, 6, 7)).astype(np.float32)
    offset = (0.25, -0.5, 0.75)
    shifted = shift_maps(torch.from_numpy(maps.copy()), offset).numpy()
    np.testing.assert_allclose(shifted, ndi.shift(maps, (0, 0, *offset), order=1, mode="nearest"), atol=1e-6)


def test_apply_offset_keeps_probabilities_and_is_a_no_op_at_zero():
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(size=(2, 3, 16, 16)).astype(np.float32))
    probabilities = torch.softmax(logits, dim=1)
    assert apply_offset(probabilities, (0.0, 0.0)) is probabilities
    moved = apply_offset(probabilities, (0.5, -0.25))
    torch.testing.assert_close(moved.sum(dim=1), torch.ones(2, 16, 16))
    # log-probabilities are interpolated: a whole-pixel shift moves the map exactly
    torch.testing.assert_close(apply_offset(probabilities, (1.0, 0.0))[:, :, 1:], probabilities[:, :, :-1],
                               atol=1e-6, rtol=1e-5)
    foreground = torch.sigmoid(logits[:, :1])
    moved = apply_offset(foreground, (0.0, 1.0))
    torch.testing.assert_close(moved[..., 1:], foreground[..., :-1], atol=1e-6, rtol=1e-5)


def _smooth_field(shape, seed=0):
    field = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), 4)
    return (field - field.mean()) / field.std()


def _binary_case(true_offset, slope=8.0, n=3, size=96):
    """Sharp probabilities of a smooth field, and labels of the same field moved by ``true_offset``."""
    field = _smooth_field((n, size, size))
    foreground = 1 / (1 + np.exp(-slope * field))
    probabilities = [torch.from_numpy(np.stack([1 - f, f]).astype(np.float32)) for f in foreground]
    labels = [(ndi.shift(f, true_offset, order=1, mode="nearest") > 0).astype(np.int64) for f in field]
    weights = [np.ones(label.shape, np.float32) for label in labels]
    return probabilities, labels, weights


@pytest.mark.parametrize("true_offset", [(-0.5, 0.25), (0.25, -0.75), (1.0, 0.0)])
def test_estimate_finds_where_the_labels_sit(true_offset):
    probabilities, labels, weights = _binary_case(true_offset)
    assert estimate_offset(probabilities, labels, weights, (0.0, 0.0)) == true_offset


def test_registered_labels_keep_the_current_offset():
    probabilities, labels, weights = _binary_case((0.0, 0.0))
    assert estimate_offset(probabilities, labels, weights, (0.0, 0.0)) == (0.0, 0.0)
    # labels registered to what the model with offset (0.5, 0) predicts: 0.5 stays
    probabilities, labels, weights = _binary_case((0.5, 0.0))
    assert estimate_offset(probabilities, labels, weights, (0.5, 0.0)) == (0.5, 0.0)


def test_too_few_labels_or_one_class_keep_the_current_offset():
    probabilities, labels, weights = _binary_case((-0.5, 0.25))
    sparse = [np.zeros_like(w) for w in weights]
    sparse[0][40:50, 40:50] = 1  # 100 labelled pixels
    assert estimate_offset(probabilities, labels, sparse, (0.25, 0.0)) == (0.25, 0.0)
    one_class = [np.ones_like(label) for label in labels]
    assert estimate_offset(probabilities, one_class, weights, (0.0, 0.0)) == (0.0, 0.0)


def test_estimate_in_3d_and_with_several_classes():
    field = _smooth_field((24, 40, 40), seed=3)
    classes = np.digitize(field, [-0.5, 0.5])  # 3 classes
    logits = np.stack([-(field + 1) ** 2, -field**2, -(field - 1) ** 2]) * 8
    probabilities = torch.softmax(torch.from_numpy(logits.astype(np.float32)), dim=0)
    true_offset = (0.5, -0.25, 0.0)
    moved = np.digitize(ndi.shift(field, true_offset, order=1, mode="nearest"), [-0.5, 0.5])
    assert estimate_offset([probabilities], [moved], [np.ones(moved.shape, np.float32)], (0.0, 0.0, 0.0)) \
        == true_offset
    assert estimate_offset([probabilities], [classes], [np.ones(classes.shape, np.float32)], (0.0,) * 3) \
        == (0.0, 0.0, 0.0)


def test_validate_offset_and_model_offset():
    assert validate_offset([0.5, -0.25], 2) == (0.5, -0.25)
    for bad in ([0.5], [0.5, float("nan")], [2.0, 0.0], "ab", None):
        with pytest.raises(ValueError, match="label_offset"):
            validate_offset(bad, 2)

    class Model:
        spatial_dims = 3

    model = Model()
    assert model_offset(model) == (0.0, 0.0, 0.0)
    model.label_offset = [0.25, 0.0, -1.0]
    assert model_offset(model) == (0.25, 0.0, -1.0)
