"""The Fine-tune dock: record the user's corrections and fine-tune the shared model on them.

The widget only wires things together:

* the corrected Labels layer's ``paint`` events go into a :class:`~napari_unet.corrections.
  CorrectionState` (with slices marked reviewed by a button or Shift-R), which is autosaved a
  moment after the last edit (in a worker, atomically) and offered back when the same image is
  opened again;
* Start builds a Trainer with :func:`~napari_unet.corrections.build_finetune_trainer` (the path the
  benchmark uses too) and runs ``Trainer.run()`` in a worker from :mod:`._qt.workers`; its events
  feed :class:`~napari_unet._qt.plots.TrainingPlots` and the preview layer;
* at the end the best weights are saved as a checkpoint and shared with the Segment widget;
* Save session… / Open session… write and read a :mod:`napari_unet.session` folder (image path,
  labels, corrections, model, settings); a session saved or opened is kept up to date by a
  :class:`~napari_unet.session.SessionAutosaver` (corrections on the autosave cadence, the weights
  during fine-tuning), so that a crash loses at most the last autosave interval.

Nothing heavy happens on the GUI thread: the training, the previews, the normalisation statistics,
checkpoint saving and autosaves all run in workers.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_unet import session as sessions
from napari_unet.corrections import (
    CorrectionsError,
    CorrectionState,
    FinetuneSettings,
    autosave_path_for,
    build_finetune_trainer,
    default_autosave_folder,
    find_autosave,
    finetune_provenance,
    image_fingerprint,
    load_corrections,
    load_replay,
    one_class_warning,
    replay_paths,
    save_corrections,
)
from napari_unet.session import SessionError
from napari_unet._qt.plots import TrainingPlots
from napari_unet._qt.shared import model_holder
from napari_unet._qt.workers import notify_error, start_worker

__all__ = ["FinetuneWidget"]

REVIEW_SHORTCUT = "Shift-R"
AUTOSAVE_DELAY_MS = 1500  # save this long after the last edit...
AUTOSAVE_MAX_DELAY_S = 5.0  # ...but never let unsaved strokes get older than this
ROLE_KEY = "napari_unet_role"  # layer metadata marking the layers this widget made

LOSS_NAMES = {
    "dice_bce": "Dice + BCE",
    "bce": "BCE",
    "dice": "Dice",
    "focal": "Focal",
    "border_weighted": "Border-weighted",
    "ce_dice": "CE + Dice",
}
START_FROM = ("Segment widget's model", "Checkpoint file", "Fresh model")


@dataclass
class Notice:
    """A message from the training job to the user (e.g. an out-of-memory retry)."""

    text: str
    info: bool = False  # news, not a warning


@dataclass
class TrainingRun:
    """Everything one Start (or Resume) works on, snapshotted on the GUI thread at the start.

    The job thread reads the arrays and writes ``trainer``, ``model``, ``saved_path`` and
    ``history``; the GUI thread only sets ``preview_region`` and calls :meth:`stop`.
    """

    image_layer: Layer
    labels_layer: Layer
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
    preview_interval: float
    preview_region: tuple = ()
    resume_from: Any = None
    replay_paths: tuple | None = None  # the start model's (images, labels) files, to replay
    session: Any = None  # the SessionAutosaver of the session these labels belong to, if any
    form_settings: Any = None  # the form's settings (for the session), before per-run adjustments
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
# Work done in worker threads (no Qt, no layer access: only the snapshots in TrainingRun)


def _preview_prediction(model, run: TrainingRun, stats: dict | None):
    """Predict the region the user is looking at with the current weights: ``(region, labels)``."""
    from napari_unet.inference import PredictionCancelled, predict, probabilities_to_labels

    region = run.preview_region
    if not region:
        return None
    try:
        probs = predict(
            model,
            _image_region(run.image, region, model),
            device=run.settings.device,
            normalization=stats,
            cancel=lambda: run.stop_requested,
        )
    except PredictionCancelled:
        return None
    return region, probabilities_to_labels(probs)


def _image_region(image: Any, region: tuple, model) -> np.ndarray:
    """The raw image under a spatial ``region``, keeping a channel axis where the image has one."""
    spatial = len(region)
    if image.ndim == spatial:
        return np.asarray(image[region])
    # channels: (Z, C, Y, X) stacks for 2D models, (C, Z, Y, X) volumes for 3D models
    channel_axis = 1 if (model.spatial_dims == 2 and spatial == 3) else 0
    index = list(region)
    index.insert(channel_axis, slice(None))
    part = np.asarray(image[tuple(index)])
    return part


def _training_job(run: TrainingRun):
    """The training generator run in a worker: yields TrainEvents and Notices, returns the run."""
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
    replay = None
    if run.replay_paths:
        try:
            replay = load_replay(run.replay_paths, spatial_dims=spatial_dims)
            yield Notice(f"Replaying the model's training data ({Path(run.replay_paths[0]).name}) beside "
                         "your corrections, so that it keeps what it knew.", info=True)
        except CorrectionsError as exc:
            run.replay_paths = None
            yield Notice(f"{exc} Fine-tuning on your corrections alone.")
    while True:
        try:
            trainer = build_finetune_trainer(
                run.model,
                run.image,
                run.labels,
                run.state,
                settings,
                preview_fn=lambda model: _preview_prediction(model, run, stats),
                preview_interval=run.preview_interval,
                resume_from=run.resume_from,
                replay=replay,
            )
            run.trainer = trainer
            if run.stop_requested:
                trainer.stop()
            for event in trainer.run():
                if event.kind == "step":
                    run.last_step = int(event.step)
                yield event
                notice = _autosave_into_session(
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
        # the Segment widget gets the checkpoint as saved (model on the CPU, provenance attached)
        run.checkpoint = load_checkpoint(run.saved_path)
        run.model = run.checkpoint.model
    except (OSError, ValueError) as exc:  # the trained weights stay in memory and go to Segment
        yield Notice(f"Could not save the model to {run.checkpoint_path}: {exc}. The fine-tuned model is still used.")
    notice = _autosave_into_session(run, lambda s: s.save_model(
        run.model, checkpoint=run.checkpoint, source=_finetuned_source(run), trained=True, step=run.last_step,
        settings=run.form_settings))
    if notice is not None:
        yield notice
    run.model.to("cpu")  # off the accelerator, so that its memory can be given back
    run.trainer = None  # drop the optimizer state too
    del trainer
    devices.release_memory(None)
    return run


def _finetuned_source(run: TrainingRun) -> str:
    counts = run.state.counts(run.settings.margin)
    return f"fine-tuned in napari on '{run.image_name}' ({run.last_step} steps, {counts.confirmed:,} confirmed pixels)"


def _autosave_into_session(run: TrainingRun, save) -> Notice | None:
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


def _save_job(writer: "AutosaveWriter", path: Path, state: CorrectionState, labels: np.ndarray, meta: dict,
              session: sessions.SessionAutosaver | None = None, settings: FinetuneSettings | None = None):
    """Write one autosave in a worker (atomic; an older snapshot never overwrites a newer one),
    and into the open session, if any."""
    yield from ()
    try:
        saved = writer.write(path, state, labels, meta)
    except OSError as exc:  # disk full, folder gone: one plain sentence, as flush_autosave says it
        raise CorrectionsError(f"Could not save the corrections to {path}: {exc.strerror or exc}.") from exc
    if session is not None:
        session.save_corrections(state, labels, settings=settings)
    return saved


@dataclass(frozen=True)
class AutosaveTarget:
    """Where and under which image the corrections are saved (fixed when the image is chosen)."""

    path: Path
    fingerprint: str
    image_name: str
    image_source: str
    image_shape: tuple[int, ...]


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


# ---------------------------------------------------------------------------------------------
# Small Qt helpers


class LayerPicker(QComboBox):
    """A combo box of the viewer's layers of one type, kept in sync with the layer list."""

    def __init__(self, viewer, layer_type: type, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self._layers: list[Layer] = []
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.reordered.connect(self.refresh)
        self.refresh()

    def _wanted(self, layer: Layer) -> bool:
        return isinstance(layer, self.layer_type) and not layer.metadata.get(ROLE_KEY)

    def refresh(self, event=None) -> None:
        current = self.layer
        self._layers = [layer for layer in self.viewer.layers if self._wanted(layer)]
        for layer in self._layers:
            try:
                layer.events.name.disconnect(self._rename)
            except (TypeError, ValueError, RuntimeError):
                pass
            layer.events.name.connect(self._rename)
        self.blockSignals(True)
        self.clear()
        self.addItems([layer.name for layer in self._layers])
        index = self._layers.index(current) if current in self._layers else (0 if self._layers else -1)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if current is not self.layer:
            self.currentIndexChanged.emit(self.currentIndex())

    def _rename(self, event=None) -> None:
        for i, layer in enumerate(self._layers):
            self.setItemText(i, layer.name)

    @property
    def layer(self) -> Layer | None:
        index = self.currentIndex()
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def set_layer(self, layer: Layer) -> None:
        self.refresh()
        if layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer))

    def disconnect_viewer(self) -> None:
        for signal in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed, self.viewer.layers.events.reordered):
            signal.disconnect(self.refresh)


