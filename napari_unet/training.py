"""The training engine: a step loop that reports through events and stops on request.

``Trainer.run()`` is a generator: it yields a :class:`TrainEvent` after every optimisation step,
every validation and every preview, then a final ``"finished"`` event. A GUI iterates it inside a
worker thread; ``Trainer.stop()`` (thread-safe) ends the run before the next step. Nothing here
imports napari or Qt.

Typical use::

    trainer = Trainer(build_model("unet", width=16), images, labels,
                      config=TrainConfig(time_budget=600))
    history = trainer.fit()          # or: for event in trainer.run(): ...
    trainer.save("model.pt")
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import devices, io, label_offset, losses, metrics
from .data import AugmentConfig, DataError, PatchSampler, Sample, make_samples, split_validation

__all__ = [
    "TrainConfig",
    "TrainEvent",
    "Trainer",
    "TrainingError",
    "TrainingOutOfMemory",
    "default_patch_size",
]

SCHEDULES = ("cosine", "plateau", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
# validation predicts whole samples up to this many pixels (2D) / voxels (3D) at once; bigger
# ones go through the tiled inference engine
_WHOLE_SAMPLE_PIXELS = {2: 2048 * 2048, 3: 128**3}
# training pixels (voxels) the label offset is measured on: at each validation (about half the
# cost of validating four 512^2 slices), and once more for the kept weights at the end
_OFFSET_PIXELS_DURING = 2**19
_OFFSET_PIXELS_FINAL = 2**21
# during a run the offset is measured again at a validation at most this often: it settles within
# the first minutes, and each measurement costs training steps
_OFFSET_REMEASURE_SECONDS = 30.0


class TrainingError(ValueError):
    """Training settings or a resume checkpoint that cannot be used."""


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory during training."""


