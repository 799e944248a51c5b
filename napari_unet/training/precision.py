"""Mixed precision for training and validation: the autocast context and the fp16 gradient scaler."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .. import devices

# TrainConfig.amp -> devices.autocast_dtype's precision
_PRECISION = {"auto": "auto", "bf16": "bf16", "fp16": "fp16", "off": "fp32"}


def mixed_precision(device: torch.device, amp: str
                    ) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler | None]:
    """(autocast context factory, GradScaler or None) for ``amp`` ("auto", "bf16", "fp16", "off") on ``device``.

    The scaler is new: fp16 training on CUDA scales its loss, bf16 and fp32 need no scaler.
    """
    dtype = devices.autocast_dtype(device, _PRECISION[amp])
    if dtype is None or device.type not in ("cuda", "cpu"):
        return (lambda: torch.autocast(device.type, enabled=False)), None
    scaler = None
    if dtype == torch.float16 and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler
