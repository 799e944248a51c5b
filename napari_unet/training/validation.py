"""Scoring weights during training: Dice and IoU on the held-out samples, and the label offset.

:class:`Validator` predicts whole samples (tiled when big), scores them where the labels sit
(after the label offset measured on a spread subset of the training samples), and estimates how
long the work after the last step will take so that a time budget leaves room for it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import devices, label_offset, metrics
from ..data import Sample
from ..inference.tiling import _size_multiple
from .config import TrainConfig
from .precision import mixed_precision

# validation predicts whole samples up to this many pixels (2D) / voxels (3D) at once; bigger
# ones go through the tiled inference engine
_WHOLE_SAMPLE_PIXELS = {2: 2048 * 2048, 3: 128**3}
# training pixels (voxels) the label offset is measured on: at each validation (about half the
# cost of validating four 512^2 slices), and once more for the kept weights at the end
OFFSET_PIXELS_DURING = 2**19
OFFSET_PIXELS_FINAL = 2**21
# during a run the offset is measured again at a validation at most this often: it settles within
# the first minutes, and each measurement costs training steps
OFFSET_REMEASURE_SECONDS = 30.0


@dataclass
class Validation:
    """Scores of one validation: Dice and IoU per class, with the label offset applied."""

    dice: list[float]
    iou: list[float]
    offset: tuple[float, ...]


class Validator:
    """Scores models on the validation samples and measures the label offset on the training ones.

    ``label_offset`` is the offset of the weights being evaluated (the model's own to begin with);
    ``finish_reserve`` the seconds a time budget keeps for scoring the candidates with test-time
    augmentation and measuring the offset once more after the last step. ``config`` is read live:
    a later run may change it.
    """

    def __init__(self, config: TrainConfig, *, train_samples: Sequence[Sample], val_samples: Sequence[Sample],
                 n_classes: int, spatial_dims: int, device: torch.device, offset: tuple[float, ...],
                 stop_requested: Callable[[], bool]):
        self.config = config
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.n_classes = n_classes
        self.spatial_dims = spatial_dims
        self.device = device
        self.stop_requested = stop_requested
        self.label_offset = offset
        self.offset_measured_at = -math.inf  # when label_offset was last measured (perf_counter)
        self.offset_seconds = 0.0  # what the latest label-offset measurement took
        self.finish_reserve = 0.0

    def start_run(self) -> None:
        """A new run measures the offset at its first validation and estimates its reserve afresh."""
        self.offset_measured_at = -math.inf
        self.finish_reserve = 0.0

    @torch.no_grad()
    def predict_logits(self, sample: Sample, model: nn.Module, tta: bool = False) -> torch.Tensor:
        """Logits-like scores (C, *spatial) of a whole sample (no label offset), in eval mode.

        With ``tta``, log-probabilities averaged over the 8 views of ``predict(tta=True)``.
        """
        autocast, _ = mixed_precision(self.device, self.config.amp)
        image = sample.image
        whole = (int(np.prod(sample.spatial_shape)) <= _WHOLE_SAMPLE_PIXELS[self.spatial_dims]
                 and min(sample.spatial_shape) >= _size_multiple(model))
        if not tta and whole:  # else tiled: the engine reflects a side thinner than the model's pooling
            batch = torch.from_numpy(image)[None].to(self.device)
            if self.config.channels_last:
                batch = batch.contiguous(memory_format=devices.channels_last_format(self.spatial_dims))
            with autocast():
                return model(batch)[0].float()
        from ..inference import predict

        probabilities = predict(model, image, normalization=False, device=self.device, tta=tta,
                                label_offset=(0.0,) * self.spatial_dims)
        # probabilities (n_classes, *spatial) -> log-probabilities; a (1, Y, X) image came back
        # as a one-slice stack, (n_classes, 1, Y, X)
        probabilities = np.asarray(probabilities).reshape(-1, *sample.spatial_shape)
        return torch.from_numpy(probabilities).clamp_min(1e-12).log()

    def own_classes(self, sample: Sample, model: nn.Module) -> np.ndarray:
        """``model``'s class map of ``sample``, moved by the label offset to where the annotations sit."""
        probabilities = probabilities_of(self.predict_logits(sample, model))[None]
        return to_classes(label_offset.apply_offset(probabilities, self.label_offset))[0].cpu().numpy()

    def scores(self, model: nn.Module, offset: tuple[float, ...], *, tta: bool = False,
               ignore_stop: bool = False) -> tuple[list[float], list[float]] | None:
        """Dice and IoU per class of ``model`` on the validation samples; None if stopped."""
        predictions, targets, weights = [], [], []
        with eval_mode(model):
            for sample in self.val_samples:
                if self.stop_requested() and not ignore_stop:
                    return None
                probabilities = probabilities_of(self.predict_logits(sample, model, tta=tta))
                classes = to_classes(label_offset.apply_offset(probabilities[None], offset))[0]
                predictions.append(classes.cpu().numpy().ravel())
                targets.append(sample.labels.ravel())
                weights.append(sample.weights.ravel())
        prediction = np.concatenate(predictions)
        target = np.concatenate(targets)
        weight = np.concatenate(weights)
        dice = [float(v) for v in metrics.dice_per_class(prediction, target, self.n_classes, weight)]
        iou = [float(v) for v in metrics.iou_per_class(prediction, target, self.n_classes, weight)]
        return dice, iou

    def validate(self, model: nn.Module, *, ignore_stop: bool = False) -> Validation | None:
        """Score ``model`` (measuring the label offset first when it is due); None if stopped."""
        if self.stop_requested() and not ignore_stop:
            return None
        if time.perf_counter() - self.offset_measured_at >= OFFSET_REMEASURE_SECONDS:
            measure_start = time.perf_counter()
            self.measure_label_offset(model, OFFSET_PIXELS_DURING)
            self.offset_measured_at = time.perf_counter()
            offset_seconds = self.offset_measured_at - measure_start
        else:
            offset_seconds = None
        offset = self.label_offset
        model.label_offset = offset
        predict_start = time.perf_counter()
        scores = self.scores(model, offset, ignore_stop=ignore_stop)
        if scores is None:
            return None
        self._update_finish_reserve(time.perf_counter() - predict_start, offset_seconds)
        return Validation(scores[0], scores[1], offset)

    def _update_finish_reserve(self, predict_seconds: float, offset_seconds: float | None) -> None:
        """Leave room in a time budget for what follows the last step: scoring the candidates with
        8 views each, and measuring the label offset on 4x the pixels of a measurement in the run."""
        if offset_seconds is not None:
            self.offset_seconds = offset_seconds
        offset_part = 4 * self.offset_seconds if self.config.fit_label_offset else 0.0
        candidates_part = 8 * predict_seconds * self.config.tta_candidates if self.config.tta_candidates > 1 else 0.0
        budget = self.config.time_budget or 0.0
        self.finish_reserve = min(0.1 * budget, offset_part + candidates_part)

    def measure_label_offset(self, model: nn.Module, pixel_budget: int) -> tuple[float, ...]:
        """The label offset of ``model`` on up to ``pixel_budget`` training pixels (label_offset.py).

        Whole samples spread evenly over the training set (a bigger one is cut along its first
        axis). Without ``fit_label_offset`` the offset stays what the model came with.
        """
        current = self.label_offset
        if not self.config.fit_label_offset:
            return current
        samples = spread_subset([s for s in self.train_samples if s.labelled_pixels], pixel_budget)
        with eval_mode(model):
            probabilities = [probabilities_of(self.predict_logits(s, model)) for s in samples]
        self.label_offset = label_offset.estimate_offset(
            probabilities, [s.labels for s in samples], [s.weights for s in samples], current)
        return self.label_offset


def probabilities_of(scores: torch.Tensor) -> torch.Tensor:
    """Logits (or log-probabilities) (C, *spatial) -> probabilities with at least two channels."""
    if scores.shape[0] == 1:
        foreground = torch.sigmoid(scores.float())
        return torch.cat([1 - foreground, foreground])
    return torch.softmax(scores.float(), dim=0)


def to_classes(logits: torch.Tensor) -> torch.Tensor:
    """Logits (N, C, *spatial) -> class map (N, *spatial)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def spread_subset(samples: list[Sample], pixel_budget: int) -> list[Sample]:
    """About ``pixel_budget`` pixels of samples spread evenly over ``samples``; a sample bigger
    than the budget is cut to it along its first axis, around its middle."""
    if not samples:
        return []
    mean_pixels = float(np.mean([np.prod(s.spatial_shape) for s in samples]))
    count = int(min(len(samples), max(1, pixel_budget // mean_pixels)))
    picks = sorted(set(np.linspace(0, len(samples) - 1, count).round().astype(int)))
    return [_cut_to_budget(samples[i], pixel_budget) for i in picks]


# a 3D sample is cut to a box no thinner than this (or the sample) along any axis: thinner slabs
# give a deep 3D model too little context (and fewer voxels than its pooling needs)
_MIN_BOX_SIDE = 32


def _cut_to_budget(sample: Sample, pixel_budget: int) -> Sample:
    pixels = int(np.prod(sample.spatial_shape))
    if pixels <= pixel_budget:
        return sample
    if len(sample.spatial_shape) == 3:
        return _central_box(sample, pixel_budget)
    keep = max(1, pixel_budget * sample.spatial_shape[0] // pixels)
    first = (sample.spatial_shape[0] - keep) // 2  # around the middle
    return sample.along_first_axis(slice(first, first + keep))


def _central_box(sample: Sample, pixel_budget: int) -> Sample:
    """A box of about ``pixel_budget`` voxels around the middle of a 3D sample, every side shrunk by
    the same factor but kept at least ``_MIN_BOX_SIDE`` (or the whole side)."""
    shape = sample.spatial_shape
    factor = (pixel_budget / float(np.prod(shape))) ** (1.0 / len(shape))
    sides = [min(n, max(_MIN_BOX_SIDE, int(round(n * factor)))) for n in shape]
    box = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(shape, sides))
    return sample.crop(box)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, then back: batch norm uses its running statistics and keeps them."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
