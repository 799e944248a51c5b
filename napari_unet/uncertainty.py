"""Where to correct next: how unsure a model is, per pixel, and which slices or boxes to review first.

:func:`predict_with_uncertainty` runs :func:`napari_unet.inference.predict` once per test-time view
(the flips, and in 2D the transposes, that ``predict(tta=True)`` averages) and returns the mean
probabilities together with a per-pixel uncertainty in 0..1 (0 = certain):

- ``"entropy"``: entropy of the mean prediction, divided by ``log(n_classes)``. High on every
  boundary the model draws, sure or not.
- ``"tta"``: the views' disagreement, as mutual information (BALD: entropy of the mean minus the mean
  of the views' entropies), divided by ``log(n_classes)``. High where a flip changes the answer.
- ``"variance"``: the variance of the class probabilities across the views, summed over the classes
  and divided by its largest possible value ``1 - 1/n_classes``.
- ``"combined"``: the mean of ``"entropy"`` and ``"tta"``.

:func:`rank_slices` turns the map into a per-slice score and orders the slices of a stack worst first;
:func:`rank_regions` does the same for boxes of a 3D volume. :class:`ReviewQueue` walks such a ranking
("go to next") and knows where each entry's centre is, so the GUI only moves the viewer there.

Which method and score: measured by ``benchmarks/uncertainty_ranking.py`` on ISBI 2012 (start models
trained 250 steps on slices 0-3, as ``benchmarks/human_in_the_loop.py`` does; the 20 unseen slices 4-23;
``benchmarks/results/uncertainty_ranking*.json``, 5 models: 2 trained on CPUs, 3 on a GPU):

- Ranking: the ``"expected_dice"`` score (1 - the Dice the probabilities themselves expect) ranks slices
  by their true membrane error (1 - membrane Dice) best, Spearman 0.72-0.82 on average (worst model
  0.68). A slice's mean entropy ranks them at about 0 (-0.26 to +0.03): it measures how much membrane
  a slice holds, so it follows the pixel error instead (0.6-0.8); the mean disagreement (``"tta"``,
  ``"variance"``) reaches 0.24-0.42, uncertainty on the predicted boundaries only 0.55-0.73.
  ``"expected_dice"`` reads the probabilities, so its ranking hardly depends on the method.
- Map: ``"entropy"`` of a single pass is the default: it finds the wrong pixels best (AUROC 0.89, as
  the 8-view entropy; BALD ``"tta"`` 0.81-0.82, ``"variance"`` 0.87), its ranking is as good
  (Spearman 0.75 CPU / 0.82 GPU models against membrane error on 4-23), and it costs one pass, not 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import label_offset as offsets
from .inference import PredictionCancelled, _is_dask, _tta_views, predict, volume_statistics

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_SCORE",
    "METHODS",
    "SCORES",
    "ReviewQueue",
    "ViewStatistics",
    "box_centre",
    "iter_view_predictions",
    "predict_with_uncertainty",
    "rank_regions",
    "rank_slices",
    "slice_scores",
]

METHODS = ("entropy", "tta", "variance", "combined")
SCORES = ("mean", "top", "boundary", "expected_error", "expected_dice")
# Chosen by benchmarks/uncertainty_ranking.py (see the docstrings of the functions using them).
DEFAULT_METHOD = "entropy"
DEFAULT_SCORE = "expected_dice"  # with probabilities; "mean" uncertainty without them
# "top" score: the mean of this share of a slice's most uncertain pixels.
TOP_FRACTION = 0.05
_EPS = 1e-6

ProgressCallback = Callable[[int, int], Any]
CancelCallback = Callable[[], bool]


def predict_with_uncertainty(
    model: Any,
    image: Any,
    *,
    device: str = "auto",
    method: str = DEFAULT_METHOD,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    views: int | None = None,
    normalization: dict | bool | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    **predict_options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and a per-pixel uncertainty map of ``image``.

    Args:
        model: a 2D model (a 2D image or a stack, predicted slice by slice) or a 3D model (a
            volume); binary (``out_channels == 1``) or multi-class.
        image: what :func:`napari_unet.inference.predict` accepts (NumPy, zarr or dask; spatial axes
            last, an optional channel axis before them).
        device: as for ``predict``.
        method: ``"entropy"`` (default), ``"tta"``, ``"variance"`` or ``"combined"`` (module
            docstring). Entropy is the default: of the four maps it points at the wrong pixels best
            (pixel AUROC 0.89 on unseen ISBI slices; BALD 0.82, variance 0.87), one pass gives it as
            well as 8 views, and with the ``"expected_dice"`` slice score its ranking matched the true
            membrane error best (Spearman 0.75-0.82 on slices 4-23; figures in
            ``benchmarks/results/uncertainty_ranking.json``).
        tile, overlap: as for ``predict``.
        views: how many test-time views to predict (1-8; the identity first). None: 8, or 1 for
            ``"entropy"`` (one pass, 8x faster; it needs no disagreement). ``"tta"``, ``"variance"``
            and ``"combined"`` need at least 2.
        normalization: as for ``predict`` (None: the model's spec; a 3D model's whole-volume
            statistics are measured once and shared by all views).
        progress: ``progress(done, total)`` over all views' tiles.
        cancel: ``cancel()`` checked before every batch of tiles; True raises
            :class:`napari_unet.inference.PredictionCancelled`.
        **predict_options: passed on to ``predict`` (``batch_size``, ``precision``, ``blend``).

    Returns:
        ``(probabilities, uncertainty)``: probabilities ``(n_classes, *spatial)`` float32, the mean of
        the views (with 8 views what ``predict(tta=True)`` gives); uncertainty float32 of the image's
        spatial shape, in 0..1, 0 = certain.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    for name in ("tta", "out", "label_offset", "dtype"):
        if name in predict_options:
            raise ValueError(f"predict_with_uncertainty does not take {name}=")
    dims = int(getattr(model, "spatial_dims", 0) or 0)
    if dims not in (2, 3):
        raise ValueError("the model must have spatial_dims 2 or 3")
    all_views = _views(dims)
    if views is None:
        views = 1 if method == "entropy" else len(all_views)
    if isinstance(views, bool) or not 1 <= int(views) <= len(all_views):
        raise ValueError(f"views must be between 1 and {len(all_views)}, got {views!r}")
    views = int(views)
    if views < 2 and method != "entropy":
        raise ValueError(f"the {method!r} uncertainty compares test-time views: it needs views >= 2")
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) < 2:
        raise ValueError(f"the image must have at least 2 dimensions, got shape {shape}")
    n_classes = max(2, int(model.out_channels))
    statistics = ViewStatistics(n_classes, methods=(method,))
    for probs in iter_view_predictions(
        model, image, views=views, device=device, tile=tile, overlap=overlap,
        normalization=normalization, progress=progress, cancel=cancel, **predict_options,
    ):
        statistics.add(probs)
        del probs
    return statistics.mean, statistics.uncertainty(method)


def iter_view_predictions(
    model: Any, image: Any, *, views: int = 8, device: str = "auto", tile: Any = None,
    overlap: float = 0.25, normalization: dict | bool | None = None,
    progress: ProgressCallback | None = None, cancel: CancelCallback | None = None,
    **predict_options: Any,
):
    """Yield the probabilities ``(C, *spatial)`` of each of the first ``views`` test-time views,
    back in the image's frame (identity first). ``progress(done, total)`` counts all views' tiles.
    A 3D model's whole-volume statistics are measured once when ``normalization`` is None."""
    dims = int(model.spatial_dims)
    all_views = _views(dims)
    if not _is_dask(image):
        image = np.asarray(image)
    if normalization is None and dims == 3:
        normalization = volume_statistics(model, image)  # once, not once per view
    base_offset = offsets.model_offset(model)
    state: dict[str, Any] = {"total": None}

    def view_progress(index: int) -> ProgressCallback | None:
        if progress is None:
            return None

        def report(done: int, total: int) -> None:
            state["total"] = total
            progress(index * total + done, views * total)

        return report

    for index, (transpose, flips) in enumerate(all_views[:views]):
        if cancel is not None and cancel():
            raise PredictionCancelled("prediction was cancelled")
        probs = predict(
            model, _forward(image, transpose, flips), device=device, tile=tile, overlap=overlap,
            tta=False, progress=view_progress(index), cancel=cancel, normalization=normalization,
            label_offset=_view_offset(base_offset, transpose, flips), **predict_options,
        )
        yield _inverse(np.asarray(probs, dtype=np.float32), transpose, flips)


