"""The Fine-tune dock's form: its groups of fields, and settings to and from the form.

:class:`FinetuneForm` only builds the widgets (Session, Data, Corrections, Starting model,
Settings, Output, the run buttons and the live plots) and converts between the fields and a
:class:`~napari_unet.corrections.FinetuneSettings`; :class:`~napari_unet._qt.finetune_widget.
FinetuneWidget` connects them to the session and the viewer.
"""

from __future__ import annotations

from napari.layers import Image, Labels
from qtpy.QtCore import Qt
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

from napari_unet._qt.layer_picker import LayerPicker
from napari_unet._qt.plots import TrainingPlots
from napari_unet.corrections import FinetuneSettings, default_autosave_folder
from napari_unet.finetuning import FreshModel, StartModel

__all__ = ["LOSS_NAMES", "REVIEW_SHORTCUT", "START_FROM", "FinetuneForm"]

REVIEW_SHORTCUT = "Shift-R"
LOSS_NAMES = {
    "dice_bce": "Dice + BCE",
    "bce": "BCE",
    "dice": "Dice",
    "focal": "Focal",
    "border_weighted": "Border-weighted",
    "ce_dice": "CE + Dice",
}
START_FROM = {  # menu order: StartModel's values
    StartModel.SHARED: "Segment widget's model",
    StartModel.CHECKPOINT: "Checkpoint file",
    StartModel.FRESH: "Fresh model",
}


def _tip(widget: QWidget, text: str) -> QWidget:
    widget.setToolTip(text)
    return widget


def _browse_button() -> QPushButton:
    button = QPushButton("…")
    button.setMaximumWidth(30)
    return button


