"""A Trainer's resume state: what its checkpoint keeps beside the weights, and loading it back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import TrainConfig, TrainingError


@dataclass
class ResumeState:
    """Where a run left off: steps taken, training seconds, the sampling stream, the history."""

    step: int = 0
    elapsed: float = 0.0
    generator_state: torch.Tensor | None = None
    history: dict = field(default_factory=dict)


def resume_extra(optimizer: torch.optim.Optimizer, *, step: int, elapsed: float, lr_scale: float,
                 best_score: float, generator: torch.Generator) -> dict:
    """The checkpoint's ``extra``: the optimizer state and the trainer's counters."""
    return {
        "optimizer": optimizer.state_dict(),
        "trainer": {
            "step": step,
            "elapsed": elapsed,
            "lr_scale": lr_scale,
            "best_score": best_score if math.isfinite(best_score) else None,
            "generator_state": generator.get_state(),
        },
    }


def load_resume_state(source, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                      device: torch.device) -> ResumeState:
    """Load a checkpoint's (path or Checkpoint) weights into ``model`` and its optimizer state into
    ``optimizer`` (with ``config``'s learning rate and weight decay); returns the rest.

    The best score is not taken over (it may come from another validation set): selection starts
    afresh.
    """
    from ..checkpoint import Checkpoint, load_checkpoint

    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    if dict(ckpt.config) != dict(model.config):
        raise TrainingError("The checkpoint to resume from holds a different model architecture.")
    model.load_state_dict(ckpt.model.state_dict())
    model.to(device)
    state = ckpt.extra.get("trainer", {}) if isinstance(ckpt.extra, dict) else {}
    optimizer_state = ckpt.extra.get("optimizer") if isinstance(ckpt.extra, dict) else None
    if optimizer_state:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as error:
            raise TrainingError("The optimizer state in the checkpoint does not fit this model.") from error
        for group in optimizer.param_groups:  # this run's settings win
            group["lr"] = config.learning_rate
            group["weight_decay"] = config.weight_decay
    history = {key: list(value) if isinstance(value, (list, tuple)) else value
               for key, value in (ckpt.history or {}).items()}
    return ResumeState(int(state.get("step", 0)), float(state.get("elapsed", 0.0)), state.get("generator_state"),
                       history)
