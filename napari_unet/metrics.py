"""Segmentation metrics: per-class Dice / IoU, pixel error and instance (EM) metrics.

Inputs are NumPy arrays (torch tensors are converted); results are plain Python
floats or float64 arrays. ``pred`` and ``target`` are integer class maps 0..K-1 of
the same shape; an optional non-negative ``weight`` map of that shape weights each
pixel (0 = ignore, as in the loss convention).

Convention for empty classes: a class absent from both prediction and target (in
the weighted pixels) has nothing to get wrong, so its Dice and IoU are 1.0 and it
counts as such in the means. This keeps every result a finite float (valid JSON).
Likewise the pixel error of an all-ignored input is 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import metrics as skimage_metrics

__all__ = [
    "adapted_rand_error",
    "confusion_matrix",
    "dice_per_class",
    "evaluate_segmentation",
    "instances_from_classes",
    "iou_per_class",
    "mean_dice",
    "mean_iou",
    "pixel_error",
    "variation_of_information",
]


# ---------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------


def _to_numpy(array: Any) -> np.ndarray:
    """NumPy view of ``array``; torch tensors are detached and copied to the CPU."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_same_shape(first: np.ndarray, second: np.ndarray, first_name: str, second_name: str) -> None:
    if first.shape != second.shape:
        raise ValueError(
            f"The {first_name} shape {first.shape} does not match the {second_name} shape {second.shape}."
        )


