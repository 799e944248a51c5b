"""Where the annotations sit relative to the image: a sub-pixel offset measured while training.

Labels are not always drawn exactly on the image's pixels: ISBI 2012's membrane labels lie about
half a pixel above the dark membranes they trace (and a quarter pixel to the left), so one edge row
of every membrane disagrees with them. A model trained with flips and 90-degree rotations cannot
learn such an offset (a flip turns it around), so it predicts boundaries centred on the image.

The trainer therefore measures, on its training labels, the shift of the model's probabilities
that matches those labels best (``estimate_offset``), stores it with the model
(``model.label_offset``, pixels per spatial axis, saved in checkpoints), and validation and
``inference.predict`` move the probabilities by it (``apply_offset``). Labels registered to the image
give an offset of 0, which changes nothing. ISBI figures: benchmarks/results/TRAINING.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_OFFSET", "apply_offset", "describe_offset", "estimate_offset", "model_offset", "shift_maps",
    "validate_offset",
]

# Offsets are searched on this grid (pixels, per axis); larger misregistrations are not annotation
# conventions but wrong data, and finer steps gain nothing measurable.
MAX_OFFSET = 1.0
OFFSET_STEP = 0.25
# A new offset must lower the cross-entropy by this fraction to replace the current one, so noise
# never moves a registered model by a fraction of a pixel (and blurs it by the interpolation).
MIN_RELATIVE_GAIN = 0.002
# Fewer labelled pixels than this say nothing about where boundaries sit: the offset is kept.
MIN_LABELLED_PIXELS = 2000
# Pixels this close to a sample's edge are left out: a shift repeats the edge there.
EDGE = 2


def validate_offset(value: Any, spatial_dims: int) -> tuple[float, ...]:
    """``value`` as a tuple of ``spatial_dims`` finite floats within +-MAX_OFFSET (ValueError if not)."""
    try:
        offset = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"label_offset must be {spatial_dims} numbers (pixels per axis), got {value!r}") from None
    if len(offset) != spatial_dims or not all(math.isfinite(v) and abs(v) <= MAX_OFFSET for v in offset):
        raise ValueError(
            f"label_offset must be {spatial_dims} numbers between -{MAX_OFFSET:g} and {MAX_OFFSET:g} pixels, "
            f"got {value!r}"
        )
    return offset


def model_offset(model: Any) -> tuple[float, ...]:
    """The offset a model carries (zeros when it has none)."""
    dims = int(model.spatial_dims)
    value = getattr(model, "label_offset", None)
    return (0.0,) * dims if value is None else validate_offset(value, dims)


def describe_offset(offset: Sequence[float]) -> str:
    """One line for the widgets and the CLI ("" for no offset)."""
    if not any(offset):
        return ""
    axes = "zyx"[-len(offset):]
    shifts = ", ".join(f"{axis} {value:+.2f}" for axis, value in zip(axes, offset))
    return f"label offset: {shifts} px (where the training labels sit; applied to predictions)"


def apply_offset(probabilities: torch.Tensor, offset: Sequence[float]) -> torch.Tensor:
    """Move probabilities (N, C, *spatial) by ``offset`` pixels per spatial axis.

    ``out[x] = probabilities[x - offset]``, interpolated linearly between the log-odds (C = 1,
    a sigmoid's output) or log-probabilities (C > 1, renormalised): interpolating probabilities
    themselves would blur sharp boundaries, which the search below would then penalise.
    """
    if not any(offset):
        return probabilities
    eps = 1e-6
    if probabilities.shape[1] == 1:
        p = probabilities.float().clamp(eps, 1 - eps)
        return torch.sigmoid(shift_maps(torch.log(p) - torch.log1p(-p), offset))
    return torch.softmax(shift_maps(probabilities.float().clamp_min(eps).log(), offset), dim=1)


def shift_maps(maps: torch.Tensor, offset: Sequence[float]) -> torch.Tensor:
    """``out[x] = maps[x - offset]`` for maps (N, C, *spatial), linear, the edge repeated (as
    ``scipy.ndimage.shift(order=1, mode="nearest")``)."""
    spatial_dims = maps.ndim - 2
    for axis, amount in zip(range(2, 2 + spatial_dims), offset[-spatial_dims:]):
        if amount == 0:
            continue
        whole = math.floor(-amount)
        fraction = -amount - whole
        size = maps.shape[axis]
        index = torch.arange(size, device=maps.device) + whole
        lower = maps.index_select(axis, index.clamp(0, size - 1))
        upper = maps.index_select(axis, (index + 1).clamp(0, size - 1))
        maps = lower.mul_(1 - fraction).add_(upper, alpha=fraction) if fraction else lower
    return maps


def estimate_offset(
    probabilities: Sequence[torch.Tensor],
    labels: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    current: Sequence[float],
) -> tuple[float, ...]:
    """The offset under which ``probabilities`` match ``labels`` best (least weighted cross-entropy).

    probabilities: per sample (C, *spatial), C >= 2, before any offset. labels: class maps of the
    same spatial shape; weights: 0 = unlabelled. The search runs axis by axis over a grid of
    ``OFFSET_STEP`` up to ``MAX_OFFSET`` pixels, twice. ``current`` is kept unless another offset
    is better by ``MIN_RELATIVE_GAIN``, or when there are too few labelled pixels to tell.
    """
    current = tuple(float(v) for v in current)
    targets, masks, maps = [], [], []
    for probs, label, weight in zip(probabilities, labels, weights):
        inner = tuple(slice(EDGE, -EDGE) if n > 4 * EDGE else slice(None) for n in label.shape)
        weight = np.asarray(weight, dtype=np.float32)[inner]
        if not weight.any():
            continue
        targets.append(torch.from_numpy(np.asarray(label, dtype=np.int64)[inner])[None].to(probs.device))
        masks.append(torch.from_numpy(weight).to(probs.device))
        maps.append((probs.float(), inner))
    labelled = sum(int((mask > 0).sum()) for mask in masks)
    classes: set[int] = set()
    for target, mask in zip(targets, masks):
        classes.update(target[0][mask > 0].unique().tolist())
    if labelled < MIN_LABELLED_PIXELS or len(classes) < 2:
        return current

    def loss(offset: tuple[float, ...]) -> float:
        total = 0.0
        for (probs, inner), target, mask in zip(maps, targets, masks):
            shifted = apply_offset(probs[None], offset)[0][(slice(None), *inner)]
            picked = shifted.gather(0, target)[0].clamp_min(1e-6)
            total -= float((picked.log() * mask).sum())
        return total / float(sum(mask.sum() for mask in masks))

    candidates = np.round(np.arange(-MAX_OFFSET, MAX_OFFSET + 1e-9, OFFSET_STEP), 6)
    scores = {current: loss(current)}
    best = current
    for _ in range(2):
        for axis in range(len(current)):
            for value in candidates:
                trial = tuple(float(value) if a == axis else v for a, v in enumerate(best))
                if trial not in scores:
                    scores[trial] = loss(trial)
            best = min(scores, key=scores.get)
    if scores[best] < scores[current] * (1 - MIN_RELATIVE_GAIN):
        return best
    return current
