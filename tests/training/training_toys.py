"""Tiny synthetic data, models and settings shared by the training tests."""

from __future__ import annotations

import numpy as np
import torch

from napari_unet.models import build_model
from napari_unet.training import TrainConfig


def toy_stack(n=6, size=32, seed=0):
    """Bright blobs (class 1) on a dark noisy background: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.integers(4, size - 4, 2)
            labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(9, 30)] = 1
    images = (labels * 120 + 60 + rng.normal(0, 15, labels.shape)).clip(0, 255).astype(np.uint8)
    return images, labels


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = {"width": 4, "depth": 2, **kwargs}
    return build_model("unet", **options)


def config(**overrides):
    base = {"steps": 5, "patch_size": 32, "batch_size": 2, "device": "cpu", "val_fraction": 0.0, "warmup_steps": 2}
    base.update(overrides)
    return TrainConfig(**base)


def step_losses(events):
    return [e.loss for e in events if e.kind == "step"]
