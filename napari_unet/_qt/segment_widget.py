"""The Segment widget: pick an image layer and a model, press Run, get probability and label layers.

The widget only wires napari layers to the engine (:mod:`napari_unet.segmentation`); the
segmentation runs in a thread worker started by :func:`napari_unet._qt.workers.start_worker`, so
the viewer stays responsive and Cancel stops it at the next batch of tiles. The model lives in the
viewer's :class:`~napari_unet._qt.shared.ModelHolder`, shared with the Fine-tune widget. The form's
controls are built by :class:`~napari_unet._qt.segment_form.SegmentForm`; the output layers are
written by :mod:`napari_unet._qt.segment_layers` (a cancelled run adds or changes no layer).
"""

from __future__ import annotations

from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image
from napari.utils.notifications import (
    Notification,
    NotificationSeverity,
    notification_manager,
)
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

from napari_unet import segmentation
from napari_unet._qt.segment_export import ExportMixin
from napari_unet._qt.segment_form import CHECKPOINT, FRESH, SegmentForm
from napari_unet._qt.segment_layers import OUTPUT_TAG, show_result
from napari_unet._qt.shared import (
    UNTRAINED_NOTE,
    ModelHolder,
    image_layer_named,
    model_holder,
    select_layer_in,
)
from napari_unet._qt.workers import (
    Job,
    Progress,
    notify_error,
    notify_info,
    start_worker,
)
from napari_unet.segmentation import SegmentRequest, SegmentResult

if TYPE_CHECKING:
    import napari
    from torch import nn

__all__ = ["SegmentRequest", "SegmentResult", "SegmentWidget", "segment"]


