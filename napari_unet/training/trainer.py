"""The training loop: optimisation steps that report through events and stop on request.

:class:`Trainer` runs the steps and the events; its collaborators hold the other jobs:
:class:`~.samples.TrainingData` (the samples and how often each is drawn),
:class:`~.schedule.Schedule` (learning rate, Dice fade, augmentation ramp),
:class:`~.averaging.WeightAverage` (the weights validation and previews use),
:class:`~.validation.Validator` (scores, label offset) and :class:`~.selection.KeptWeights` (which
weights are kept at the end).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import devices, label_offset, losses
from ..data import AugmentConfig, PatchSampler, Sample
from . import distributed
from .averaging import WeightAverage, state_copy
from .config import (
    TrainConfig,
    TrainEvent,
    TrainingOutOfMemory,
    patch_size_for,
    plain_config,
)
from .precision import mixed_precision
from .resume import load_resume_state, resume_extra
from .samples import TrainingData, anchored_samples
from .schedule import Schedule
from .selection import KeptWeights
from .steps import OptimisationStep
from .validation import OFFSET_PIXELS_FINAL, Validator, eval_mode


@dataclass
class _Run:
    """One run()'s step and clocks (perf_counter seconds)."""

    start: float
    optimisation_step: OptimisationStep
    steps: int = 0
    throughput: float | None = None
    last_validation: float = 0.0
    validation_seconds: float = 0.0
    last_preview: float = 0.0


