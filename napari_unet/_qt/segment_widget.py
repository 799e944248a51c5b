"""The Segment widget: pick an image layer and a model, press Run, get probability and label layers.

The widget only wires napari layers to the engine (:func:`napari_unet.inference.predict`); the
prediction runs in a thread worker started by :func:`napari_unet._qt.workers.start_worker`, so the
viewer stays responsive and Cancel stops it at the next batch of tiles. The model lives in the
viewer's :class:`~napari_unet._qt.shared.ModelHolder`, shared with the Fine-tune widget.

Output layers are named after the input (``"<image> probabilities"``, ``"<image> labels"``,
``"<image> instances"``), updated in place on reruns and placed with the input's scale/translate.
A cancelled run adds or changes no layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import Notification, NotificationSeverity, notification_manager
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_unet._qt.shared import image_layer_named, select_layer_in, UNTRAINED_NOTE, ModelHolder, model_holder
from napari_unet._qt.workers import Job, Progress, notify_error, notify_info, start_worker

if TYPE_CHECKING:
    import napari
    import torch.nn as nn

OUTPUT_TAG = "napari_unet_output"  # layer metadata key marking layers this widget created
# the Instances choices (napari_unet.instances.METHODS) and their tooltips
INSTANCE_METHODS = {
    "none": "No instances layer",
    "components": "Connected regions of class 1 (fast; a gap in a membrane merges two cells)",
    "watershed": "Seeded watershed on the membrane probability (splits cells a membrane gap would merge)",
}
FRESH, CHECKPOINT = "fresh", "checkpoint"


@dataclass
class SegmentRequest:
    """Everything the worker needs, captured on the main thread when Run is pressed."""

    layer_name: str
    data: Any  # the layer's data (numpy, dask or zarr), possibly a lazy view
    rgb: bool  # the data's last axis holds RGB(A) colours
    to_grayscale: bool  # RGB into a 1-channel model: convert first
    channel_axis: int | None  # input axis holding channels (dropped in the output), if any
    slice_window: tuple[int, int] | None  # (start, stop) along the first spatial axis, or all
    keep_slice: int | None  # index within the window to keep ("current slice only")
    tile: int | None
    overlap: float
    tta: bool
    threshold: float
    instances: str  # "none", "components" or "watershed" (napari_unet.instances.METHODS)
    device: str


@dataclass
class SegmentResult:
    """What a finished prediction hands back to the main thread."""

    probability: np.ndarray  # foreground probability (binary) or 1 - P(background) (multi-class)
    labels: np.ndarray  # class map 0..K-1
    instances: np.ndarray | None  # one id per cell (components or watershed), if asked for


class SegmentWidget(QWidget):
    """Dock widget that segments an image layer with the viewer's shared UNet."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.holder: ModelHolder = model_holder(viewer)
        self.worker = None  # the running (or last) worker: prediction or checkpoint loading
        self._job: Job | None = None
        self._last_request: SegmentRequest | None = None
        self._fresh_timer = QTimer(self)
        self._fresh_timer.setSingleShot(True)
        self._fresh_timer.setInterval(300)  # rebuild a fresh model once the spin boxes settle
        self._fresh_timer.timeout.connect(self._build_fresh_model)

        self._build_ui()
        self._connect_viewer()
        self.refresh_layers()
        self._on_model_changed(self.holder.model)

    # ------------------------------------------------------------------------------ layout

    def _build_ui(self) -> None:
        # the form scrolls in a short dock instead of squeezing its rows on top of each other
        content = QWidget()
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        layout = QVBoxLayout(content)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self._input_group())
        layout.addWidget(self._model_group())
        layout.addWidget(self._prediction_group())

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Segment the selected image with the model above")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running segmentation; no layer is changed")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)

        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self._reset_progress()
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _input_group(self) -> QGroupBox:
        group = QGroupBox("Input")
        form = QFormLayout(group)
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The image layer to segment (a 2D image, a stack or a volume)")
        self.layer_combo.currentTextChanged.connect(self._on_layer_picked)
        form.addRow("Image", self.layer_combo)
        self.grayscale_check = QCheckBox("Convert RGB to grayscale")
        self.grayscale_check.setToolTip(
            "An RGB image goes into a 1-channel model as its luminance (the layer is not changed)"
        )
        self.grayscale_check.setVisible(False)
        form.addRow(self.grayscale_check)
        self.current_slice_check = QCheckBox("Current slice only (quick look)")
        self.current_slice_check.setToolTip(
            "Segment only the slice shown in the viewer; the rest of the output is left as it was"
        )
        form.addRow(self.current_slice_check)
        return group

    def _model_group(self) -> QGroupBox:
        group = QGroupBox("Model")
        box = QVBoxLayout(group)
        sources = QHBoxLayout()
        self.fresh_radio = QRadioButton("New model")
        self.fresh_radio.setToolTip("Build a fresh (untrained) variant; fine-tune it afterwards")
        self.checkpoint_radio = QRadioButton("Checkpoint file")
        self.checkpoint_radio.setToolTip("Load a trained model saved by napari-unet (.pt)")
        self.source_group = QButtonGroup(self)
        self.source_group.addButton(self.fresh_radio)
        self.source_group.addButton(self.checkpoint_radio)
        self.fresh_radio.setChecked(True)
        sources.addWidget(self.fresh_radio)
        sources.addWidget(self.checkpoint_radio)
        box.addLayout(sources)

        # one page at a time, each only as tall as it needs (a QStackedWidget keeps the tallest)
        self.fresh_page = self._fresh_page()
        self.checkpoint_page = self._checkpoint_page()
        self.checkpoint_page.setVisible(False)
        box.addWidget(self.fresh_page)
        box.addWidget(self.checkpoint_page)
        self.fresh_radio.toggled.connect(self._on_source_toggled)

        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary_label.setToolTip("The model the Run button uses (shared with Fine-tune)")
        box.addWidget(self.summary_label)
        return group

    def _fresh_page(self) -> QWidget:
        from napari_unet.models import available_models

        page = QWidget()
        form = QFormLayout(page)
        form.setContentsMargins(0, 0, 0, 0)
        self.variant_combo = QComboBox()
        self.variant_combo.addItems(available_models())
        self.variant_combo.setToolTip("2D variants segment stacks slice by slice; 3D ones whole volumes")
        self.width_spin = _spin(4, 256, 16, "Features in the first level (more: slower, stronger)")
        self.depth_spin = _spin(1, 6, 4, "Number of down-sampling levels")
        self.classes_spin = _spin(2, 16, 2, "Classes to predict (2 = foreground vs background)")
        form.addRow("Variant", self.variant_combo)
        form.addRow("Width", self.width_spin)
        form.addRow("Depth", self.depth_spin)
        form.addRow("Classes", self.classes_spin)
        for signal in (self.variant_combo.currentTextChanged, self.width_spin.valueChanged,
                       self.depth_spin.valueChanged, self.classes_spin.valueChanged):
            signal.connect(lambda *_: self._fresh_timer.start())
        return page

    def _checkpoint_page(self) -> QWidget:
        page = QWidget()
        row = QHBoxLayout(page)
        row.setContentsMargins(0, 0, 0, 0)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path to a .pt checkpoint")
        self.checkpoint_edit.returnPressed.connect(lambda: self.load_checkpoint())
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_checkpoint)
        self.load_button = QPushButton("Load")
        self.load_button.setToolTip("Load the checkpoint; it replaces the current model")
        self.load_button.clicked.connect(lambda: self.load_checkpoint())
        row.addWidget(self.checkpoint_edit, 1)
        row.addWidget(browse)
        row.addWidget(self.load_button)
        return page

    def _prediction_group(self) -> QGroupBox:
        from napari_unet.devices import available_devices

        group = QGroupBox("Prediction")
        form = QFormLayout(group)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("Where the model runs; auto picks a GPU when there is one")
        for info in available_devices():
            label = info.label
            if info.free_bytes:
                label = f"{label} ({info.free_bytes / 2**30:.1f} GiB free)" if "free" not in label else label
            self.device_combo.addItem(label, info.spec)
        if self.device_combo.findData("auto") < 0:
            self.device_combo.insertItem(0, "auto", "auto")
        self.device_combo.setCurrentIndex(self.device_combo.findData("auto"))
        form.addRow("Device", self.device_combo)

        self.tile_spin = _spin(0, 4096, 0, "Tile side in pixels (0 = automatic, fits the device memory)")
        self.tile_spin.setSingleStep(32)
        self.tile_spin.setSpecialValueText("auto")
        form.addRow("Tile size", self.tile_spin)
        self.overlap_spin = _double_spin(0.0, 0.75, 0.25, 0.05, "Fraction shared by neighbouring tiles")
        form.addRow("Overlap", self.overlap_spin)
        self.threshold_spin = _double_spin(0.05, 0.95, 0.5, 0.05, "Foreground probability cut-off")
        form.addRow("Threshold", self.threshold_spin)
        self.tta_check = QCheckBox("Test-time flips")
        self.tta_check.setToolTip("Average the predictions of flipped (in 2D also transposed) copies: 8 views, smoother, 8x slower")
        form.addRow(self.tta_check)
        self.instances_combo = QComboBox()
        for method, tip in INSTANCE_METHODS.items():
            self.instances_combo.addItem(method, method)
            self.instances_combo.setItemData(self.instances_combo.count() - 1, tip, Qt.ToolTipRole)
        self.instances_combo.setToolTip(
            "Also add an instances layer, one id per cell: none; components = connected regions of "
            "class 1 (a gap in a membrane merges two cells); watershed = seeded watershed on the "
            "membrane probability, seeded where the class-1 probability passes the threshold (splits them)"
        )
        form.addRow("Instances", self.instances_combo)
        return group

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

    def set_model_source(self, source: str) -> None:
        """``"fresh"`` (a new variant) or ``"checkpoint"`` (a file)."""
        if source not in (FRESH, CHECKPOINT):
            raise ValueError(f"model source must be {FRESH!r} or {CHECKPOINT!r}, not {source!r}")
        (self.fresh_radio if source == FRESH else self.checkpoint_radio).setChecked(True)

    def model_source(self) -> str:
        return FRESH if self.fresh_radio.isChecked() else CHECKPOINT

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
        for spin, value in ((self.width_spin, width), (self.depth_spin, depth),
                            (self.classes_spin, classes)):
            if value is not None:
                spin.setValue(int(value))
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
        classes = self.classes_spin.value()
        variant = self.variant_combo.currentText()
        try:
            model = build_model(
                variant, in_channels=1, out_channels=1 if classes == 2 else classes,
                width=self.width_spin.value(), depth=self.depth_spin.value(),
            )
        except ValueError as exc:
            notify_error(exc)
            return None
        model.eval()
        source = f"fresh {variant}, width {self.width_spin.value()}, depth {self.depth_spin.value()}"
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

    def _show_model_in_form(self, model: Any) -> None:
        """Let the variant/width/depth/classes fields show the shared model (without rebuilding)."""
        config = getattr(model, "config", None) or {}
        if self.variant_combo.findText(str(config.get("name"))) < 0:
            return
        out_channels = int(config.get("out_channels", 1))
        values = ((self.width_spin, config.get("width")), (self.depth_spin, config.get("depth")),
                  (self.classes_spin, 2 if out_channels == 1 else out_channels))
        for field in (self.variant_combo, self.width_spin, self.depth_spin, self.classes_spin):
            field.blockSignals(True)
        try:
            self.variant_combo.setCurrentText(str(config["name"]))
            for spin, value in values:
                if isinstance(value, int):
                    spin.setValue(value)
        finally:
            for field in (self.variant_combo, self.width_spin, self.depth_spin, self.classes_spin):
                field.blockSignals(False)

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

    def set_device(self, spec: str) -> None:
        """Pick a device by spec ("auto", "cpu", "cuda", "cuda:1", "mps"), even one not listed."""
        index = self.device_combo.findData(spec)
        if index < 0:
            self.device_combo.addItem(spec, spec)
            index = self.device_combo.count() - 1
        self.device_combo.setCurrentIndex(index)

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
            request = self._make_request(layer, model)
        except _NeedsGrayscale as need:
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
        self._last_request = request
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

    def _make_request(self, layer: Image, model: nn.Module) -> SegmentRequest:
        """Check the layer against the model and capture the options (main thread, cheap)."""
        data = layer.data[0] if layer.multiscale else layer.data
        rgb = bool(layer.rgb)
        dims = int(model.spatial_dims)
        channels = int(model.in_channels)
        to_grayscale = False
        if rgb and channels == 1:
            if not self.grayscale_check.isChecked():
                raise _NeedsGrayscale(
                    f"'{layer.name}' is an RGB image but the model takes 1 channel: "
                    "convert it to grayscale (tick 'Convert RGB to grayscale') or load a 3-channel model."
                )
            to_grayscale = True
        elif rgb and channels != 3:
            raise ValueError(
                f"'{layer.name}' is an RGB image but the model takes {channels} channels."
            )

        spatial_ndim = data.ndim - (1 if rgb else 0)
        channel_axis = None
        if rgb and channels == 3:
            channel_axis = -1  # moved to where the engine wants it in the worker
        elif not rgb and channels > 1:
            # ARCHITECTURE.md: a 2D model takes (C, Y, X) or (Z, C, Y, X); a 3D model (C, Z, Y, X)
            channel_axis = 0 if (dims == 3 or data.ndim == 3) else 1
            spatial_ndim -= 1
        if dims == 3 and spatial_ndim < 3:
            raise ValueError(
                f"'{layer.name}' is a single 2D image but the model is 3D "
                f"({model.config.get('name', 'a 3D model')}): pick a 2D variant or a 3D volume."
            )
        if spatial_ndim > 3:
            raise ValueError(
                f"'{layer.name}' has {data.ndim} axes {tuple(data.shape)}; napari-unet segments 2D "
                "images, stacks (Z, Y, X) and volumes: take one time point or channel first."
            )

        slice_window = keep_slice = None
        if self.current_slice_check.isChecked() and spatial_ndim == 3:
            slice_window, keep_slice = self._current_slice_window(layer, data, channel_axis, model)
        tile = self.tile_spin.value() or None
        return SegmentRequest(
            layer_name=layer.name, data=data, rgb=rgb, to_grayscale=to_grayscale,
            channel_axis=channel_axis, slice_window=slice_window, keep_slice=keep_slice,
            tile=tile, overlap=self.overlap_spin.value(), tta=self.tta_check.isChecked(),
            threshold=self.threshold_spin.value(),
            instances=str(self.instances_combo.currentData() or "none"),
            device=str(self.device_combo.currentData() or "auto"),
        )

    def _current_slice_window(
        self, layer: Image, data: Any, channel_axis: int | None, model: nn.Module
    ) -> tuple[tuple[int, int], int]:
        """The z range to predict for "current slice only", and the slice to keep within it."""
        z_axis = 1 if channel_axis == 0 else 0
        n_slices = int(data.shape[z_axis])
        position = layer.world_to_data(self.viewer.dims.point)
        z = int(np.clip(round(float(position[z_axis])), 0, n_slices - 1))
        if int(model.spatial_dims) == 2:
            return (z, z + 1), 0
        # a 3D model needs context above and below the slice
        half = max(8, 2 ** int(model.config.get("depth", 4)))
        start, stop = max(0, z - half), min(n_slices, z + half + 1)
        return (start, stop), z - start

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

    # ------------------------------------------------------------------------------ output

    def _show_result(self, request: SegmentRequest, result: SegmentResult) -> None:
        """Add or update the output layers (main thread)."""
        layer = self.viewer.layers[request.layer_name] if request.layer_name in self.viewer.layers else None
        geometry = _output_geometry(layer, request, result.labels.ndim)
        outputs = [
            (f"{request.layer_name} probabilities", result.probability, "image"),
            (f"{request.layer_name} labels", result.labels, "labels"),
        ]
        if result.instances is not None:
            outputs.append((f"{request.layer_name} instances", result.instances, "labels"))
        full_shape = _full_output_shape(request)
        for name, data, kind in outputs:
            self._write_output(name, data, kind, request, full_shape, geometry)
        if layer is not None:
            self.viewer.layers.selection.active = layer
        what = "one slice of " if request.keep_slice is not None else ""
        self.status_label.setText(f"Segmented {what}{request.layer_name}.")
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)

    def _write_output(
        self, name: str, data: np.ndarray, kind: str, request: SegmentRequest,
        full_shape: tuple[int, ...], geometry: dict[str, tuple],
    ) -> None:
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        layer_type = Image if kind == "image" else Labels
        if existing is not None and not isinstance(existing, layer_type):
            notify_error(f"A layer called '{name}' exists and is not a {kind} layer: rename it to keep it.")
            return
        if request.slice_window is not None:
            # a single slice: write it into the existing full-size output (or a new empty one)
            target = np.asarray(existing.data) if existing is not None else None
            if target is None or target.shape != full_shape or target.dtype != data.dtype:
                target = np.zeros(full_shape, dtype=data.dtype)
            else:
                target = target.copy()
            z = request.slice_window[0] + request.keep_slice
            target[z] = data[0]
            data = target
        if existing is not None:
            # in place: the same layer keeps its place, colours and visibility
            for attribute, value in geometry.items():
                if tuple(getattr(existing, attribute)) != tuple(value):
                    setattr(existing, attribute, value)
            existing.data = data
            return
        metadata = {OUTPUT_TAG: True, "source_layer": request.layer_name}
        if kind == "image":
            self.viewer.add_image(
                data, name=name, **geometry, colormap="magma",
                contrast_limits=(0.0, 1.0), visible=False, metadata=metadata,
            )
        else:
            self.viewer.add_labels(
                data, name=name, **geometry, opacity=0.5, metadata=metadata,
            )


