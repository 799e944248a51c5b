"""A fine-tuning session on the user's corrections, without any GUI.

:class:`FinetuneSession` holds what the Fine-tune dock shows: the image and the corrected labels
(arrays and names, never layers), their :class:`~napari_unet.corrections.CorrectionState`, the
:class:`~napari_unet.corrections.FinetuneSettings`, which model to start from
(:class:`StartModel`), and the training run. It checks the inputs in plain words, starts, stops
and resumes a run, and reports where it stands as a :class:`TrainingState` to plain callbacks.

A run is a generator (:meth:`FinetuneSession.events`, built on :func:`training_job`) that yields
the Trainer's events and :class:`Notice` messages: the Fine-tune dock iterates it in a worker,
:meth:`FinetuneSession.run_to_end` iterates it in the calling thread (scripts, benchmarks, tests).
The job retries once with half the batch after running out of memory, records provenance, saves
the checkpoint and reloads it as saved. The autosave of the corrections (:class:`AutosaveTarget`,
:class:`AutosaveWriter`, :func:`save_job`) lives here too, so that any front end saves alike.

Pure Python + NumPy (+ the engine): no napari, Qt or psygnal imports.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_unet import session as sessions
from napari_unet.corrections import (
    CorrectionsError,
    CorrectionState,
    FinetuneSettings,
    autosave_path_for,
    build_finetune_trainer,
    default_autosave_folder,
    finetune_provenance,
    image_fingerprint,
    load_replay,
    replay_paths,
    save_corrections,
)

__all__ = [
    "AutosaveTarget",
    "AutosaveWriter",
    "FinetuneSession",
    "FreshModel",
    "Notice",
    "SharedModel",
    "StartModel",
    "TrainingRun",
    "TrainingState",
    "autosave_into_session",
    "autosave_snapshot",
    "copy_model",
    "finetuned_source",
    "image_channels",
    "image_region",
    "preview_prediction",
    "preview_region",
    "save_job",
    "training_job",
]

# A 3D model's preview covers the whole volume in a 3D view up to this many voxels, else a slab
# of this many slices around the one in view (a preview must come back within seconds).
PREVIEW_MAX_VOXELS = 2**23
PREVIEW_SLAB_DEPTH = 32


class StartModel(enum.IntEnum):
    """Which model a fine-tuning starts from (the values are the dock's menu order)."""

    SHARED = 0  # the model the viewer's widgets share (Segment's)
    CHECKPOINT = 1  # a checkpoint file
    FRESH = 2  # a new, untrained model


class TrainingState(enum.Enum):
    """Where a session's fine-tuning stands."""

    IDLE = "idle"  # nothing run yet
    TRAINING = "training"
    STOPPING = "stopping"  # stop asked; the run ends before its next step and saves the best weights
    DONE = "done"  # ran to the end of its budget
    STOPPED = "stopped"  # ended early by stop() (the weights are kept and saved)
    FAILED = "failed"


RUNNING_STATES = (TrainingState.TRAINING, TrainingState.STOPPING)


@dataclass
class FreshModel:
    """The variant and size of a fresh model (the dock's defaults)."""

    variant: str = "unet"
    width: int = 16
    depth: int = 3


@dataclass
class SharedModel:
    """A model to fine-tune a copy of, as the viewer's model holder offers it (scripts make one)."""

    model: Any
    checkpoint: Any = None  # the checkpoint it was loaded from (its provenance names replay data)
    source: str = ""
    trained: bool = True
    busy: bool = False  # True while someone else runs it


@dataclass
class Notice:
    """A message from the training job to the user (e.g. an out-of-memory retry)."""

    text: str
    info: bool = False  # news, not a warning


@dataclass
class TrainingRun:
    """Everything one Start (or Resume) works on, snapshotted when it starts.

    The job thread reads the arrays and writes ``trainer``, ``model``, ``saved_path`` and
    ``history``; the thread that started it only sets ``preview_region`` and calls :meth:`stop`.
    """

    image_name: str
    image: Any
    labels: np.ndarray
    state: CorrectionState
    settings: FinetuneSettings
    model: Any
    start_model: str
    checkpoint_path: Path
    fingerprint: str
    image_source: str
    preview_interval: float | None  # seconds between previews (None: no previews)
    preview_region: tuple = ()
    resume_from: Any = None
    replay_paths: tuple | None = None  # the start model's (images, labels) files, to replay
    replay_data: tuple | None = None  # or the (images, labels) arrays themselves
    session: Any = None  # the SessionAutosaver of the session these labels belong to, if any
    form_settings: Any = None  # the settings as the user set them (for the session), before per-run adjustments
    trainer: Any = None
    history: dict = field(default_factory=dict)
    saved_path: Path | None = None
    checkpoint: Any = None
    last_step: int = 0
    stop_reason: str = ""
    stop_requested_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def stop(self, reason: str = "") -> None:
        """Ask training to stop before its next step (thread-safe); the best weights are kept."""
        if not self._stop.is_set():
            self.stop_requested_at = time.perf_counter()
            self.stop_reason = reason
        self._stop.set()
        trainer = self.trainer
        if trainer is not None:
            trainer.stop()


# ---------------------------------------------------------------------------------------------
# The preview: the region in view, predicted with the current weights


def preview_region(shape: tuple[int, ...], spatial_dims: int, z: int | None, *, volume_view: bool = False) -> tuple:
    """The spatial region to preview: the slice ``z`` (2D model), a slab or the volume (3D model).

    ``volume_view``: the viewer shows the volume in 3D (a small volume is then previewed whole).
    """
    if len(shape) == 2:
        return tuple(slice(0, s) for s in shape)
    z = z or 0
    if spatial_dims == 2:
        return (z, slice(0, shape[1]), slice(0, shape[2]))
    if volume_view and int(np.prod(shape)) <= PREVIEW_MAX_VOXELS:
        return tuple(slice(0, s) for s in shape)
    depth = min(shape[0], PREVIEW_SLAB_DEPTH)
    start = int(np.clip(z - depth // 2, 0, shape[0] - depth))
    return (slice(start, start + depth), slice(0, shape[1]), slice(0, shape[2]))


def image_region(image: Any, region: tuple, model) -> np.ndarray:
    """The raw image under a spatial ``region``, keeping a channel axis where the image has one."""
    spatial = len(region)
    if image.ndim == spatial:
        return np.asarray(image[region])
    # channels: (Z, C, Y, X) stacks for 2D models, (C, Z, Y, X) volumes for 3D models
    channel_axis = 1 if (model.spatial_dims == 2 and spatial == 3) else 0
    index = list(region)
    index.insert(channel_axis, slice(None))
    return np.asarray(image[tuple(index)])


def preview_prediction(model, run: TrainingRun, stats: dict | None):
    """Predict the run's preview region with the current weights: ``(region, labels)`` or None."""
    from napari_unet.inference import (
        PredictionCancelled,
        predict,
        probabilities_to_labels,
    )

    region = run.preview_region
    if not region:
        return None
    try:
        probs = predict(
            model,
            image_region(run.image, region, model),
            device=run.settings.device,
            normalization=stats,
            cancel=lambda: run.stop_requested,
        )
    except PredictionCancelled:
        return None
    return region, probabilities_to_labels(probs)


# ---------------------------------------------------------------------------------------------
# The run (in a worker thread: only the snapshots in TrainingRun, no GUI objects)


def training_job(run: TrainingRun) -> Iterator[Any]:
    """The training generator: yields TrainEvents and Notices, returns the run.

    Out of memory, it retries once with half the batch; at the end it saves the best weights
    with their provenance and reloads the checkpoint as saved (model on the CPU).
    """
    from napari_unet import devices, io
    from napari_unet.checkpoint import load_checkpoint
    from napari_unet.inference import volume_statistics
    from napari_unet.training import TrainingOutOfMemory

    spec = getattr(run.model, "normalization", None) or io.DEFAULT_NORMALIZATION
    # a 3D model's preview slab is normalised as its whole volume; a 2D model's preview is one
    # whole slice, which predict normalises on its own statistics, as in training
    stats = volume_statistics(run.model, run.image)
    settings = run.settings
    spatial_dims = int(run.model.spatial_dims)
    retried = False
    replay = run.replay_data
    if replay is None and run.replay_paths:
        try:
            replay = load_replay(run.replay_paths, spatial_dims=spatial_dims)
            yield Notice(f"Replaying the model's training data ({Path(run.replay_paths[0]).name}) beside "
                         "your corrections, so that it keeps what it knew.", info=True)
        except CorrectionsError as exc:
            run.replay_paths = None
            yield Notice(f"{exc} Fine-tuning on your corrections alone.")
    previews = {"preview_fn": lambda model: preview_prediction(model, run, stats),
                "preview_interval": run.preview_interval} if run.preview_interval else {}
    while True:
        try:
            trainer = build_finetune_trainer(
                run.model,
                run.image,
                run.labels,
                run.state,
                settings,
                resume_from=run.resume_from,
                replay=replay,
                **previews,
            )
            run.trainer = trainer
            if run.stop_requested:
                trainer.stop()
            for event in trainer.run():
                if event.kind == "step":
                    run.last_step = int(event.step)
                yield event
                notice = autosave_into_session(
                    run, lambda s, trainer=trainer, event=event: s.on_training_event(trainer, event))
                if notice is not None:
                    yield notice
            break
        except TrainingOutOfMemory:
            batch = settings.train_config(spatial_dims).batch_size
            if retried or batch <= 1 or run.stop_requested:
                raise
            retried = True
            smaller = max(1, batch // 2)
            settings = replace(settings, batch_size=smaller)
            run.trainer = None
            devices.release_memory(None)
            yield Notice(f"Out of memory with batch size {batch}: retrying with batch size {smaller}.")
    run.settings = settings
    run.model = trainer.model
    run.history = dict(trainer.history)
    provenance = finetune_provenance(
        run.state,
        settings,
        image_name=run.image_name,
        image_source=run.image_source,
        fingerprint=run.fingerprint,
        start_model=run.start_model,
        steps=run.last_step,
        replayed=run.replay_paths,
    )
    if run.stop_reason:
        provenance["stopped"] = run.stop_reason
    if getattr(run.model, "normalization", None) is None:
        run.model.normalization = dict(spec)
    try:
        run.saved_path = Path(trainer.save(run.checkpoint_path, provenance=provenance))
        # whoever shares the model gets the checkpoint as saved (model on the CPU, provenance attached)
        run.checkpoint = load_checkpoint(run.saved_path)
        run.model = run.checkpoint.model
    except (OSError, ValueError) as exc:  # the trained weights stay in memory and are still used
        yield Notice(f"Could not save the model to {run.checkpoint_path}: {exc}. The fine-tuned model is still used.")
    notice = autosave_into_session(run, lambda s: s.save_model(
        run.model, checkpoint=run.checkpoint, source=finetuned_source(run), trained=True, step=run.last_step,
        settings=run.form_settings))
    if notice is not None:
        yield notice
    run.model.to("cpu")  # off the accelerator, so that its memory can be given back
    run.trainer = None  # drop the optimizer state too
    del trainer
    devices.release_memory(None)
    return run


def finetuned_source(run: TrainingRun) -> str:
    """Where the run's model came from, in words (the shared model's ``source``)."""
    counts = run.state.counts(run.settings.margin)
    return f"fine-tuned in napari on '{run.image_name}' ({run.last_step} steps, {counts.confirmed:,} confirmed pixels)"


def autosave_into_session(run: TrainingRun, save: Callable[[sessions.SessionAutosaver], Any]) -> Notice | None:
    """Run ``save(autosaver)`` for the run's session; a failure ends the session's autosave with a
    Notice (training goes on: its checkpoint is saved as usual)."""
    session = run.session
    if session is None:
        return None
    try:
        save(session)
    except (OSError, ValueError) as exc:
        run.session = None
        return Notice(f"The session in {session.folder} is no longer updated: {exc}")
    return None


def copy_model(model):
    """A copy to train, so that the shared model keeps serving predictions meanwhile."""
    copied = copy.deepcopy(model)
    for name in ("normalization", "class_names"):
        if hasattr(model, name):
            setattr(copied, name, copy.deepcopy(getattr(model, name)))
    return copied


# ---------------------------------------------------------------------------------------------
# Autosave of the corrections


@dataclass(frozen=True)
class AutosaveTarget:
    """Where and under which image the corrections are saved (fixed when the image is chosen)."""

    path: Path
    fingerprint: str
    image_name: str
    image_source: str
    image_shape: tuple[int, ...]

    @classmethod
    def for_image(cls, image_shape: tuple[int, ...], image_name: str, fingerprint: str, image_source: str = "",
                  folder: Path | None = None) -> AutosaveTarget:
        """The target of an image: beside its file, in ``folder``, or in the default folder."""
        return cls(
            path=autosave_path_for(image_source, image_name, fingerprint, folder),
            fingerprint=fingerprint,
            image_name=image_name,
            image_source=image_source,
            image_shape=tuple(image_shape),
        )


def autosave_snapshot(target: AutosaveTarget | None, state: CorrectionState | None, labels: Any,
                      margin: int) -> tuple[Path, CorrectionState, np.ndarray, dict] | None:
    """Copies of what to save (path, state, label values, meta); None when there is nothing to save."""
    if target is None or state is None:
        return None
    if state.is_empty and not target.path.exists():
        return None  # nothing to save and nothing saved to update
    if tuple(target.image_shape[-state.ndim :]) != state.shape:
        return None  # labels of another image: saving them under this image would mislead
    meta = {
        "fingerprint": target.fingerprint,
        "image_name": target.image_name,
        "image_source": target.image_source,
        "margin": int(margin),
    }
    return target.path, state.copy(), np.array(labels), meta


class AutosaveWriter:
    """Serialises autosaves: one at a time, and a snapshot older than the last written is skipped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._written: dict[Path, int] = {}

    def write(self, path: Path, state: CorrectionState, labels: np.ndarray, meta: dict) -> Path | None:
        with self._lock:
            if self._written.get(path, -1) > state.revision:
                return None
            saved = save_corrections(path, state, labels, **meta)
            self._written[path] = state.revision
            return saved


def save_job(writer: AutosaveWriter, path: Path, state: CorrectionState, labels: np.ndarray, meta: dict,
             session: sessions.SessionAutosaver | None = None, settings: FinetuneSettings | None = None):
    """Write one autosave (a generator for a worker; atomic, an older snapshot never overwrites a
    newer one), and into the open session, if any."""
    yield from ()
    try:
        saved = writer.write(path, state, labels, meta)
    except OSError as exc:  # disk full, folder gone: one plain sentence, as a flush says it
        raise CorrectionsError(f"Could not save the corrections to {path}: {exc.strerror or exc}.") from exc
    if session is not None:
        session.save_corrections(state, labels, settings=settings)
    return saved


# ---------------------------------------------------------------------------------------------
# The session


def image_channels(image_shape: tuple[int, ...], labels_ndim: int, variant: str) -> int:
    """Input channels of a fresh ``variant`` for an image of ``image_shape`` over labels of ``labels_ndim`` axes."""
    if len(image_shape) == labels_ndim + 1:
        channel_axis = 1 if (labels_ndim == 3 and not variant.endswith("3d")) else 0
        return int(image_shape[channel_axis])
    return 1


class FinetuneSession:
    """The state of one fine-tuning session on the user's corrections (no GUI).

    Set the data with :meth:`set_image` and :meth:`set_labels`, the settings and the start model
    through the attributes, then :meth:`start` (or :meth:`resume`) and iterate :meth:`events`
    (or call :meth:`run_to_end`). ``shared`` is the model other tools use (a :class:`SharedModel`,
    or the viewer's model holder, which has the same attributes); :attr:`StartModel.SHARED`
    fine-tunes a copy of it. ``replay_data`` gives the start model's training data as arrays
    (else the files its checkpoint names are read).

    State listeners (:meth:`add_state_listener`) are called with the new :class:`TrainingState` in
    the thread that changes it: the caller's for start/stop, the one iterating the run for its end.
    """

    def __init__(self, settings: FinetuneSettings | None = None, *, review_hint: str = "") -> None:
        self.settings = settings or FinetuneSettings()
        self.review_hint = review_hint  # how to mark a slice reviewed, named in the "no corrections" message
        self.image: Any = None
        self.image_name = ""
        self.image_source = ""
        self.fingerprint = ""
        self.labels: Any = None
        self.labels_name = ""
        self.corrections: CorrectionState | None = None
        self.start_from = StartModel.SHARED
        self.checkpoint_in = ""  # the checkpoint file of StartModel.CHECKPOINT
        self.fresh = FreshModel()
        self.shared: Any = None
        self.checkpoint_out = ""  # where the fine-tuned model goes ("": beside the autosave)
        self.autosave_folder: Path | None = None  # None: beside the image file, else the default folder
        self.preview_interval: float | None = None  # seconds between previews of the region in view
        self.replay_data: tuple | None = None  # (images, labels) to replay instead of the files a checkpoint names
        self.run: TrainingRun | None = None  # the current or last run
        self.status = TrainingState.IDLE
        self.error: BaseException | None = None  # why the last run failed
        self._state_listeners: list[Callable[[TrainingState], None]] = []

    # -- data ----------------------------------------------------------------------------------

    def set_image(self, image: Any, *, name: str, source: str = "", fingerprint: str | None = None) -> None:
        """The image to fine-tune on (raw array, grey or with a channel axis); its fingerprint is
        computed unless given (it names the autosave)."""
        self.image, self.image_name, self.image_source = image, name, str(source or "")
        self.fingerprint = fingerprint if fingerprint is not None else image_fingerprint(image) if image is not None else ""

    def set_labels(self, labels: Any, corrections: CorrectionState | None = None, *, name: str = "") -> None:
        """The labels the user corrects and what was confirmed on them (new, empty corrections if None)."""
        self.labels, self.labels_name = labels, name
        if corrections is None and labels is not None and np.ndim(labels) in (2, 3):
            corrections = CorrectionState(np.shape(labels))
        self.corrections = corrections

    def autosave_target(self) -> AutosaveTarget | None:
        """Where the image's corrections are saved (None without an image)."""
        if self.image is None:
            return None
        return AutosaveTarget.for_image(tuple(self.image.shape), self.image_name, self.fingerprint,
                                        self.image_source, self.autosave_folder)

    # -- state ---------------------------------------------------------------------------------

    def add_state_listener(self, callback: Callable[[TrainingState], None]) -> None:
        self._state_listeners.append(callback)

    def remove_state_listener(self, callback: Callable[[TrainingState], None]) -> None:
        if callback in self._state_listeners:
            self._state_listeners.remove(callback)

    def _set_status(self, status: TrainingState) -> None:
        if status is self.status:
            return
        self.status = status
        for callback in list(self._state_listeners):
            callback(status)

    @property
    def is_running(self) -> bool:
        return self.status in RUNNING_STATES

    @property
    def history(self) -> dict:
        """The last run's training history (losses, validation Dice per step)."""
        return self.run.history if self.run is not None else {}

    # -- the starting model and input checks ---------------------------------------------------

    def image_channels(self, variant: str | None = None) -> int:
        """Input channels a fresh model needs for this image."""
        if self.image is None or self.labels is None:
            return 1
        return image_channels(tuple(self.image.shape), np.ndim(self.labels), variant or self.fresh.variant)

    def out_channels(self) -> int:
        """Output channels a fresh model needs: 1 (binary) or the classes the confirmed labels hold."""
        if self.labels is None:
            return 1
        state = self.corrections
        data = np.asarray(self.labels)
        values = data[state.confirmed_mask(self.settings.margin)] if state is not None and not state.is_empty else data
        n_classes = int(values.max()) + 1 if values.size else 2
        return 1 if n_classes <= 2 else n_classes

    def starts_untrained(self) -> bool:
        """True when the start model predicts noise (its guesses must not be learnt)."""
        shared_trained = self.shared is not None and self.shared.trained
        return self.start_from is StartModel.FRESH or (self.start_from is StartModel.SHARED and not shared_trained)

    def starting_model(self) -> tuple[Any, str]:
        """A copy of the model to train and where it came from, in words (CorrectionsError if none)."""
        if self.start_from is StartModel.SHARED:
            shared = self.shared
            if shared is None or shared.model is None:
                raise CorrectionsError(
                    "The Segment widget has no model yet: load one there, or start from a checkpoint or a fresh model."
                )
            if shared.busy:
                raise CorrectionsError("The Segment widget is using the model right now; try again when it has finished.")
            return copy_model(shared.model), shared.source or "the Segment widget's model"
        if self.start_from is StartModel.CHECKPOINT:
            from napari_unet.checkpoint import load_checkpoint

            path = self.checkpoint_in.strip()
            if not path:
                raise CorrectionsError("Pick a checkpoint file to start from.")
            return load_checkpoint(path).model, f"checkpoint {path}"
        from napari_unet.models import build_model

        fresh = self.fresh
        model = build_model(
            fresh.variant,
            in_channels=self.image_channels(fresh.variant),
            out_channels=self.out_channels(),
            width=int(fresh.width),
            depth=int(fresh.depth),
        )
        return model, f"fresh {fresh.variant}, width {fresh.width}, depth {fresh.depth}"

    def replay_paths(self, previous: TrainingRun | None = None) -> tuple | None:
        """The start model's training data files, from its checkpoint (None: none recorded)."""
        if previous is not None:
            return previous.replay_paths
        shared = self.shared
        if self.start_from is StartModel.SHARED and shared is not None and shared.checkpoint is not None:
            return replay_paths(shared.checkpoint.provenance)
        if self.start_from is StartModel.CHECKPOINT and self.checkpoint_in.strip():
            from napari_unet.checkpoint import load_checkpoint

            return replay_paths(load_checkpoint(self.checkpoint_in.strip()).provenance)
        return None

    def checkpoint_target(self) -> Path:
        """Where the fine-tuned model is saved: ``checkpoint_out``, or a stamped file beside the autosave."""
        text = self.checkpoint_out.strip()
        if text:
            path = Path(text).expanduser()
            return path if path.suffix else path.with_suffix(".pt")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.autosave_target()
        folder = target.path.parent if target is not None else default_autosave_folder()
        return folder / f"{self.image_name.replace(' ', '_')}-finetuned-{stamp}.pt"

    def check_inputs(self) -> None:
        """CorrectionsError in plain words when the image, the labels or the corrections do not do."""
        image, labels, state = self.image, self.labels, self.corrections
        if image is None:
            raise CorrectionsError("Pick the image to fine-tune on (open an image first).")
        if labels is None or state is None:
            raise CorrectionsError("Pick the corrected labels layer (a (Y, X) or (Z, Y, X) labels layer).")
        labels_shape = tuple(np.shape(labels))
        spatial = tuple(image.shape[-len(labels_shape):]) if image.ndim > len(labels_shape) else tuple(image.shape)
        if spatial != labels_shape:
            raise CorrectionsError(
                f"The image '{self.image_name}' has shape {tuple(image.shape)} but the labels '{self.labels_name}' "
                f"have shape {labels_shape}; pick labels made for this image."
            )
        if state.is_empty:
            hint = f" ({self.review_hint})" if self.review_hint else ""
            raise CorrectionsError(
                f"No confirmed pixels yet: paint corrections on the labels or mark a slice as reviewed{hint} first."
            )
        settings = self.settings
        if settings.time_budget is None and settings.steps is None:
            raise CorrectionsError("Set a time budget or a step limit.")

    def prepare_run(self, model, start_model: str, *, resume: bool = False, autosaver: Any = None,
                    on_checked: Callable[[], Any] | None = None) -> TrainingRun:
        """Check the inputs and snapshot them for a run; CorrectionsError says what is missing.

        ``on_checked`` runs once the inputs passed, before the snapshot (the dock flushes its
        autosave there); ``autosaver``: the SessionAutosaver the run saves its weights into.
        """
        self.check_inputs()
        if on_checked is not None:
            on_checked()
        settings = form_settings = self.settings
        if not resume and self.starts_untrained():
            settings = replace(settings, anchor_weight=0.0)  # an untrained model's guesses teach nothing
        previous = self.run
        run = TrainingRun(
            image_name=self.image_name,
            image=self.image,
            labels=np.array(self.labels),
            state=self.corrections.copy(),
            settings=settings,
            model=model,
            start_model=start_model,
            checkpoint_path=self.checkpoint_target(),
            fingerprint=self.fingerprint,
            image_source=self.image_source,
            preview_interval=self.preview_interval,
            resume_from=previous.saved_path if (resume and previous) else None,
            replay_paths=self.replay_paths(previous if resume else None) if settings.replay else None,
            replay_data=self.replay_data if settings.replay else None,
            session=autosaver,
            form_settings=form_settings,
        )
        return run

    # -- running -------------------------------------------------------------------------------

    def start(self, *, resume: bool = False, autosaver: Any = None,
              on_checked: Callable[[], Any] | None = None) -> TrainingRun:
        """Prepare a run from the start model (or, ``resume``, from the last run's saved weights)
        and make it the current one; iterate :meth:`events` to train. CorrectionsError (or
        CheckpointError, OSError) in plain words when it cannot start."""
        if self.is_running:
            raise CorrectionsError("A fine-tuning is already running: stop it before starting another.")
        if resume:
            if self.run is None or self.run.saved_path is None:
                raise CorrectionsError("Nothing to resume yet: start a fine-tuning first.")
            model, start_model = copy_model(self.run.model), f"resumed from {self.run.saved_path}"
        else:
            model, start_model = self.starting_model()
        run = self.prepare_run(model, start_model, resume=resume, autosaver=autosaver, on_checked=on_checked)
        self.run = run
        self.error = None
        self._set_status(TrainingState.TRAINING)
        return run

    def resume(self, **kwargs: Any) -> TrainingRun:
        """Go on from the last fine-tuned weights (with the corrections as they are now)."""
        return self.start(resume=True, **kwargs)

    def stop(self, reason: str = "stopped by the user") -> None:
        """Stop the run before its next step (thread-safe); the best weights are kept and saved."""
        if self.run is not None and self.is_running:
            self.run.stop(reason)
            self._set_status(TrainingState.STOPPING)

    def abandon(self) -> None:
        """Whoever iterated the run gave up before its end (a worker that quit): it failed."""
        if self.is_running:
            self.run.stop("abandoned")
            self._set_status(TrainingState.FAILED)

    def events(self, run: TrainingRun | None = None) -> Iterator[Any]:
        """The current run as a generator of TrainEvents and Notices; returns the run.

        The status becomes DONE, STOPPED or FAILED when it ends (in the iterating thread).
        """
        run = run or self.run
        if run is None:
            raise CorrectionsError("Start a fine-tuning first.")
        try:
            result = yield from training_job(run)
        except BaseException as exc:
            self.error = exc
            self._set_status(TrainingState.FAILED)
            raise
        self._set_status(TrainingState.STOPPED if run.stop_reason else TrainingState.DONE)
        return result

    def run_to_end(self, on_event: Callable[[Any], Any] | None = None) -> TrainingRun:
        """Iterate the current run here, calling ``on_event`` with each event; returns the run."""
        events = self.events()
        while True:
            try:
                event = next(events)
            except StopIteration as end:
                return end.value
            if on_event is not None:
                on_event(event)

    # -- preview -------------------------------------------------------------------------------

    def preview_region(self, z: int | None, *, volume_view: bool = False) -> tuple:
        """The region the current run previews when the viewer shows slice ``z``."""
        run = self.run
        if run is None:
            return ()
        return preview_region(run.state.shape, int(getattr(run.model, "spatial_dims", 2)), z, volume_view=volume_view)
