"""Live training plots for the dock: loss per step (raw and smoothed) and validation Dice per class.

Training events arrive many times a second and the viewer must never stall, so the plots are drawn
with pyqtgraph (Qt's own painter: an axis with new tick labels costs a few milliseconds, where a
matplotlib redraw cost 70-140 ms and stalled the viewer). :meth:`TrainingPlots.add_step` and
:meth:`TrainingPlots.add_validation` only append numbers; a Qt timer pushes them into the curves at
most ``redraws_per_second`` times a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from qtpy.QtCore import QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

__all__ = ["TrainingPlots"]

# napari's dark theme, so the plots sit in the dock without a white block
_BACKGROUND = "#262930"
_FOREGROUND = "#d6d0ce"
_GRID_ALPHA = 0.25
_CLASS_COLOURS = ["#ff7f50", "#4fc3f7", "#aed581", "#ba68c8", "#ffd54f", "#90a4ae"]


class TrainingPlots(QWidget):
    """Two stacked plots fed by the training loop: loss per step and validation Dice per class.

    Parameters
    ----------
    smoothing : float
        Weight of the past in the exponential moving average drawn over the raw loss (0.9: the
        smoothed curve follows about the last ten steps).
    redraws_per_second : float
        Upper bound on redraws, whatever the rate of incoming points.
    """

    def __init__(self, parent: QWidget | None = None, *, smoothing: float = 0.9, redraws_per_second: float = 4.0):
        super().__init__(parent)
        self.smoothing = float(smoothing)
        self.class_names: list[str] = []
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.val_steps: list[int] = []
        self.dice: list[list[float]] = []  # one list per evaluation, one value per class
        self._dirty = False

        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground(_BACKGROUND)
        self.graphics.setMinimumHeight(300)
        self.loss_plot = self.graphics.addPlot(row=0, col=0)
        self.dice_plot = self.graphics.addPlot(row=1, col=0)
        self._style(self.loss_plot, "Training loss", "loss")
        self._style(self.dice_plot, "Validation Dice per class", "Dice")
        self.dice_plot.setXLink(self.loss_plot)  # both plots show the same steps
        # the ranges are set by redraw, in jumps: autoranging re-laid out the axes on every paint
        self.dice_plot.setYRange(0.0, 1.02, padding=0)
        self._x_limit = 0.0
        self._y_limit = 0.0
        self._fit_ranges()
        # long runs: draw at most one point per pixel column (min/max per column keeps the spikes)
        self.loss_plot.setDownsampling(auto=True, mode="peak")
        self.loss_plot.setClipToView(True)
        self.loss_legend = self.loss_plot.addLegend(offset=(-8, 8), labelTextColor=_FOREGROUND, labelTextSize="7pt")
        self.dice_legend = self.dice_plot.addLegend(offset=(-8, -8), labelTextColor=_FOREGROUND, labelTextSize="7pt")
        self.raw_curve = self.loss_plot.plot([], [], pen=pg.mkPen(QColor(141, 153, 174, 115), width=1), name="loss")
        self.smooth_curve = self.loss_plot.plot([], [], pen=pg.mkPen("#ff7f50", width=2), name="smoothed")
        self.dice_curves: list[pg.PlotDataItem] = []

        self.status = QLabel("No training yet.")
        self.status.setWordWrap(True)
        # a fixed height: a label that grows by a line would resize (and re-lay out) the whole dock
        self.status.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)
        self.status.setFixedHeight(2 * self.status.fontMetrics().lineSpacing() + 4)
        self.export_button = QPushButton("Export PNG…")
        self.export_button.setToolTip("Save both plots as a PNG image.")
        self.export_button.clicked.connect(self._ask_export_path)
        bottom = QHBoxLayout()
        bottom.addWidget(self.status, 1)
        bottom.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.graphics)
        layout.addLayout(bottom)

        self._timer = QTimer(self)
        self._timer.setInterval(int(1000 / max(redraws_per_second, 0.1)))
        self._timer.timeout.connect(self._redraw_if_dirty)
        self._timer.start()

    @staticmethod
    def _style(plot: pg.PlotItem, title: str, y_label: str) -> None:
        plot.setTitle(title, color=_FOREGROUND, size="9pt")
        for side, label in (("bottom", "step"), ("left", y_label)):
            axis = plot.getAxis(side)
            axis.setPen(_FOREGROUND)
            axis.setTextPen(_FOREGROUND)
            plot.setLabel(side, label, color=_FOREGROUND, **{"font-size": "8pt"})
        plot.showGrid(x=True, y=True, alpha=_GRID_ALPHA)
        plot.setMenuEnabled(False)
        plot.setMouseEnabled(x=False, y=False)  # a scroll over the dock scrolls the dock, not the plot
        plot.hideButtons()

    # -- feeding -------------------------------------------------------------------------------

    def set_class_names(self, names: Sequence[str]) -> None:
        """Legend names for the Dice curves (e.g. ``["membrane", "cell"]``)."""
        self.class_names = [str(n) for n in names]
        for index, curve in enumerate(self.dice_curves):
            if index < len(self.class_names) and curve.name() != self.class_names[index]:
                self.dice_legend.removeItem(curve)
                curve.opts["name"] = self.class_names[index]
                self.dice_legend.addItem(curve, self.class_names[index])
        self._dirty = True

    def add_step(self, step: int, loss: float) -> None:
        """One training step's loss; the smoothed curve is an exponential moving average."""
        loss = float(loss)
        previous = self.smoothed[-1] if self.smoothed else loss
        self.steps.append(int(step))
        self.losses.append(loss)
        self.smoothed.append(self.smoothing * previous + (1 - self.smoothing) * loss)
        self._dirty = True

    def add_validation(self, step: int, dice: Sequence[float]) -> None:
        """One evaluation: the Dice of each class on the validation data."""
        values = [float(d) for d in dice]
        self.val_steps.append(int(step))
        self.dice.append(values)
        while len(self.dice_curves) < len(values):
            index = len(self.dice_curves)
            name = self.class_names[index] if index < len(self.class_names) else f"class {index}"
            colour = _CLASS_COLOURS[index % len(_CLASS_COLOURS)]
            curve = self.dice_plot.plot(
                [], [], pen=pg.mkPen(colour, width=1.5), symbol="o", symbolSize=5,
                symbolBrush=colour, symbolPen=None, name=name,
            )
            self.dice_curves.append(curve)
        self._dirty = True

    def set_status(self, text: str) -> None:
        """The line under the plots; shown at the next redraw (each widget update repaints the window)."""
        self._pending_status = text
        self._dirty = True

    _pending_status: str | None = None

    def clear(self) -> None:
        """Forget all points (a new training run)."""
        self.steps.clear()
        self.losses.clear()
        self.smoothed.clear()
        self.val_steps.clear()
        self.dice.clear()
        for curve in self.dice_curves:
            self.dice_plot.removeItem(curve)  # also takes it out of the legend
        self.dice_curves.clear()
        self.status.setText("No training yet.")
        self._pending_status = None
        self._x_limit = self._y_limit = 0.0
        self.redraw()

    @property
    def n_loss_points(self) -> int:
        return len(self.losses)

    @property
    def n_dice_points(self) -> int:
        return len(self.val_steps)

    # -- drawing -------------------------------------------------------------------------------

    def redraw(self) -> None:
        """Push the stored points into the curves (pyqtgraph repaints them at the next paint)."""
        self._dirty = False
        if self._pending_status is not None:
            self.status.setText(self._pending_status)
            self._pending_status = None
        steps = np.asarray(self.steps, dtype=np.float64)
        losses = np.asarray(self.losses, dtype=np.float64)
        self.raw_curve.setData(steps, losses)
        self.smooth_curve.setData(steps, np.asarray(self.smoothed, dtype=np.float64))
        val_steps = np.asarray(self.val_steps, dtype=np.float64)
        for index, curve in enumerate(self.dice_curves):
            values = [d[index] if index < len(d) else np.nan for d in self.dice]
            curve.setData(val_steps, np.asarray(values, dtype=np.float64))
        self._fit_ranges(losses)

    def _fit_ranges(self, losses: np.ndarray | None = None) -> None:
        """Grow the step and loss ranges in jumps (doubling), so that the axes rarely change."""
        last_step = max(self.steps[-1] if self.steps else 0, self.val_steps[-1] if self.val_steps else 0)
        x_limit = self._x_limit if last_step <= self._x_limit else max(10.0, 2.0 * last_step)
        finite = np.empty(0) if losses is None else losses[np.isfinite(losses)]
        highest = float(finite.max()) if finite.size else 0.0
        # grow only, so that a falling loss does not rescale the axis at every point
        y_limit = self._y_limit if highest <= self._y_limit else 1.1 * highest
        y_limit = y_limit or 1.0
        if (x_limit, y_limit) != (self._x_limit, self._y_limit) or x_limit == 0.0:
            self._x_limit, self._y_limit = x_limit or 10.0, y_limit
            lowest = min(0.0, 1.1 * float(finite.min())) if finite.size else 0.0
            self.loss_plot.setXRange(0.0, self._x_limit, padding=0)
            self.loss_plot.setYRange(lowest, self._y_limit, padding=0)

    def _redraw_if_dirty(self) -> None:
        if self._dirty and self.isVisible():
            self.redraw()

    # -- export --------------------------------------------------------------------------------

    def export_png(self, path: str | Path, scale: float = 2.0) -> Path:
        """Save both plots as a PNG file (the current points, at ``scale`` times the dock's size)."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            path = path.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.redraw()
        from pyqtgraph.exporters import ImageExporter

        exporter = ImageExporter(self.graphics.scene())
        width = max(int(self.graphics.width() * scale), 400)
        exporter.parameters()["width"] = width
        exporter.parameters()["background"] = QColor(_BACKGROUND)
        exporter.export(str(path))
        if not path.is_file():
            raise OSError(f"the PNG file {path} was not written")
        return path

    def _ask_export_path(self) -> None:
        name, _ = QFileDialog.getSaveFileName(self, "Export training plots", "training_plots.png", "PNG image (*.png)")
        if not name:
            return
        try:
            saved = self.export_png(name)
        except OSError as exc:
            from napari_unet._qt.workers import notify_error

            notify_error(f"Could not save the plots to {name}: {exc.strerror or exc}.")
            return
        self.set_status(f"Plots saved to {saved}")

    def closeEvent(self, event) -> None:
        self._timer.stop()
        super().closeEvent(event)
