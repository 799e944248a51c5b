"""The samples a Trainer learns from: normalised, split for validation, mixed with replay data.

:class:`TrainingData` turns the given images, labels and weights into normalised
:class:`~napari_unet.data.Sample` objects, holds out validation data, appends the replay
(rehearsal) samples and says how often each sample is drawn. :func:`anchored_samples` labels the
unlabelled pixels with the starting model's own prediction (``TrainConfig.anchor_weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import io, losses
from ..data import DataError, Sample, make_samples, split_validation
from .config import TrainConfig


class TrainingData:
    """Training and validation samples (the new data first, then the replay data).

    normalization: the spec (``io.DEFAULT_NORMALIZATION`` by default); each sample is normalised
    on its own statistics, as ``predict`` normalises a 2D model's slice or a 3D model's volume.
    Statistics given with it (``lo``/``hi``) are used for every new sample instead: for crops of
    one bigger image, which prediction will see whole. ``normalization`` keeps the spec only.
    Without validation data, ``val_fraction`` of the labelled samples (or a region of a single
    sample) is held out; replay data hold out their own part.
    """

    def __init__(self, model: nn.Module, n_classes: int, images, labels, weights=None, *, val_images=None,
                 val_labels=None, val_weights=None, replay_images=None, replay_labels=None,
                 replay_weights=None, normalization: dict | None = None, val_fraction: float = 0.2):
        self.spatial_dims = int(model.spatial_dims)
        self.in_channels = int(model.in_channels)
        self.n_classes = n_classes
        self.normalization = dict(normalization or getattr(model, "normalization", None) or io.DEFAULT_NORMALIZATION)
        # the model keeps only the spec: prediction measures each new image itself
        given = (self.normalization.pop("lo", None), self.normalization.pop("hi", None))
        self.fixed_statistics = (
            {**self.normalization, "lo": given[0], "hi": given[1]} if None not in given else None)

        samples = self._make(images, labels, weights, self.normalize)
        check_sides(samples, model)
        if val_images is not None or val_labels is not None:
            if val_images is None or val_labels is None:
                raise DataError("Validation needs both images and labels.")
            self.train_samples, self.val_samples = samples, self._make(val_images, val_labels, val_weights,
                                                                       self.normalize)
        else:
            self.train_samples, self.val_samples = split_validation(samples, val_fraction)
        if not any(s.labelled_pixels for s in self.train_samples):
            raise DataError("After holding out validation data no labelled pixels are left to train on.")
        self.new_samples = len(self.train_samples)  # the replay samples follow them
        if replay_images is not None or replay_labels is not None:
            if replay_images is None or replay_labels is None:
                raise DataError("Replay needs both images and labels.")
            # each replayed image on its own statistics (fixed ones belong to the new image)
            replay = self._make(replay_images, replay_labels, replay_weights, self._normalize_on_its_own)
            replay_train, replay_val = split_validation(replay, val_fraction)
            self.train_samples = self.train_samples + replay_train
            self.val_samples = self.val_samples + replay_val

    @property
    def replay_samples(self) -> int:
        """How many training samples are replayed ones."""
        return len(self.train_samples) - self.new_samples

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """A new image normalised on the given statistics, or else on its own."""
        stats = self.fixed_statistics or io.compute_normalization(image, self.normalization)
        return io.apply_normalization(image, stats)

    def _normalize_on_its_own(self, image: np.ndarray) -> np.ndarray:
        return io.apply_normalization(image, io.compute_normalization(image, self.normalization))

    def _make(self, images, labels, weights, normalize: Callable[[np.ndarray], np.ndarray]) -> list[Sample]:
        return make_samples(images, labels, weights, spatial_dims=self.spatial_dims, in_channels=self.in_channels,
                            n_classes=self.n_classes, normalize=normalize)

    def sample_probability(self, replay_share: float) -> list[float] | None:
        """How often each training sample is drawn: None = in proportion to its labelled pixels.

        With replay data, ``replay_share`` of the draws go to the replay samples and the rest to
        the new ones (each group in proportion to its labelled pixels): a few thousand corrected
        pixels would otherwise be drowned by whole replayed slices.
        """
        counts = [float((sample.weights > 0).sum()) for sample in self.train_samples]
        new, old = counts[: self.new_samples], counts[self.new_samples:]
        if not sum(old) or not sum(new):
            return None
        share = float(replay_share)
        return [(1 - share) * c / sum(new) for c in new] + [share * c / sum(old) for c in old]

    def border_weight_maps(self, config: TrainConfig) -> list[np.ndarray] | None:
        """Per-sample border weight maps for the "border_weighted" loss or ``border_weights``; else None."""
        is_border_loss = config.loss.strip().lower().replace("-", "_") == "border_weighted"
        if not (is_border_loss or config.border_weights):
            return None
        return [losses.border_weight_map(sample.labels, w0=config.border_w0, sigma=config.border_sigma,
                                         valid_mask=sample.weights > 0)
                for sample in self.train_samples]


def check_sides(samples: Sequence[Sample], model: nn.Module) -> None:
    """One plain sentence, not the network's, when an image is thinner than the model can pool."""
    depth = int((getattr(model, "config", None) or {}).get("depth", getattr(model, "depth", 0)) or 0)
    thin = [s.spatial_shape for s in samples if min(s.spatial_shape) < 2**depth]
    if thin:
        raise DataError(
            f"The images are {' x '.join(str(n) for n in thin[0])} pixels, too thin for this model: with depth "
            f"{depth} every side must be at least {2**depth} pixels."
        )


@torch.no_grad()
def anchored_samples(samples: list[Sample], weight: float, own_classes: Callable[[Sample], np.ndarray],
                     stop_requested: Callable[[], bool]) -> list[Sample]:
    """``samples`` with their unlabelled pixels labelled ``own_classes(sample)`` at ``weight``.

    Only with ``weight`` > 0 and unlabelled pixels; patches are still centred on the labelled
    pixels. ``samples`` unchanged when ``stop_requested()`` comes first: the run ends before its
    first step.
    """
    if weight <= 0 or all(s.labelled_pixels == s.weights.size for s in samples):
        return samples
    anchored = []
    for sample in samples:
        if stop_requested():
            return samples
        unlabelled = sample.weights <= 0
        if not unlabelled.any():
            anchored.append(sample)
            continue
        own = own_classes(sample)
        labels = np.where(unlabelled, own.astype(sample.labels.dtype), sample.labels)
        weights = np.where(unlabelled, np.float32(weight), sample.weights).astype(np.float32)
        anchored.append(Sample(sample.image, labels, weights))
    return anchored
