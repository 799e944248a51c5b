"""What changes over a training run: the learning rate, the loss's Dice weight and the augmentation.

:class:`Schedule` sets them before every step from the run's progress through its step or time
budget: warm-up then cosine decay (or plateau halving, or constant) for the learning rate, the
Dice term fading to 0 over ``dice_fade``, and elastic/intensity augmentation rising over
``augment_ramp``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..data import AugmentConfig, PatchSampler
from .config import TrainConfig


class Schedule:
    """The schedules of a Trainer's runs; ``config`` is read live (a later run may change it).

    ``lr_scale`` carries the plateau schedule's halvings from one run to the next.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.lr_scale = 1.0
        self._loss_fn: nn.Module | None = None
        self._full_dice_weight: float | None = None  # the loss's own Dice weight, faded each step
        self._sampler: PatchSampler | None = None
        self._full_augment: AugmentConfig | None = None  # ramped up each step

    def start_run(self, loss_fn: nn.Module, sampler: PatchSampler, augment: AugmentConfig | None) -> None:
        """Fade ``loss_fn``'s Dice term and ramp ``sampler``'s augmentation (full: ``augment``) in this run."""
        config = self.config
        fading = config.dice_fade is not None and has_cross_entropy_term(loss_fn)
        self._loss_fn = loss_fn
        self._full_dice_weight = loss_fn.dice_weight if fading else None
        self._sampler = sampler
        self._full_augment = augment if augment is not None and config.augment_ramp is not None else None

    def apply(self, run_steps: int, seconds: float, optimizer: torch.optim.Optimizer) -> float:
        """Set this step's learning rate, Dice weight and augmentation, after ``run_steps`` steps
        and ``seconds`` of the run; returns the learning rate."""
        progress = self.progress(run_steps, seconds)  # one value for every schedule of this step
        lr = self.learning_rate(run_steps, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        config = self.config
        if self._full_dice_weight is not None and progress is not None:
            self._loss_fn.dice_weight = self._full_dice_weight * max(0.0, 1.0 - progress / config.dice_fade)
        if self._full_augment is not None and progress is not None:
            self._sampler.augment = ramped(self._full_augment, min(1.0, progress / config.augment_ramp))
        return lr

    def progress(self, run_steps: int, seconds: float) -> float | None:
        """Fraction of the run done (by steps or time, whichever is further); None = open-ended."""
        parts = []
        if self.config.steps is not None:
            parts.append(run_steps / self.config.steps)
        if self.config.time_budget is not None:
            parts.append(seconds / self.config.time_budget)
        return min(1.0, max(parts)) if parts else None

    def learning_rate(self, run_steps: int, progress: float | None) -> float:
        """Linear warm-up, then the cosine decay to ``min_lr_fraction`` (or the plateau's scale)."""
        config = self.config
        lr = config.learning_rate * self.lr_scale
        if config.warmup_steps and run_steps < config.warmup_steps:
            lr *= (run_steps + 1) / (config.warmup_steps + 1)
        elif config.schedule == "cosine" and progress is not None:
            floor = config.min_lr_fraction
            lr *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr

    def after_stale_validation(self, stale_validations: int) -> None:
        """The plateau schedule halves the rate after every ``plateau_patience`` validations without a better one."""
        if self.config.schedule == "plateau" and stale_validations % self.config.plateau_patience == 0:
            self.lr_scale *= self.config.plateau_factor


def ramped(augment: AugmentConfig, fraction: float) -> AugmentConfig:
    """``augment`` with its elastic and intensity probabilities scaled by ``fraction``."""
    return replace(augment, elastic_probability=augment.elastic_probability * fraction,
                   intensity_probability=augment.intensity_probability * fraction)


def has_cross_entropy_term(loss_fn: nn.Module) -> bool:
    """A loss with a Dice term beside a cross-entropy one (the Dice loss alone cannot fade)."""
    if not hasattr(loss_fn, "dice_weight"):
        return False
    return getattr(loss_fn, "bce_weight", 1.0) > 0