@dataclass
class TrainConfig:
    """Settings of one training run. The defaults are the ones benchmarked on ISBI 2012.

    patch_size: patch side(s); None = 192 x 192 for 2D models, 32 x 96 x 96 for 3D models.
    steps / time_budget: stop after this many optimisation steps / seconds (either or both;
        neither = until stop() or early stopping).
    schedule: "cosine" (linear warm-up, then cosine decay to `min_lr_fraction` of the peak over the
        steps or time budget),
        "plateau" (halve the learning rate after `plateau_patience` validations without
        improvement) or "constant".
    val_every: validate every N steps; None = automatically, every `val_interval` seconds at
        the earliest and so that validation takes at most about 12 % of the time.
    early_stopping_patience: stop after this many validations without a better mean Dice.
    amp: mixed precision: "auto" (bf16/fp16 on CUDA, fp32 on CPU where bf16 measured slower
        on the reference machine), "bf16", "fp16" or "off".
    loss_options: keyword options of the loss (e.g. {"dice_weight": 1.0} for "border_weighted").
    label_focus: probability that a patch is centred on a labelled pixel.
    ema_decay: validate, preview and keep an exponential moving average of the weights
        (Polyak averaging; it smooths the noise of high learning rates); None = the raw weights.
    border_weights: multiply the pixel weights by the UNet paper's border weight map (class
        balance plus w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) between touching cells) for any loss;
        always on for the "border_weighted" loss.
    anchor_weight: the unlabelled pixels (weight 0) of the training images learn the starting
        model's own prediction with this weight. For fine-tuning on a few corrections: the
        corrected pixels teach what was wrong, the rest keeps what the model already got right
        (self-distillation); without it, strokes that are nearly all one class teach "that
        class everywhere". 0 = unlabelled pixels are ignored.
    fit_label_offset: measure the sub-pixel offset between the training labels and the image
        (``label_offset.py``) during validation and at the end, and keep it with the model so
        validation and ``predict`` place boundaries where the annotations do.
    dice_fade: the Dice term of a loss that has one (``ce_dice``, ``dice_bce``, ...) falls
        linearly to 0 over this fraction of the step or time budget, leaving cross-entropy alone.
        Dice learns thin structures fast; cross-entropy is the proper scoring rule, so its
        probabilities thresholded at 0.5 give the least pixel error. None = a constant weight
        (also without a budget).
    tta_candidates: the weights of this many best validations are kept, and at the end of the
        run scored once more on the validation data with 8-view test-time augmentation (what
        ``predict(tta=True)`` does); the best of them is kept. One view's Dice is a noisy choice:
        a view can be lucky while the seven others are worse. 1 = the best single-view weights.
        A time budget leaves room for this scoring (and the final label-offset measurement).
    augment_ramp: the probabilities of the elastic and intensity augmentations rise linearly from
        0 to their full values over this fraction of the step or time budget (flips and
        rotations are always on). The first steps learn the plain images, which reaches a useful
        model sooner; the later ones get the full regularisation (the progressive learning of
        EfficientNetV2). None = full augmentation from the start (also without a budget); the
        Fine-tune dock and ``train --init`` use None: a trained model learning a few corrections
        needs the regularisation from the first step.
    replay_share: with replay data given to the Trainer (the data a model was trained on, while
        it fine-tunes on new corrections), this share of the patches comes from them and the
        rest from the new data, however few pixels those hold. Rehearsal keeps what the model
        learnt while the corrections pull it where it was wrong (benchmarks/results/TRAINING.md).
    """

    patch_size: int | tuple[int, ...] | None = None
    batch_size: int = 4
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    steps: int | None = None
    time_budget: float | None = None
    loss: str = "ce_dice"
    loss_options: dict = field(default_factory=dict)
    augment: bool = True
    schedule: str = "cosine"
    warmup_steps: int = 30
    val_fraction: float = 0.2
    val_every: int | None = None
    early_stopping_patience: int | None = None
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    val_interval: float = 10.0
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    min_lr_fraction: float = 0.01
    label_focus: float = 0.8
    channels_last: bool = True
    ema_decay: float | None = 0.99
    border_weights: bool = False
    border_w0: float = 10.0
    border_sigma: float = 5.0
    anchor_weight: float = 0.0
    fit_label_offset: bool = True
    dice_fade: float | None = 0.3
    tta_candidates: int = 4
    augment_ramp: float | None = 0.2
    replay_share: float = 0.5

    def check(self) -> None:
        """Raise TrainingError (one plain sentence) for settings that cannot work."""
        if self.batch_size < 1:
            raise TrainingError(f"The batch size must be at least 1, not {self.batch_size}.")
        if not self.learning_rate > 0:
            raise TrainingError(f"The learning rate must be positive, not {self.learning_rate}.")
        if self.steps is not None and self.steps < 1:
            raise TrainingError(f"The number of steps must be at least 1, not {self.steps}.")
        if self.time_budget is not None and not self.time_budget > 0:
            raise TrainingError(f"The time budget must be positive, not {self.time_budget}.")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"Unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}.")
        if self.amp not in AMP_MODES:
            raise TrainingError(f"Unknown mixed-precision mode {self.amp!r}; use one of {', '.join(AMP_MODES)}.")
        if not 0 <= self.val_fraction < 1:
            raise TrainingError(f"The validation fraction must be in [0, 1), not {self.val_fraction}.")
        if self.val_every is not None and self.val_every < 1:
            raise TrainingError(f"val_every must be at least 1 step, not {self.val_every}.")
        if self.warmup_steps < 0:
            raise TrainingError(f"The warm-up must not be negative, not {self.warmup_steps}.")
        if not 0 <= self.anchor_weight <= 1:
            raise TrainingError(f"The anchor weight must be in [0, 1], not {self.anchor_weight}.")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise TrainingError(f"The EMA decay must be in [0, 1), not {self.ema_decay}.")
        if not 0 <= self.min_lr_fraction <= 1:
            raise TrainingError(f"min_lr_fraction must be in [0, 1], not {self.min_lr_fraction}.")
        if self.dice_fade is not None and not 0 < self.dice_fade <= 1:
            raise TrainingError(f"dice_fade must be in (0, 1], not {self.dice_fade}.")
        if self.augment_ramp is not None and not 0 < self.augment_ramp <= 1:
            raise TrainingError(f"augment_ramp must be in (0, 1], not {self.augment_ramp}.")
        if not 0 <= self.replay_share < 1:
            raise TrainingError(f"The replay share must be in [0, 1), not {self.replay_share}.")
        if self.tta_candidates < 1:
            raise TrainingError(f"tta_candidates must be at least 1, not {self.tta_candidates}.")
        if self.loss.strip().lower().replace("-", "_") not in losses.available_losses():
            raise TrainingError(f"Unknown loss {self.loss!r}; use one of {', '.join(losses.available_losses())}.")


@dataclass
class TrainEvent:
    """What the trainer reports: after a step, a validation, a preview, and once at the end."""

    kind: str  # "step" | "validation" | "preview" | "finished"
    step: int
    elapsed: float  # seconds since run() started
    loss: float | None = None
    lr: float | None = None
    samples_per_second: float | None = None
    dice: list[float] | None = None  # per class
    iou: list[float] | None = None  # per class
    message: str = ""
    payload: Any = None


def default_patch_size(spatial_dims: int) -> tuple[int, ...]:
    return (192, 192) if spatial_dims == 2 else (32, 96, 96)


def _patch_size(config: TrainConfig, spatial_dims: int) -> tuple[int, ...]:
    if config.patch_size is None:
        return default_patch_size(spatial_dims)
    if isinstance(config.patch_size, int):
        return (int(config.patch_size),) * spatial_dims
    size = tuple(int(s) for s in config.patch_size)
    if len(size) != spatial_dims:
        raise TrainingError(f"The patch size {size} does not have {spatial_dims} sides for a {spatial_dims}D model.")
    return size


def _n_classes(model: nn.Module) -> int:
    return max(2, int(model.out_channels))


def _to_classes(logits: torch.Tensor) -> torch.Tensor:
    """Logits (N, C, *spatial) -> class map (N, *spatial)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def _check_sides(samples, model: nn.Module) -> None:
    """One plain sentence, not the network's, when an image is thinner than the model can pool."""
    depth = int((getattr(model, "config", None) or {}).get("depth", getattr(model, "depth", 0)) or 0)
    thin = [s.spatial_shape for s in samples if min(s.spatial_shape) < 2**depth]
    if thin:
        raise DataError(
            f"The images are {' x '.join(str(n) for n in thin[0])} pixels, too thin for this model: with depth "
            f"{depth} every side must be at least {2**depth} pixels."
        )