class ViewStatistics:
    """Running sums over test-time views, from which each method's uncertainty map is made."""

    def __init__(self, n_classes: int, methods: Sequence[str] = METHODS) -> None:
        self.n_classes = int(n_classes)
        self.methods = tuple(methods)
        self.count = 0
        self._sum: np.ndarray | None = None
        self._entropy_sum: np.ndarray | None = None
        self._square_sum: np.ndarray | None = None

    def add(self, probs: np.ndarray) -> None:
        """Add one view's probabilities ``(C, *spatial)``."""
        probs = np.asarray(probs, dtype=np.float32)
        self._sum = probs.copy() if self._sum is None else self._sum.__iadd__(probs)
        if {"tta", "combined"} & set(self.methods):
            ent = _entropy(probs)
            self._entropy_sum = ent if self._entropy_sum is None else self._entropy_sum.__iadd__(ent)
        if "variance" in self.methods:
            squared = np.square(probs)
            self._square_sum = squared if self._square_sum is None else self._square_sum.__iadd__(squared)
        self.count += 1

    @property
    def mean(self) -> np.ndarray:
        """The views' mean probabilities."""
        if self._sum is None:
            raise ValueError("no view was added")
        return self._sum / self.count

    def uncertainty(self, method: str) -> np.ndarray:
        """The ``method``'s map (float32, 0..1) from the views added so far."""
        if method not in self.methods:
            raise ValueError(f"these statistics were not kept for the {method!r} method")
        mean = self.mean
        scale = 1.0 / math.log(self.n_classes)
        if method == "entropy":
            result = _entropy(mean) * scale
        elif method == "tta":
            result = (_entropy(mean) - self._entropy_sum / self.count) * scale
        elif method == "combined":
            total = _entropy(mean)
            result = 0.5 * (total + (total - self._entropy_sum / self.count)) * scale
        else:  # variance across views, summed over classes, over its largest value (views spread evenly)
            variance = np.maximum(self._square_sum / self.count - np.square(mean), 0.0).sum(axis=0)
            result = variance / (1.0 - 1.0 / self.n_classes)
        return np.clip(result, 0.0, 1.0).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------- ranking


