"""Toy images and comparisons shared by the inference tests (tests/inference/)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi


def blobs(shape: tuple[int, ...], count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blurred bright balls on a noisy background, and their masks."""
    centres = np.zeros(shape, dtype=bool)
    centres[tuple(rng.integers(0, side, count) for side in shape)] = True
    mask = ndi.distance_transform_edt(~centres) <= 4
    image = ndi.gaussian_filter(mask.astype(np.float32), 1.0)
    image += rng.normal(0, 0.1, shape).astype(np.float32)
    return image.astype(np.float32), mask


def whole_pass(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Probability of class 1 from one forward pass over the whole (already normalised) input."""
    with torch.inference_mode():
        logits = model(torch.from_numpy(image)[None, None])
    return torch.sigmoid(logits)[0, 0].numpy()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))
