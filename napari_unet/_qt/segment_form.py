"""The Segment dock's form: its Input, Model and Prediction groups, and reading and writing them.

:class:`SegmentForm` is mixed into :class:`~napari_unet._qt.segment_widget.SegmentWidget`, so the
controls stay attributes of the widget (tests, the demo and the screenshots reach them there).
The form only builds and lays out the controls, reads them into a
:class:`~napari_unet.segmentation.SegmentRequest` and shows a model's settings in them; the widget
connects their signals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
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

from napari_unet import segmentation

if TYPE_CHECKING:
    import napari
    from napari.layers import Image
    from torch import nn

# the Instances choices (napari_unet.instances.METHODS) and their tooltips
INSTANCE_METHODS = {
    "none": "No instances layer",
    "components": "Connected regions of class 1 (fast; a gap in a membrane merges two cells)",
    "watershed": "Seeded watershed on the membrane probability (splits cells a membrane gap would merge)",
}
FRESH, CHECKPOINT = "fresh", "checkpoint"


class SegmentForm:
    """The Segment widget's controls; mixed into a QWidget with ``self.viewer`` (for the current slice)."""

    viewer: napari.viewer.Viewer

    # ------------------------------------------------------------------------------ building

    def _build_form(self) -> None:
        """Lay the groups, the Run/Cancel buttons, the progress bar and the status line out in ``self``."""
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
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running segmentation; no layer is changed")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)

        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
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
        self.checkpoint_radio.setToolTip("Load a trained model saved by napari-unet (.pt, or a bioimage.io .zip it exported)")
        self.source_group = QButtonGroup(group)
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

        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary_label.setToolTip("The model the Run button uses (shared with Fine-tune)")
        box.addWidget(self.summary_label)
        self.export_button = QPushButton("Export model…")
        self.export_button.setToolTip(
            "Save this model for other tools or a colleague: a bioimage.io package (.zip), ONNX (.onnx) "
            "or TorchScript (.pt)"
        )
        box.addWidget(self.export_button)
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
        return page

    def _checkpoint_page(self) -> QWidget:
        page = QWidget()
        row = QHBoxLayout(page)
        row.setContentsMargins(0, 0, 0, 0)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path to a .pt checkpoint or an exported .zip")
        self.browse_button = QPushButton("Browse…")
        self.load_button = QPushButton("Load")
        self.load_button.setToolTip("Load the checkpoint; it replaces the current model")
        row.addWidget(self.checkpoint_edit, 1)
        row.addWidget(self.browse_button)
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
        self.tta_check.setToolTip(
            "Average the predictions of flipped (in 2D also transposed) copies: 8 views, smoother, 8x slower"
        )
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

    # ------------------------------------------------------------------------------ reading

    def model_source(self) -> str:
        """``"fresh"`` (a new variant) or ``"checkpoint"`` (a file)."""
        return FRESH if self.fresh_radio.isChecked() else CHECKPOINT

    def fresh_model_options(self) -> dict:
        """``models.build_model``'s arguments for the fresh variant the form describes."""
        classes = self.classes_spin.value()
        return {"name": self.variant_combo.currentText(), "in_channels": 1,
                "out_channels": 1 if classes == 2 else classes,
                "width": self.width_spin.value(), "depth": self.depth_spin.value()}

    def _request_for(self, layer: Image, model: nn.Module) -> segmentation.SegmentRequest:
        """Check the layer against the model and capture the form's settings (main thread, cheap)."""
        point = layer.world_to_data(self.viewer.dims.point) if self.current_slice_check.isChecked() else None
        return segmentation.make_request(
            model, layer.name, layer.data[0] if layer.multiscale else layer.data,
            rgb=bool(layer.rgb), convert_rgb=self.grayscale_check.isChecked(), point=point,
            tile=self.tile_spin.value() or None, overlap=self.overlap_spin.value(),
            tta=self.tta_check.isChecked(), threshold=self.threshold_spin.value(),
            instances=str(self.instances_combo.currentData() or "none"),
            device=str(self.device_combo.currentData() or "auto"),
        )

    # ------------------------------------------------------------------------------ writing

    def set_model_source(self, source: str) -> None:
        """``"fresh"`` (a new variant) or ``"checkpoint"`` (a file)."""
        if source not in (FRESH, CHECKPOINT):
            raise ValueError(f"model source must be {FRESH!r} or {CHECKPOINT!r}, not {source!r}")
        (self.fresh_radio if source == FRESH else self.checkpoint_radio).setChecked(True)

    def set_device(self, spec: str) -> None:
        """Pick a device by spec ("auto", "cpu", "cuda", "cuda:1", "mps"), even one not listed."""
        index = self.device_combo.findData(spec)
        if index < 0:
            self.device_combo.addItem(spec, spec)
            index = self.device_combo.count() - 1
        self.device_combo.setCurrentIndex(index)

    def _set_fresh_size(self, width: int | None, depth: int | None, classes: int | None) -> None:
        """Set the fresh variant's size fields that are given (their signals fire)."""
        for spin, value in ((self.width_spin, width), (self.depth_spin, depth), (self.classes_spin, classes)):
            if value is not None:
                spin.setValue(int(value))

    def _show_model_in_form(self, model: nn.Module | None) -> None:
        """Let the variant/width/depth/classes fields show the shared model (without rebuilding)."""
        config = getattr(model, "config", None) or {}
        if self.variant_combo.findText(str(config.get("name"))) < 0:
            return
        out_channels = int(config.get("out_channels", 1))
        values = ((self.width_spin, config.get("width")), (self.depth_spin, config.get("depth")),
                  (self.classes_spin, 2 if out_channels == 1 else out_channels))
        fields = (self.variant_combo, self.width_spin, self.depth_spin, self.classes_spin)
        for field in fields:
            field.blockSignals(True)
        try:
            self.variant_combo.setCurrentText(str(config["name"]))
            for spin, value in values:
                if isinstance(value, int):
                    spin.setValue(value)
        finally:
            for field in fields:
                field.blockSignals(False)


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