# ---------------------------------------------------------------------------------- the job


def segment(job: Job, model: nn.Module, request: SegmentRequest, holder: ModelHolder):
    """Generator run in the worker thread: check, predict, threshold; returns a SegmentResult."""
    from napari_unet import io as image_io
    from napari_unet.inference import predict, probabilities_to_labels

    yield Progress(0, 0, "checking the image")
    data = _crop_to_window(request.data, request)
    image_io.check_image(data, name=f"image '{request.layer_name}'")
    if request.to_grayscale:
        data = image_io.rgb_to_grayscale(data)
    elif request.channel_axis == -1:
        # RGB into a 3-channel model: colours become the channel axis the engine expects
        channels_first = int(model.spatial_dims) == 3 or data.ndim == 3
        data = np.moveaxis(data[..., :3], -1, 0 if channels_first else 1)
    normalization = _volume_statistics(model, request)
    job.check()

    def report(done: int, total: int) -> None:
        job.report(done, total, f"segmenting {request.layer_name}")

    with holder.lock:
        probabilities = predict(
            model, data, tile=request.tile, overlap=request.overlap, tta=request.tta,
            device=request.device, progress=report, cancel=job.cancelled, normalization=normalization,
        )
    job.check()
    yield Progress(0, 0, "making labels")
    probabilities = np.asarray(probabilities)
    labels = probabilities_to_labels(probabilities, threshold=request.threshold)
    if probabilities.shape[0] == 2:
        probability = probabilities[1]
    else:
        probability = 1.0 - probabilities[0]
    keep = None if request.keep_slice is None else slice(request.keep_slice, request.keep_slice + 1)
    if keep is not None:
        labels, probability = labels[keep], probability[keep]
    instances = None
    if request.instances != "none":
        yield Progress(0, 0, f"making instances ({request.instances})")
        instances = _instances(probabilities, keep, request, model)
    job.check()
    return SegmentResult(probability=probability.astype(np.float32, copy=False), labels=labels,
                         instances=instances)