def slice_scores(
    uncertainty: Any, *, probabilities: Any = None, axis: int = 0, score: str | None = None,
) -> np.ndarray:
    """One expected-error score per slice along ``axis`` (float64, higher = worse).

    Scores: ``"mean"`` (mean uncertainty), ``"top"`` (mean of the slice's most uncertain 5 %),
    ``"boundary"`` (mean uncertainty on the predicted boundary pixels only, those whose class differs
    from a neighbour's; needs ``probabilities``), ``"expected_error"`` (mean of ``1 - max p``: the
    pixel error a calibrated model expects; needs ``probabilities``; ignores ``uncertainty``) and
    ``"expected_dice"`` (1 - mean over classes of the Dice the probabilities expect against the
    predicted classes; needs ``probabilities``).
    """
    uncertainty = np.asarray(uncertainty)
    score = _resolve_score(score, probabilities)
    if uncertainty.ndim < 2:
        raise ValueError(f"the uncertainty map must be 2D or 3D, got shape {uncertainty.shape}")
    if uncertainty.ndim == 2:
        uncertainty = uncertainty[np.newaxis]
        axis = 0
        if probabilities is not None:
            probabilities = np.asarray(probabilities)[:, np.newaxis]
    if not -uncertainty.ndim <= axis < uncertainty.ndim:
        raise ValueError(f"axis {axis} does not exist in an uncertainty map of shape {uncertainty.shape}")
    axis %= uncertainty.ndim
    moved = np.moveaxis(uncertainty, axis, 0)
    probs = None
    if probabilities is not None:
        probs = np.asarray(probabilities)
        if probs.ndim != uncertainty.ndim + 1 or probs.shape[1:] != uncertainty.shape or probs.shape[0] < 2:
            raise ValueError(
                f"probabilities must be (n_classes, *{uncertainty.shape}), got shape {probs.shape}"
            )
        probs = np.moveaxis(probs, axis + 1, 1)
    elif score in ("boundary", "expected_error", "expected_dice"):
        raise ValueError(f"the {score!r} score needs the probabilities")

    results = np.empty(moved.shape[0], dtype=np.float64)
    for index in range(moved.shape[0]):
        part = np.asarray(moved[index], dtype=np.float32)
        part_probs = None if probs is None else np.asarray(probs[:, index], dtype=np.float32)
        results[index] = _score(part, part_probs, score)
    return results


