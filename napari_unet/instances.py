"""Instance labels (one id per cell) from a boundary model's prediction.

Two methods, both giving int32 ids 1..N with 0 for background:

- ``components``: the face-connected components of the thresholded cell interior. Fast, but one
  gap in a predicted membrane merges the two cells on either side of it.
- ``watershed``: a seeded watershed on the membrane (boundary) probability. Seeds are the
  h-maxima of the distance transform of the confidently predicted interior: a gap in a membrane
  leaves a narrow neck between two wide cells, so each cell keeps its own distance peak and the
  flood splits them along the weak membrane. The flooding relief is the boundary probability with
  optionally some of the inverted distance mixed in (``distance_weight``; off by default, as it
  let floods cross weak membranes on ISBI).

Both work on a 2D image, a 3D volume, or a stack of 2D slices (``per_slice=True``) that a 2D
model predicted slice by slice: it knows nothing about z, so each slice is labelled on its own
and ids stay unique across the stack (slice by slice also keeps each call short, so a GUI worker
never holds the GIL for long).

Probabilities are ``predict``'s ``(C, *spatial)`` with the class axis first; the boundary
probability is ``1 - P(foreground_class)`` (the membrane channel of a binary ISBI-style model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "METHODS",
    "WATERSHED_DEFAULTS",
    "InstancesError",
    "component_instances",
    "instances_from_probabilities",
    "instances_slice_by_slice",
    "watershed_instances",
]

METHODS = ("none", "components", "watershed")

# Chosen with benchmarks/instances_isbi.py --tune: the best mean adapted Rand error on ISBI 2012
# slices 16-19 (the part of the training slices 0-19 that the trainer holds out for validation),
# never on the evaluation slices 20-23. Any share of inverted distance in the relief (0.2, 0.5)
# and any mask (0.2) made it worse there: the flood then crosses weak membranes.
WATERSHED_DEFAULTS: dict[str, float] = {
    "seed_threshold": 0.5,  # interior probability above which the distance transform is taken
    "h": 5.0,  # a distance peak must rise this many pixels above its saddle to seed a cell
    "sigma": 3.0,  # Gaussian smoothing (pixels) of the distance transform: ragged edges make no peaks
    "distance_weight": 0.0,  # share of the inverted distance in the flooding relief
    "mask_threshold": 0.0,  # pixels with interior probability below this stay background (0 = none)
}


class InstancesError(ValueError):
    """Bad input for instance labelling, said in one sentence."""


# ---------------------------------------------------------------------------------------- api


def component_instances(labels: Any, foreground_class: int = 1, *, per_slice: bool = False) -> np.ndarray:
    """Face-connected components of ``foreground_class`` in a class map (int32, 0 = background).

    Face connectivity keeps cells separated by a membrane only one pixel wide apart.
    ``per_slice=True`` labels each slice of a (Z, Y, X) stack on its own, ids unique in the stack.
    """
    labels = np.asarray(labels)
    if labels.ndim < 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InstancesError(f"The labels must be an integer class map, not an array of {labels.dtype}.")
    _check_spatial(labels.ndim, per_slice, "class map")
    foreground = labels == foreground_class
    return _apply(_components, foreground, per_slice)


def watershed_instances(
    probabilities: Any,
    *,
    foreground_class: int = 1,
    per_slice: bool = False,
    seed_threshold: float = WATERSHED_DEFAULTS["seed_threshold"],
    h: float = WATERSHED_DEFAULTS["h"],
    sigma: float = WATERSHED_DEFAULTS["sigma"],
    distance_weight: float = WATERSHED_DEFAULTS["distance_weight"],
    mask_threshold: float = WATERSHED_DEFAULTS["mask_threshold"],
) -> np.ndarray:
    """Seeded watershed on the boundary probability ``1 - probabilities[foreground_class]``.

    Args:
        probabilities: ``(C, *spatial)`` class probabilities (C >= 2), e.g. ``inference.predict``'s;
            2 or 3 spatial axes.
        foreground_class: the cell-interior class.
        per_slice: treat a (Z, Y, X) stack as independent 2D slices (a 2D model's prediction).
        seed_threshold: interior probability above which pixels count as confident interior.
        h: minimum height (pixels of distance) of a distance-transform peak to seed a cell.
        sigma: Gaussian smoothing (pixels) of the distance transform (0 = none).
        distance_weight: in [0, 1], the share of the inverted, normalised distance in the relief.
        mask_threshold: pixels with interior probability below it stay 0 (0 = flood everything).

    Returns:
        int32 instance ids of the spatial shape, 0 = background.
    """
    foreground = _foreground_probability(probabilities, foreground_class, per_slice)
    if not 0.0 < seed_threshold < 1.0:
        raise InstancesError(f"The seed threshold must be between 0 and 1, not {seed_threshold}.")
    if h < 0 or sigma < 0:
        raise InstancesError(f"h and sigma must not be negative, not h={h} and sigma={sigma}.")
    if not 0.0 <= distance_weight <= 1.0:
        raise InstancesError(f"The distance weight must be in [0, 1], not {distance_weight}.")
    if not 0.0 <= mask_threshold < 1.0:
        raise InstancesError(f"The mask threshold must be in [0, 1), not {mask_threshold}.")

    def one(interior: np.ndarray) -> np.ndarray:
        return _watershed(interior, seed_threshold, h, sigma, distance_weight, mask_threshold)

    return _apply(one, foreground, per_slice)


def instances_from_probabilities(
    probabilities: Any,
    method: str = "watershed",
    *,
    threshold: float = 0.5,
    foreground_class: int = 1,
    per_slice: bool = False,
    **watershed_options: float,
) -> np.ndarray | None:
    """Instances by ``method`` (one of :data:`METHODS`) from ``(C, *spatial)`` probabilities.

    ``"none"`` returns None; ``"components"`` labels the class map that
    ``inference.probabilities_to_labels(probabilities, threshold)`` gives; ``"watershed"`` passes
    ``watershed_options`` to :func:`watershed_instances`, with ``threshold`` as its seed threshold
    unless they name one (one foreground cut-off for both methods, as the GUI and CLI offer one).
    """
    if method not in METHODS:
        raise InstancesError(f"Unknown instance method {method!r}: use one of {', '.join(METHODS)}.")
    if method == "none":
        return None
    if method == "watershed":
        watershed_options.setdefault("seed_threshold", threshold)
        return watershed_instances(probabilities, foreground_class=foreground_class, per_slice=per_slice,
                                   **watershed_options)
    from .inference import probabilities_to_labels  # here: inference imports this module

    _foreground_probability(probabilities, foreground_class, per_slice)  # same checks, same errors
    labels = probabilities_to_labels(np.asarray(probabilities), threshold=threshold)
    return component_instances(labels, foreground_class, per_slice=per_slice)


def instances_slice_by_slice(
    probabilities: Any, method: str = "watershed", *, threshold: float = 0.5, foreground_class: int = 1,
) -> np.ndarray | None:
    """Instances of a 2D model's ``(C, Z, Y, X)`` probabilities, reading one slice at a time (a zarr
    store bigger than memory works), ids unique in the stack; as ``per_slice=True`` otherwise.
    ``"none"`` returns None."""
    if method == "none":
        return None
    shape = tuple(int(s) for s in probabilities.shape[1:])
    if len(shape) != 3:
        raise InstancesError(
            f"Labelling slice by slice needs (C, Z, Y, X) probabilities, not shape {tuple(probabilities.shape)}."
        )
    per_slice = (
        instances_from_probabilities(np.asarray(probabilities[:, z]), method, threshold=threshold,
                                     foreground_class=foreground_class)
        for z in range(shape[0])
    )
    return _stack_slices(per_slice, shape)


# ---------------------------------------------------------------------------------- internals


def _check_spatial(ndim: int, per_slice: bool, what: str) -> None:
    if per_slice and ndim != 3:
        raise InstancesError(f"Labelling slice by slice needs a (Z, Y, X) stack, not a {what} with {ndim} axes.")
    if not 2 <= ndim <= 3:
        raise InstancesError(f"Instances need a 2D image or a 3D volume, not a {what} with {ndim} spatial axes.")


def _foreground_probability(probabilities: Any, foreground_class: int, per_slice: bool) -> np.ndarray:
    """The interior probability map, after checking the class axis and the spatial axes."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 3 or probabilities.shape[0] < 2:
        raise InstancesError(
            "The probabilities need a class axis first with at least 2 classes and 2 or 3 spatial axes, "
            f"not shape {probabilities.shape}."
        )
    if not np.issubdtype(probabilities.dtype, np.floating):
        raise InstancesError(f"The probabilities must be floats in [0, 1], not {probabilities.dtype}.")
    if not 0 <= foreground_class < probabilities.shape[0]:
        raise InstancesError(
            f"The foreground class {foreground_class} is not among the {probabilities.shape[0]} classes."
        )
    _check_spatial(probabilities.ndim - 1, per_slice, "probability map")
    return probabilities[foreground_class].astype(np.float32, copy=False)