def _instances(probabilities: np.ndarray, keep: slice | None, request: SegmentRequest,
               model: nn.Module) -> np.ndarray:
    """Instances by the chosen method (the engine's); a 2D model's stack slice by slice, as it
    knows nothing about z. A 3D model's slab is labelled whole and then cropped to the kept
    slice, so that slice's cells are cut with their 3D context."""
    from napari_unet.instances import instances_from_probabilities

    per_slice = int(model.spatial_dims) == 2 and probabilities.ndim == 4
    if per_slice and keep is not None:
        probabilities = probabilities[:, keep]
    instances = instances_from_probabilities(probabilities, request.instances, threshold=request.threshold,
                                             per_slice=per_slice)
    if keep is not None and not per_slice:
        instances = instances[keep]
    return instances


def _volume_statistics(model: nn.Module, request: SegmentRequest) -> dict | None:
    """The whole volume's normalisation statistics when a 3D model predicts only a slab of it.

    A 3D model was trained on (and normally predicts) whole volumes, each normalised on its own
    statistics: the slab around the current slice must get the same ones, not its own. A 2D
    model's slice is a whole image already (None: predict measures it).
    """
    from napari_unet import io as image_io
    from napari_unet.inference import volume_statistics

    if request.slice_window is None or int(model.spatial_dims) != 3:
        return None
    volume = image_io.rgb_to_grayscale(request.data) if request.to_grayscale else request.data
    return volume_statistics(model, volume)


