"""The model width, batch and patch that a training device is used well with (the CLI's defaults).

A 2-core CPU gets the most out of a time budget with a narrow model and small batches (more steps
beat more width: benchmarks/results/TRAINING.md). A GPU runs the CPU recipe at ~40 steps/s with
a tenth of a GB in use, so the same seconds buy a wider model on bigger batches of bigger patches:
more learning per step at nearly the same steps per second. The GPU figures scale with its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import devices

# GPU memory (GiB) from which the large recipe is used; below it the batch is halved
_LARGE_GPU_GIB = 12


@dataclass(frozen=True)
class Recipe:
    """Defaults for one device and model dimensionality; ``why`` says where they come from."""

    width: int
    batch_size: int
    patch_size: tuple[int, ...]
    why: str


def recipe_for(device: torch.device, spatial_dims: int) -> Recipe:
    """The width, batch and patch for training a ``spatial_dims``-D model on ``device``."""
    if device.type == "cpu":
        if spatial_dims == 2:
            return Recipe(16, 4, (192, 192), "CPU: the benchmarked ISBI defaults")
        return Recipe(8, 2, (32, 96, 96), "CPU: the benchmarked Lucchi++ 3D settings")
    memory = devices.free_memory(device) or 0
    large = memory >= _LARGE_GPU_GIB * 2**30
    where = f"{device.type} with {memory / 2**30:.0f} GiB free" if memory else device.type
    if spatial_dims == 2:
        return Recipe(32, 16 if large else 8, (256, 256), f"GPU recipe ({where})")
    return Recipe(16, 4 if large else 2, (64, 128, 128) if large else (32, 96, 96), f"GPU recipe ({where})")
