"""Fixtures shared by the io tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest


@pytest.fixture
def make_stack() -> Callable[..., np.ndarray]:
    """``make_stack(shape=(3, 16, 20), dtype=np.uint8, seed=0)``: a reproducible random image that
    spans the pixel type's whole range (floats: 0..1)."""

    def make(shape=(3, 16, 20), dtype=np.uint8, seed=0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if np.dtype(dtype).kind == "f":
            return rng.random(shape).astype(dtype)
        return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)

    return make