def _class_map(array: Any, n_classes: int, name: str) -> np.ndarray:
    """Return ``array`` as an integer class map, checking its values lie in 0..n_classes-1."""
    array = _to_numpy(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.array_equal(array, np.round(array)):
            raise ValueError(f"The {name} must be an integer class map.")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(f"The {name} holds values outside the class range 0..{n_classes - 1}.")
    return array


def _weight_map(weight: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if weight is None:
        return None
    weight = _to_numpy(weight).astype(np.float64, copy=False)
    if weight.shape != shape:
        raise ValueError(f"The weight shape {weight.shape} does not match the target shape {shape}.")
    if weight.size and weight.min() < 0:
        raise ValueError("The weight map must not contain negative values.")
    return weight


def _check_n_classes(n_classes: int) -> int:
    if int(n_classes) < 1:
        raise ValueError(f"The number of classes must be at least 1, not {n_classes}.")
    return int(n_classes)


# ---------------------------------------------------------------------------
# Class (semantic) metrics
# ---------------------------------------------------------------------------


def confusion_matrix(pred: Any, target: Any, n_classes: int, weight: Any = None) -> np.ndarray:
    """(K, K) float64 matrix: entry [t, p] = (weighted) number of pixels of class t predicted as p."""
    n_classes = _check_n_classes(n_classes)
    pred_array, target_array = _to_numpy(pred), _to_numpy(target)
    _check_same_shape(pred_array, target_array, "prediction", "target")
    pred_array = _class_map(pred_array, n_classes, "prediction")
    target_array = _class_map(target_array, n_classes, "target")
    weights = _weight_map(weight, target_array.shape)
    # One bincount over target * K + pred: vectorised, cheap enough for every validation step.
    pair_index = target_array.astype(np.intp, copy=False).ravel() * n_classes + pred_array.ravel()
    counts = np.bincount(
        pair_index, weights=None if weights is None else weights.ravel(), minlength=n_classes * n_classes
    )
    return counts.astype(np.float64).reshape(n_classes, n_classes)


def _overlap_scores(confusion: np.ndarray, dice: bool) -> np.ndarray:
    true_positive = np.diag(confusion)
    false_positive = confusion.sum(axis=0) - true_positive
    false_negative = confusion.sum(axis=1) - true_positive
    if dice:
        numerator, denominator = 2 * true_positive, 2 * true_positive + false_positive + false_negative
    else:
        numerator, denominator = true_positive, true_positive + false_positive + false_negative
    scores = np.ones(confusion.shape[0])  # classes absent from both count as perfect
    present = denominator > 0
    scores[present] = numerator[present] / denominator[present]
    return scores


def dice_per_class(pred: Any, target: Any, n_classes: int, weight: Any = None) -> np.ndarray:
    """Dice ``2 TP / (2 TP + FP + FN)`` per class (float64 array of length ``n_classes``).

    A class absent from both ``pred`` and ``target`` scores 1.0.
    """
    return _overlap_scores(confusion_matrix(pred, target, n_classes, weight), dice=True)


def iou_per_class(pred: Any, target: Any, n_classes: int, weight: Any = None) -> np.ndarray:
    """Intersection over union ``TP / (TP + FP + FN)`` per class; absent classes score 1.0."""
    return _overlap_scores(confusion_matrix(pred, target, n_classes, weight), dice=False)


def mean_dice(pred: Any, target: Any, n_classes: int, weight: Any = None) -> float:
    """Mean of :func:`dice_per_class` over all classes."""
    return float(dice_per_class(pred, target, n_classes, weight).mean())


def mean_iou(pred: Any, target: Any, n_classes: int, weight: Any = None) -> float:
    """Mean of :func:`iou_per_class` over all classes."""
    return float(iou_per_class(pred, target, n_classes, weight).mean())


def pixel_error(pred: Any, target: Any, weight: Any = None) -> float:
    """Fraction of (weighted) pixels where ``pred != target``; 0.0 when every weight is 0."""
    pred_array, target_array = _to_numpy(pred), _to_numpy(target)
    _check_same_shape(pred_array, target_array, "prediction", "target")
    wrong = pred_array != target_array
    weights = _weight_map(weight, target_array.shape)
    if weights is None:
        return float(wrong.mean()) if wrong.size else 0.0
    total = weights.sum()
    return float((weights * wrong).sum() / total) if total > 0 else 0.0


# ---------------------------------------------------------------------------
# Instance metrics (EM connectomics)
# ---------------------------------------------------------------------------


def instances_from_classes(
    class_map: Any, foreground_class: int = 1, *, per_slice: bool = False
) -> np.ndarray:
    """Label image (int32) of the face-connected components of ``foreground_class``; 0 elsewhere.

    For ISBI-like maps the cells are the components of the interior class, separated
    by the membrane class. ``per_slice=True`` labels each slice of a (Z, Y, X) stack
    of 2D images on its own (ids stay unique across the stack).
    """
    class_map = _to_numpy(class_map)
    foreground = class_map == foreground_class
    if not per_slice:
        labels, _ = ndimage.label(foreground)
        return labels.astype(np.int32, copy=False)
    if class_map.ndim < 2:
        raise ValueError(f"Labelling per slice needs a stack of images, not shape {class_map.shape}.")
    labels = np.zeros(class_map.shape, np.int32)
    next_id = 0
    for index, slice_foreground in enumerate(foreground):
        slice_labels, count = ndimage.label(slice_foreground)
        labels[index] = np.where(slice_labels > 0, slice_labels + next_id, 0)
        next_id += count
    return labels


def _instance_pair(pred_instances: Any, true_instances: Any) -> tuple[np.ndarray, np.ndarray]:
    pred_array, true_array = _to_numpy(pred_instances), _to_numpy(true_instances)
    _check_same_shape(pred_array, true_array, "predicted instances", "true instances")
    for array, name in ((pred_array, "predicted instances"), (true_array, "true instances")):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise ValueError(f"The {name} must be an integer label image.")
        if array.size and array.min() < 0:
            raise ValueError(f"The {name} must not contain negative labels.")
    return pred_array.astype(np.int64, copy=False), true_array.astype(np.int64, copy=False)


def _nothing_scored(true_instances: np.ndarray, ignore_labels: Sequence[int]) -> bool:
    """True when every true pixel is ignored (skimage would return NaN)."""
    return bool(np.isin(true_instances, list(ignore_labels)).all())


def adapted_rand_error(
    pred_instances: Any, true_instances: Any, *, ignore_labels: Sequence[int] = (0,)
) -> float:
    """Adapted Rand error (SNEMI3D / ISBI 2012) from ``skimage.metrics.adapted_rand_error``.

    Pixels whose true label is in ``ignore_labels`` (default: 0, background/membrane)
    are not scored, as in the challenges; with no scored pixel at all the error is 0.0.
    """
    pred_array, true_array = _instance_pair(pred_instances, true_instances)
    if _nothing_scored(true_array, ignore_labels):
        return 0.0
    error, _, _ = skimage_metrics.adapted_rand_error(true_array, pred_array, ignore_labels=ignore_labels)
    return float(error)


def variation_of_information(
    pred_instances: Any, true_instances: Any, *, ignore_labels: Sequence[int] = (0,)
) -> tuple[float, float]:
    """``(split, merge)`` conditional entropies of the VI from ``skimage.metrics.variation_of_information``.

    ``split`` = H(pred | true) (over-segmentation), ``merge`` = H(true | pred)
    (under-segmentation); VI = split + merge. Pixels whose true label is in
    ``ignore_labels`` (default: 0) are not scored ("foreground-restricted", as ISBI 2012);
    with no scored pixel at all both are 0.0.
    """
    pred_array, true_array = _instance_pair(pred_instances, true_instances)
    if _nothing_scored(true_array, ignore_labels):
        return 0.0, 0.0
    split, merge = skimage_metrics.variation_of_information(
        true_array, pred_array, ignore_labels=ignore_labels
    )
    return float(split), float(merge)


# ---------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------


def _instance_scores_of(pred_instances: np.ndarray, true_instances: np.ndarray) -> dict[str, float]:
    split, merge = variation_of_information(pred_instances, true_instances)
    return {
        "adapted_rand_error": adapted_rand_error(pred_instances, true_instances),
        "voi_split": split,
        "voi_merge": merge,
    }


def _instance_scores(
    pred: np.ndarray, target: np.ndarray, weights: np.ndarray | None, foreground_class: int, per_slice: bool
) -> dict[str, float]:
    pred_instances = instances_from_classes(pred, foreground_class, per_slice=per_slice)
    true_instances = instances_from_classes(target, foreground_class, per_slice=per_slice)
    if weights is not None:
        true_instances[weights == 0] = 0  # unlabelled pixels are ignored like the membrane
    if not per_slice:
        return _instance_scores_of(pred_instances, true_instances)
    # ISBI 2012 convention for 2D stacks: score each slice, report the mean.
    slice_scores = [
        _instance_scores_of(pred_slice, true_slice)
        for pred_slice, true_slice in zip(pred_instances, true_instances, strict=True)
    ]
    return {key: float(np.mean([scores[key] for scores in slice_scores])) for key in slice_scores[0]}


def evaluate_segmentation(
    pred: Any,
    target: Any,
    n_classes: int = 2,
    weight: Any = None,
    instances: bool = True,
    *,
    foreground_class: int = 1,
    per_slice: bool = False,
) -> dict[str, float | list[float]]:
    """All metrics of a class-map prediction against a class-map target, as plain Python values.

    Returns ``"dice"`` and ``"iou"`` (means over classes), ``"pixel_error"``,
    ``"dice_per_class"`` and ``"iou_per_class"`` (lists), and with ``instances=True``
    ``"adapted_rand_error"``, ``"voi_split"`` and ``"voi_merge"`` computed on the
    connected components of ``foreground_class`` (pixels with weight 0 are not scored).
    ``per_slice=True`` treats a (Z, Y, X) input as a stack of 2D images: instances are
    found and scored per slice and the instance scores averaged.
    """
    n_classes = _check_n_classes(n_classes)
    pred_array, target_array = _to_numpy(pred), _to_numpy(target)
    _check_same_shape(pred_array, target_array, "prediction", "target")
    confusion = confusion_matrix(pred_array, target_array, n_classes, weight)
    dice, iou = _overlap_scores(confusion, dice=True), _overlap_scores(confusion, dice=False)
    results: dict[str, float | list[float]] = {
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "pixel_error": pixel_error(pred_array, target_array, weight),
        "dice_per_class": [float(value) for value in dice],
        "iou_per_class": [float(value) for value in iou],
    }
    if instances:
        if per_slice and target_array.ndim != 3:
            raise ValueError(f"Per-slice scoring needs a (Z, Y, X) stack, not shape {target_array.shape}.")
        weights = _weight_map(weight, target_array.shape)
        results.update(_instance_scores(pred_array, target_array, weights, foreground_class, per_slice))
    return results
