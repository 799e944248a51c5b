"""Toy models shared by the inference tests: trained once per test session (a few seconds each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_toys import blobs

from napari_unet.models import build_model


def _train_toy(name: str, batch_shape: tuple[int, ...], count: int, steps: int) -> torch.nn.Module:
    """A width-4, depth-2 model trained for a few steps to segment blobs (a few seconds)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(name, width=4, depth=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(steps):
        image, mask = blobs(batch_shape, count, rng)  # a fresh batch: the model generalises
        loss = loss_fn(model(torch.from_numpy(image)[:, None]), torch.from_numpy(mask)[:, None].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def model_2d() -> torch.nn.Module:
    return _train_toy("unet", (8, 32, 32), count=6, steps=60)


@pytest.fixture(scope="session")
def model_3d() -> torch.nn.Module:
    return _train_toy("unet3d", (2, 16, 16, 16), count=2, steps=200)