def rank_slices(
    uncertainty: Any, *, probabilities: Any = None, axis: int = 0, score: str | None = None,
) -> list[tuple[int, float]]:
    """Slices along ``axis`` ordered worst first: ``[(index, score), ...]``.

    ``score`` None: ``"expected_dice"`` when ``probabilities`` are given (pass them: it is the
    measured best), else ``"mean"``. On the 20 unseen ISBI slices ``"expected_dice"`` ranked slices
    by their true error (1 - membrane Dice) with Spearman 0.72-0.82 (means over 2 CPU-trained and 3
    GPU-trained start models; against pixel error 0.40-0.48). A slice's mean or top-5 % entropy
    scored about 0 against membrane error (it follows how much membrane a slice has: pixel error
    0.6-0.8), the mean disagreement of 8 views 0.24-0.42, uncertainty on the predicted boundaries
    0.55-0.73 (``benchmarks/uncertainty_ranking.py``). A 2D map is one slice.
    """
    scores = slice_scores(uncertainty, probabilities=probabilities, axis=axis, score=score)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [(int(i), float(scores[i])) for i in order]


def rank_regions(
    uncertainty: Any,
    box: Sequence[int] = (16, 128, 128),
    *,
    probabilities: Any = None,
    score: str | None = None,
) -> list[tuple[tuple[slice, ...], float]]:
    """Boxes of a 3D volume (a tiling by ``box``, the last ones moved inside) ordered worst first.

    Returns ``[(box_slices, score), ...]`` where ``box_slices`` is a tuple of slices (index the
    volume with it; :func:`box_centre` gives its centre). A box side larger than the volume is
    clipped to it; a 2D map is tiled with the box's last two sides.
    """
    uncertainty = np.asarray(uncertainty)
    if uncertainty.ndim not in (2, 3):
        raise ValueError(f"the uncertainty map must be 2D or 3D, got shape {uncertainty.shape}")
    sides = tuple(int(s) for s in box)
    if len(sides) not in (2, 3) or any(s < 1 for s in sides):
        raise ValueError(f"box must be 2 or 3 positive sides (z, y, x), got {tuple(box)!r}")
    sides = sides[-uncertainty.ndim:] if len(sides) >= uncertainty.ndim else (1, *sides)
    score = _resolve_score(score, probabilities)
    probs = None
    if probabilities is not None:
        probs = np.asarray(probabilities)
        if probs.shape[1:] != uncertainty.shape or probs.shape[0] < 2:
            raise ValueError(
                f"probabilities must be (n_classes, *{uncertainty.shape}), got shape {probs.shape}"
            )
    elif score in ("boundary", "expected_error", "expected_dice"):
        raise ValueError(f"the {score!r} score needs the probabilities")
    starts = [_box_starts(n, min(s, n)) for n, s in zip(uncertainty.shape, sides)]
    results = []
    for corner in _product(starts):
        region = tuple(slice(c, c + min(s, n)) for c, s, n in zip(corner, sides, uncertainty.shape))
        part_probs = None if probs is None else probs[(slice(None), *region)]
        results.append((region, _score(uncertainty[region].astype(np.float32), part_probs, score)))
    results.sort(key=lambda item: (-item[1], tuple(s.start for s in item[0])))
    return [(region, float(value)) for region, value in results]


