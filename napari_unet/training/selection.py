"""Which weights a run keeps: the best validation's, or the best of the best few with test-time augmentation.

:class:`KeptWeights` follows the validations (best mean Dice, validations since the last better
one, the ``tta_candidates`` best weights) and at the end of a run compares the candidates once
more with 8-view test-time augmentation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .averaging import state_copy
from .config import TrainConfig


@dataclass
class Candidate:
    """Weights of one validation, kept for the final choice with test-time augmentation."""

    score: float  # mean Dice over the classes, one view
    step: int
    dice: list[float]
    state: dict[str, torch.Tensor]
    offset: tuple[float, ...]


class KeptWeights:
    """The best validated weights so far and the candidates for the final choice.

    ``best_state`` None means the model's own weights are kept; ``best_offset`` is the label
    offset that goes with the kept weights. ``config`` is read live: a later run may change it.
    """

    def __init__(self, config: TrainConfig, offset: tuple[float, ...]):
        self.config = config
        self.best_score = -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_offset = offset
        self.stale_validations = 0  # validations since the last better one
        self.candidates: list[Candidate] = []  # the best validations' weights, best first

    def record(self, step: int, dice: list[float], model: nn.Module, offset: tuple[float, ...]) -> bool:
        """Follow one validation of ``model``'s weights; True when it is the best so far."""
        score = float(np.mean(dice))
        improved = score > self.best_score
        if improved:
            self.best_score = score
            self.best_state = state_copy(model)
            self.best_offset = offset
            self.stale_validations = 0
        else:
            self.stale_validations += 1
        self._keep_candidate(Candidate(score, step, dice, self.best_state if improved else None, offset), model)
        return improved

    def _keep_candidate(self, candidate: Candidate, model: nn.Module) -> None:
        """Keep these weights if they are among the ``tta_candidates`` best validated so far."""
        limit = self.config.tta_candidates
        if limit < 2 or (len(self.candidates) >= limit and candidate.score <= self.candidates[-1].score):
            return
        if candidate.state is None:  # the best weights are copied already: no second copy
            candidate.state = state_copy(model)
        self.candidates.append(candidate)
        self.candidates.sort(key=lambda kept: -kept.score)
        del self.candidates[limit:]

    def choose_with_tta(self, model: nn.Module,
                        score_with_tta: Callable[[nn.Module, tuple[float, ...]], list[float] | None]
                        ) -> tuple[Candidate, list[tuple[Candidate, list[float]]]] | None:
        """Score the candidates with ``score_with_tta`` (Dice per class, None when stopped); the best
        becomes the kept weights.

        Returns the kept candidate and every candidate with its Dice, or None when there was nothing
        to choose or Stop came first (then the best single-view weights stay). ``model`` is not
        changed: a copy of it loads each candidate.
        """
        if len(self.candidates) < 2:
            return None
        scratch = copy.deepcopy(model)
        scored = []
        for candidate in self.candidates:
            scratch.load_state_dict(candidate.state)
            dice = score_with_tta(scratch, candidate.offset)
            if dice is None:  # Stop came first
                return None
            scored.append((float(np.mean(dice)), candidate, dice))
        _, kept, _ = max(scored, key=lambda item: item[0])
        self.best_state, self.best_offset = kept.state, kept.offset
        return kept, [(candidate, dice) for _, candidate, dice in scored]
