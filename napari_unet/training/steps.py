"""One optimisation step: a sampled batch, the forward pass in mixed precision, the update, the average."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..data import PatchSampler
from .averaging import WeightAverage


@dataclass
class OptimisationStep:
    """The tools of one run's steps; calling it takes a step and returns the batch's loss.

    ``scaler`` scales the fp16 loss on CUDA (None otherwise); ``memory_format`` is channels-last
    (None = as the batch comes); ``averaged`` follows the weights after each update. ``model`` may
    be a DistributedDataParallel wrapper of ``module`` (the model itself, which the average follows).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: PatchSampler
    loss_fn: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    memory_format: torch.memory_format | None
    averaged: WeightAverage
    module: nn.Module | None = None

    def __call__(self, batch_size: int, generator: torch.Generator) -> float:
        images, labels, weights = self.sampler.sample(batch_size, generator)
        if self.memory_format is not None:
            images = images.contiguous(memory_format=self.memory_format)
        with self.autocast():
            logits = self.model(images)
        loss = self.loss_fn(logits.float(), labels, weights)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.averaged.update(self.module if self.module is not None else self.model)
        return float(loss.detach())
