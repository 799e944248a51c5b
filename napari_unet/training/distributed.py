"""Data-parallel training over processes (torchrun): PyTorch's DistributedDataParallel, and what
the ranks must agree on so that their weights stay identical.

``torchrun --nproc-per-node N -m napari_unet.cli train ...`` starts N processes; each draws its
own patches (its own random seed), DDP averages the gradients, so every rank takes the same
update. What else changes the update is decided by rank 0 and broadcast before every step: whether
to stop (time budget, early stopping, NaN), the run's elapsed seconds (the learning rate, the Dice
fade and the augmentation ramp follow it) and the plateau schedule's scale. Only rank 0 validates,
chooses the kept weights and saves.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the training processes."""

    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> ProcessGroup | None:
    """The group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); None when
    this process was not started by torchrun or is its only process."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    if world_size <= 1:
        return None
    return ProcessGroup(rank, world_size, local_rank)


def device_for(group: ProcessGroup, device: torch.device) -> torch.device:
    """Each rank's device: on CUDA the GPU of its local rank, else ``device`` itself."""
    if device.type == "cuda":
        return torch.device("cuda", group.local_rank % max(1, torch.cuda.device_count()))
    return device


def start(group: ProcessGroup, device: torch.device) -> str:
    """Join the process group (nccl on CUDA, gloo otherwise); returns the backend. Needs
    MASTER_ADDR and MASTER_PORT in the environment (torchrun sets them)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=group.rank, world_size=group.world_size)
    return backend


def stop(finished: bool = True) -> None:
    """Leave the process group: together after a finished run; at once after an error (a
    collective would wait forever for ranks still training; torchrun then stops them)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel: rank 0's weights and buffers are broadcast now, and
    the gradients averaged at every backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def agree(group: ProcessGroup, stop_reason: str, seconds: float, lr_scale: float,
          device: torch.device) -> tuple[str, float, float]:
    """Rank 0's stop decision, elapsed seconds and learning-rate scale, on every rank."""
    values = torch.tensor([1.0 if stop_reason else 0.0, seconds, lr_scale], dtype=torch.float64,
                          device=_collective_device(device))
    dist.broadcast(values, src=0)
    stop_flag, seconds, lr_scale = (float(v) for v in values.cpu())
    if group.is_main:
        return stop_reason, seconds, lr_scale
    return ("rank 0 ended the run" if stop_flag else ""), seconds, lr_scale


def mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (a NaN on one rank makes it NaN on all)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(tensor)
    return float(tensor.cpu()) / dist.get_world_size()


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank. DDP sends them before each
    forward pass, so after the last step each rank still holds statistics of its own last batch."""
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def weight_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer: equal on all ranks when their weights are identical."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_digests(model: nn.Module) -> list[str]:
    """Every rank's ``weight_digest``, in rank order."""
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, weight_digest(model))
    return [str(d) for d in digests]


def _collective_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")  # nccl needs CUDA tensors