class SegmentWidget(ExportMixin, SegmentForm, QWidget):
    """Dock widget that segments an image layer with the viewer's shared UNet."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.holder: ModelHolder = model_holder(viewer)
        self.worker = None  # the running (or last) worker: prediction or checkpoint loading
        self._job: Job | None = None
        self._fresh_timer = QTimer(self)
        self._fresh_timer.setSingleShot(True)
        self._fresh_timer.setInterval(300)  # rebuild a fresh model once the spin boxes settle
        self._fresh_timer.timeout.connect(self._build_fresh_model)

        self._build_form()
        self._connect_form()
        self._connect_viewer()
        self.refresh_layers()
        self._on_model_changed(self.holder.model)

    # ------------------------------------------------------------------------------ wiring

    def _connect_form(self) -> None:
        self.layer_combo.currentTextChanged.connect(self._on_layer_picked)
        self.fresh_radio.toggled.connect(self._on_source_toggled)
        for signal in (self.variant_combo.currentTextChanged, self.width_spin.valueChanged,
                       self.depth_spin.valueChanged, self.classes_spin.valueChanged):
            signal.connect(lambda *_: self._fresh_timer.start())
        self.checkpoint_edit.returnPressed.connect(lambda: self.load_checkpoint())
        self.browse_button.clicked.connect(self._browse_checkpoint)
        self.load_button.clicked.connect(lambda: self.load_checkpoint())
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_button.clicked.connect(lambda: self.export_model())

    # ------------------------------------------------------------------------------ layers

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        self._connections: list[tuple[Any, Any]] = []
        for emitter, callback in (
            (events.inserted, self._on_layer_inserted),
            (events.removed, self._on_layers_changed),
            (events.moved, self._on_layers_changed),
            (self.holder.changed, self._on_model_changed),
        ):
            self._connect(emitter, callback)
        for layer in self.viewer.layers:
            self._watch_layer(layer)
        # Qt deletes the widget before Python forgets it: disconnect everything it listens to
        self.destroyed.connect(partial(_disconnect_all, self._connections))

    def _connect(self, emitter: Any, callback: Any) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def _watch_layer(self, layer: Any) -> None:
        self._connect(layer.events.name, self._on_layers_changed)
        if hasattr(layer.events, "data"):
            self._connect(layer.events.data, self._on_layer_data_changed)

    def _on_layer_inserted(self, event: Any) -> None:
        self._watch_layer(event.value)
        self.refresh_layers()

    def _on_layers_changed(self, event: Any = None) -> None:
        self.refresh_layers()

    def _on_layer_data_changed(self, event: Any = None) -> None:
        if event is not None and getattr(event, "source", None) is self.selected_layer():
            self._update_rgb_hint()

    def image_layers(self) -> list[Image]:
        """The viewer's Image layers that can be segmented (not this widget's own outputs)."""
        return [
            layer for layer in self.viewer.layers
            if isinstance(layer, Image) and not layer.metadata.get(OUTPUT_TAG, False)
        ]

    def refresh_layers(self) -> None:
        """Fill the image picker from the viewer, keeping the current choice when it still exists."""
        current = self.layer_combo.currentText()
        names = [layer.name for layer in self.image_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        elif names:
            self.layer_combo.setCurrentIndex(0)
        self.layer_combo.blockSignals(False)
        self._on_layer_picked(self.layer_combo.currentText())

    def select_layer(self, layer: Image | str) -> None:
        """Pick the image layer to segment (a layer or its name)."""
        select_layer_in(self.layer_combo, layer if isinstance(layer, str) else layer.name)

    def selected_layer(self) -> Image | None:
        """The picked Image layer, or None."""
        return image_layer_named(self.viewer, self.layer_combo.currentText())

    def _on_layer_picked(self, name: str) -> None:
        self._update_rgb_hint()

    def _update_rgb_hint(self) -> None:
        layer = self.selected_layer()
        self.grayscale_check.setVisible(bool(layer is not None and layer.rgb))

    # ------------------------------------------------------------------------------ model

    def _on_source_toggled(self, fresh: bool) -> None:
        self.fresh_page.setVisible(fresh)
        self.checkpoint_page.setVisible(not fresh)
        if fresh and self.holder.checkpoint is not None:
            # the user switched back from a checkpoint: the form's variant is the model again
            self._fresh_timer.start()

    def set_fresh_model(
        self, variant: str, *, width: int | None = None, depth: int | None = None,
        classes: int | None = None,
    ) -> nn.Module | None:
        """Choose a fresh variant (and size) and build it now; returns the model (None on error)."""
        self.set_model_source(FRESH)
        self._set_fresh_size(width, depth, classes)
        index = self.variant_combo.findText(variant)
        if index < 0:
            notify_error(f"Unknown model variant {variant!r}.")
            return None
        self.variant_combo.setCurrentIndex(index)
        self._fresh_timer.stop()
        return self._build_fresh_model()

    def _build_fresh_model(self) -> nn.Module | None:
        """Build the variant chosen in the form and share it; None (with a message) on error."""
        from napari_unet.models import build_model

        if self.holder.busy:
            notify_error("The model is in use (segmentation or fine-tuning): wait or cancel first.")
            return None
        options = self.fresh_model_options()
        try:
            model = build_model(**options)
        except ValueError as exc:
            notify_error(exc)
            return None
        model.eval()
        source = f"fresh {options['name']}, width {options['width']}, depth {options['depth']}"
        self.holder.set(model, source=source, trained=False)
        return model

    def load_checkpoint(self, path: str | Path | None = None):
        """Load a checkpoint file in a worker; it replaces the shared model. Returns the worker."""
        from napari_unet.checkpoint import load_checkpoint

        self.set_model_source(CHECKPOINT)
        if path is not None:
            self.checkpoint_edit.setText(str(path))
        text = self.checkpoint_edit.text().strip()
        if not text:
            notify_error("Choose a checkpoint file first (Browse…).")
            return None
        path = Path(text).expanduser()
        if not path.is_file():
            notify_error(f"No checkpoint file at {path}.")
            return None
        if self._is_busy():
            return None

        def job():
            yield Progress(0, 0, f"loading {path.name}")
            return load_checkpoint(path, map_location="cpu")

        self._set_running(True, f"Loading {path.name}…")
        self.worker = start_worker(
            job(),
            on_return=partial(self._on_checkpoint_loaded, path),
            on_finished=lambda: self._set_running(False),
            description=f"Loading {path.name}",
        )
        return self.worker

    def _on_checkpoint_loaded(self, path: Path, checkpoint: Any) -> None:
        self.holder.set(checkpoint.model, checkpoint=checkpoint, source=f"checkpoint {path}")
        self.status_label.setText(f"Loaded {path.name}.")

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load a napari-unet checkpoint", "", "Checkpoints (*.pt *.pth *.ckpt);;All files (*)"
        )
        if path:
            self.load_checkpoint(path)

    def _on_model_changed(self, model: Any = None) -> None:
        self._show_model_summary()
        self._show_model_in_form(model)

    def _show_model_summary(self) -> None:
        if self.holder.model is None:
            self.summary_label.setText(
                "No model yet: Run builds the variant above, or load a checkpoint. "
                f"A new model is {UNTRAINED_NOTE}."
            )
        else:
            self.summary_label.setText(self.holder.summary())

    def current_model(self) -> nn.Module | None:
        """The shared model, building the fresh variant of the form when there is none yet."""
        if self.holder.model is None and self.model_source() == FRESH:
            return self._build_fresh_model()
        if self.holder.model is None:
            notify_error("Load a checkpoint first, or switch to 'New model'.")
        return self.holder.model

    # ------------------------------------------------------------------------------ run

    def run(self):
        """Segment the selected layer in a worker; returns the worker, or None after a message."""
        if self._is_busy():
            return None
        layer = self.selected_layer()
        if layer is None:
            notify_error("Pick an image layer to segment first (open an image or a sample).")
            return None
        model = self.current_model()
        if model is None:
            return None
        if self.holder.busy:
            notify_error("The model is being fine-tuned: stop the training or wait for it to finish.")
            return None
        try:
            request = self._request_for(layer, model)
        except segmentation.NeedsGrayscale as need:
            self._offer_grayscale(str(need))
            return None
        except ValueError as exc:
            notify_error(exc)
            return None
        try:
            from napari_unet.devices import resolve_device

            device = resolve_device(request.device)
        except ValueError as exc:
            notify_error(exc)
            return None

        self._job = Job()
        self._set_running(True, f"Segmenting {layer.name} on {device}…")
        self.progress_bar.setRange(0, 0)
        self.worker = start_worker(
            segment(self._job, model, request, self.holder),
            on_return=partial(self._show_result, request),
            on_cancelled=self._on_cancelled,
            on_error=self._on_failed,
            on_finished=lambda: self._set_running(False),
            description=f"Segmenting {layer.name}",
            job=self._job,
            device=str(device),
        )
        self.worker.yielded.connect(self._on_progress)
        return self.worker

    def cancel(self) -> None:
        """Stop the running segmentation at the next batch of tiles; no layer is changed."""
        if self._job is not None and self.worker is not None and self.worker.is_running:
            self._job.cancel()
            self.status_label.setText("Cancelling…")

    def _on_failed(self, exc: BaseException) -> None:
        self._reset_progress()
        self.status_label.setText("Failed: see the notification.")

    def _is_busy(self) -> bool:
        if self.worker is not None and self.worker.is_running:
            notify_error("napari-unet is still busy: wait for the current run or cancel it.")
            return True
        return False

    def _set_running(self, running: bool, text: str = "") -> None:
        self.run_button.setEnabled(not running)
        self.load_button.setEnabled(not running)
        self.export_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if text:
            self.status_label.setText(text)

    def _on_progress(self, value: Any) -> None:
        if isinstance(value, Progress) and value.total > 0:
            self.progress_bar.setRange(0, value.total)
            self.progress_bar.setValue(value.done)

    def _reset_progress(self) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)

    def _on_cancelled(self) -> None:
        self._reset_progress()
        self.status_label.setText("Cancelled: no layer was changed.")
        notify_info("Segmentation cancelled; no layer was changed.")

    def _offer_grayscale(self, message: str) -> None:
        """An error notification with a button that converts and runs again."""
        self.grayscale_check.setVisible(True)

        def convert_and_run(*_: Any) -> None:
            self.grayscale_check.setChecked(True)
            self.run()

        notification_manager.dispatch(
            Notification(message, severity=NotificationSeverity.ERROR,
                         actions=[("Convert and run", convert_and_run)])
        )
        self.status_label.setText(message)

    def _show_result(self, request: SegmentRequest, result: SegmentResult) -> None:
        """Show the result as layers and say so (main thread)."""
        layer = show_result(self.viewer, request, result)
        if layer is not None:
            self.viewer.layers.selection.active = layer
        what = "one slice of " if request.keep_slice is not None else ""
        self.status_label.setText(f"Segmented {what}{request.name}.")
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)


def segment(
    job: Job, model: nn.Module, request: SegmentRequest, holder: ModelHolder,
) -> Generator[Progress, None, SegmentResult]:
    """Worker generator: :func:`segmentation.run_segmentation` reporting through ``job`` (its cancel
    flag and progress channel), holding the model lock so Fine-tune does not swap the weights."""
    yield Progress(0, 0, "waiting for the model")

    def report(done: int, total: int) -> None:
        job.report(done, total, f"segmenting {request.name}")

    with holder.lock:
        return segmentation.run_segmentation(
            model, request, progress=report, cancel=job.cancelled, step=partial(job.report, 0, 0),
        )


def _disconnect_all(callbacks: list, *_: Any) -> None:
    for emitter, callback in callbacks:
        try:
            emitter.disconnect(callback)
        except Exception:  # noqa: BLE001 - the emitter may already be gone with its viewer
            pass
