"""The Fine-tune dock: record the user's corrections and fine-tune the shared model on them.

The dock is a view over a Qt-free :class:`~napari_unet.finetuning.FinetuneSession`, which checks
the inputs, starts, stops and resumes a run and saves its checkpoint. The widget only wires:

* the form (:mod:`._qt.finetune_form`) to the session's settings and start model, read at Start;
* the corrected Labels layer's ``paint`` events into a :class:`~napari_unet.corrections.
  CorrectionState` (:mod:`._qt.finetune_corrections`; slices marked reviewed by a button or
  Shift-R), autosaved a moment after the last edit and offered back when the same image is opened
  again (:mod:`._qt.finetune_autosave`);
* Start to the session's run, iterated in a worker from :mod:`._qt.workers`; its events feed
  :class:`~napari_unet._qt.plots.TrainingPlots` and the preview layer (:mod:`._qt.finetune_layers`);
  at the end the fine-tuned model goes to the viewer's shared model holder (Segment uses it);
* Save session… / Open session… (:mod:`._qt.finetune_session_io`), kept up to date by a
  :class:`~napari_unet.session.SessionAutosaver` so that a crash loses at most the last seconds.

Nothing heavy happens on the GUI thread: the training, the previews, the normalisation statistics,
checkpoint saving and autosaves all run in workers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QWidget

from napari_unet import session as sessions
from napari_unet._qt.finetune_autosave import AUTOSAVE_DELAY_MS, AutosaveMixin
from napari_unet._qt.finetune_corrections import CorrectionsRecorder
from napari_unet._qt.finetune_form import REVIEW_SHORTCUT, FinetuneForm
from napari_unet._qt.finetune_layers import (
    ConfirmedOverlay,
    PreviewLayer,
    docked_segment_widget,
    raw_image_data,
    segment_into_layer,
    source_path,
)
from napari_unet._qt.finetune_session_io import SessionIOMixin
from napari_unet._qt.layer_picker import LayerPicker
from napari_unet._qt.shared import model_holder
from napari_unet._qt.workers import notify_error, start_worker
from napari_unet.corrections import CorrectionState, one_class_warning
from napari_unet.finetuning import (
    AutosaveTarget,
    AutosaveWriter,
    FinetuneSession,
    Notice,
    StartModel,
    TrainingRun,
    finetuned_source,
)

# napari quits every running worker right after its window's close event, which would drop the run
# before it saves: the close waits this long for a stopped run to end by itself (and save)
CLOSE_WAIT_S = 20.0

# the names the dock module has always offered
__all__ = ["AutosaveTarget", "AutosaveWriter", "FinetuneWidget", "LayerPicker", "Notice", "TrainingRun"]


class FinetuneWidget(CorrectionsRecorder, AutosaveMixin, SessionIOMixin, FinetuneForm):
    """Dock widget: corrections bookkeeping, fine-tuning with live plots and preview."""

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(viewer, parent)  # the form
        self.holder = model_holder(viewer)
        self.finetune_session = FinetuneSession(review_hint=REVIEW_SHORTCUT)
        self.finetune_session.shared = self.holder
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
        self._run_image: Image | None = None  # the layers the current or last run was started on
        self._run_labels: Labels | None = None
        self.worker = None
        self.last_checkpoint: Path | None = None
        self.last_stop_latency: float | None = None
        self.confirmed_overlay = ConfirmedOverlay(viewer)
        self.preview = PreviewLayer(viewer)
        self.session: sessions.SessionAutosaver | None = None  # the session being worked on
        self._session_labels: Labels | None = None  # the labels layer whose work goes into it
        self.session_worker = None
        self._connect_form()
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
        # the viewer's main window, watched from the start: closing the viewer must stop a run even
        # when this dock was never shown (a script, a test, a collapsed dock)
        self._watch_window_close(getattr(getattr(viewer, "window", None), "_qt_window", None))

        self._on_image_changed()
        self._on_labels_changed()
        self._refresh_model_summary()
        self._update_buttons()

    def _connect_form(self) -> None:
        self.save_session_button.clicked.connect(self._save_session_dialog)
        self.open_session_button.clicked.connect(self._open_session_dialog)
        self.image_picker.currentIndexChanged.connect(self._on_image_changed)
        self.labels_picker.currentIndexChanged.connect(self._on_labels_changed)
        self.review_button.clicked.connect(self.mark_current_slice_reviewed)
        self.unreview_button.clicked.connect(self.unmark_current_slice)
        self.forget_button.clicked.connect(self.forget_current_strokes)
        self.margin_spin.valueChanged.connect(self._schedule_counts)
        self.show_confirmed.toggled.connect(self._toggle_confirmed_overlay)
        self.autosave_folder.editingFinished.connect(self._on_image_changed)
        self.autosave_browse.clicked.connect(self._browse_autosave_folder)
        self.restore_button.clicked.connect(self.restore_corrections)
        self.start_from.currentIndexChanged.connect(self._refresh_model_summary)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(self.resume)

    @property
    def run(self) -> TrainingRun | None:
        """The current or last training run."""
        return self.finetune_session.run

    @property
    def preview_layer(self) -> Labels | None:
        return self.preview.layer

    @property
    def is_training(self) -> bool:
        return self.worker is not None

    # -- the starting model --------------------------------------------------------------------

    def _refresh_model_summary(self, *args) -> None:
        choice = self.start_choice
        if choice is StartModel.SHARED:
            text = self.holder.summary()
        elif choice is StartModel.CHECKPOINT:
            text = "The checkpoint is loaded when training starts."
        else:
            text = "A new, untrained model: fine-tuning it needs more corrections and time."
        self.model_summary.setText(text)

    # -- training ------------------------------------------------------------------------------

    def _update_buttons(self) -> None:
        running = self.is_training
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.resume_button.setEnabled(not running and self.run is not None and self.run.saved_path is not None)

    def _sync_session(self) -> None:
        """Give the session what the form and the pickers show now."""
        session = self.finetune_session
        image, labels = self.image_layer, self.labels_layer
        if image is not None:
            session.set_image(raw_image_data(image), name=image.name, source=source_path(image),
                              fingerprint=self._fingerprint(image))
        else:
            session.set_image(None, name="")
        session.set_labels(labels.data if labels is not None else None, self.state,
                           name=labels.name if labels is not None else "")
        session.settings = self.settings()
        session.start_from = self.start_choice
        session.checkpoint_in = self.checkpoint_in.text()
        session.fresh = self.fresh_model()
        session.checkpoint_out = self.checkpoint_out.text()
        session.autosave_folder = self._autosave_folder()
        session.preview_interval = float(self.preview_spin.value())

    def _prepare_run(self, *, resume: bool) -> TrainingRun:
        """The session's checked, snapshotted run (CorrectionsError says what is missing)."""
        self._sync_session()
        labels = self.labels_layer
        return self.finetune_session.start(
            resume=resume,
            autosaver=self.session if labels is self._session_labels else None,
            on_checked=self.flush_autosave,
        )

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
        image, labels = self.image_layer, self.labels_layer
        try:
            run = self._prepare_run(resume=resume)
        except (ValueError, OSError) as exc:  # CorrectionsError, CheckpointError, ...: plain words
            notify_error(exc)
            return
        self._run_image, self._run_labels = image, labels
        run.preview_region = self._preview_region()
        if not resume:
            self.plots.clear()
        self.plots.set_class_names(list(getattr(run.model, "class_names", []) or []) or self._class_names(run.model))
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
            self.finetune_session.events(run),
            on_yield=self._on_training_event,
            on_return=self._on_training_done,
            on_error=self._on_training_error,
            on_finished=self._on_training_finished,
            description="Fine-tuning",
            device=run.settings.device,
            activity_bar=False,  # the dock shows the progress: status line and live plots
        )
        self._update_buttons()

    @staticmethod
    def _class_names(model) -> list[str]:
        n_classes = max(2, int(getattr(model, "out_channels", 1)))
        return [f"class {i}" for i in range(n_classes)]

    def stop(self) -> None:
        """Stop training before its next step; the best weights are kept and saved."""
        if self.run is not None and self.is_training:
            self.finetune_session.stop("stopped by the user")
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
        self.holder.set(run.model, checkpoint=run.checkpoint, source=finetuned_source(run), trained=True)
        ending = run.stop_reason or "finished"
        saved = f"Model saved to {run.saved_path}" if run.saved_path else "The model could not be saved"
        self.status_label.setText(f"Training {ending} after {steps} steps. {saved}; Segment now uses it.")
        if self.rerun_check.isChecked():
            if self._run_image in self.viewer.layers:
                self._rerun_segment(run)
            else:
                show_warning("The image layer is gone, so Segment was not re-run.")

    def _on_training_error(self, exc: BaseException) -> None:
        self.status_label.setText("Training failed; your corrections are kept. See the notification for why.")

    def _on_training_finished(self) -> None:
        self.worker = None
        self.finetune_session.abandon()  # a worker that quit before its run ended
        self._update_buttons()

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        run = self.run
        if self.is_training and run is not None and layer in (self._run_image, self._run_labels):
            self.finetune_session.stop(f"stopped because the layer '{layer.name}' was deleted")
            show_warning(
                f"The layer '{layer.name}' was deleted during training: training stopped and the weights "
                "learnt so far are kept and saved."
            )
        if layer is self.preview.layer:
            self.preview.layer = None
        if layer is self.confirmed_overlay.layer:
            self.confirmed_overlay.layer = None
            self.show_confirmed.setChecked(False)
        if layer is self._labels_layer:
            # the user's strokes must survive the layer: save them before forgetting it
            self.flush_autosave()
            self._unfollow_labels()
            self._labels_layer = None
            self.states.pop(id(layer), None)
        if layer is self._session_labels:
            self._session_labels = None  # the session keeps what was saved last (just flushed)
        self._fingerprints.pop(id(layer), None)

    # -- preview -------------------------------------------------------------------------------

    def _preview_region(self) -> tuple:
        """The region in view, by the session's policy: the current slice, a slab or the volume."""
        labels = self._run_labels
        z = self.current_slice(labels) if labels is not None and labels in self.viewer.layers else 0
        return self.finetune_session.preview_region(z, volume_view=self.viewer.dims.ndisplay == 3)

    def _on_view_changed(self, event=None) -> None:
        run = self.run
        if run is not None and self.is_training:
            run.preview_region = self._preview_region()

    def _ensure_preview_layer(self, run: TrainingRun) -> Labels:
        return self.preview.ensure(run.state.shape, self._run_image.name, self._run_labels)

    def _show_preview(self, run: TrainingRun, payload) -> None:
        region, labels = payload
        if not self.preview.shown:
            if self._run_image not in self.viewer.layers or self._run_labels not in self.viewer.layers:
                return
            self._ensure_preview_layer(run)
        self.preview.show(region, labels)

    # -- after training ------------------------------------------------------------------------

    def _rerun_segment(self, run: TrainingRun) -> None:
        """Predict the whole image with the new weights: through the Segment widget when docked."""
        segment = docked_segment_widget(self.viewer)
        if segment is not None:
            self.flush_autosave()  # corrections on the layer Segment may overwrite stay on disk and in place
            segment.run()
            return
        segment_into_layer(self.viewer, self.holder.model, self._run_image, self._run_labels, run.settings.device)

    # -- closing -------------------------------------------------------------------------------

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._watch_window_close(self.window())

    def _watch_window_close(self, window) -> None:
        if self._close_watcher is None and window is not None and window is not self:
            self._close_watcher = _CloseWatcher(self._on_window_close, self)
            window.installEventFilter(self._close_watcher)

    def _on_window_close(self) -> None:
        if self.run is not None and self.is_training:
            self.finetune_session.stop("stopped because the viewer was closed")
            deadline = time.monotonic() + CLOSE_WAIT_S
            # the run ends at its next step; its events queue up for a window that is going away
            while self.finetune_session.is_running and time.monotonic() < deadline:
                time.sleep(0.02)
        self.flush_autosave()

    def closeEvent(self, event) -> None:
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
            self._unfollow_labels()
            self._labels_layer = None
        try:
            self.viewer.bind_key(REVIEW_SHORTCUT, None)
        except Exception:  # noqa: BLE001 - another widget may have rebound it
            pass


class _CloseWatcher(QObject):
    """Calls ``callback`` when the watched window closes (to flush the last strokes to disk)."""

    def __init__(self, callback, parent: QObject):
        super().__init__(parent)
        self._callback = callback

    def eventFilter(self, watched, event):
        if event.type() == QEvent.Close:
            self._callback()
        return False
