"""Tests for napari_unet.metrics: hand-computed scores, skimage wrappers, ISBI-like instances."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from skimage import metrics as skimage_metrics

from napari_unet.metrics import (
    adapted_rand_error,
    confusion_matrix,
    dice_per_class,
    evaluate_segmentation,
    instances_from_classes,
    iou_per_class,
    mean_dice,
    mean_iou,
    pixel_error,
    variation_of_information,
)

# 8 pixels, 3 classes.
#   target: 0 0 0 1 1 1 2 2
#   pred:   0 0 1 1 1 2 2 0
PRED = np.array([[0, 0, 1, 1], [1, 2, 2, 0]])
TARGET = np.array([[0, 0, 0, 1], [1, 1, 2, 2]])
# Per class: TP, FP, FN -> class 0: 2, 1, 1; class 1: 2, 1, 1; class 2: 1, 1, 1.
EXPECTED_DICE = [4 / 6, 4 / 6, 2 / 4]
EXPECTED_IOU = [2 / 4, 2 / 4, 1 / 3]


def test_confusion_matrix_counts_target_rows_and_prediction_columns():
    expected = np.array([[2, 1, 0], [0, 2, 1], [1, 0, 1]])
    np.testing.assert_array_equal(confusion_matrix(PRED, TARGET, 3), expected)


def test_dice_and_iou_per_class_match_hand_counts():
    np.testing.assert_allclose(dice_per_class(PRED, TARGET, 3), EXPECTED_DICE)
    np.testing.assert_allclose(iou_per_class(PRED, TARGET, 3), EXPECTED_IOU)
    assert mean_dice(PRED, TARGET, 3) == pytest.approx(sum(EXPECTED_DICE) / 3)
    assert mean_iou(PRED, TARGET, 3) == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert isinstance(mean_dice(PRED, TARGET, 3), float)


def test_weighted_scores_ignore_zero_weight_pixels():
    # Ignore pixels 2 and 5 (both wrong) and count pixel 6 twice.
    weight = np.array([[1, 1, 0, 1], [1, 0, 2, 1]], dtype=float)
    # class 0: TP 2, FP 1 (pixel 7), FN 0; class 1: TP 2, FP 0, FN 0; class 2: TP 2, FP 0, FN 1.
    np.testing.assert_allclose(dice_per_class(PRED, TARGET, 3, weight), [4 / 5, 1.0, 4 / 5])
    np.testing.assert_allclose(iou_per_class(PRED, TARGET, 3, weight), [2 / 3, 1.0, 2 / 3])
    assert pixel_error(PRED, TARGET, weight) == pytest.approx(1 / 7)
    assert pixel_error(PRED, TARGET) == pytest.approx(3 / 8)


def test_absent_classes_score_one_and_all_ignored_is_perfect():
    pred = np.array([0, 1, 1, 0])
    target = np.array([0, 1, 0, 0])
    # Class 2 appears in neither: Dice 1.0 and it counts in the mean.
    np.testing.assert_allclose(dice_per_class(pred, target, 3), [4 / 5, 2 / 3, 1.0])
    assert mean_dice(pred, target, 3) == pytest.approx((4 / 5 + 2 / 3 + 1) / 3)
    zero = np.zeros(4)
    np.testing.assert_allclose(dice_per_class(pred, target, 2, zero), [1.0, 1.0])
    assert pixel_error(pred, target, zero) == 0.0


def test_torch_tensors_bools_and_integral_floats_are_accepted():
    expected = dice_per_class(PRED, TARGET, 3)
    np.testing.assert_allclose(dice_per_class(torch.from_numpy(PRED), torch.from_numpy(TARGET), 3), expected)
    np.testing.assert_allclose(dice_per_class(PRED.astype(np.float32), TARGET, 3), expected)
    assert mean_iou(np.array([True, False]), np.array([1, 0]), 2) == 1.0


def test_bad_input_raises_plain_errors():
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(8,\)"):
        dice_per_class(PRED, TARGET.ravel(), 3)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(8,\)"):
        pixel_error(PRED, TARGET.ravel())
    with pytest.raises(ValueError, match="0..1"):
        dice_per_class(PRED, TARGET, 2)
    with pytest.raises(ValueError, match="class range"):
        iou_per_class(PRED - 1, TARGET, 3)
    with pytest.raises(ValueError, match="integer"):
        mean_dice(PRED + 0.5, TARGET, 3)
    with pytest.raises(ValueError, match="weight shape"):
        mean_dice(PRED, TARGET, 3, np.ones(3))
    with pytest.raises(ValueError, match="negative"):
        mean_dice(PRED, TARGET, 3, -np.ones(PRED.shape))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        adapted_rand_error(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_dice_per_class_is_fast_on_large_arrays():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=(8, 512, 512))
    target = rng.integers(0, 3, size=(8, 512, 512))
    scores = dice_per_class(pred, target, 3)
    # Independent uniform maps: every class has Dice close to 1/3.
    np.testing.assert_allclose(scores, 1 / 3, atol=0.01)


def _isbi_like_class_map() -> np.ndarray:
    """Three cells (class 1) separated by one-pixel membranes (class 0), including a diagonal-free cross."""
    class_map = np.ones((9, 9), np.uint8)
    class_map[4, :] = 0
    class_map[:4, 4] = 0
    class_map[0, :] = 0
    return class_map


def test_instances_from_classes_finds_cells_separated_by_membranes():
    class_map = _isbi_like_class_map()
    labels = instances_from_classes(class_map)
    assert labels.max() == 3
    assert np.all((labels > 0) == (class_map == 1))
    assert len(np.unique(labels[1:4, 0:4])) == 1 and len(np.unique(labels[5:, :])) == 1
    assert labels[1, 0] != labels[1, 5] and labels[1, 0] != labels[6, 0]
    # Cells touching only at a corner stay separate (face connectivity).
    diagonal = np.array([[1, 0], [0, 1]])
    assert instances_from_classes(diagonal).max() == 2
    # Another foreground class and per-slice labelling of a stack keep ids unique.
    assert instances_from_classes(class_map * 2, foreground_class=2).max() == 3
    stack = np.stack([class_map, class_map])
    per_slice = instances_from_classes(stack, per_slice=True)
    assert per_slice.max() == 6 and instances_from_classes(stack).max() == 3


def test_skimage_wrappers_match_skimage_and_order_split_merge():
    rng = np.random.default_rng(1)
    true_instances = rng.integers(0, 5, size=(20, 20))
    pred_instances = rng.integers(0, 7, size=(20, 20))
    expected_are = skimage_metrics.adapted_rand_error(true_instances, pred_instances)[0]
    assert adapted_rand_error(pred_instances, true_instances) == pytest.approx(expected_are)
    expected_vi = skimage_metrics.variation_of_information(true_instances, pred_instances, ignore_labels=(0,))
    assert variation_of_information(pred_instances, true_instances) == pytest.approx(tuple(expected_vi))
    no_ignore = skimage_metrics.variation_of_information(true_instances, pred_instances)
    assert variation_of_information(pred_instances, true_instances, ignore_labels=()) == pytest.approx(
        tuple(no_ignore)
    )

    truth = np.array([[1, 1, 2, 2]])
    split_one = np.array([[1, 3, 2, 2]])  # cell 1 cut in two: split error only
    split, merge = variation_of_information(split_one, truth)
    assert split == pytest.approx(0.5) and merge == 0.0  # half the pixels need 1 bit
    merged = np.array([[1, 1, 1, 1]])
    split, merge = variation_of_information(merged, truth)
    assert split == 0.0 and merge == pytest.approx(1.0)
    assert adapted_rand_error(truth, truth) == 0.0
    assert adapted_rand_error(merged, np.zeros((1, 4), int)) == 0.0  # nothing scored


def test_evaluate_segmentation_returns_json_ready_floats():
    class_map = _isbi_like_class_map()
    prediction = class_map.copy()
    prediction[4, 0:2] = 1  # a leak through the membrane merges two cells
    results = evaluate_segmentation(prediction, class_map)
    assert json.loads(json.dumps(results)) == results
    wrong = 2
    assert results["pixel_error"] == pytest.approx(wrong / 81)
    n_membrane, n_cell = int((class_map == 0).sum()), int((class_map == 1).sum())
    expected_dice = [2 * (n_membrane - wrong) / (2 * n_membrane - wrong), 2 * n_cell / (2 * n_cell + wrong)]
    assert results["dice_per_class"] == pytest.approx(expected_dice)
    assert results["dice"] == pytest.approx(sum(expected_dice) / 2)
    assert results["iou_per_class"] == pytest.approx(list(iou_per_class(prediction, class_map, 2)))
    assert results["voi_split"] == pytest.approx(0.0, abs=1e-12) and results["voi_merge"] > 0
    assert results["adapted_rand_error"] > 0
    true_instances, pred_instances = instances_from_classes(class_map), instances_from_classes(prediction)
    assert results["adapted_rand_error"] == pytest.approx(adapted_rand_error(pred_instances, true_instances))
    assert set(evaluate_segmentation(prediction, class_map, instances=False)) == {
        "dice", "iou", "pixel_error", "dice_per_class", "iou_per_class"
    }


def test_evaluate_segmentation_weight_and_per_slice_stack():
    class_map = _isbi_like_class_map()
    prediction = class_map.copy()
    prediction[4, 0:2] = 1
    weight = np.ones(class_map.shape)
    weight[4, 0:2] = 0  # the leak is in an unlabelled region: a perfect score
    results = evaluate_segmentation(prediction, class_map, weight=weight)
    assert results["pixel_error"] == 0.0 and results["dice"] == 1.0
    # The ignored pixels are dropped from the instance scores, but the merge itself still counts.
    assert results["voi_merge"] > 0 and not math.isnan(results["adapted_rand_error"])

    stack_truth = np.stack([class_map, class_map])
    stack_pred = np.stack([class_map, prediction])
    per_slice = evaluate_segmentation(stack_pred, stack_truth, per_slice=True)
    single = evaluate_segmentation(prediction, class_map)
    assert per_slice["voi_merge"] == pytest.approx(single["voi_merge"] / 2)
    assert per_slice["adapted_rand_error"] == pytest.approx(single["adapted_rand_error"] / 2)
    with pytest.raises(ValueError, match="stack"):
        evaluate_segmentation(prediction, class_map, per_slice=True)