def _crop_to_window(data: Any, request: SegmentRequest) -> Any:
    if request.slice_window is None:
        return data
    start, stop = request.slice_window
    z_axis = 1 if request.channel_axis == 0 else 0
    index = [slice(None)] * data.ndim
    index[z_axis] = slice(start, stop)
    return data[tuple(index)]


def _full_output_shape(request: SegmentRequest) -> tuple[int, ...]:
    """Spatial shape of the whole input (the output's shape), channel axis dropped."""
    shape = list(request.data.shape)
    if request.rgb:
        shape = shape[:-1]
    elif request.channel_axis is not None:
        del shape[request.channel_axis]
    return tuple(shape)


def _output_geometry(layer: Image | None, request: SegmentRequest, ndim: int) -> dict[str, tuple]:
    """Scale, translate and units of the output: the input's, minus a channel axis."""
    if layer is None:
        return {"scale": (1.0,) * ndim, "translate": (0.0,) * ndim}
    geometry = {"scale": list(layer.scale), "translate": list(layer.translate),
                "units": list(layer.units)}
    for values in geometry.values():
        if not request.rgb and request.channel_axis is not None and len(values) > ndim:
            del values[request.channel_axis]
    return {key: tuple(values[-ndim:]) for key, values in geometry.items()}


class _NeedsGrayscale(ValueError):
    """An RGB image into a 1-channel model, before the user agreed to convert it."""


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def _double_spin(low: float, high: float, value: float, step: float, tip: str) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(low, high)
    spin.setSingleStep(step)
    spin.setDecimals(2)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def _disconnect_all(callbacks: list, *_: Any) -> None:
    for emitter, callback in callbacks:
        try:
            emitter.disconnect(callback)
        except Exception:  # noqa: BLE001 - the emitter may already be gone with its viewer
            pass