class Trainer:
    """Trains a segmentation model on (sparsely) labelled images; see the module docstring.

    images: a list of raw arrays, one per sample (2D model: (Y, X) or (C, Y, X); 3D model:
    (Z, Y, X) or (C, Z, Y, X)), or one array: a (Z, Y, X) stack is Z samples for a 2D model.
    labels: integer class maps of the same spatial shapes. weights: float maps, 0 = ignore.
    Validation data are given the same way; without them `config.val_fraction` of the labelled
    samples (or a region of a single sample) is held out and never used for training.
    normalization: the spec (``io.DEFAULT_NORMALIZATION`` by default); each sample is normalised
    on its own statistics, as ``predict`` normalises a 2D model's slice or a 3D model's volume.
    Statistics given with it (``lo``/``hi``) are used for every sample instead: for crops of one
    bigger image, which prediction will see whole. The model keeps the spec only.
    """

    def __init__(
        self,
        model: nn.Module,
        images,
        labels,
        weights=None,
        *,
        val_images=None,
        val_labels=None,
        val_weights=None,
        config: TrainConfig | None = None,
        callbacks: Sequence[Callable[[TrainEvent], Any]] = (),
        normalization: dict | None = None,
        preview_fn: Callable[[nn.Module], Any] | None = None,
        preview_interval: float = 5.0,
        resume_from=None,
        replay_images=None,
        replay_labels=None,
        replay_weights=None,
    ):
        self.config = config if config is not None else TrainConfig()
        self.config.check()
        self.model = model
        self.callbacks = list(callbacks)
        self.preview_fn = preview_fn
        self.preview_interval = float(preview_interval)
        self.normalization = dict(normalization or getattr(model, "normalization", None) or io.DEFAULT_NORMALIZATION)
        # the model keeps only the spec: prediction measures each new image itself
        given = (self.normalization.pop("lo", None), self.normalization.pop("hi", None))
        self._fixed_statistics = (
            {**self.normalization, "lo": given[0], "hi": given[1]} if None not in given else None)
        self.device = devices.resolve_device(self.config.device)
        self.spatial_dims = int(model.spatial_dims)
        self.n_classes = _n_classes(model)
        self.patch_size = _patch_size(self.config, self.spatial_dims)

        def make(imgs, labs, wts, normalize=self._normalize):
            return make_samples(
                imgs, labs, wts, spatial_dims=self.spatial_dims, in_channels=int(model.in_channels),
                n_classes=self.n_classes, normalize=normalize,
            )

        samples = make(images, labels, weights)
        _check_sides(samples, model)
        if val_images is not None or val_labels is not None:
            if val_images is None or val_labels is None:
                raise DataError("Validation needs both images and labels.")
            self.train_samples, self.val_samples = samples, make(val_images, val_labels, val_weights)
        else:
            self.train_samples, self.val_samples = split_validation(samples, self.config.val_fraction)
        if not any(s.labelled_pixels for s in self.train_samples):
            raise DataError("After holding out validation data no labelled pixels are left to train on.")
        self._new_samples = len(self.train_samples)  # the replay samples follow them
        if replay_images is not None or replay_labels is not None:
            if replay_images is None or replay_labels is None:
                raise DataError("Replay needs both images and labels.")
            # each replayed image on its own statistics (fixed ones belong to the new image)
            replay = make(replay_images, replay_labels, replay_weights,
                          normalize=lambda image: io.apply_normalization(
                              image, io.compute_normalization(image, self.normalization)))
            replay_train, replay_val = split_validation(replay, self.config.val_fraction)
            self.train_samples = self.train_samples + replay_train
            self.val_samples = self.val_samples + replay_val

        self.history: dict[str, Any] = {
            "step": [], "elapsed": [], "loss": [], "lr": [],
            "val_step": [], "val_elapsed": [], "val_dice": [], "val_iou": [],
            "best_step": None, "best_val_dice": None, "stop_reason": "",
        }
        self._stop_event = threading.Event()
        self._step = 0
        self._elapsed_before = 0.0  # training seconds of earlier runs (resume)
        self._best_score = -math.inf
        self._best_state: dict[str, torch.Tensor] | None = None
        self._lr_scale = 1.0
        self._stale_validations = 0
        self._generator = torch.Generator().manual_seed(int(self.config.seed))
        self._evaluated = model  # the model validation and previews use (an EMA copy during run())
        self._label_offset = label_offset.model_offset(model)  # of the evaluated weights
        self._best_offset = self._label_offset
        self._offset_measured_at = -math.inf  # when _label_offset was last measured (perf_counter)
        self._candidates: list[_Candidate] = []  # the best validations' weights, best first
        self._finish_reserve = 0.0  # seconds of a time budget left for the work after the last step
        self._offset_seconds = 0.0  # what the latest label-offset measurement took
        self.model.normalization = dict(self.normalization)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        if resume_from is not None:
            self._load_resume_state(resume_from)

    # ------------------------------------------------------------------------------------------
    # Public API

    def stop(self) -> None:
        """Ask the run to end before its next step (safe to call from any thread)."""
        self._stop_event.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_event.is_set()

    @property
    def step(self) -> int:
        return self._step

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights validation and previews use: the running weight average during run()."""
        return self._evaluated

    def fit(self) -> dict:
        """Run to the end, calling the callbacks with every event; returns the history."""
        for _ in self.run():
            pass
        return self.history

    def run(self) -> Iterator[TrainEvent]:
        """Train, yielding a TrainEvent per step / validation / preview and a final "finished" event."""
        try:
            yield from self._run()
        except Exception as error:
            if devices.is_out_of_memory(error):
                devices.release_memory(self.device)
                raise TrainingOutOfMemory(
                    f"The {self.device.type} device ran out of memory; use a smaller batch size "
                    f"(now {self.config.batch_size}) or patch size (now {'x'.join(map(str, self.patch_size))})."
                ) from error
            raise
        finally:
            self._restore_best()
            # a stop() asked for during this run is used up; a later run() trains again
            self._stop_event.clear()

    def save(
        self, path, provenance: dict | None = None, class_names: Sequence[str] | None = None
    ) -> Path:
        """Save the model (best weights), history, normalisation spec and resume state.

        ``class_names`` (e.g. ["membrane", "cell interior"]) default to the model's own, if any.
        """
        from .checkpoint import save_checkpoint

        info = {
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": self._step,
            "training_seconds": round(self._elapsed_before, 1),
            "train_config": _plain_config(self.config),
            "train_samples": self._new_samples,
            "replay_samples": len(self.train_samples) - self._new_samples,
            "val_samples": len(self.val_samples),
        }
        info.update(provenance or {})
        extra = {
            "optimizer": self.optimizer.state_dict(),
            "trainer": {
                "step": self._step,
                "elapsed": self._elapsed_before,
                "lr_scale": self._lr_scale,
                "best_score": self._best_score if math.isfinite(self._best_score) else None,
                "generator_state": self._generator.get_state(),
            },
        }
        return save_checkpoint(
            path, self.model, normalization=self.normalization, history=self.history,
            provenance=info, extra=extra,
            class_names=class_names or getattr(self.model, "class_names", None),
        )

    # ------------------------------------------------------------------------------------------
    # Setup

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        stats = self._fixed_statistics or io.compute_normalization(image, self.normalization)
        return io.apply_normalization(image, stats)

    def _load_resume_state(self, source) -> None:
        from .checkpoint import Checkpoint, load_checkpoint

        ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
        if dict(ckpt.config) != dict(self.model.config):
            raise TrainingError("The checkpoint to resume from holds a different model architecture.")
        self.model.load_state_dict(ckpt.model.state_dict())
        self.model.to(self.device)
        state = ckpt.extra.get("trainer", {}) if isinstance(ckpt.extra, dict) else {}
        optimizer_state = ckpt.extra.get("optimizer") if isinstance(ckpt.extra, dict) else None
        if optimizer_state:
            try:
                self.optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError) as error:
                raise TrainingError("The optimizer state in the checkpoint does not fit this model.") from error
            for group in self.optimizer.param_groups:  # this run's settings win
                group["lr"] = self.config.learning_rate
                group["weight_decay"] = self.config.weight_decay
        self._step = int(state.get("step", 0))
        self._elapsed_before = float(state.get("elapsed", 0.0))
        if state.get("generator_state") is not None:
            self._generator.set_state(state["generator_state"])
        if ckpt.history:
            for key, value in ckpt.history.items():
                self.history[key] = list(value) if isinstance(value, (list, tuple)) else value
        # the old best score came from another validation set maybe: start selection afresh,
        # with the resumed weights as the first candidate
        self._best_state = None

    def _loss_weights(self) -> list[np.ndarray] | None:
        """Per-sample border weight maps for the "border_weighted" loss (computed once)."""
        is_border_loss = self.config.loss.strip().lower().replace("-", "_") == "border_weighted"
        if not (is_border_loss or self.config.border_weights):
            return None
        maps = []
        for sample in self.train_samples:
            maps.append(
                losses.border_weight_map(
                    sample.labels, w0=self.config.border_w0, sigma=self.config.border_sigma,
                    valid_mask=sample.weights > 0,
                )
            )
        return maps

    @torch.no_grad()
    def _anchored_samples(self) -> list[Sample]:
        """The training samples, their unlabelled pixels labelled by the model as it is now.

        Only with ``anchor_weight`` > 0; patches are still centred on the labelled pixels.
        """
        weight = float(self.config.anchor_weight)
        if weight <= 0 or all(s.labelled_pixels == s.weights.size for s in self.train_samples):
            return self.train_samples
        anchored = []
        with _eval_mode(self.model) as model:
            for sample in self.train_samples:
                if self._stop_event.is_set():  # stop() comes first: the run ends before its first step
                    return self.train_samples
                unlabelled = sample.weights <= 0
                if not unlabelled.any():
                    anchored.append(sample)
                    continue
                # the model's own labels, moved to where the annotations sit
                probabilities = _probabilities(self._predict_sample_logits(sample, model))[None]
                own = _to_classes(label_offset.apply_offset(probabilities, self._label_offset))[0].cpu().numpy()
                labels = np.where(unlabelled, own.astype(sample.labels.dtype), sample.labels)
                weights = np.where(unlabelled, np.float32(weight), sample.weights).astype(np.float32)
                anchored.append(Sample(sample.image, labels, weights))
        return anchored

    def _sample_probability(self) -> list[float] | None:
        """How often each training sample is drawn: None = in proportion to its labelled pixels.

        With replay data, ``replay_share`` of the draws go to the replay samples and the rest to
        the new ones (each group in proportion to its labelled pixels): a few thousand corrected
        pixels would otherwise be drowned by whole replayed slices.
        """
        counts = [float((sample.weights > 0).sum()) for sample in self.train_samples]
        new, old = counts[: self._new_samples], counts[self._new_samples:]
        if not sum(old) or not sum(new):
            return None
        share = float(self.config.replay_share)
        return [(1 - share) * c / sum(new) for c in new] + [share * c / sum(old) for c in old]

    def _autocast(self):
        """(autocast context factory, GradScaler or None) for the chosen precision."""
        precision = {"auto": "auto", "bf16": "bf16", "fp16": "fp16", "off": "fp32"}[self.config.amp]
        dtype = devices.autocast_dtype(self.device, precision)
        if dtype is None or self.device.type not in ("cuda", "cpu"):
            return (lambda: torch.autocast(self.device.type, enabled=False)), None
        scaler = None
        if dtype == torch.float16 and self.device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        return (lambda: torch.autocast(self.device.type, dtype=dtype)), scaler

    # ------------------------------------------------------------------------------------------
    # The loop

    def _run(self) -> Iterator[TrainEvent]:
        config = self.config
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        self._run_start = start
        augment = AugmentConfig() if config.augment else None
        ramping = augment is not None and config.augment_ramp is not None
        sampler = PatchSampler(
            self._anchored_samples(), self.patch_size, device=self.device, augment=augment,
            label_focus=config.label_focus, extra_weights=self._loss_weights(),
            focus=[sample.weights > 0 for sample in self.train_samples],
            sample_probability=self._sample_probability(),
        )
        loss_fn = losses.get_loss(config.loss, **config.loss_options)
        fading = config.dice_fade is not None and _has_cross_entropy_term(loss_fn)
        dice_weight = loss_fn.dice_weight if fading else None  # the full weight, faded each step
        autocast, scaler = self._autocast()
        memory_format = torch.channels_last if (config.channels_last and self.spatial_dims == 2) else None
        if memory_format is not None:
            self.model.to(memory_format=memory_format)
        self.model.train()
        averaged = _WeightAverage(self.model, config.ema_decay)
        self._evaluated = averaged.model
        self._offset_measured_at = -math.inf
        self._finish_reserve = 0.0  # estimated again at every validation
        self.history.pop("tta_choice", None)  # describes the latest run's choice only
        self._evaluated.label_offset = self._label_offset

        run_steps = 0
        throughput = None
        last_validation = start
        validation_seconds = 0.0
        last_preview = start
        reason = ""
        best_before = self._best_score
        while True:
            reason = self._stop_reason(run_steps, start)
            if reason:
                break
            step_start = time.perf_counter()
            progress = self._progress(run_steps, start)  # one value for both schedules of this step
            lr = self._set_learning_rate(run_steps, progress)
            if dice_weight is not None and progress is not None:
                loss_fn.dice_weight = dice_weight * max(0.0, 1.0 - progress / config.dice_fade)
            if ramping and progress is not None:
                sampler.augment = _ramped(augment, min(1.0, progress / config.augment_ramp))
            images, labels, weights = sampler.sample(config.batch_size, self._generator)
            if memory_format is not None:
                images = images.contiguous(memory_format=memory_format)
            with autocast():
                logits = self.model(images)
            loss = loss_fn(logits.float(), labels, weights)
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(self.optimizer)
                scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            averaged.update(self.model)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                reason = "stopped: the loss became NaN or infinite (try a smaller learning rate)"
                break
            run_steps += 1
            self._step += 1
            now = time.perf_counter()
            rate = config.batch_size / max(now - step_start, 1e-9)
            throughput = rate if throughput is None else 0.9 * throughput + 0.1 * rate
            elapsed = self._elapsed(now, start)
            self._record_step(elapsed, loss_value, lr)
            event = TrainEvent("step", self._step, elapsed, loss=loss_value, lr=lr, samples_per_second=throughput)
            yield self._emit(event)

            if self.val_samples and self._validation_due(run_steps, now, last_validation, validation_seconds):
                val_start = time.perf_counter()
                event = self._validate(start)
                last_validation = time.perf_counter()
                validation_seconds = last_validation - val_start
                if event is None:  # interrupted by stop()
                    continue
                yield self._emit(event)
                if self._early_stop_due():
                    reason = f"early stop: no better validation Dice in {config.early_stopping_patience} validations"
                    break
            if self.preview_fn is not None and time.perf_counter() - last_preview >= self.preview_interval:
                yield self._emit(self._preview(start))
                last_preview = time.perf_counter()

        # score the final weights too, unless they were just validated
        if self.val_samples and run_steps and (not self.history["val_step"] or self.history["val_step"][-1] != self._step):
            if not reason.startswith("stopped by user"):
                event = self._validate(start, ignore_stop=True)
                if event is not None:
                    yield self._emit(event)
        if not self.val_samples:
            # without validation the last (averaged) weights are kept
            self._best_state = _state_copy(averaged.model) if averaged.model is not self.model else None
        self.history["stop_reason"] = reason
        choice = self._choose_with_tta() if not reason.startswith("stopped by user") else None
        self._restore_best()
        if run_steps and not reason.startswith("stopped by user"):
            self._best_offset = self._measure_label_offset(self.model, _OFFSET_PIXELS_FINAL)
            self.model.label_offset = self._best_offset
        self.history["label_offset"] = list(self._best_offset)
        self._elapsed_before = self._elapsed(time.perf_counter(), start)
        message = reason
        if self.history["best_val_dice"] is not None and self._best_score > best_before:
            message += f"; best validation mean Dice {self._best_score:.4f}"
            if choice:
                kept = max(choice, key=lambda c: np.mean(c["tta_dice"]))
                message += (f"; kept step {self.history['best_step']}, the best of the {len(choice)} best "
                            f"with test-time augmentation (mean Dice {np.mean(kept['tta_dice']):.4f})")
            else:
                message += f" at step {self.history['best_step']}"
        yield self._emit(TrainEvent("finished", self._step, self._elapsed_before, message=message))

    def _elapsed(self, now: float, start: float) -> float:
        return self._elapsed_before + (now - start)

    def _stop_reason(self, run_steps: int, start: float) -> str:
        config = self.config
        if self._stop_event.is_set():
            return f"stopped by user after {run_steps} steps"
        if config.steps is not None and run_steps >= config.steps:
            return f"reached {config.steps} steps"
        if config.time_budget is not None and time.perf_counter() - start >= config.time_budget - self._finish_reserve:
            return f"reached the time budget of {config.time_budget:g} s"
        return ""

    def _progress(self, run_steps: int, start: float) -> float | None:
        """Fraction of the run done (by steps or time, whichever is further); None = open-ended."""
        parts = []
        if self.config.steps is not None:
            parts.append(run_steps / self.config.steps)
        if self.config.time_budget is not None:
            parts.append((time.perf_counter() - start) / self.config.time_budget)
        return min(1.0, max(parts)) if parts else None

    def _set_learning_rate(self, run_steps: int, progress: float | None) -> float:
        config = self.config
        lr = config.learning_rate * self._lr_scale
        if config.warmup_steps and run_steps < config.warmup_steps:
            lr *= (run_steps + 1) / (config.warmup_steps + 1)
        elif config.schedule == "cosine" and progress is not None:
            floor = config.min_lr_fraction
            lr *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _record_step(self, elapsed: float, loss: float, lr: float) -> None:
        self.history["step"].append(self._step)
        self.history["elapsed"].append(round(elapsed, 3))
        self.history["loss"].append(loss)
        self.history["lr"].append(lr)

    def _emit(self, event: TrainEvent) -> TrainEvent:
        for callback in self.callbacks:
            callback(event)
        return event

    # ------------------------------------------------------------------------------------------
    # Validation, model selection, previews

    def _validation_due(self, run_steps: int, now: float, last_validation: float, last_cost: float) -> bool:
        if self.config.val_every is not None:
            return run_steps % self.config.val_every == 0
        # automatic: at most every val_interval seconds, and validation <= ~12 % of the time
        waited = now - last_validation
        return waited >= max(self.config.val_interval, 7.0 * last_cost)

    @torch.no_grad()
    def _predict_sample_logits(self, sample: Sample, model: nn.Module | None = None,
                               tta: bool = False) -> torch.Tensor:
        """Logits-like scores (C, *spatial) of a whole sample (no label offset), in eval mode.

        With ``tta``, log-probabilities averaged over the 8 views of ``predict(tta=True)``.
        """
        model = self._evaluated if model is None else model
        autocast, _ = self._autocast()
        image = sample.image
        if not tta and int(np.prod(sample.spatial_shape)) <= _WHOLE_SAMPLE_PIXELS[self.spatial_dims]:
            batch = torch.from_numpy(image)[None].to(self.device)
            if self.spatial_dims == 2 and self.config.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast():
                return model(batch)[0].float()
        from .inference import predict

        probabilities = predict(model, image, normalization=False, device=self.device, tta=tta,
                                label_offset=(0.0,) * self.spatial_dims)
        # probabilities (n_classes, *spatial) -> log-probabilities; a (1, Y, X) image came back
        # as a one-slice stack, (n_classes, 1, Y, X)
        probabilities = np.asarray(probabilities).reshape(-1, *sample.spatial_shape)
        return torch.from_numpy(probabilities).clamp_min(1e-12).log()

    def _validation_scores(self, model: nn.Module, offset: tuple[float, ...], *, tta: bool = False,
                           ignore_stop: bool = False) -> tuple[list[float], list[float]] | None:
        """Dice and IoU per class of ``model`` on the validation samples; None if stopped."""
        predictions, targets, weights = [], [], []
        with _eval_mode(model):
            for sample in self.val_samples:
                if self._stop_event.is_set() and not ignore_stop:
                    return None
                probabilities = _probabilities(self._predict_sample_logits(sample, model, tta=tta))
                classes = _to_classes(label_offset.apply_offset(probabilities[None], offset))[0]
                predictions.append(classes.cpu().numpy().ravel())
                targets.append(sample.labels.ravel())
                weights.append(sample.weights.ravel())
        prediction = np.concatenate(predictions)
        target = np.concatenate(targets)
        weight = np.concatenate(weights)
        dice = [float(v) for v in metrics.dice_per_class(prediction, target, self.n_classes, weight)]
        iou = [float(v) for v in metrics.iou_per_class(prediction, target, self.n_classes, weight)]
        return dice, iou

    def _validate(self, start: float, ignore_stop: bool = False) -> TrainEvent | None:
        model = self._evaluated
        if self._stop_event.is_set() and not ignore_stop:
            return None
        if time.perf_counter() - self._offset_measured_at >= _OFFSET_REMEASURE_SECONDS:
            measure_start = time.perf_counter()
            self._measure_label_offset(model, _OFFSET_PIXELS_DURING)
            self._offset_measured_at = time.perf_counter()
            offset_seconds = self._offset_measured_at - measure_start
        else:
            offset_seconds = None
        offset = self._label_offset
        model.label_offset = offset
        predict_start = time.perf_counter()
        scores = self._validation_scores(model, offset, ignore_stop=ignore_stop)
        if scores is None:
            return None
        dice, iou = scores
        self._update_finish_reserve(time.perf_counter() - predict_start, offset_seconds)
        elapsed = self._elapsed(time.perf_counter(), start)
        self.history["val_step"].append(self._step)
        self.history["val_elapsed"].append(round(elapsed, 3))
        self.history["val_dice"].append(dice)
        self.history["val_iou"].append(iou)
        score = float(np.mean(dice))
        if score > self._best_score:
            self._best_score = score
            self._best_state = _state_copy(model)
            self._best_offset = offset
            self.history["best_step"] = self._step
            self.history["best_val_dice"] = dice
            self._stale_validations = 0
        else:
            self._stale_validations += 1
            if self.config.schedule == "plateau" and self._stale_validations % self.config.plateau_patience == 0:
                self._lr_scale *= self.config.plateau_factor
        self._keep_candidate(score, dice, model, offset)
        return TrainEvent("validation", self._step, elapsed, dice=dice, iou=iou,
                          message=f"validation mean Dice {score:.4f}")

    def _keep_candidate(self, score: float, dice: list[float], model: nn.Module,
                        offset: tuple[float, ...]) -> None:
        """Keep these weights if they are among the ``tta_candidates`` best validated so far."""
        limit = self.config.tta_candidates
        if limit < 2 or (len(self._candidates) >= limit and score <= self._candidates[-1].score):
            return
        just_best = self.history["best_step"] == self._step and self._best_score == score
        state = self._best_state if just_best else _state_copy(model)  # no second copy of the best
        self._candidates.append(_Candidate(score, self._step, dice, state, offset))
        self._candidates.sort(key=lambda candidate: -candidate.score)
        del self._candidates[limit:]

    def _update_finish_reserve(self, predict_seconds: float, offset_seconds: float | None) -> None:
        """Leave room in a time budget for what follows the last step: scoring the candidates with
        8 views each, and measuring the label offset on 4x the pixels of a measurement in the run."""
        if offset_seconds is not None:
            self._offset_seconds = offset_seconds
        offset_part = 4 * self._offset_seconds if self.config.fit_label_offset else 0.0
        candidates_part = 8 * predict_seconds * self.config.tta_candidates if self.config.tta_candidates > 1 else 0.0
        budget = self.config.time_budget or 0.0
        self._finish_reserve = min(0.1 * budget, offset_part + candidates_part)

    def _choose_with_tta(self) -> list[dict] | None:
        """Score the candidates with test-time augmentation; the best becomes the kept weights.

        Returns what was compared (also in ``history["tta_choice"]``), or None when there was
        nothing to choose or Stop came first (then the best single-view weights stay).
        """
        if len(self._candidates) < 2:
            return None
        scratch = copy.deepcopy(self.model)
        scored = []
        for candidate in self._candidates:
            scratch.load_state_dict(candidate.state)
            scores = self._validation_scores(scratch, candidate.offset, tta=True)
            if scores is None:  # Stop came first
                return None
            scored.append((float(np.mean(scores[0])), candidate, scores[0]))
        _, kept, _ = max(scored, key=lambda item: item[0])
        self._best_state, self._best_offset = kept.state, kept.offset
        self.history["best_step"], self.history["best_val_dice"] = kept.step, kept.dice
        self.history["tta_choice"] = [{"step": c.step, "dice": c.dice, "tta_dice": tta_dice}
                                      for _, c, tta_dice in scored]
        return self.history["tta_choice"]

    def _measure_label_offset(self, model: nn.Module, pixel_budget: int) -> tuple[float, ...]:
        """The label offset of ``model`` on up to ``pixel_budget`` training pixels (label_offset.py).

        Whole samples spread evenly over the training set (a bigger one is cut along its first
        axis). Without ``fit_label_offset`` the offset stays what the model came with.
        """
        current = self._label_offset
        if not self.config.fit_label_offset:
            return current
        samples = _spread_subset([s for s in self.train_samples if s.labelled_pixels], pixel_budget)
        with _eval_mode(model):
            probabilities = [_probabilities(self._predict_sample_logits(s, model)) for s in samples]
        self._label_offset = label_offset.estimate_offset(
            probabilities, [s.labels for s in samples], [s.weights for s in samples], current)
        return self._label_offset

    def _early_stop_due(self) -> bool:
        patience = self.config.early_stopping_patience
        return patience is not None and self._stale_validations >= patience

    def _preview(self, start: float) -> TrainEvent:
        with _eval_mode(self._evaluated) as model, torch.no_grad():
            payload = self.preview_fn(model)
        return TrainEvent("preview", self._step, self._elapsed(time.perf_counter(), start), payload=payload)

    def _restore_best(self) -> None:
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        self.model.label_offset = self._best_offset
        self.model.eval()
        if self.spatial_dims == 2:
            self.model.to(memory_format=torch.contiguous_format)


def _ramped(augment: AugmentConfig, fraction: float) -> AugmentConfig:
    """``augment`` with its elastic and intensity probabilities scaled by ``fraction``."""
    return replace(augment, elastic_probability=augment.elastic_probability * fraction,
                   intensity_probability=augment.intensity_probability * fraction)


def _has_cross_entropy_term(loss_fn: nn.Module) -> bool:
    """A loss with a Dice term beside a cross-entropy one (the Dice loss alone cannot fade)."""
    if not hasattr(loss_fn, "dice_weight"):
        return False
    return getattr(loss_fn, "bce_weight", 1.0) > 0


def _probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Logits (or log-probabilities) (C, *spatial) -> probabilities with at least two channels."""
    if scores.shape[0] == 1:
        foreground = torch.sigmoid(scores.float())
        return torch.cat([1 - foreground, foreground])
    return torch.softmax(scores.float(), dim=0)