def _apply(label_one: Callable[[np.ndarray], np.ndarray], array: np.ndarray, per_slice: bool) -> np.ndarray:
    """``label_one`` on the whole array, or on each slice with ids offset to stay unique."""
    if not per_slice:
        return label_one(array).astype(np.int32, copy=False)
    return _stack_slices((label_one(plane) for plane in array), array.shape)


def _stack_slices(slices: Iterable[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """Each slice's ids, offset so that they stay unique in the (Z, Y, X) stack."""
    instances = np.zeros(tuple(shape), dtype=np.int32)
    offset = 0
    for z, ids in enumerate(slices):
        instances[z] = np.where(ids > 0, ids + offset, 0)
        offset += int(ids.max(initial=0))
    return instances


def _components(foreground: np.ndarray) -> np.ndarray:
    ids, _ = ndimage.label(foreground)  # face connectivity (the default structure)
    return ids


def _watershed(
    interior: np.ndarray, seed_threshold: float, h: float, sigma: float, distance_weight: float,
    mask_threshold: float,
) -> np.ndarray:
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    confident = interior >= seed_threshold
    if not confident.any():
        return np.zeros(interior.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(confident).astype(np.float32)
    if sigma > 0:
        distance = ndimage.gaussian_filter(distance, sigma)  # one ragged pixel must not make a peak
    full = np.ones((3,) * interior.ndim, dtype=bool)
    if h > 0:
        peaks = h_maxima(distance, h, footprint=full).astype(bool)
    else:
        peaks = _regional_maxima(distance, full)
    peaks &= confident
    seeds, n_seeds = ndimage.label(peaks, structure=full)
    # a confident region too thin for a peak of height h still is a cell: seed it at its widest
    # point, so the watershed never merges what the components keep apart
    regions, n_regions = ndimage.label(confident)
    seeded = np.zeros(n_regions + 1, dtype=bool)
    seeded[np.unique(regions[seeds > 0])] = True
    unseeded = np.flatnonzero(~seeded[1:]) + 1
    if unseeded.size:
        widest = ndimage.maximum_position(distance, regions, unseeded)
        for offset, position in enumerate(widest, start=1):
            seeds[position] = n_seeds + offset
    # relief: the membrane probability; optionally some inverted distance, which puts a missing
    # membrane's split on the neck between two cells (but lets floods cross weak membranes)
    relief = (1.0 - interior) * (1.0 - distance_weight)
    if distance_weight > 0:
        relief += distance_weight * (1.0 - distance / max(float(distance.max()), 1e-6))
    mask = interior >= mask_threshold if mask_threshold > 0 else None
    return watershed(relief, markers=seeds, mask=mask)


def _regional_maxima(distance: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Plateaus of ``distance`` no neighbour exceeds (h = 0)."""
    from skimage.morphology import local_maxima

    return local_maxima(distance, footprint=footprint, allow_borders=True).astype(bool)
