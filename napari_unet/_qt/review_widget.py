"""The Correct next widget: where is the model least sure, so the user corrects there first?

*Find uncertain slices* runs :func:`napari_unet.uncertainty.predict_with_uncertainty` with the
viewer's shared model (:class:`~napari_unet._qt.shared.ModelHolder`) in a worker, shows the map as an
image layer ``"<image> uncertainty"`` and lists the slices of a stack (boxes of a 3D volume, for a 3D
model) worst first. *Go to next* and a click on a row move the viewer there. The ranking and the
walk through it live in the engine's :class:`~napari_unet.uncertainty.ReviewQueue`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_unet._qt.layer_picker import LayerPicker
from napari_unet._qt.shared import (
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
from napari_unet.uncertainty import ReviewQueue, predict_with_uncertainty

if TYPE_CHECKING:
    import napari
    import torch.nn as nn

OUTPUT_TAG = "napari_unet_output"  # the Segment widget's tag: outputs are not offered as inputs
METHODS = {  # the engine's default first (benchmarks/uncertainty_ranking.py)
    "Entropy (one pass, fast)": "entropy",
    "Disagreement of 8 flipped views (8x slower)": "tta",
}


@dataclass
class ReviewResult:
    """What the worker hands back: the map and the ranking made from it."""

    uncertainty: np.ndarray
    queue: ReviewQueue


class ReviewWidget(QWidget):
    """Dock widget "Correct next": rank slices (or 3D boxes) by the model's uncertainty."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.holder: ModelHolder = model_holder(viewer)
        self.worker = None
        self.queue = ReviewQueue()
        self._job: Job | None = None
        self._layer_name = ""  # the image the current ranking belongs to
        self._axes: tuple[int, ...] = ()  # its data axes the ranking's positions are on
        self._build_ui()  # the layer picker follows the layer list itself
        self._connections = [(emitter, self.layer_combo.refresh) for emitter in self.layer_combo.viewer_events()]
        self.destroyed.connect(partial(_disconnect_all, self._connections))

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        form = QFormLayout()
        self.layer_combo = LayerPicker(self.viewer, Image, skip_tags=(OUTPUT_TAG,))
        self.layer_combo.setToolTip("The image to find the model's most uncertain places in")
        form.addRow("Image", self.layer_combo)
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(METHODS))
        self.method_combo.setToolTip("How uncertainty is measured (benchmarks/uncertainty_ranking.py)")
        form.addRow("Measure", self.method_combo)
        layout.addLayout(form)

        buttons = QHBoxLayout()
        self.find_button = QPushButton("Find uncertain slices")
        self.find_button.setToolTip("Predict with the shared model and rank the slices, worst first")
        self.find_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.find_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)

        self.list_widget = QListWidget()
        self.list_widget.setToolTip("Worst first: click a row to go there")
        self.list_widget.currentRowChanged.connect(self._on_row_changed)
        layout.addWidget(self.list_widget)
        self.next_button = QPushButton("Go to next")
        self.next_button.setToolTip("Show the next most uncertain slice (wraps round)")
        self.next_button.setEnabled(False)
        self.next_button.clicked.connect(self.go_to_next)
        layout.addWidget(self.next_button)
        self.status_label = QLabel("Load or train a model, then press Find uncertain slices.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

    # ------------------------------------------------------------------------------ layers

    def image_layers(self) -> list[Image]:
        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and not layer.metadata.get(OUTPUT_TAG, False)]

    def refresh_layers(self, event: Any = None) -> None:
        self.layer_combo.refresh()

    def select_layer(self, name: str) -> None:
        select_layer_in(self.layer_combo, name)

    def selected_layer(self) -> Image | None:
        """The picked Image layer, or None."""
        return image_layer_named(self.viewer, self.layer_combo.currentText())

    # ------------------------------------------------------------------------------ run

    def run(self):
        """Start the uncertainty prediction in a worker; returns it, or None after a message."""
        if not self.find_button.isEnabled():
            notify_error("napari-unet is still busy: wait for the current run or cancel it.")
            return None
        layer = self.selected_layer()
        if layer is None:
            notify_error("Pick an image layer first (open an image or a sample).")
            return None
        model = self.holder.model
        if model is None:
            notify_error("No model loaded: pick or load one in the Segment widget first.")
            return None
        if self.holder.busy:
            notify_error("The model is being fine-tuned: stop the training or wait for it to finish.")
            return None
        if layer.multiscale or layer.rgb:
            kind = "multiscale" if layer.multiscale else "RGB"
            notify_error(f"The image '{layer.name}' is {kind}: Correct next needs a grayscale image.")
            return None
        if not self.holder.trained:
            show_warning("The model is untrained: its uncertainty is noise; fine-tune it or load a checkpoint.")
        self._job = Job()
        method = METHODS[self.method_combo.currentText()]
        self._set_running(True, f"Measuring uncertainty in {layer.name}…")
        self.worker = start_worker(
            find_uncertain(self._job, model, layer.data, method, self.holder),
            on_return=partial(self._show_result, layer.name),
            on_cancelled=lambda: self._finish("Cancelled: nothing was changed."),
            on_error=lambda exc: self._finish("Failed: see the notification."),
            on_finished=lambda: self._set_running(False),
            description=f"Uncertainty of {layer.name}",
            job=self._job,
            activity_bar=False,
        )
        self.worker.yielded.connect(self._on_progress)
        return self.worker

    def cancel(self) -> None:
        # the Find button is off from start to finish (is_running is False until the pool starts it)
        if self._job is not None and not self.find_button.isEnabled():
            self._job.cancel()
            self.status_label.setText("Cancelling…")

    def _set_running(self, running: bool, text: str = "") -> None:
        self.find_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress_bar.setRange(0, 0)
        if text:
            self.status_label.setText(text)

    def _finish(self, text: str) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label.setText(text)

    def _on_progress(self, value: Any) -> None:
        if isinstance(value, Progress) and value.total > 0:
            self.progress_bar.setRange(0, value.total)
            self.progress_bar.setValue(value.done)

    def _show_result(self, name: str, result: ReviewResult) -> None:
        if name not in self.viewer.layers:
            notify_error(f"The image layer '{name}' was deleted while its uncertainty was measured.")
            self._finish("The image was deleted: nothing was added.")
            return
        source = self.viewer.layers[name]
        ndim = result.uncertainty.ndim
        geometry = {"scale": tuple(source.scale)[-ndim:], "translate": tuple(source.translate)[-ndim:]}
        top = float(np.percentile(result.uncertainty, 99.9)) or 1.0
        out_name = f"{name} uncertainty"
        existing = self.viewer.layers[out_name] if out_name in self.viewer.layers else None
        if isinstance(existing, Image):
            existing.scale, existing.translate = geometry["scale"], geometry["translate"]
            existing.data = result.uncertainty
            existing.contrast_limits = (0.0, top)
        else:
            self.viewer.add_image(
                result.uncertainty, name=out_name, colormap="magma", blending="additive", opacity=0.6,
                contrast_limits=(0.0, top), metadata={OUTPUT_TAG: True, "source_layer": name}, **geometry,
            )
        self.viewer.layers.selection.active = source
        self.queue = result.queue
        self._layer_name = name
        volume = bool(self.queue.entries) and isinstance(self.queue.entries[0][0], tuple)
        # the data axes a ranked entry refers to: a stack's first, or a volume's last three
        self._axes = tuple(range(source.ndim - 3, source.ndim)) if volume else ((0,) if ndim == 3 else ())
        self.list_widget.blockSignals(True)
        self.list_widget.clear()
        self.list_widget.addItems([self.queue.label(i) for i in range(len(self.queue))])
        self.list_widget.blockSignals(False)
        self.next_button.setEnabled(len(self.queue) > 0)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        what = "boxes" if volume else "slices"
        self.status_label.setText(f"{len(self.queue)} {what} of {name} ranked, most uncertain first.")

    # ------------------------------------------------------------------------------ navigation

    def go_to_next(self) -> None:
        """Move the viewer to the next most uncertain slice (or box centre)."""
        index = self.queue.next()
        if index is None:
            notify_info("Nothing ranked yet: press Find uncertain slices first.")
            return
        self.list_widget.blockSignals(True)
        self.list_widget.setCurrentRow(index)
        self.list_widget.blockSignals(False)
        self._go_to(index)

    def _on_row_changed(self, row: int) -> None:
        if 0 <= row < len(self.queue):
            self.queue.select(row)
            self._go_to(row)

    def _go_to(self, index: int) -> None:
        layer = self.viewer.layers[self._layer_name] if self._layer_name in self.viewer.layers else None
        if layer is None:
            notify_error(f"The image layer '{self._layer_name}' is gone: find uncertain slices again.")
            return
        position = self.queue.position(index)
        axes = self._axes[-len(position):] if self._axes else ()
        data_point = [0.0] * layer.ndim
        for axis, value in zip(axes, position):
            data_point[axis] = float(value)
        world = layer.data_to_world(data_point)
        lead = self.viewer.dims.ndim - len(world)
        for axis in axes:
            self.viewer.dims.set_point(lead + axis, float(world[axis]))
        if len(axes) == 3 and self.viewer.dims.ndisplay == 2:
            # napari >= 0.9 keeps the camera on viewer.scene (viewer.camera is deprecated there)
            camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
            camera.center = tuple(float(v) for v in world[-2:])
        self.status_label.setText(f"Showing {self.queue.label(index).split('   ')[0]} (rank {index + 1}).")


def find_uncertain(job: Job, model: nn.Module, data: Any, method: str, holder: ModelHolder):
    """Worker generator: the uncertainty map and its ranking (slices, or boxes for a 3D model)."""
    yield Progress(0, 0, "measuring uncertainty")

    def report(done: int, total: int) -> None:
        job.report(done, total, "measuring uncertainty")

    with holder.lock:
        probabilities, uncertainty = predict_with_uncertainty(
            model, data, method=method, progress=report, cancel=job.cancelled)
    job.check()
    volume = int(model.spatial_dims) == 3
    queue = ReviewQueue.from_uncertainty(uncertainty, probabilities=probabilities, volume=volume)
    return ReviewResult(uncertainty=uncertainty, queue=queue)


def _disconnect_all(callbacks: list, *_: Any) -> None:
    for emitter, callback in callbacks:
        try:
            emitter.disconnect(callback)
        except Exception:  # noqa: BLE001 - the emitter may be gone with its viewer
            pass
