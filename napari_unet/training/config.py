"""The settings and reports of a training run: TrainConfig, TrainEvent, the training errors.

Also the patch size a configuration gives a 2D or 3D model, and the configuration as plain data
for a checkpoint's provenance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .. import losses

SCHEDULES = ("cosine", "plateau", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")


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
    """The patch a run uses without ``patch_size``: 192 x 192 in 2D, 32 x 96 x 96 in 3D."""
    return (192, 192) if spatial_dims == 2 else (32, 96, 96)


def patch_size_for(config: TrainConfig, spatial_dims: int) -> tuple[int, ...]:
    """The patch sides of a run: ``config.patch_size`` given for every spatial axis."""
    if config.patch_size is None:
        return default_patch_size(spatial_dims)
    if isinstance(config.patch_size, int):
        return (int(config.patch_size),) * spatial_dims
    size = tuple(int(s) for s in config.patch_size)
    if len(size) != spatial_dims:
        raise TrainingError(f"The patch size {size} does not have {spatial_dims} sides for a {spatial_dims}D model.")
    return size


def plain_config(config: TrainConfig) -> dict:
    """``config`` as plain lists and numbers, as a checkpoint's provenance stores it."""
    values = asdict(config)
    if isinstance(values.get("patch_size"), tuple):
        values["patch_size"] = list(values["patch_size"])
    return values