class _CloseWatcher(QObject):
    """Calls ``callback`` when the watched window closes (to flush the last strokes to disk)."""

    def __init__(self, callback, parent: QObject):
        super().__init__(parent)
        self._callback = callback

    def eventFilter(self, watched, event):  # noqa: N802 - Qt API
        if event.type() == QEvent.Close:
            self._callback()
        return False


def _tip(widget: QWidget, text: str) -> QWidget:
    widget.setToolTip(text)
    return widget


def _raw_image_data(layer: Image) -> Any:
    """The full-resolution array behind an image layer (grey if it is RGB)."""
    data = layer.data[0] if layer.multiscale else layer.data
    if getattr(layer, "rgb", False):
        from napari_unet.io import rgb_to_grayscale

        data = rgb_to_grayscale(data)
    return data


def _copy_model(model):
    """A copy to train, so that the shared model keeps serving Segment meanwhile."""
    copied = copy.deepcopy(model)
    for name in ("normalization", "class_names"):
        if hasattr(model, name):
            setattr(copied, name, copy.deepcopy(getattr(model, name)))
    return copied


def _source_path(layer: Layer) -> str:
    path = getattr(getattr(layer, "source", None), "path", None) or layer.metadata.get("napari_unet_source")
    return str(path) if path else ""


def _display(layer: Layer, *names: str) -> dict:
    """How a layer is shown, as plain data for a session's manifest."""
    shown = {"name": layer.name}
    for name in ("scale", "translate", "opacity", *names):
        value = getattr(layer, name, None)
        if name == "colormap":
            value = getattr(value, "name", value)
        shown[name] = value.tolist() if hasattr(value, "tolist") else (list(value) if isinstance(value, tuple) else value)
    return shown


def _layer_kwargs(shown: dict, ndims: tuple[int, ...], *names: str) -> dict:
    """Keyword arguments for add_image/add_labels from :func:`_display`'s dict (what fits ``ndims``)."""
    kwargs = {}
    for name in ("scale", "translate"):
        value = shown.get(name)
        if isinstance(value, list) and len(value) in ndims:
            kwargs[name] = value
    for name in ("opacity", *names):
        if shown.get(name) is not None:
            kwargs[name] = shown[name]
    return kwargs


# ---------------------------------------------------------------------------------------------
# The widget