class FinetuneForm(QWidget):
    """The Fine-tune dock's fields (no behaviour but settings to and from the form)."""

    def __init__(self, viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self._build_ui()

    # -- layout --------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        defaults = FinetuneSettings()
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addWidget(self._session_group())
        layout.addWidget(self._data_group())
        layout.addWidget(self._corrections_group(defaults))
        layout.addWidget(self._model_group())
        layout.addWidget(self._settings_group(defaults))
        layout.addWidget(self._output_group())
        buttons = QHBoxLayout()
        self.start_button = _tip(QPushButton("Start"), "Fine-tune on the confirmed pixels, from the starting model.")
        self.stop_button = _tip(QPushButton("Stop"), "Stop within a second; the best weights are kept and saved.")
        self.resume_button = _tip(QPushButton("Resume"), "Go on from the last fine-tuned weights, with today's corrections.")
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

    def _session_group(self) -> QGroupBox:
        box = QGroupBox("Session")
        layout = QVBoxLayout(box)
        row = QHBoxLayout()
        self.save_session_button = _tip(
            QPushButton("Save session…"),
            "Save the image path, labels, corrections, model and settings in one folder; it is then kept up to "
            "date as you work (a crash loses at most the last seconds).",
        )
        self.open_session_button = _tip(QPushButton("Open session…"), "Open a saved session and go on where you left off.")
        row.addWidget(self.save_session_button)
        row.addWidget(self.open_session_button)
        layout.addLayout(row)
        self.session_label = QLabel("No session open.")
        self.session_label.setWordWrap(True)
        layout.addWidget(self.session_label)
        return box

    def _data_group(self) -> QGroupBox:
        box = QGroupBox("Data")
        form = QFormLayout(box)
        self.image_picker = _tip(LayerPicker(self.viewer, Image), "The image the labels belong to.")
        self.labels_picker = _tip(
            LayerPicker(self.viewer, Labels),
            "The labels you correct with napari's paint, fill and erase tools (or a fresh layer of scribbles).",
        )
        form.addRow("Image", self.image_picker)
        form.addRow("Corrected labels", self.labels_picker)
        return box

    def _corrections_group(self, defaults: FinetuneSettings) -> QGroupBox:
        box = QGroupBox("Corrections (what will be trained on)")
        layout = QVBoxLayout(box)
        self.counts_label = QLabel("No corrections yet.")
        self.counts_label.setWordWrap(True)
        layout.addWidget(self.counts_label)
        row = QHBoxLayout()
        self.review_button = _tip(
            QPushButton(f"Reviewed ({REVIEW_SHORTCUT})"),
            "The prediction on this slice is now correct everywhere: train on all of it.",
        )
        self.unreview_button = _tip(QPushButton("Unmark"), "This slice is not reviewed after all.")
        self.forget_button = _tip(QPushButton("Forget strokes"), "Forget the painted pixels on this slice.")
        for button in (self.review_button, self.unreview_button, self.forget_button):
            row.addWidget(button)
        layout.addLayout(row)
        form = QFormLayout()
        self.review_depth = _tip(QSpinBox(minimum=1, maximum=512, value=1),
                                 "Slices marked at once: more than 1 marks a sub-volume (3D).")
        self.margin_spin = _tip(
            QSpinBox(minimum=0, maximum=20, value=defaults.margin),
            "Grow painted strokes by this many pixels (napari records only the pixels a stroke changed).",
        )
        self.show_confirmed = _tip(QCheckBox("Show confirmed pixels"), "Overlay the pixels the loss will see.")
        form.addRow("Review depth", self.review_depth)
        form.addRow("Stroke margin", self.margin_spin)
        form.addRow(self.show_confirmed)
        folder_row = QHBoxLayout()
        self.autosave_folder = _tip(
            QLineEdit(),
            "Where corrections are saved automatically. Empty: next to the image file, else " + str(default_autosave_folder()),
        )
        self.autosave_folder.setPlaceholderText("next to the image")
        self.autosave_browse = _browse_button()
        folder_row.addWidget(self.autosave_folder)
        folder_row.addWidget(self.autosave_browse)
        form.addRow("Autosave to", folder_row)
        layout.addLayout(form)
        self.autosave_label = QLabel("")
        self.autosave_label.setWordWrap(True)
        layout.addWidget(self.autosave_label)
        # restore banner, shown when saved corrections of this image are found
        self.restore_box = QWidget()
        restore_row = QHBoxLayout(self.restore_box)
        restore_row.setContentsMargins(0, 0, 0, 0)
        self.restore_label = QLabel("")
        self.restore_label.setWordWrap(True)
        self.restore_button = QPushButton("Restore")
        self.dismiss_button = QPushButton("Ignore")
        self.dismiss_button.clicked.connect(lambda: self.restore_box.setVisible(False))
        restore_row.addWidget(self.restore_label, 1)
        restore_row.addWidget(self.restore_button)
        restore_row.addWidget(self.dismiss_button)
        self.restore_box.setVisible(False)
        layout.addWidget(self.restore_box)
        return box

    def _model_group(self) -> QGroupBox:
        box = QGroupBox("Starting model")
        form = QFormLayout(box)
        self.start_from = _tip(QComboBox(), "Fine-tune the Segment widget's model, a saved checkpoint, or a new model.")
        self.start_from.addItems([START_FROM[choice] for choice in StartModel])
        form.addRow("Start from", self.start_from)
        row = QHBoxLayout()
        self.checkpoint_in = _tip(QLineEdit(), "A checkpoint (.pt) saved by napari-unet.")
        self.checkpoint_in_browse = _browse_button()
        self.checkpoint_in_browse.clicked.connect(self._browse_checkpoint_in)
        row.addWidget(self.checkpoint_in)
        row.addWidget(self.checkpoint_in_browse)
        form.addRow("Checkpoint", row)
        fresh = FreshModel()
        self.variant = _tip(QComboBox(), "The UNet variant of a fresh model (2D for images and stacks, 3D for volumes).")
        self.variant.addItems(self._model_names())
        self.width_spin = _tip(QSpinBox(minimum=2, maximum=128, value=fresh.width),
                               "Channels of the first level; doubles at each level.")
        self.depth_spin = _tip(QSpinBox(minimum=1, maximum=6, value=fresh.depth), "Number of down-sampling levels.")
        size_row = QHBoxLayout()
        size_row.addWidget(QLabel("width"))
        size_row.addWidget(self.width_spin)
        size_row.addWidget(QLabel("depth"))
        size_row.addWidget(self.depth_spin)
        form.addRow("Fresh model", self.variant)
        form.addRow("", size_row)
        self.model_summary = QLabel("")
        self.model_summary.setWordWrap(True)
        form.addRow(self.model_summary)
        return box

    def _settings_group(self, defaults: FinetuneSettings) -> QGroupBox:
        engine = self._engine_defaults()
        box = QGroupBox("Settings")
        form = QFormLayout(box)
        self.lr_spin = _tip(QDoubleSpinBox(decimals=5, minimum=1e-5, maximum=1.0, singleStep=1e-4), "Step size of the optimiser.")
        self.lr_spin.setValue(defaults.learning_rate or engine.get("learning_rate", 1e-3))
        self.time_spin = _tip(
            QSpinBox(minimum=0, maximum=24 * 3600, value=int(defaults.time_budget or 0), suffix=" s"),
            "Stop after this long (0: no time limit, use the step limit).",
        )
        self.steps_spin = _tip(QSpinBox(minimum=0, maximum=10**7, value=defaults.steps or 0),
                               "Stop after this many steps (0: no step limit).")
        self.steps_spin.setSpecialValueText("no limit")
        self.patch_spin = _tip(QSpinBox(minimum=0, maximum=2048, singleStep=16, value=0),
                               "Edge of the training patches (0: automatic).")
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
        self.augment_check = _tip(QCheckBox("Augmentation"),
                                  "Random flips, rotations, elastic deformations and intensity changes.")
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
        self.val_every_spin = _tip(QSpinBox(minimum=0, maximum=10**6, value=defaults.val_every or 0),
                                   "Measure validation Dice every this many steps (0: automatic).")
        self.val_every_spin.setSpecialValueText("auto")
        self.device_combo = _tip(QComboBox(), "Where to train: auto picks a GPU when there is one.")
        for spec, label in self._device_choices():
            self.device_combo.addItem(label, spec)
        self.preview_spin = _tip(
            QDoubleSpinBox(decimals=1, minimum=0.5, maximum=120.0, value=3.0, suffix=" s"),
            "How often the slice in view is predicted with the current weights.",
        )
        for label, field in (
            ("Learning rate", self.lr_spin), ("Time budget", self.time_spin), ("Step limit", self.steps_spin),
            ("Patch size", self.patch_spin), ("Batch size", self.batch_spin), ("Loss", self.loss_combo),
            ("Keep what it knew", self.anchor_spin), ("Validation share", self.val_spin),
            ("Validate every", self.val_every_spin), ("Preview every", self.preview_spin), ("Device", self.device_combo),
        ):
            form.addRow(label, field)
        for check in (self.augment_check, self.balance_check, self.replay_check):
            form.addRow(check)
        return box

    def _output_group(self) -> QGroupBox:
        box = QGroupBox("Output")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.checkpoint_out = _tip(QLineEdit(), "Where the fine-tuned model is saved (empty: beside the autosaved corrections).")
        self.checkpoint_out.setPlaceholderText("automatic")
        browse = _browse_button()
        browse.clicked.connect(self._browse_checkpoint_out)
        row.addWidget(self.checkpoint_out)
        row.addWidget(browse)
        form.addRow("Save model to", row)
        self.rerun_check = _tip(QCheckBox("Re-run Segment on the whole image afterwards"),
                                "Predict the whole image with the new weights.")
        form.addRow(self.rerun_check)
        return box

    # -- choices offered (the engine's lists; the form still opens if the engine fails to) ------

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

    @property
    def start_choice(self) -> StartModel:
        """Which model the form says to start from."""
        return StartModel(self.start_from.currentIndex())

    def fresh_model(self) -> FreshModel:
        """The fresh model the form describes."""
        return FreshModel(self.variant.currentText(), int(self.width_spin.value()), int(self.depth_spin.value()))

    def show_plots(self) -> None:
        """Scroll the dock so that the buttons and the live plots are in view."""
        self._scroll.ensureWidgetVisible(self.plots, 0, 0)

    # -- file dialogs --------------------------------------------------------------------------

    def _browse_checkpoint_in(self) -> None:
        name, _ = QFileDialog.getOpenFileName(self, "Start from checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)")
        if name:
            self.checkpoint_in.setText(name)
            self.start_from.setCurrentIndex(StartModel.CHECKPOINT)

    def _browse_checkpoint_out(self) -> None:
        name, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model", "", "Checkpoints (*.pt)")
        if name:
            self.checkpoint_out.setText(name)
