"""Choosing and describing compute devices (CUDA, Apple MPS, CPU) in one place.

Every part of the engine resolves devices here, so "auto" means the same thing in the CLI, the trainer,
the inference engine and the widgets: CUDA first, then MPS, then the CPU.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass

import torch

__all__ = [
    "DeviceError",
    "DeviceInfo",
    "autocast_dtype",
    "available_devices",
    "free_memory",
    "is_out_of_memory",
    "release_memory",
    "resolve_device",
]

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A requested device does not exist on this machine or is spelled wrongly."""


@dataclass(frozen=True)
class DeviceInfo:
    """One device a user can pick: ``spec`` goes to :func:`resolve_device`, ``label`` is for people."""

    spec: str
    label: str
    free_bytes: int | None = None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:1" | "mps"`` (or a torch.device) into a usable device.

    ``auto`` picks CUDA, then MPS, then the CPU. Asking for a device that is not there raises
    :class:`DeviceError` with a sentence saying what is available instead.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if not _DEVICE_PATTERN.match(spec):
        raise DeviceError(
            f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps"
        )
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError("MPS (Apple GPU) was requested but is not available on this machine")
        return torch.device("mps")
    # cuda or cuda:N
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{spec} was requested but this machine has no usable CUDA GPU; choose 'auto' or 'cpu'"
        )
    device = torch.device(spec)
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"{spec} was requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def free_memory(device: torch.device) -> int | None:
    """Free memory in bytes on a CUDA device (None where it cannot be known, e.g. CPU or MPS)."""
    if device.type != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return None
    return int(free)


def available_devices() -> list[DeviceInfo]:
    """Devices to offer in a picker: auto, each CUDA GPU by name and free memory, MPS, CPU."""
    devices = [DeviceInfo("auto", f"auto ({resolve_device('auto').type})")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            device = torch.device("cuda", index)
            free = free_memory(device)
            name = torch.cuda.get_device_name(index)
            free_text = f", {free / 2**30:.1f} GiB free" if free is not None else ""
            devices.append(DeviceInfo(f"cuda:{index}", f"cuda:{index} {name}{free_text}", free))
    if _mps_available():
        devices.append(DeviceInfo("mps", "mps (Apple GPU)"))
    devices.append(DeviceInfo("cpu", f"cpu ({torch.get_num_threads()} threads)"))
    return devices


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 can beat fp32."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # very old torch
        return False
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype to use on ``device`` (None = plain fp32).

    ``precision``: ``"auto"`` (bf16 on CUDA where supported, else fp16; fp32 on CPU and MPS),
    ``"fp32"``, ``"bf16"`` or ``"fp16"``. Callers that measured bf16 to be faster on a CPU pass ``"bf16"``.
    """
    precision = precision.lower()
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last layout of a 2D or 3D model's tensors: on CPUs (oneDNN) 1.4-1.7x faster
    convolutions than the default layout (2D and 3D UNet training steps on the 2-core reference)."""
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an accelerator (or host) out-of-memory error worth retrying smaller."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    if isinstance(error, MemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in message or "mps backend out of memory" in message
    )


def release_memory(device: torch.device | None = None) -> None:
    """Give cached accelerator memory back (after a run, a cancel or an error).

    Nothing to do for the CPU: a full ``gc.collect()`` there only holds the GIL (hundreds of ms with
    napari loaded) and would stall the viewer's event loop at the end of every run.
    """
    if device is not None and device.type == "cpu":
        return
    gc.collect()  # drop unreachable tensors first so the caches can really be emptied
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()
    if _mps_available() and (device is None or device.type == "mps"):
        empty = getattr(getattr(torch, "mps", None), "empty_cache", None)
        if empty is not None:
            empty()