class FinetuneWidget(QWidget):
    """Dock widget: corrections bookkeeping, fine-tuning with live plots and preview."""

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.holder = model_holder(viewer)
        self.states: dict[int, CorrectionState] = {}  # id(labels layer) -> its corrections
        self._fingerprints: dict[int, str] = {}  # id(image layer) -> fingerprint
        self._labels_layer: Labels | None = None  # the layer whose paint events we follow
        self._labels_snapshot: np.ndarray | None = None  # label values at the last autosave
        self._restoring_data = False
        self._offered: set[str] = set()  # fingerprints whose saved corrections were offered
        self._pending_restore: Path | None = None
        self._unsaved_since: float | None = None
        self._writer = AutosaveWriter()
        self._target: AutosaveTarget | None = None  # where the current image's corrections go
        self.last_autosave: Path | None = None
        self.run: TrainingRun | None = None  # the current or last training run
        self.worker = None
        self.last_checkpoint: Path | None = None
        self.last_stop_latency: float | None = None
        self.preview_layer: Labels | None = None
        self.confirmed_layer: Image | None = None
        self.session: sessions.SessionAutosaver | None = None  # the session being worked on
        self._session_labels: Labels | None = None  # the labels layer whose work goes into it
        self.session_worker = None

        self._build_ui()
        self._autosave_timer = QTimer(self, singleShot=True, interval=AUTOSAVE_DELAY_MS)
        self._autosave_timer.timeout.connect(self.autosave)
        self._counts_timer = QTimer(self, singleShot=True, interval=150)
        self._counts_timer.timeout.connect(self._refresh_counts)

        viewer.layers.events.removed.connect(self._on_layer_removed)
        viewer.dims.events.current_step.connect(self._on_view_changed)
        viewer.dims.events.ndisplay.connect(self._on_view_changed)
        self.holder.changed.connect(self._refresh_model_summary)
        viewer.bind_key(REVIEW_SHORTCUT, self._shortcut_mark_reviewed, overwrite=True)
        self._close_watcher: _CloseWatcher | None = None
        self._closed = False

        self._on_image_changed()
        self._on_labels_changed()
        self._refresh_model_summary()
        self._update_buttons()

    # -- layout --------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        defaults = FinetuneSettings()
        engine = self._engine_defaults()
        content = QWidget()
        layout = QVBoxLayout(content)

        # session
        session_box = QGroupBox("Session")
        session_layout = QVBoxLayout(session_box)
        session_row = QHBoxLayout()
        self.save_session_button = _tip(
            QPushButton("Save session…"),
            "Save the image path, labels, corrections, model and settings in one folder; it is then kept up to "
            "date as you work (a crash loses at most the last seconds).",
        )
        self.open_session_button = _tip(QPushButton("Open session…"), "Open a saved session and go on where you left off.")
        self.save_session_button.clicked.connect(self._save_session_dialog)
        self.open_session_button.clicked.connect(self._open_session_dialog)
        session_row.addWidget(self.save_session_button)
        session_row.addWidget(self.open_session_button)
        session_layout.addLayout(session_row)
        self.session_label = QLabel("No session open.")
        self.session_label.setWordWrap(True)
        session_layout.addWidget(self.session_label)
        layout.addWidget(session_box)

        # data
        data_box = QGroupBox("Data")
        form = QFormLayout(data_box)
        self.image_picker = _tip(LayerPicker(self.viewer, Image), "The image the labels belong to.")
        self.labels_picker = _tip(
            LayerPicker(self.viewer, Labels),
            "The labels you correct with napari's paint, fill and erase tools (or a fresh layer of scribbles).",
        )
        form.addRow("Image", self.image_picker)
        form.addRow("Corrected labels", self.labels_picker)
        self.image_picker.currentIndexChanged.connect(self._on_image_changed)
        self.labels_picker.currentIndexChanged.connect(self._on_labels_changed)
        layout.addWidget(data_box)

        # corrections
        corr_box = QGroupBox("Corrections (what will be trained on)")
        corr = QVBoxLayout(corr_box)
        self.counts_label = QLabel("No corrections yet.")
        self.counts_label.setWordWrap(True)
        corr.addWidget(self.counts_label)
        row = QHBoxLayout()
        self.review_button = _tip(
            QPushButton(f"Reviewed ({REVIEW_SHORTCUT})"),
            "The prediction on this slice is now correct everywhere: train on all of it.",
        )
        self.unreview_button = _tip(QPushButton("Unmark"), "This slice is not reviewed after all.")
        self.forget_button = _tip(QPushButton("Forget strokes"), "Forget the painted pixels on this slice.")
        self.review_button.clicked.connect(self.mark_current_slice_reviewed)
        self.unreview_button.clicked.connect(self.unmark_current_slice)
        self.forget_button.clicked.connect(self.forget_current_strokes)
        for button in (self.review_button, self.unreview_button, self.forget_button):
            row.addWidget(button)
        corr.addLayout(row)
        corr_form = QFormLayout()
        self.review_depth = _tip(QSpinBox(minimum=1, maximum=512, value=1), "Slices marked at once: more than 1 marks a sub-volume (3D).")
        self.margin_spin = _tip(
            QSpinBox(minimum=0, maximum=20, value=defaults.margin),
            "Grow painted strokes by this many pixels (napari records only the pixels a stroke changed).",
        )
        self.margin_spin.valueChanged.connect(self._schedule_counts)
        self.show_confirmed = _tip(QCheckBox("Show confirmed pixels"), "Overlay the pixels the loss will see.")
        self.show_confirmed.toggled.connect(self._toggle_confirmed_overlay)
        corr_form.addRow("Review depth", self.review_depth)
        corr_form.addRow("Stroke margin", self.margin_spin)
        corr_form.addRow(self.show_confirmed)
        folder_row = QHBoxLayout()
        self.autosave_folder = _tip(
            QLineEdit(), "Where corrections are saved automatically. Empty: next to the image file, else " + str(default_autosave_folder())
        )
        self.autosave_folder.setPlaceholderText("next to the image")
        self.autosave_folder.editingFinished.connect(self._on_image_changed)
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_autosave_folder)
        folder_row.addWidget(self.autosave_folder)
        folder_row.addWidget(browse)
        corr_form.addRow("Autosave to", folder_row)
        corr.addLayout(corr_form)
        self.autosave_label = QLabel("")
        self.autosave_label.setWordWrap(True)
        corr.addWidget(self.autosave_label)
        # restore banner, shown when saved corrections of this image are found
        self.restore_box = QWidget()
        restore_row = QHBoxLayout(self.restore_box)
        restore_row.setContentsMargins(0, 0, 0, 0)
        self.restore_label = QLabel("")
        self.restore_label.setWordWrap(True)
        self.restore_button = QPushButton("Restore")
        self.dismiss_button = QPushButton("Ignore")
        self.restore_button.clicked.connect(self.restore_corrections)
        self.dismiss_button.clicked.connect(lambda: self.restore_box.setVisible(False))
        restore_row.addWidget(self.restore_label, 1)
        restore_row.addWidget(self.restore_button)
        restore_row.addWidget(self.dismiss_button)
        self.restore_box.setVisible(False)
        corr.addWidget(self.restore_box)
        layout.addWidget(corr_box)

        # model
        model_box = QGroupBox("Starting model")
        model_form = QFormLayout(model_box)
        self.start_from = _tip(QComboBox(), "Fine-tune the Segment widget's model, a saved checkpoint, or a new model.")
        self.start_from.addItems(START_FROM)
        self.start_from.currentIndexChanged.connect(self._refresh_model_summary)
        model_form.addRow("Start from", self.start_from)
        ckpt_row = QHBoxLayout()
        self.checkpoint_in = _tip(QLineEdit(), "A checkpoint (.pt) saved by napari-unet.")
        ckpt_browse = QPushButton("…")
        ckpt_browse.setMaximumWidth(30)
        ckpt_browse.clicked.connect(self._browse_checkpoint_in)
        ckpt_row.addWidget(self.checkpoint_in)
        ckpt_row.addWidget(ckpt_browse)
        model_form.addRow("Checkpoint", ckpt_row)
        self.variant = _tip(QComboBox(), "The UNet variant of a fresh model (2D for images and stacks, 3D for volumes).")
        self.variant.addItems(self._model_names())
        self.width_spin = _tip(QSpinBox(minimum=2, maximum=128, value=16), "Channels of the first level; doubles at each level.")
        self.depth_spin = _tip(QSpinBox(minimum=1, maximum=6, value=3), "Number of down-sampling levels.")
        size_row = QHBoxLayout()
        size_row.addWidget(QLabel("width"))
        size_row.addWidget(self.width_spin)
        size_row.addWidget(QLabel("depth"))
        size_row.addWidget(self.depth_spin)
        model_form.addRow("Fresh model", self.variant)
        model_form.addRow("", size_row)
        self.model_summary = QLabel("")
        self.model_summary.setWordWrap(True)
        model_form.addRow(self.model_summary)
        layout.addWidget(model_box)

        # settings
        settings_box = QGroupBox("Settings")
        sform = QFormLayout(settings_box)
        self.lr_spin = _tip(QDoubleSpinBox(decimals=5, minimum=1e-5, maximum=1.0, singleStep=1e-4), "Step size of the optimiser.")
        self.lr_spin.setValue(defaults.learning_rate or engine.get("learning_rate", 1e-3))
        self.time_spin = _tip(
            QSpinBox(minimum=0, maximum=24 * 3600, value=int(defaults.time_budget or 0), suffix=" s"),
            "Stop after this long (0: no time limit, use the step limit).",
        )
        self.steps_spin = _tip(QSpinBox(minimum=0, maximum=10**7, value=defaults.steps or 0), "Stop after this many steps (0: no step limit).")
        self.steps_spin.setSpecialValueText("no limit")
        self.patch_spin = _tip(QSpinBox(minimum=0, maximum=2048, singleStep=16, value=0), "Edge of the training patches (0: automatic).")
        self.patch_spin.setSpecialValueText("auto")
        self.batch_spin = _tip(QSpinBox(minimum=0, maximum=512, value=0), "Patches per step (0: automatic).")
        self.batch_spin.setSpecialValueText("auto")
        self.loss_combo = _tip(
            QComboBox(),
            "What the optimiser minimises on the confirmed pixels."
            + (f" A Dice term beside cross-entropy fades to 0 over the first {engine['dice_fade']:.0%} of the "
               "budget: Dice learns thin structures fast, cross-entropy then places boundaries best."
               if engine.get("dice_fade") else ""),
        )
        for key in self._loss_names():
            self.loss_combo.addItem(LOSS_NAMES.get(key, key), key)
        self.loss_combo.setCurrentIndex(max(0, self.loss_combo.findData(defaults.loss)))
        self.augment_check = _tip(QCheckBox("Augmentation"), "Random flips, rotations, elastic deformations and intensity changes.")
        self.augment_check.setChecked(defaults.augment)
        self.balance_check = _tip(
            QCheckBox("Balance classes"),
            "Give every class the same total weight: corrections are often mostly one class.",
        )
        self.balance_check.setChecked(defaults.balance_classes)
        self.replay_check = _tip(
            QCheckBox("Replay its training data"),
            "Mix the data the starting model was trained on (the files its checkpoint names) into the "
            "fine-tuning: it keeps what it knew while your corrections teach it. The fewer pixels you "
            "confirmed, the more is replayed.",
        )
        self.replay_check.setChecked(defaults.replay)
        self.anchor_spin = _tip(
            QDoubleSpinBox(decimals=2, minimum=0.0, maximum=1.0, singleStep=0.05, value=defaults.anchor_weight),
            "Weight of the starting model's own prediction on the pixels you did not confirm in a corrected "
            "slice: your strokes fix its mistakes while it keeps what it got right (0: those pixels are ignored). "
            "Not used for a fresh model.",
        )
        self.val_spin = _tip(
            QDoubleSpinBox(decimals=2, minimum=0.0, maximum=0.5, singleStep=0.05, value=defaults.val_fraction),
            "Share of the confirmed data held out to measure Dice (0: no validation).",
        )
        self.val_every_spin = _tip(QSpinBox(minimum=0, maximum=10**6, value=defaults.val_every or 0), "Measure validation Dice every this many steps (0: automatic).")
        self.val_every_spin.setSpecialValueText("auto")
        self.device_combo = _tip(QComboBox(), "Where to train: auto picks a GPU when there is one.")
        for spec, label in self._device_choices():
            self.device_combo.addItem(label, spec)
        self.preview_spin = _tip(
            QDoubleSpinBox(decimals=1, minimum=0.5, maximum=120.0, value=3.0, suffix=" s"),
            "How often the slice in view is predicted with the current weights.",
        )
        sform.addRow("Learning rate", self.lr_spin)
        sform.addRow("Time budget", self.time_spin)
        sform.addRow("Step limit", self.steps_spin)
        sform.addRow("Patch size", self.patch_spin)
        sform.addRow("Batch size", self.batch_spin)
        sform.addRow("Loss", self.loss_combo)
        sform.addRow("Keep what it knew", self.anchor_spin)
        sform.addRow("Validation share", self.val_spin)
        sform.addRow("Validate every", self.val_every_spin)
        sform.addRow("Preview every", self.preview_spin)
        sform.addRow("Device", self.device_combo)
        sform.addRow(self.augment_check)
        sform.addRow(self.balance_check)
        sform.addRow(self.replay_check)
        layout.addWidget(settings_box)

        # output
        out_box = QGroupBox("Output")
        oform = QFormLayout(out_box)
        out_row = QHBoxLayout()
        self.checkpoint_out = _tip(QLineEdit(), "Where the fine-tuned model is saved (empty: beside the autosaved corrections).")
        self.checkpoint_out.setPlaceholderText("automatic")
        out_browse = QPushButton("…")
        out_browse.setMaximumWidth(30)
        out_browse.clicked.connect(self._browse_checkpoint_out)
        out_row.addWidget(self.checkpoint_out)
        out_row.addWidget(out_browse)
        oform.addRow("Save model to", out_row)
        self.rerun_check = _tip(QCheckBox("Re-run Segment on the whole image afterwards"), "Predict the whole image with the new weights.")
        oform.addRow(self.rerun_check)
        layout.addWidget(out_box)

        # run
        buttons = QHBoxLayout()
        self.start_button = _tip(QPushButton("Start"), "Fine-tune on the confirmed pixels, from the starting model.")
        self.stop_button = _tip(QPushButton("Stop"), "Stop within a second; the best weights are kept and saved.")
        self.resume_button = _tip(QPushButton("Resume"), "Go on from the last fine-tuned weights, with today's corrections.")
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(self.resume)
        for button in (self.start_button, self.stop_button, self.resume_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        self.plots = TrainingPlots()
        layout.addWidget(self.plots)
        layout.addStretch(1)

        self._scroll = QScrollArea()
        self._scroll.setWidgetResizable(True)
        self._scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # the form narrows instead
        self._scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._scroll)
        # wide enough for the form's widest row: the horizontal scroll bar is off, so a narrower
        # dock would clip the right-hand column instead of scrolling to it
        scroll_bar = self._scroll.verticalScrollBar().sizeHint().width()
        self.setMinimumWidth(max(360, content.minimumSizeHint().width() + scroll_bar + 4))

    @staticmethod
    def _engine_defaults() -> dict:
        try:
            from dataclasses import asdict

            from napari_unet.training import TrainConfig

            return asdict(TrainConfig())
        except Exception:  # noqa: BLE001 - the widget still opens; Start reports the real error
            return {}

    @staticmethod
    def _model_names() -> list[str]:
        try:
            from napari_unet.models import available_models

            return list(available_models())
        except Exception:  # noqa: BLE001
            return ["unet"]

    @staticmethod
    def _loss_names() -> list[str]:
        try:
            from napari_unet.losses import available_losses

            return list(available_losses())
        except Exception:  # noqa: BLE001
            return list(LOSS_NAMES)

    @staticmethod
    def _device_choices() -> list[tuple[str, str]]:
        choices = [("auto", "auto")]
        try:
            from napari_unet.devices import available_devices

            choices += [(d.spec, d.label) for d in available_devices() if d.spec != "auto"]
        except Exception:  # noqa: BLE001
            choices.append(("cpu", "CPU"))
        return choices

    # -- settings ------------------------------------------------------------------------------

    def settings(self) -> FinetuneSettings:
        """The settings the form shows."""
        return FinetuneSettings(
            learning_rate=float(self.lr_spin.value()),
            time_budget=float(self.time_spin.value()) or None,
            steps=int(self.steps_spin.value()) or None,
            patch_size=int(self.patch_spin.value()) or None,
            batch_size=int(self.batch_spin.value()) or None,
            loss=str(self.loss_combo.currentData()),
            augment=self.augment_check.isChecked(),
            val_fraction=float(self.val_spin.value()),
            val_every=int(self.val_every_spin.value()) or None,
            margin=int(self.margin_spin.value()),
            balance_classes=self.balance_check.isChecked(),
            anchor_weight=float(self.anchor_spin.value()),
            replay=self.replay_check.isChecked(),
            device=str(self.device_combo.currentData()),
        )

    def set_settings(self, settings: FinetuneSettings) -> None:
        """Fill the form from ``settings`` (scripts and tests)."""
        if settings.learning_rate is not None:
            self.lr_spin.setValue(settings.learning_rate)
        self.time_spin.setValue(int(settings.time_budget or 0))
        self.steps_spin.setValue(int(settings.steps or 0))
        self.patch_spin.setValue(int(settings.patch_size or 0))
        self.batch_spin.setValue(int(settings.batch_size or 0))
        self.loss_combo.setCurrentIndex(max(0, self.loss_combo.findData(settings.loss)))
        self.augment_check.setChecked(settings.augment)
        self.val_spin.setValue(settings.val_fraction)
        self.val_every_spin.setValue(int(settings.val_every or 0))
        self.margin_spin.setValue(settings.margin)
        self.balance_check.setChecked(settings.balance_classes)
        self.anchor_spin.setValue(settings.anchor_weight)
        self.replay_check.setChecked(settings.replay)
        index = self.device_combo.findData(settings.device)
        if index >= 0:
            self.device_combo.setCurrentIndex(index)

    # -- layers and corrections ----------------------------------------------------------------

    @property
    def image_layer(self) -> Image | None:
        return self.image_picker.layer

    @property
    def labels_layer(self) -> Labels | None:
        return self.labels_picker.layer

    @property
    def state(self) -> CorrectionState | None:
        """The corrections of the chosen labels layer (None when no labels layer is chosen)."""
        layer = self.labels_layer
        if layer is None:
            return None
        state = self.states.get(id(layer))
        shape = tuple(layer.data.shape)
        if state is None or state.shape != shape:
            if len(shape) not in (2, 3):
                return None
            state = CorrectionState(shape)
            self.states[id(layer)] = state
        return state

    def _on_labels_changed(self, index=None) -> None:
        layer = self.labels_layer
        if layer is self._labels_layer:
            return
        if self._labels_layer is not None:
            self.flush_autosave()
            self._labels_layer.events.paint.disconnect(self._on_paint)
            self._labels_layer.events.data.disconnect(self._on_labels_data_replaced)
        self._labels_layer = layer
        self._labels_snapshot = None
        if layer is not None:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self._on_labels_data_replaced)
        self._remove_confirmed_overlay()
        self._refresh_counts()

    def _on_paint(self, event) -> None:
        state = self.state
        if state is None:
            return
        if state.record_history_atoms(event.value):
            self._edited()

    def _edited(self) -> None:
        """After any change to the corrections: schedule the autosave and the counts."""
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
        if time.monotonic() - self._unsaved_since > AUTOSAVE_MAX_DELAY_S:
            self.autosave()  # a long run of edits: do not postpone forever
        else:
            self._autosave_timer.start()
        self._schedule_counts()

    def _on_labels_data_replaced(self, event=None) -> None:
        """The labels layer got new data (e.g. a new prediction): keep the user's corrections.

        Confirmed pixels get back the values they had at the last autosave; a layer of another
        shape starts a new set of corrections (the old ones stay on disk).
        """
        layer = self._labels_layer
        state = self.states.get(id(layer)) if layer is not None else None
        if self._restoring_data or layer is None or state is None or state.is_empty:
            self._refresh_counts()
            return
        snapshot = self._labels_snapshot
        if tuple(layer.data.shape) != state.shape or snapshot is None or snapshot.shape != state.shape:
            self._refresh_counts()
            return
        confirmed = state.confirmed_mask(0)
        data = np.array(layer.data)
        if np.array_equal(data[confirmed], snapshot[confirmed]):
            return
        data[confirmed] = snapshot[confirmed]
        self._restoring_data = True
        try:
            layer.data = data
        finally:
            self._restoring_data = False
        show_info(f"Your corrections on '{layer.name}' were kept on top of the new labels.")

    def current_slice(self, layer: Layer | None = None) -> int | None:
        """The index along axis 0 of ``layer`` (default: the labels) that the viewer shows."""
        layer = layer or self.labels_layer
        if layer is None or layer.ndim < 3:
            return None
        data_point = layer.world_to_data(self.viewer.dims.point)
        return int(np.clip(np.round(data_point[0]), 0, layer.data.shape[0] - 1))

    def _shortcut_mark_reviewed(self, viewer=None) -> None:
        self.mark_current_slice_reviewed()

    def mark_current_slice_reviewed(self) -> None:
        """Mark the slice in view (or a sub-volume of ``Review depth`` slices) as reviewed."""
        state = self._state_or_warn()
        if state is None:
            return
        z = self.current_slice()
        depth = int(self.review_depth.value())
        if state.ndim == 2:
            state.mark_reviewed()
            text = "Image marked as reviewed."
        elif depth <= 1:
            state.mark_reviewed(z)
            text = f"Slice {z} marked as reviewed."
        else:
            start = max(0, z - (depth - 1) // 2)
            box = state.mark_region((slice(start, min(state.shape[0], start + depth)), slice(None), slice(None)))
            text = f"Slices {box[0][0]}-{box[0][1] - 1} marked as reviewed."
        self.status_label.setText(text)
        self._edited()

    def unmark_current_slice(self) -> None:
        state = self._state_or_warn()
        if state is None:
            return
        state.unmark_reviewed(self.current_slice())
        self._edited()

    def forget_current_strokes(self) -> None:
        state = self._state_or_warn()
        if state is None:
            return
        state.forget_painted(self.current_slice())
        self._edited()

    def _state_or_warn(self) -> CorrectionState | None:
        state = self.state
        if state is None:
            notify_error("Pick the labels layer you are correcting first (a (Y, X) or (Z, Y, X) labels layer).")
        return state

    def _schedule_counts(self, *args) -> None:
        self._counts_timer.start()

    def _refresh_counts(self) -> None:
        state = self.state
        if state is None:
            self.counts_label.setText("No labels layer to correct yet.")
            return
        self.counts_label.setText(state.counts(self.margin_spin.value()).describe())
        self._update_confirmed_overlay()

    # -- confirmed overlay ---------------------------------------------------------------------

    def _toggle_confirmed_overlay(self, on: bool) -> None:
        if on:
            self._update_confirmed_overlay()
        else:
            self._remove_confirmed_overlay()

    def _update_confirmed_overlay(self) -> None:
        state, labels = self.state, self.labels_layer
        if not self.show_confirmed.isChecked() or state is None or labels is None:
            return
        mask = state.confirmed_mask(self.margin_spin.value()).astype(np.uint8)
        layer = self.confirmed_layer
        if layer is None or layer not in self.viewer.layers:
            layer = self.viewer.add_image(
                mask,
                name=f"{labels.name} confirmed",
                colormap="yellow",
                blending="additive",
                opacity=0.35,
                contrast_limits=(0, 1),
                scale=labels.scale,
                translate=labels.translate,
                metadata={ROLE_KEY: "confirmed"},
            )
            self.confirmed_layer = layer
        else:
            layer.data = mask

    def _remove_confirmed_overlay(self) -> None:
        layer, self.confirmed_layer = self.confirmed_layer, None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    # -- autosave and restore ------------------------------------------------------------------

    def _fingerprint(self, layer: Image) -> str:
        key = id(layer)
        if key not in self._fingerprints:
            self._fingerprints[key] = image_fingerprint(_raw_image_data(layer))
        return self._fingerprints[key]

    def _autosave_folder(self) -> Path | None:
        text = self.autosave_folder.text().strip()
        return Path(text).expanduser() if text else None

    def autosave_path(self) -> Path | None:
        """Where the chosen image's corrections are saved (None without an image)."""
        return self._target.path if self._target is not None else None

    def _make_target(self) -> AutosaveTarget | None:
        image = self.image_layer
        if image is None:
            return None
        fingerprint = self._fingerprint(image)
        source = _source_path(image)
        return AutosaveTarget(
            path=autosave_path_for(source, image.name, fingerprint, self._autosave_folder()),
            fingerprint=fingerprint,
            image_name=image.name,
            image_source=source,
            image_shape=tuple(_raw_image_data(image).shape),
        )

    def _autosave_snapshot(self) -> tuple[Path, CorrectionState, np.ndarray, dict] | None:
        """Copies of what to save, taken on the GUI thread (the worker never touches layers).

        Uses the layer whose strokes were recorded and the image chosen when they were made, so
        that a layer deleted or a picker switched a moment after an edit still gets it saved.
        """
        target, labels = self._target, self._labels_layer
        state = self.states.get(id(labels)) if labels is not None else None
        if target is None or state is None:
            return None
        if state.is_empty and not target.path.exists():
            return None  # nothing to save and nothing saved to update
        if tuple(target.image_shape[-state.ndim :]) != state.shape:
            return None  # labels of another image: saving them under this image would mislead
        values = np.array(labels.data)
        self._labels_snapshot = values
        meta = {
            "fingerprint": target.fingerprint,
            "image_name": target.image_name,
            "image_source": target.image_source,
            "margin": int(self.margin_spin.value()),
        }
        return target.path, state.copy(), values, meta

    def _session_of_labels(self) -> sessions.SessionAutosaver | None:
        labels = self._labels_layer
        return self.session if labels is not None and labels is self._session_labels else None

    def autosave(self) -> None:
        """Save the corrections now, in a worker (called by the debounce timer)."""
        self._autosave_timer.stop()
        snapshot = self._autosave_snapshot()
        self._unsaved_since = None
        if snapshot is None:
            return
        path = snapshot[0]
        session = self._session_of_labels()
        start_worker(
            _save_job(self._writer, *snapshot, session=session, settings=self.settings()),
            on_return=lambda saved: self._autosaved(saved or path),
            on_error=lambda exc: self._session_failed(session, exc),
            description="Saving corrections",
        )

    def flush_autosave(self) -> Path | None:
        """Save pending corrections right away, on this thread (closing, switching layers)."""
        if self._unsaved_since is None and not self._autosave_timer.isActive():
            return self.last_autosave
        self._autosave_timer.stop()
        self._unsaved_since = None
        snapshot = self._autosave_snapshot()
        if snapshot is None:
            return None
        try:
            saved = self._writer.write(*snapshot)
        except OSError as exc:
            notify_error(f"Could not save the corrections to {snapshot[0]}: {exc.strerror or exc}.")
            return None
        session = self._session_of_labels()
        if session is not None:
            try:
                session.save_corrections(snapshot[1], snapshot[2], settings=self.settings())
            except (OSError, ValueError) as exc:
                notify_error(exc)
                self._session_failed(session, exc)
        self._autosaved(saved or snapshot[0])
        return self.last_autosave

    def _autosaved(self, path: Path) -> None:
        self.last_autosave = Path(path)
        self.autosave_label.setText(f"Corrections saved to {path} at {dt.datetime.now():%H:%M:%S}.")

    def _on_image_changed(self, index=None) -> None:
        """A different image (or autosave folder): save for the old one, offer the new one's."""
        self.flush_autosave()
        self._target = self._make_target()
        self.restore_box.setVisible(False)
        image = self.image_layer
        if image is None:
            return
        fingerprint = self._fingerprint(image)
        folders = [default_autosave_folder()]
        if self._autosave_folder() is not None:
            folders.insert(0, self._autosave_folder())
        source = _source_path(image)
        if source:
            folders.insert(0, Path(source).parent)
        found = find_autosave(fingerprint, dict.fromkeys(folders))
        if found is None or found == self.last_autosave:
            return
        try:
            saved = load_corrections(found)
        except CorrectionsError as exc:
            notify_error(exc)
            return
        self._pending_restore = found
        self.restore_label.setText(f"Saved corrections found for '{image.name}': {saved.describe()}.")
        self.restore_box.setVisible(True)
        if fingerprint not in self._offered:
            self._offered.add(fingerprint)
            show_info(f"Saved corrections found for '{image.name}': press Restore in the Fine-tune dock to get them back.")

    def restore_corrections(self) -> Labels | None:
        """Add the saved corrections as a new labels layer and follow it (never overwrites a layer)."""
        image, path = self.image_layer, self._pending_restore
        if image is None or path is None:
            return None
        try:
            saved = load_corrections(path)
        except CorrectionsError as exc:
            notify_error(exc)
            return None
        layer = self.viewer.add_labels(
            saved.labels,
            name=f"{image.name} corrections",
            scale=image.scale[-saved.labels.ndim :],
            translate=image.translate[-saved.labels.ndim :],
        )
        self.states[id(layer)] = saved.state
        self.margin_spin.setValue(int(saved.meta.get("margin", self.margin_spin.value())))
        self.labels_picker.set_layer(layer)
        self._labels_snapshot = np.array(saved.labels)
        self.last_autosave = path
        self.restore_box.setVisible(False)
        self._refresh_counts()
        self.status_label.setText(f"Corrections restored from {path}.")
        return layer

    def _browse_autosave_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save corrections in")
        if folder:
            self.autosave_folder.setText(folder)
            self._on_image_changed()

    def _browse_checkpoint_in(self) -> None:
        name, _ = QFileDialog.getOpenFileName(self, "Start from checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)")
        if name:
            self.checkpoint_in.setText(name)
            self.start_from.setCurrentIndex(1)

    def _browse_checkpoint_out(self) -> None:
        name, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model", "", "Checkpoints (*.pt)")
        if name:
            self.checkpoint_out.setText(name)

    # -- sessions ------------------------------------------------------------------------------

    def _save_session_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the session in (a new or empty folder, or a session to replace)")
        if folder:
            self.save_session(folder)

    def _open_session_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a session folder")
        if folder:
            self.open_session(folder)

    def _session_snapshot(self) -> sessions.SessionData:
        """What Save session writes, copied on the GUI thread (the worker never touches layers)."""
        image, labels, state = self.image_layer, self.labels_layer, self.state
        if image is None or labels is None or state is None:
            raise CorrectionsError("Pick the image and the labels layer you correct before saving a session.")
        self.flush_autosave()
        source = _source_path(image)
        holder = self.holder
        return sessions.SessionData(
            image_path=source,
            image=_raw_image_data(image) if not source else None,  # an image without a file is kept inside
            image_fingerprint=self._fingerprint(image),
            image_name=image.name,
            labels=np.array(labels.data),
            labels_name=labels.name,
            state=state.copy(),
            settings=self.settings(),
            model=holder.model,
            checkpoint=holder.checkpoint,
            model_source=holder.source,
            model_trained=holder.trained,
            display={"image": _display(image, "colormap", "contrast_limits", "blending"), "labels": _display(labels)},
        )

    def save_session(self, folder: str | Path):
        """Save the session into ``folder`` in a worker; returns the worker (None if refused)."""
        if self.session_worker is not None:
            notify_error("A session is being saved or opened; wait a moment.")
            return None
        try:
            sessions.check_writable_folder(folder)  # plain words at once for the usual problem
            data = self._session_snapshot()
        except (ValueError, OSError) as exc:
            notify_error(exc)
            return None
        folder, labels = Path(folder).expanduser(), self.labels_layer

        def job():
            yield from ()
            sessions.save_session(folder, data)
            return folder

        self.session_label.setText(f"Saving the session to {folder}…")
        self.session_worker = start_worker(
            job(), on_return=lambda saved: self._follow_session(saved, labels, "saved to"),
            on_error=lambda exc: self.session_label.setText("The session was not saved; see the notification for why."),
            on_finished=self._session_job_finished, description="Saving the session",
        )
        return self.session_worker

    def open_session(self, folder: str | Path):
        """Open the session in ``folder`` (checked here, read in a worker); returns the worker or None."""
        if self.session_worker is not None:
            notify_error("A session is being saved or opened; wait a moment.")
            return None
        if self.is_training:
            notify_error("Stop the fine-tuning before opening a session.")
            return None
        try:
            sessions.check_session(folder)  # plain words at once for the usual problems
        except SessionError as exc:
            notify_error(exc)
            return None

        def job():
            yield from ()
            return sessions.load_session(folder)

        self.session_label.setText(f"Opening the session {folder}…")
        self.session_worker = start_worker(
            job(), on_return=self._apply_session,
            on_error=lambda exc: self.session_label.setText("The session could not be opened; see the notification for why."),
            on_finished=self._session_job_finished, description="Opening the session",
        )
        return self.session_worker

    def _session_job_finished(self) -> None:
        self.session_worker = None

    def _apply_session(self, data: sessions.SessionData) -> None:
        """Show an opened session: its image and labels as new layers, its corrections, settings, model."""
        self.flush_autosave()  # the work on the current layers stays on disk
        self._offered.add(data.image_fingerprint)  # its own autosave need not be offered back
        shown = data.display or {}
        image_shown, labels_shown = shown.get("image") or {}, shown.get("labels") or {}
        image_layer = self.viewer.add_image(
            data.image,
            name=data.image_name or image_shown.get("name") or "image",
            metadata={"napari_unet_source": data.image_path} if data.image_path else {},
            # an RGB image's scale has one axis less than its array
            **_layer_kwargs(image_shown, (np.ndim(data.image), np.ndim(data.image) - 1),
                            "colormap", "contrast_limits", "blending"),
        )
        labels_layer = self.viewer.add_labels(
            data.labels,
            name=data.labels_name or f"{image_layer.name} labels",
            **_layer_kwargs(labels_shown, (data.labels.ndim,)),
        )
        self._fingerprints[id(image_layer)] = data.image_fingerprint
        self.states[id(labels_layer)] = data.state
        self.image_picker.set_layer(image_layer)
        self.labels_picker.set_layer(labels_layer)
        self._labels_snapshot = np.array(data.labels)
        self.set_settings(data.settings)
        if data.model is not None:
            self.holder.set(data.model, checkpoint=data.checkpoint, source=data.model_source or f"session {data.folder}",
                            trained=data.model_trained)
            self.start_from.setCurrentIndex(0)  # fine-tune the session's model
        self.restore_box.setVisible(False)
        self._refresh_counts()
        for warning in data.warnings:
            show_warning(warning)
        self._follow_session(data.folder, labels_layer, "opened from")

    def _follow_session(self, folder: Path, labels: Labels | None, how: str) -> None:
        """From now on the work on ``labels`` (and its fine-tuning) is autosaved into ``folder``."""
        self.session = sessions.SessionAutosaver(folder)
        self._session_labels = labels if labels is not None and labels in self.viewer.layers else None
        if self.run is not None and self.is_training and self.run.labels_layer is self._session_labels:
            self.run.session = self.session  # the running fine-tuning autosaves its weights there too
        text = (f"Session {how} {folder}. Labels and corrections are saved into it as you work, "
                f"the weights every {sessions.MODEL_AUTOSAVE_INTERVAL:.0f} s while fine-tuning.")
        self.session_label.setText(text)
        self.status_label.setText(f"Session {how} {folder}.")

    def _session_failed(self, session: sessions.SessionAutosaver | None, exc: BaseException) -> None:
        """An autosave into the session failed (folder gone, disk full): stop autosaving there."""
        if session is None or session is not self.session:
            return
        self.session = None
        self._session_labels = None
        self.session_label.setText(f"The session in {session.folder} is no longer updated: {exc}")

    # -- the starting model --------------------------------------------------------------------

    def _refresh_model_summary(self, *args) -> None:
        choice = self.start_from.currentIndex()
        if choice == 0:
            text = self.holder.summary()
        elif choice == 1:
            text = "The checkpoint is loaded when training starts."
        else:
            text = "A new, untrained model: fine-tuning it needs more corrections and time."
        self.model_summary.setText(text)

    def _replay_paths(self, previous: TrainingRun | None) -> tuple | None:
        """The start model's training data files, from its checkpoint (None: none recorded)."""
        if previous is not None:
            return previous.replay_paths
        choice = self.start_from.currentIndex()
        if choice == 0 and self.holder.checkpoint is not None:
            return replay_paths(self.holder.checkpoint.provenance)
        if choice == 1 and self.checkpoint_in.text().strip():
            from napari_unet.checkpoint import load_checkpoint

            return replay_paths(load_checkpoint(self.checkpoint_in.text().strip()).provenance)
        return None

    def _starting_model(self) -> tuple[Any, str]:
        """A copy of the model to train (the shared one keeps serving Segment meanwhile)."""
        choice = self.start_from.currentIndex()
        if choice == 0:
            if self.holder.model is None:
                raise CorrectionsError(
                    "The Segment widget has no model yet: load one there, or start from a checkpoint or a fresh model."
                )
            if self.holder.busy:
                raise CorrectionsError("The Segment widget is using the model right now; try again when it has finished.")
            return _copy_model(self.holder.model), self.holder.source or "the Segment widget's model"
        if choice == 1:
            from napari_unet.checkpoint import load_checkpoint

            path = self.checkpoint_in.text().strip()
            if not path:
                raise CorrectionsError("Pick a checkpoint file to start from.")
            return load_checkpoint(path).model, f"checkpoint {path}"
        from napari_unet.models import build_model

        image, labels = self.image_layer, self.labels_layer
        name = self.variant.currentText()
        model = build_model(
            name,
            in_channels=self._image_channels(image, labels, name),
            out_channels=self._out_channels(labels),
            width=int(self.width_spin.value()),
            depth=int(self.depth_spin.value()),
        )
        return model, f"fresh {name}, width {self.width_spin.value()}, depth {self.depth_spin.value()}"

    @staticmethod
    def _image_channels(image: Image | None, labels: Labels | None, variant: str) -> int:
        if image is None or labels is None:
            return 1
        data = _raw_image_data(image)
        if data.ndim == labels.ndim + 1:
            channel_axis = 1 if (labels.ndim == 3 and not variant.endswith("3d")) else 0
            return int(data.shape[channel_axis])
        return 1

    def _out_channels(self, labels: Labels | None) -> int:
        if labels is None:
            return 1
        state = self.state
        data = np.asarray(labels.data)
        values = data[state.confirmed_mask(self.margin_spin.value())] if state is not None and not state.is_empty else data
        n_classes = int(values.max()) + 1 if values.size else 2
        return 1 if n_classes <= 2 else n_classes

    # -- training ------------------------------------------------------------------------------

    @property
    def is_training(self) -> bool:
        return self.worker is not None

    def _update_buttons(self) -> None:
        running = self.is_training
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.resume_button.setEnabled(not running and self.run is not None and self.run.saved_path is not None)

    def _checkpoint_target(self, image: Image) -> Path:
        text = self.checkpoint_out.text().strip()
        if text:
            path = Path(text).expanduser()
            return path if path.suffix else path.with_suffix(".pt")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = self.autosave_path().parent if self._target is not None else default_autosave_folder()
        return folder / f"{image.name.replace(' ', '_')}-finetuned-{stamp}.pt"

    def _starts_untrained(self) -> bool:
        choice = self.start_from.currentIndex()
        return choice == 2 or (choice == 0 and not self.holder.trained)

    def _prepare_run(self, model, start_model: str, *, resume: bool) -> TrainingRun:
        """Check the inputs and snapshot them for the job; CorrectionsError says what is missing."""
        image, labels, state = self.image_layer, self.labels_layer, self.state
        if image is None:
            raise CorrectionsError("Pick the image to fine-tune on (open an image first).")
        if labels is None or state is None:
            raise CorrectionsError("Pick the corrected labels layer (a (Y, X) or (Z, Y, X) labels layer).")
        data = _raw_image_data(image)
        spatial = tuple(data.shape[-labels.ndim :]) if data.ndim > labels.ndim else tuple(data.shape)
        if spatial != tuple(labels.data.shape):
            raise CorrectionsError(
                f"The image '{image.name}' has shape {tuple(data.shape)} but the labels '{labels.name}' have shape "
                f"{tuple(labels.data.shape)}; pick labels made for this image."
            )
        if state.is_empty:
            raise CorrectionsError(
                "No confirmed pixels yet: paint corrections on the labels or mark a slice as reviewed "
                f"({REVIEW_SHORTCUT}) first."
            )
        self.flush_autosave()
        settings = form_settings = self.settings()
        if not resume and self._starts_untrained():
            settings = replace(settings, anchor_weight=0.0)  # an untrained model's guesses teach nothing
        if settings.time_budget is None and settings.steps is None:
            raise CorrectionsError("Set a time budget or a step limit.")
        previous = self.run
        run = TrainingRun(
            image_layer=image,
            labels_layer=labels,
            image_name=image.name,
            image=data,
            labels=np.array(labels.data),
            state=state.copy(),
            settings=settings,
            model=model,
            start_model=start_model,
            checkpoint_path=self._checkpoint_target(image),
            fingerprint=self._fingerprint(image),
            image_source=_source_path(image),
            preview_interval=float(self.preview_spin.value()),
            resume_from=previous.saved_path if (resume and previous) else None,
            replay_paths=self._replay_paths(previous if resume else None) if settings.replay else None,
            session=self.session if labels is self._session_labels else None,
            form_settings=form_settings,
        )
        run.preview_region = self._preview_region(run)
        return run

    def start(self) -> None:
        """Start fine-tuning from the chosen starting model."""
        self._launch(resume=False)

    def resume(self) -> None:
        """Go on from the last fine-tuned weights (with the corrections as they are now)."""
        if self.run is None or self.run.saved_path is None:
            notify_error("Nothing to resume yet: start a fine-tuning first.")
            return
        self._launch(resume=True)

    def _launch(self, *, resume: bool) -> None:
        if self.is_training:
            notify_error("A fine-tuning is already running: stop it before starting another.")
            return
        try:
            if resume:
                model, start_model = _copy_model(self.run.model), f"resumed from {self.run.saved_path}"
            else:
                model, start_model = self._starting_model()
            run = self._prepare_run(model, start_model, resume=resume)
        except (ValueError, OSError) as exc:  # CorrectionsError, CheckpointError, ...: plain words
            notify_error(exc)
            return
        if not resume:
            self.plots.clear()
        self.plots.set_class_names(list(getattr(run.model, "class_names", []) or []) or self._class_names(run.model))
        self.run = run
        warning = one_class_warning(
            run.labels, run.state, self.plots.class_names or self._class_names(run.model),
            margin=run.settings.margin, anchor_weight=run.settings.anchor_weight,
        )
        if warning:
            show_warning(warning)
        self._ensure_preview_layer(run)
        self.show_plots()
        self.status_label.setText("Preparing the training data…")
        self.worker = start_worker(
            _training_job(run),
            on_yield=self._on_training_event,
            on_return=self._on_training_done,
            on_error=self._on_training_error,
            on_finished=self._on_training_finished,
            description="Fine-tuning",
            device=run.settings.device,
            activity_bar=False,  # the dock shows the progress: status line and live plots
        )
        self._update_buttons()

    def show_plots(self) -> None:
        """Scroll the dock so that the buttons and the live plots are in view."""
        self._scroll.ensureWidgetVisible(self.plots, 0, 0)

    @staticmethod
    def _class_names(model) -> list[str]:
        n_classes = max(2, int(getattr(model, "out_channels", 1)))
        return [f"class {i}" for i in range(n_classes)]

    def stop(self) -> None:
        """Stop training before its next step; the best weights are kept and saved."""
        if self.run is not None and self.is_training:
            self.run.stop("stopped by the user")
            self.status_label.setText("Stopping…")

    def _on_training_event(self, item) -> None:
        run = self.run
        if isinstance(item, Notice):
            (show_info if item.info else show_warning)(item.text)
            self.status_label.setText(item.text)
            return
        if run is None:
            return
        step = int(item.step)  # a resumed run continues the step count
        if item.kind == "step" and item.loss is not None:
            if not self.plots.losses:
                self.status_label.setText("Training… Stop keeps the best weights so far.")
            self.plots.add_step(step, item.loss)
            budget = run.settings.time_budget
            total = f" / {budget:.0f} s" if budget else ""
            self.plots.set_status(f"step {step}, loss {item.loss:.4f}, {item.elapsed:.0f} s{total}")
        elif item.kind == "validation" and item.dice is not None:
            self.plots.add_validation(step, item.dice)
        elif item.kind == "preview" and item.payload is not None:
            self._show_preview(run, item.payload)
        elif item.kind == "finished":
            if run.stop_requested_at is not None:  # how long Stop took to end the training loop
                self.last_stop_latency = time.perf_counter() - run.stop_requested_at
            self.status_label.setText((item.message or "Training finished") + "; saving the model…")

    def _on_training_done(self, run: TrainingRun) -> None:
        self.last_checkpoint = run.saved_path
        steps = run.last_step
        self.holder.set(run.model, checkpoint=run.checkpoint, source=_finetuned_source(run), trained=True)
        ending = run.stop_reason or "finished"
        saved = f"Model saved to {run.saved_path}" if run.saved_path else "The model could not be saved"
        self.status_label.setText(f"Training {ending} after {steps} steps. {saved}; Segment now uses it.")
        if self.rerun_check.isChecked():
            if run.image_layer in self.viewer.layers:
                self._rerun_segment(run)
            else:
                show_warning("The image layer is gone, so Segment was not re-run.")

    def _on_training_error(self, exc: BaseException) -> None:
        self.status_label.setText("Training failed; your corrections are kept. See the notification for why.")

    def _on_training_finished(self) -> None:
        self.worker = None
        self._update_buttons()

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        run = self.run
        if self.is_training and run is not None and layer in (run.image_layer, run.labels_layer):
            run.stop(f"stopped because the layer '{layer.name}' was deleted")
            show_warning(
                f"The layer '{layer.name}' was deleted during training: training stopped and the weights "
                "learnt so far are kept and saved."
            )
        if layer is self.preview_layer:
            self.preview_layer = None
        if layer is self.confirmed_layer:
            self.confirmed_layer = None
            self.show_confirmed.setChecked(False)
        if layer is self._labels_layer:
            # the user's strokes must survive the layer: save them before forgetting it
            self.flush_autosave()
            layer.events.paint.disconnect(self._on_paint)
            layer.events.data.disconnect(self._on_labels_data_replaced)
            self._labels_layer = None
            self.states.pop(id(layer), None)
        if layer is self._session_labels:
            self._session_labels = None  # the session keeps what was saved last (just flushed)
        self._fingerprints.pop(id(layer), None)

    # -- preview -------------------------------------------------------------------------------

    def _preview_region(self, run: TrainingRun) -> tuple:
        """The spatial region in view: the current slice (2D model), a slab or the volume (3D)."""
        shape = run.state.shape
        if len(shape) == 2:
            return tuple(slice(0, s) for s in shape)
        z = self.current_slice(run.labels_layer) if run.labels_layer in self.viewer.layers else 0
        z = z or 0
        if int(getattr(run.model, "spatial_dims", 2)) == 2:
            return (z, slice(0, shape[1]), slice(0, shape[2]))
        if self.viewer.dims.ndisplay == 3 and int(np.prod(shape)) <= 2**23:
            return tuple(slice(0, s) for s in shape)
        depth = min(shape[0], 32)
        start = int(np.clip(z - depth // 2, 0, shape[0] - depth))
        return (slice(start, start + depth), slice(0, shape[1]), slice(0, shape[2]))

    def _on_view_changed(self, event=None) -> None:
        run = self.run
        if run is not None and self.is_training:
            run.preview_region = self._preview_region(run)

    def _ensure_preview_layer(self, run: TrainingRun) -> Labels:
        layer = self.preview_layer
        shape = run.state.shape
        if layer is None or layer not in self.viewer.layers or tuple(layer.data.shape) != shape:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_labels(
                np.zeros(shape, np.uint8),
                name=f"{run.image_layer.name} preview",
                scale=run.labels_layer.scale,
                translate=run.labels_layer.translate,
                opacity=0.5,
                metadata={ROLE_KEY: "preview"},
            )
            self.preview_layer = layer
        return layer

    def _show_preview(self, run: TrainingRun, payload) -> None:
        region, labels = payload
        layer = self.preview_layer
        if layer is None or layer not in self.viewer.layers:
            if run.image_layer not in self.viewer.layers or run.labels_layer not in self.viewer.layers:
                return
            layer = self._ensure_preview_layer(run)
        layer.data[region] = labels
        layer.refresh()

    # -- after training ------------------------------------------------------------------------

    def _rerun_segment(self, run: TrainingRun) -> None:
        """Predict the whole image with the new weights: through the Segment widget when docked."""
        segment = self._docked_segment_widget()
        if segment is not None:
            self.flush_autosave()  # corrections on the layer Segment may overwrite stay on disk and in place
            segment.run()
            return
        model, image_layer = self.holder.model, run.image_layer
        image = _raw_image_data(image_layer)
        device = run.settings.device

        def job():
            from napari_unet.inference import predict, probabilities_to_labels

            return probabilities_to_labels(predict(model, image, device=device))

        def show(labels: np.ndarray) -> None:
            name = f"{image_layer.name} fine-tuned labels"
            if name in self.viewer.layers:
                self.viewer.layers[name].data = labels
            else:
                self.viewer.add_labels(labels, name=name, scale=run.labels_layer.scale, translate=run.labels_layer.translate)

        start_worker(job, on_return=show, description="Segmenting with the fine-tuned model", device=device)

    def _docked_segment_widget(self):
        try:
            from napari_unet._qt.segment_widget import SegmentWidget
        except ImportError:
            return None
        window = getattr(self.viewer, "window", None)
        widgets = getattr(window, "dock_widgets", None) if window is not None else None
        for widget in (widgets or {}).values():
            inner = getattr(widget, "native", widget)
            if isinstance(inner, SegmentWidget):
                return inner
            if isinstance(inner, QWidget):
                found = inner.findChildren(SegmentWidget)
                if found:
                    return found[0]
        return None

    # -- closing -------------------------------------------------------------------------------

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        window = self.window()
        if self._close_watcher is None and window is not None and window is not self:
            self._close_watcher = _CloseWatcher(self._on_window_close, self)
            window.installEventFilter(self._close_watcher)

    def _on_window_close(self) -> None:
        if self.run is not None and self.is_training:
            self.run.stop("stopped because the viewer was closed")
        self.flush_autosave()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Save pending corrections, stop training and let go of the viewer's events."""
        if self._closed:
            return
        self._closed = True
        self._on_window_close()
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        self.viewer.dims.events.current_step.disconnect(self._on_view_changed)
        self.viewer.dims.events.ndisplay.disconnect(self._on_view_changed)
        self.holder.changed.disconnect(self._refresh_model_summary)
        self.image_picker.disconnect_viewer()
        self.labels_picker.disconnect_viewer()
        if self._labels_layer is not None:
            self._labels_layer.events.paint.disconnect(self._on_paint)
            self._labels_layer.events.data.disconnect(self._on_labels_data_replaced)
            self._labels_layer = None
        try:
            self.viewer.bind_key(REVIEW_SHORTCUT, None)
        except Exception:  # noqa: BLE001 - another widget may have rebound it
            pass