def _spread_subset(samples: list[Sample], pixel_budget: int) -> list[Sample]:
    """About ``pixel_budget`` pixels of samples spread evenly over ``samples``; a sample bigger
    than the budget is cut to it along its first axis, around its middle."""
    if not samples:
        return []
    mean_pixels = float(np.mean([np.prod(s.spatial_shape) for s in samples]))
    count = int(min(len(samples), max(1, pixel_budget // mean_pixels)))
    picks = sorted(set(np.linspace(0, len(samples) - 1, count).round().astype(int)))
    return [_cut_to_budget(samples[i], pixel_budget) for i in picks]


def _cut_to_budget(sample: Sample, pixel_budget: int) -> Sample:
    pixels = int(np.prod(sample.spatial_shape))
    if pixels <= pixel_budget:
        return sample
    keep = max(1, pixel_budget * sample.spatial_shape[0] // pixels)
    first = (sample.spatial_shape[0] - keep) // 2  # around the middle
    return sample.along_first_axis(slice(first, first + keep))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, then back: batch norm uses its running statistics and keeps them."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class _Candidate:
    """Weights of one validation, kept for the final choice with test-time augmentation."""

    score: float  # mean Dice over the classes, one view
    step: int
    dice: list[float]
    state: dict[str, torch.Tensor]
    offset: tuple[float, ...]


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class _WeightAverage:
    """An exponential moving average of a model's weights and of its BatchNorm statistics.

    The decay ramps up as min(decay, (1 + n) / (10 + n)), so short fine-tuning runs are not
    dominated by the starting weights. With decay None, `model` is the trained model itself.
    The running means and variances are averaged too: copied from the live model they follow the
    last ~10 augmented batches, and the averaged weights' validation Dice swung by +-0.02 between
    evaluations 10 s apart on ISBI; averaged, the curve is smooth (benchmarks/results/TRAINING.md).
    """

    def __init__(self, model: nn.Module, decay: float | None):
        self.decay = decay
        self.updates = 0
        self.model = model if decay is None else copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.decay is None:
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged = [p for p in self.model.parameters()]
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            if mine.is_floating_point():
                mine.lerp_(theirs, 1 - decay)
            else:  # e.g. num_batches_tracked
                mine.copy_(theirs)


def _plain_config(config: TrainConfig) -> dict:
    values = asdict(config)
    if isinstance(values.get("patch_size"), tuple):
        values["patch_size"] = list(values["patch_size"])
    return values
