"""Running the model on batches of tiles on a device: its prediction copy, precision, test-time
views, and retries after running out of memory.

The network runs as a prediction-only copy (``models/lean.py``): batch norms folded into the
convolutions and each decoder ``conv(cat([skip, up]))`` split into two convolutions, so the
concatenated map, a UNet's biggest tensor, is never built (a third less peak memory for a 3D UNet,
and faster). The copy is cached until the model's weights change.

Speed on a CPU: convolution weights and inputs are channels-last (oneDNN's fast layout, ~1.5x on a
width-32 UNet) under ``torch.inference_mode``; ``precision="auto"`` times the model once per process
in fp32 and bf16 autocast and uses bf16 only where the CPU has it natively and it is clearly faster.

Device placement: the copy is moved to the chosen device for the call and back to the CPU after it
(about 10 ms for a width-64 UNet), so nothing of the call stays in accelerator memory; the model itself
is not moved and its train/eval mode is kept. Cached GPU memory is released after every attempt.

On a CUDA out-of-memory error the batch is halved, then the tile, and the run retried; only then does
it fall back to the CPU, with a :class:`DeviceFallbackWarning` (the GUI shows warnings).
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import devices
from ..models.lean import lean_inference_copy
from .tiling import TilePlan, _round_up, _size_multiple

log = logging.getLogger(__name__)


class DeviceFallbackWarning(RuntimeWarning):
    """The accelerator ran out of memory even with the smallest tile, so the CPU was used."""


# original model -> (its weights' identity and versions, its lean copy): a rerun with unchanged
# weights reuses the copy; a weak key, so a dropped model takes its copy along
_LEAN_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lean_model(model: nn.Module) -> nn.Module:
    """The prediction copy of ``model`` with folded batch norms and split concatenations.

    It computes the same probabilities with fewer full-resolution maps alive (models/lean.py). It is
    rebuilt when the weights change (training steps bump the tensors' versions). A model the copy
    cannot handle is used as it is.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    key = tuple((id(t), t._version, str(t.device)) for t in tensors)
    cached = _LEAN_MODELS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        lean = lean_inference_copy(model)
    except Exception:  # a foreign module that cannot be copied: no memory saving
        log.debug("no lean copy of %s; predicting with the model itself", type(model).__name__, exc_info=True)
        return model
    _LEAN_MODELS[model] = (key, lean)
    return lean


def _prepare_model(model: nn.Module, device: torch.device) -> None:
    """Put the model on ``device`` in eval mode (it stays there; see the module docstring).

    Its convolution weights are stored channels-last, the layout oneDNN and cuDNN run fastest
    (about 1.5x on a CPU); results and training are unaffected.
    """
    model.to(device=device, memory_format=devices.channels_last_format(model.spatial_dims))
    model.eval()


def _autocast_dtype(model: nn.Module, device: torch.device, precision: str) -> torch.dtype | None:
    """``devices.autocast_dtype``, except that "auto" on a CPU uses bf16 where it was measured faster."""
    if precision == "auto" and device.type == "cpu" and devices.cpu_supports_bf16():
        return torch.bfloat16 if _cpu_bf16_is_faster(model) else None
    return devices.autocast_dtype(device, precision)


_BF16_MEASUREMENTS: dict[str, bool] = {}


def _cpu_bf16_is_faster(model: nn.Module) -> bool:
    """Time the model on a small input in fp32 and in bf16 autocast (once per architecture).

    CPUs with AVX512-BF16 but no AMX run some networks faster in bf16 and others slower (the
    casts cost more than the cheaper multiply-adds on narrow layers), so only a measurement can
    tell, and a small probe favours bf16 more than whole tiles do (measured on an AVX512-BF16 Xeon:
    bf16 won the probe but lost on real tiles), so bf16 is used only when it is 1.5x faster.
    """
    key = repr(sorted(getattr(model, "config", {}).items())) or repr(type(model))
    if key not in _BF16_MEASUREMENTS:
        multiple = _size_multiple(model)
        # small, so the probe costs about a tenth of a second (more on a busy machine)
        sides = (96, 96) if model.spatial_dims == 2 else (16, 32, 32)
        shape = (1, int(model.in_channels), *(_round_up(side, multiple) for side in sides))
        inputs = torch.randn(shape).contiguous(memory_format=devices.channels_last_format(model.spatial_dims))

        def run_once(bf16: bool) -> float:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                start = time.perf_counter()
                model(inputs)
                return time.perf_counter() - start

        run_once(False), run_once(True)  # warm-up: oneDNN builds its kernels on first use
        # interleaved and best-of, so that other processes' load hits both alike
        pairs = [(run_once(False), run_once(True)) for _ in range(3)]
        fp32_time, bf16_time = min(p[0] for p in pairs), min(p[1] for p in pairs)
        _BF16_MEASUREMENTS[key] = fp32_time > 1.5 * bf16_time
        log.info("fp32 %.3fs, bf16 %.3fs per probe: using %s on this CPU", fp32_time, bf16_time,
                 "bf16" if _BF16_MEASUREMENTS[key] else "fp32")
    return _BF16_MEASUREMENTS[key]


def _flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of an (N, C, *spatial) tensor: identity first."""
    axes = list(range(2, 2 + spatial_dims))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def _tta_views(spatial_dims: int) -> list[tuple[bool, tuple[int, ...]]]:
    """(transpose Y/X, flipped axes) of each test-time view: identity first.

    2D: the 8 symmetries of a square (4 flips, each also transposed), which scored better than the 4
    flips alone on held-out ISBI slices (pixel error 0.0727 vs 0.0732). 3D: the 8 flips; Z is often
    sampled differently from Y and X, so it is never swapped with them and Y/X are left unswapped too.
    """
    transposes = (False, True) if spatial_dims == 2 else (False,)
    return [(transpose, flips) for transpose in transposes for flips in _flip_combinations(spatial_dims)]


def _run_batch(model: nn.Module, inputs: np.ndarray, device: torch.device,
               dtype: torch.dtype | None, tta: bool) -> np.ndarray:
    """One forward pass (several with TTA) of a batch: float32 probabilities (N, C_acc, *tile).

    C_acc is 1 for a binary model (sigmoid of its logit) and the class count otherwise (softmax).
    This is the one place that touches the device, so tests replace it to fake device errors.
    """
    views = _tta_views(model.spatial_dims) if tta else [(False, ())]
    memory_format = devices.channels_last_format(model.spatial_dims)
    with torch.inference_mode():
        batch = torch.from_numpy(np.ascontiguousarray(inputs)).to(device, non_blocking=True)
        batch = batch.contiguous(memory_format=memory_format)
        total = None
        for transpose, axes in views:
            view = batch.transpose(-1, -2).contiguous(memory_format=memory_format) if transpose else batch
            view = torch.flip(view, axes) if axes else view
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(view)
            logits = logits.float()
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
            probs = torch.flip(probs, axes) if axes else probs
            probs = probs.transpose(-1, -2) if transpose else probs
            total = probs if total is None else total.add_(probs)
        total = total / len(views)
        return total.cpu().numpy()


# -------------------------------------------------------------------------- out-of-memory handling


def _run_with_memory_fallback(model: nn.Module, run: Callable[[TilePlan, torch.device], Any],
                              plan: TilePlan, device: torch.device,
                              cpu_plan: Callable[[], TilePlan]) -> Any:
    """Run, and on out-of-memory halve the batch, then the tile, then fall back to the CPU.

    Memory is released after every attempt, whether it succeeded, failed or was cancelled.
    """
    multiple = _size_multiple(model)
    while True:
        try:
            return run(plan, device)
        except Exception as error:  # only out-of-memory errors are retried
            if not devices.is_out_of_memory(error):
                raise
            smaller = _smaller_plan(plan, multiple)
            if smaller is not None:
                log.info("out of memory with %s; retrying with %s", plan, smaller)
                plan = smaller
            elif device.type != "cpu":
                message = (f"{device} ran out of memory even with a {_format_tile(plan.tile)} tile "
                           f"and a batch of 1; predicting on the CPU instead (slower)")
                warnings.warn(message, DeviceFallbackWarning, stacklevel=3)
                log.warning(message)
                devices.release_memory(device)
                device = torch.device("cpu")
                plan = cpu_plan()
            else:
                raise
        finally:
            devices.release_memory(device)


def _smaller_plan(plan: TilePlan, multiple: int) -> TilePlan | None:
    """Half the batch, else half every tile side (kept a multiple of 2**depth), else None."""
    if plan.batch_size > 1:
        return replace(plan, batch_size=plan.batch_size // 2)
    sides = tuple(side if side <= multiple else max(multiple, side // 2 // multiple * multiple)
                  for side in plan.tile)
    if sides == plan.tile:
        return None
    return replace(plan, tile=sides)


def _format_tile(tile: Sequence[int]) -> str:
    return "x".join(str(side) for side in tile if side > 1) or "1"