def box_centre(region: Sequence[slice]) -> tuple[int, ...]:
    """The integer centre of a box given as slices."""
    return tuple((s.start + s.stop - 1) // 2 for s in region)


@dataclass
class ReviewQueue:
    """A ranking to walk through, worst first ("go to next"); Qt-free state behind the GUI.

    ``entries`` are ``(where, score)`` with ``where`` a slice index (int) or a box (tuple of
    slices). :meth:`next` returns the next entry after the current one (wrapping around); the
    viewer goes to :meth:`position` of it.
    """

    entries: list[tuple[Any, float]] = field(default_factory=list)
    current: int = -1

    @classmethod
    def from_uncertainty(cls, uncertainty: Any, *, probabilities: Any = None, volume: bool = False,
                         box: Sequence[int] = (16, 128, 128), score: str | None = None) -> ReviewQueue:
        """Slices of a stack (``volume=False``) or boxes of a 3D volume, worst first."""
        if volume:
            return cls(rank_regions(uncertainty, box, probabilities=probabilities, score=score))
        return cls(rank_slices(uncertainty, probabilities=probabilities, score=score))

    def __len__(self) -> int:
        return len(self.entries)

    def next(self) -> int | None:
        """Index (in ``entries``) of the next worst entry, wrapping round; None when empty."""
        if not self.entries:
            return None
        self.current = (self.current + 1) % len(self.entries)
        return self.current

    def select(self, index: int) -> None:
        """Make ``entries[index]`` the current one (a click in the list)."""
        if not 0 <= index < len(self.entries):
            raise IndexError(f"no entry {index} in a ranking of {len(self.entries)}")
        self.current = index

    def position(self, index: int | None = None) -> tuple[int, ...]:
        """Where entry ``index`` (default: the current one) is: ``(z,)`` or a box's centre."""
        index = self.current if index is None else index
        where = self.entries[index][0]
        return box_centre(where) if isinstance(where, tuple) else (int(where),)

    def label(self, index: int) -> str:
        """One line for a list: "slice 12   0.184" or "box z 8-23, y 0-127, x 128-255   0.184"."""
        where, value = self.entries[index]
        if isinstance(where, tuple):
            axes = "zyx"[-len(where):]
            text = ", ".join(f"{a} {s.start}-{s.stop - 1}" for a, s in zip(axes, where))
            return f"box {text}   {value:.3f}"
        return f"slice {where}   {value:.3f}"


# ----------------------------------------------------------------------------------- internals


def _views(dims: int) -> list[tuple[bool, tuple[int, ...]]]:
    """(transpose Y/X, flipped spatial axes counted from the end) of each view; identity first."""
    return [(transpose, tuple(axis - 2 - dims for axis in flips)) for transpose, flips in _tta_views(dims)]


def _forward(image: Any, transpose: bool, flips: tuple[int, ...]) -> Any:
    """The view of ``image`` (spatial axes last): transpose Y/X first, then flip."""
    if transpose:
        image = image.swapaxes(-1, -2)
    for axis in flips:
        index = [slice(None)] * image.ndim
        index[axis] = slice(None, None, -1)
        image = image[tuple(index)]
    return image if _is_dask(image) else np.ascontiguousarray(image)


def _inverse(probs: np.ndarray, transpose: bool, flips: tuple[int, ...]) -> np.ndarray:
    """Probabilities of a view back in the image's frame (undo the flips, then the transpose)."""
    for axis in flips:
        probs = np.flip(probs, axis)
    if transpose:
        probs = probs.swapaxes(-1, -2)
    return np.ascontiguousarray(probs)


def _view_offset(offset: tuple[float, ...], transpose: bool, flips: tuple[int, ...]) -> tuple[float, ...]:
    """The label offset as seen in a view, so that it points the same way once the view is undone."""
    values = list(offset)
    if transpose:
        values[-1], values[-2] = values[-2], values[-1]
    for axis in flips:
        values[axis] = -values[axis]
    return tuple(float(v) + 0.0 for v in values)


def _resolve_score(score: str | None, probabilities: Any) -> str:
    if score is None:
        return DEFAULT_SCORE if probabilities is not None else "mean"
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    return score


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) over the class axis 0."""
    clipped = np.clip(probs, _EPS, 1.0)
    return -(probs * np.log(clipped)).sum(axis=0, dtype=np.float32)


def _score(uncertainty: np.ndarray, probs: np.ndarray | None, score: str) -> float:
    if uncertainty.size == 0:
        return 0.0
    if score == "mean":
        return float(uncertainty.mean(dtype=np.float64))
    if score == "top":
        flat = uncertainty.ravel()
        count = max(1, int(round(TOP_FRACTION * flat.size)))
        return float(np.partition(flat, flat.size - count)[flat.size - count:].mean(dtype=np.float64))
    assert probs is not None
    if score == "expected_error":
        return float((1.0 - probs.max(axis=0)).mean(dtype=np.float64))
    labels = probs.argmax(axis=0)
    if score == "boundary":
        edge = np.zeros(labels.shape, dtype=bool)
        for axis in range(labels.ndim):
            if labels.shape[axis] < 2:
                continue
            differs = np.diff(labels, axis=axis) != 0
            lower = [slice(None)] * labels.ndim
            upper = [slice(None)] * labels.ndim
            lower[axis], upper[axis] = slice(None, -1), slice(1, None)
            edge[tuple(lower)] |= differs
            edge[tuple(upper)] |= differs
        return float(uncertainty[edge].mean(dtype=np.float64)) if edge.any() else 0.0
    # expected Dice of the predicted classes against labels drawn from the probabilities
    dices = []
    for k in range(probs.shape[0]):
        predicted = labels == k
        expected_truth = float(probs[k].sum(dtype=np.float64))
        denominator = float(predicted.sum()) + expected_truth
        if denominator <= 0:
            continue
        dices.append(2.0 * float(probs[k][predicted].sum(dtype=np.float64)) / denominator)
    return 1.0 - (float(np.mean(dices)) if dices else 1.0)


def _box_starts(extent: int, side: int) -> list[int]:
    starts = list(range(0, max(1, extent - side + 1), side))
    if starts[-1] + side < extent:
        starts.append(extent - side)
    return starts


def _product(lists: Sequence[list[int]]) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.product(*lists))