class Trainer:
    """Trains a segmentation model on (sparsely) labelled images.

    ``run()`` is a generator: it yields a :class:`TrainEvent` after every optimisation step,
    every validation and every preview, then a final ``"finished"`` event; ``stop()``
    (thread-safe) ends the run before the next step.

    images: a list of raw arrays, one per sample (2D model: (Y, X) or (C, Y, X); 3D model:
    (Z, Y, X) or (C, Z, Y, X)), or one array: a (Z, Y, X) stack is Z samples for a 2D model.
    labels: integer class maps of the same spatial shapes. weights: float maps, 0 = ignore.
    Validation data are given the same way; without them `config.val_fraction` of the labelled
    samples (or a region of a single sample) is held out and never used for training.
    normalization: the spec, and maybe fixed statistics (see :class:`~.samples.TrainingData`).
    replay_*: data the model learnt before (rehearsal); ``config.replay_share`` of the patches
    come from them. preview_fn(model) is called every preview_interval s in eval mode.
    process_group: this process's rank among data-parallel training processes (``distributed.py``;
    the process group must be started); each rank samples its own patches, only rank 0 validates
    and keeps the best weights. None = one process.
    """

    def __init__(self, model: nn.Module, images, labels, weights=None, *, val_images=None, val_labels=None,
                 val_weights=None, config: TrainConfig | None = None,
                 callbacks: Sequence[Callable[[TrainEvent], Any]] = (), normalization: dict | None = None,
                 preview_fn: Callable[[nn.Module], Any] | None = None, preview_interval: float = 5.0,
                 resume_from=None, replay_images=None, replay_labels=None, replay_weights=None,
                 process_group: distributed.ProcessGroup | None = None):
        self.config = config if config is not None else TrainConfig()
        self.group = process_group
        self.config.check()
        self.model = model
        self.callbacks = list(callbacks)
        self.preview_fn = preview_fn
        self.preview_interval = float(preview_interval)
        self.device = devices.resolve_device(self.config.device)
        self.spatial_dims = int(model.spatial_dims)
        self.n_classes = max(2, int(model.out_channels))
        self.patch_size = patch_size_for(self.config, self.spatial_dims)
        self.data = TrainingData(
            model, self.n_classes, images, labels, weights, val_images=val_images, val_labels=val_labels,
            val_weights=val_weights, replay_images=replay_images, replay_labels=replay_labels,
            replay_weights=replay_weights, normalization=normalization, val_fraction=self.config.val_fraction)
        self.history: dict[str, Any] = {
            "step": [], "elapsed": [], "loss": [], "lr": [],
            "val_step": [], "val_elapsed": [], "val_dice": [], "val_iou": [],
            "best_step": None, "best_val_dice": None, "stop_reason": "",
        }
        self._stop_event = threading.Event()
        self._step = 0
        self._elapsed_before = 0.0  # training seconds of earlier runs (resume)
        self._generator = torch.Generator().manual_seed(self._rank_seed)
        self._evaluated = model  # the model validation and previews use (an EMA copy during run())
        offset = label_offset.model_offset(model)  # of the evaluated weights
        self.schedule = Schedule(self.config)
        self.validator = Validator(
            self.config, train_samples=self.train_samples, val_samples=self.val_samples, n_classes=self.n_classes,
            spatial_dims=self.spatial_dims, device=self.device, offset=offset, stop_requested=self._stop_event.is_set)
        self.kept = KeptWeights(self.config, offset)
        self.model.normalization = dict(self.normalization)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        if resume_from is not None:
            self._load_resume_state(resume_from)

    # ------------------------------------------------------------------------------------------
    # Public API

    @property
    def train_samples(self) -> list[Sample]:
        return self.data.train_samples

    @property
    def val_samples(self) -> list[Sample]:
        return self.data.val_samples

    @property
    def normalization(self) -> dict:
        """The normalisation spec the model keeps (without fixed statistics)."""
        return self.data.normalization

    def stop(self) -> None:
        """Ask the run to end before its next step (safe to call from any thread)."""
        self._stop_event.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_event.is_set()

    @property
    def step(self) -> int:
        return self._step

    @property
    def is_main(self) -> bool:
        """This process validates, keeps the best weights and saves (the only one, or rank 0)."""
        return self.group is None or self.group.is_main

    @property
    def _rank_seed(self) -> int:
        """Each rank its own random patches and augmentations."""
        return int(self.config.seed) + (self.group.rank if self.group is not None else 0)

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights validation and previews use: the running weight average during run()."""
        return self._evaluated

    def fit(self) -> dict:
        """Run to the end, calling the callbacks with every event; returns the history."""
        for _ in self.run():
            pass
        return self.history

    def run(self) -> Iterator[TrainEvent]:
        """Train, yielding a TrainEvent per step / validation / preview and a final "finished" event."""
        try:
            yield from self._run()
        except Exception as error:
            if devices.is_out_of_memory(error):
                devices.release_memory(self.device)
                raise TrainingOutOfMemory(
                    f"The {self.device.type} device ran out of memory; use a smaller batch size "
                    f"(now {self.config.batch_size}) or patch size (now {'x'.join(map(str, self.patch_size))})."
                ) from error
            raise
        finally:
            self._restore_best()
            # a stop() asked for during this run is used up; a later run() trains again
            self._stop_event.clear()

    def save(
        self, path, provenance: dict | None = None, class_names: Sequence[str] | None = None
    ) -> Path:
        """Save the model (best weights), history, normalisation spec and resume state.

        ``class_names`` (e.g. ["membrane", "cell interior"]) default to the model's own, if any.
        """
        from ..checkpoint import save_checkpoint

        info = {
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": self._step,
            "training_seconds": round(self._elapsed_before, 1),
            "train_config": plain_config(self.config),
            "train_samples": self.data.new_samples,
            "replay_samples": self.data.replay_samples,
            "val_samples": len(self.val_samples),
        }
        info.update(provenance or {})
        extra = resume_extra(self.optimizer, step=self._step, elapsed=self._elapsed_before,
                             lr_scale=self.schedule.lr_scale, best_score=self.kept.best_score,
                             generator=self._generator)
        return save_checkpoint(
            path, self.model, normalization=self.normalization, history=self.history,
            provenance=info, extra=extra,
            class_names=class_names or getattr(self.model, "class_names", None),
        )

    # ------------------------------------------------------------------------------------------
    # Setup

    def _load_resume_state(self, source) -> None:
        state = load_resume_state(source, self.model, self.optimizer, self.config, self.device)
        self._step, self._elapsed_before = state.step, state.elapsed
        if state.generator_state is not None:
            self._generator.set_state(state.generator_state)
        self.history.update(state.history)

    def _anchored_samples(self) -> list[Sample]:
        """The training samples, their unlabelled pixels labelled by the model as it is now."""
        with eval_mode(self.model) as model:
            return anchored_samples(self.train_samples, float(self.config.anchor_weight),
                                    lambda sample: self.validator.own_classes(sample, model),
                                    self._stop_event.is_set)

    def _start_run(self, start: float) -> _Run:
        """The sampler, loss, precision and weight average of a new run; the model in training mode."""
        config = self.config
        augment = AugmentConfig() if config.augment else None
        sampler = PatchSampler(
            self._anchored_samples(), self.patch_size, device=self.device, augment=augment,
            label_focus=config.label_focus, extra_weights=self.data.border_weight_maps(config),
            focus=[sample.weights > 0 for sample in self.train_samples],
            sample_probability=self.data.sample_probability(config.replay_share),
        )
        loss_fn = losses.get_loss(config.loss, **config.loss_options)
        self.schedule.start_run(loss_fn, sampler, augment)
        autocast, scaler = mixed_precision(self.device, config.amp)
        memory_format = devices.channels_last_format(self.spatial_dims) if config.channels_last else None
        if memory_format is not None:
            self.model.to(memory_format=memory_format)
        self.model.train()
        averaged = WeightAverage(self.model, config.ema_decay)
        self._evaluated = averaged.model
        self.validator.start_run()
        self.history.pop("tta_choice", None)  # describes the latest run's choice only
        self._evaluated.label_offset = self.validator.label_offset
        stepped = distributed.wrap(self.model, self.device) if self.group is not None else self.model
        optimisation_step = OptimisationStep(stepped, self.optimizer, sampler, loss_fn, autocast, scaler,
                                             memory_format, averaged, self.model)
        return _Run(start, optimisation_step, last_validation=start, last_preview=start)

    # ------------------------------------------------------------------------------------------
    # The loop

    def _run(self) -> Iterator[TrainEvent]:
        torch.manual_seed(self._rank_seed)
        run = self._start_run(time.perf_counter())
        best_before = self.kept.best_score
        reason = yield from self._steps(run)
        if self.group is not None:
            self._record_replicas()
            if not self.group.is_main:
                self.history["stop_reason"] = reason
                self._elapsed_before = self._elapsed(time.perf_counter(), run.start)
                return
        yield from self._finish(run, reason, best_before)

    def _record_replicas(self) -> None:
        """Every rank's weights after the last step (they must be identical) in the history."""
        distributed.broadcast_buffers(self.model)
        digests = distributed.gather_digests(self.model)
        self.history["replicas"] = {"world_size": self.group.world_size,
                                    "identical_weights": len(set(digests)) == 1, "digests": digests}

    def _steps(self, run: _Run) -> Generator[TrainEvent, None, str]:
        """Steps, validations and previews until a stop reason; returns it."""
        config = self.config
        pending = ""  # rank 0's early stop, said to the other ranks before the next step
        while True:
            reason = pending or self._stop_reason(run.steps, run.start)
            seconds = time.perf_counter() - run.start
            if self.group is not None:
                reason, seconds, self.schedule.lr_scale = distributed.agree(
                    self.group, reason, seconds, self.schedule.lr_scale, self.device)
            if reason:
                return reason
            step_start = time.perf_counter()
            lr = self.schedule.apply(run.steps, seconds, self.optimizer)
            loss_value = run.optimisation_step(config.batch_size, self._generator)
            if self.group is not None:
                loss_value = distributed.mean(loss_value, self.device)
            if not math.isfinite(loss_value):
                return "stopped: the loss became NaN or infinite (try a smaller learning rate)"
            run.steps += 1
            self._step += 1
            now = time.perf_counter()
            rate = config.batch_size / max(now - step_start, 1e-9)
            run.throughput = rate if run.throughput is None else 0.9 * run.throughput + 0.1 * rate
            elapsed = self._elapsed(now, run.start)
            self._record_step(elapsed, loss_value, lr)
            yield self._emit(TrainEvent("step", self._step, elapsed, loss=loss_value, lr=lr,
                                        samples_per_second=run.throughput))

            if self.val_samples and self.is_main and self._validation_due(run, now):
                val_start = time.perf_counter()
                event = self._validate(run.start)
                run.last_validation = time.perf_counter()
                run.validation_seconds = run.last_validation - val_start
                if event is None:  # interrupted by stop()
                    continue
                yield self._emit(event)
                if self._early_stop_due():
                    pending = f"early stop: no better validation Dice in {config.early_stopping_patience} validations"
                    if self.group is None:
                        return pending
            if (self.preview_fn is not None and self.is_main
                    and time.perf_counter() - run.last_preview >= self.preview_interval):
                yield self._emit(self._preview(run.start))
                run.last_preview = time.perf_counter()

    def _finish(self, run: _Run, reason: str, best_before: float) -> Iterator[TrainEvent]:
        """Score the last weights, keep the best (chosen with TTA), measure its label offset."""
        stopped_by_user = reason.startswith("stopped by user")
        # score the final weights too, unless they were just validated
        just_validated = bool(self.history["val_step"]) and self.history["val_step"][-1] == self._step
        if self.val_samples and run.steps and not just_validated and not stopped_by_user:
            event = self._validate(run.start, ignore_stop=True)
            if event is not None:
                yield self._emit(event)
        if not self.val_samples:
            # without validation the last (averaged) weights are kept
            averaged = run.optimisation_step.averaged.model
            self.kept.best_state = state_copy(averaged) if averaged is not self.model else None
        self.history["stop_reason"] = reason
        choice = self._choose_with_tta() if not stopped_by_user else None
        self._restore_best()
        if run.steps and not stopped_by_user:
            self.kept.best_offset = self.validator.measure_label_offset(self.model, OFFSET_PIXELS_FINAL)
            self.model.label_offset = self.kept.best_offset
        self.history["label_offset"] = list(self.kept.best_offset)
        self._elapsed_before = self._elapsed(time.perf_counter(), run.start)
        message = reason
        if self.history["best_val_dice"] is not None and self.kept.best_score > best_before:
            message += f"; best validation mean Dice {self.kept.best_score:.4f}"
            if choice:
                kept = max(choice, key=lambda c: np.mean(c["tta_dice"]))
                message += (f"; kept step {self.history['best_step']}, the best of the {len(choice)} best "
                            f"with test-time augmentation (mean Dice {np.mean(kept['tta_dice']):.4f})")
            else:
                message += f" at step {self.history['best_step']}"
        yield self._emit(TrainEvent("finished", self._step, self._elapsed_before, message=message))

    def _elapsed(self, now: float, start: float) -> float:
        return self._elapsed_before + (now - start)

    def _stop_reason(self, run_steps: int, start: float) -> str:
        config = self.config
        if self._stop_event.is_set():
            return f"stopped by user after {run_steps} steps"
        if config.steps is not None and run_steps >= config.steps:
            return f"reached {config.steps} steps"
        reserve = self.validator.finish_reserve
        if config.time_budget is not None and time.perf_counter() - start >= config.time_budget - reserve:
            return f"reached the time budget of {config.time_budget:g} s"
        return ""

    def _record_step(self, elapsed: float, loss: float, lr: float) -> None:
        self.history["step"].append(self._step)
        self.history["elapsed"].append(round(elapsed, 3))
        self.history["loss"].append(loss)
        self.history["lr"].append(lr)

    def _emit(self, event: TrainEvent) -> TrainEvent:
        for callback in self.callbacks:
            callback(event)
        return event

    # ------------------------------------------------------------------------------------------
    # Validation, model selection, previews

    def _validation_due(self, run: _Run, now: float) -> bool:
        if self.config.val_every is not None:
            return run.steps % self.config.val_every == 0
        # automatic: at most every val_interval seconds, and validation <= ~12 % of the time
        waited = now - run.last_validation
        return waited >= max(self.config.val_interval, 7.0 * run.validation_seconds)

    def _validate(self, start: float, ignore_stop: bool = False) -> TrainEvent | None:
        """Validate the evaluated weights, record the scores and follow the best; None if stopped."""
        model = self._evaluated
        validation = self.validator.validate(model, ignore_stop=ignore_stop)
        if validation is None:
            return None
        dice, iou = validation.dice, validation.iou
        elapsed = self._elapsed(time.perf_counter(), start)
        self.history["val_step"].append(self._step)
        self.history["val_elapsed"].append(round(elapsed, 3))
        self.history["val_dice"].append(dice)
        self.history["val_iou"].append(iou)
        if self.kept.record(self._step, dice, model, validation.offset):
            self.history["best_step"] = self._step
            self.history["best_val_dice"] = dice
        else:
            self.schedule.after_stale_validation(self.kept.stale_validations)
        return TrainEvent("validation", self._step, elapsed, dice=dice, iou=iou,
                          message=f"validation mean Dice {float(np.mean(dice)):.4f}")

    def _choose_with_tta(self) -> list[dict] | None:
        """Score the candidates with test-time augmentation; the best becomes the kept weights.

        Returns what was compared (also in ``history["tta_choice"]``), or None when there was
        nothing to choose or Stop came first (then the best single-view weights stay).
        """
        def dice_with_tta(model: nn.Module, offset: tuple[float, ...]) -> list[float] | None:
            scores = self.validator.scores(model, offset, tta=True)
            return None if scores is None else scores[0]

        chosen = self.kept.choose_with_tta(self.model, dice_with_tta)
        if chosen is None:
            return None
        kept, scored = chosen
        self.history["best_step"], self.history["best_val_dice"] = kept.step, kept.dice
        self.history["tta_choice"] = [{"step": c.step, "dice": c.dice, "tta_dice": tta_dice}
                                      for c, tta_dice in scored]
        return self.history["tta_choice"]

    def _early_stop_due(self) -> bool:
        patience = self.config.early_stopping_patience
        return patience is not None and self.kept.stale_validations >= patience

    def _preview(self, start: float) -> TrainEvent:
        with eval_mode(self._evaluated) as model, torch.no_grad():
            payload = self.preview_fn(model)
        return TrainEvent("preview", self._step, self._elapsed(time.perf_counter(), start), payload=payload)

    def _restore_best(self) -> None:
        if self.kept.best_state is not None:
            self.model.load_state_dict(self.kept.best_state)
        self.model.label_offset = self.kept.best_offset
        self.model.eval()
        self.model.to(memory_format=torch.contiguous_format)  # training left it channels-last
