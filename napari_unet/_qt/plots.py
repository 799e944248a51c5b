"""Live training plots for the dock: loss per step (raw and smoothed) and validation Dice per class.

Training events arrive many times a second; redrawing matplotlib on each would stall the viewer.
So :meth:`TrainingPlots.add_step` and :meth:`TrainingPlots.add_validation` only append numbers and
mark the figure dirty, and a Qt timer redraws at most ``redraws_per_second`` times a second. A
redraw only blits the curves onto a cached background (a few ms); the axes, ticks and legends
(text is what makes a full matplotlib draw cost ~100 ms) are redrawn only when the axis limits
grow, which they do by doubling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

__all__ = ["TrainingPlots"]

# napari's dark theme, so the plots sit in the dock without a white block
_BACKGROUND = "#262930"
_FOREGROUND = "#d6d0ce"
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

        # a fixed layout: tight_layout would re-measure every text on every redraw (~150 ms)
        self.figure = Figure(figsize=(4.0, 4.2), dpi=100, facecolor=_BACKGROUND)
        self.figure.subplots_adjust(left=0.16, right=0.97, top=0.94, bottom=0.1, hspace=0.55)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(300)
        self.loss_axes = self.figure.add_subplot(2, 1, 1)
        self.dice_axes = self.figure.add_subplot(2, 1, 2)
        # animated lines are left out of full draws and blitted onto the cached background
        (self._raw_line,) = self.loss_axes.plot(
            [], [], color="#8d99ae", alpha=0.45, linewidth=0.8, label="loss", animated=True
        )
        (self._smooth_line,) = self.loss_axes.plot([], [], color="#ff7f50", linewidth=1.6, label="smoothed", animated=True)
        self._dice_lines: list = []
        self._style_axes()
        self._legend(self.loss_axes)
        self._background = None
        self.canvas.mpl_connect("draw_event", self._on_full_draw)
        self.full_draws = 0  # for tests: how often the whole figure was drawn
        self._exporting = False

        self.status = QLabel("No training yet.")
        self.status.setWordWrap(True)
        self.export_button = QPushButton("Export PNG…")
        self.export_button.setToolTip("Save both plots as a PNG image.")
        self.export_button.clicked.connect(self._ask_export_path)
        bottom = QHBoxLayout()
        bottom.addWidget(self.status, 1)
        bottom.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        layout.addLayout(bottom)

        self._timer = QTimer(self)
        self._timer.setInterval(int(1000 / max(redraws_per_second, 0.1)))
        self._timer.timeout.connect(self._redraw_if_dirty)
        self._timer.start()

    # -- feeding -------------------------------------------------------------------------------

    def set_class_names(self, names: Sequence[str]) -> None:
        """Legend names for the Dice curves (e.g. ``["membrane", "cell"]``)."""
        self.class_names = [str(n) for n in names]
        for line, name in zip(self._dice_lines, self.class_names):
            line.set_label(name)
        if self._dice_lines:
            self._legend(self.dice_axes)
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
        while len(self._dice_lines) < len(values):
            index = len(self._dice_lines)
            name = self.class_names[index] if index < len(self.class_names) else f"class {index}"
            colour = _CLASS_COLOURS[index % len(_CLASS_COLOURS)]
            (line,) = self.dice_axes.plot(
                [], [], marker="o", markersize=3, color=colour, label=name, animated=True
            )
            self._dice_lines.append(line)
            self._legend(self.dice_axes)  # only when a class appears, not on every redraw
            self._background = None
        self._dirty = True

    def set_status(self, text: str) -> None:
        self.status.setText(text)

    def clear(self) -> None:
        """Forget all points (a new training run)."""
        self.steps.clear()
        self.losses.clear()
        self.smoothed.clear()
        self.val_steps.clear()
        self.dice.clear()
        for line in self._dice_lines:
            line.remove()
        self._dice_lines.clear()
        legend = self.dice_axes.get_legend()
        if legend is not None:
            legend.remove()
        self.status.setText("No training yet.")
        self._dirty = True
        self._background = None
        self.redraw()

    @property
    def n_loss_points(self) -> int:
        return len(self.losses)

    @property
    def n_dice_points(self) -> int:
        return len(self.val_steps)

    # -- drawing -------------------------------------------------------------------------------

    def _style_axes(self) -> None:
        for axes in (self.loss_axes, self.dice_axes):
            axes.set_facecolor(_BACKGROUND)
            axes.tick_params(colors=_FOREGROUND, labelsize=8)
            for spine in axes.spines.values():
                spine.set_color(_FOREGROUND)
            axes.xaxis.label.set_color(_FOREGROUND)
            axes.yaxis.label.set_color(_FOREGROUND)
            axes.title.set_color(_FOREGROUND)
            axes.grid(True, color="#555a66", linewidth=0.5, alpha=0.6)
        self.loss_axes.set_title("Training loss", fontsize=9)
        self.loss_axes.set_xlabel("step", fontsize=8)
        self.loss_axes.set_ylabel("loss", fontsize=8)
        self.dice_axes.set_title("Validation Dice per class", fontsize=9)
        self.dice_axes.set_xlabel("step", fontsize=8)
        self.dice_axes.set_ylabel("Dice", fontsize=8)
        self.dice_axes.set_ylim(0, 1.02)

    def _legend(self, axes) -> None:
        if not axes.get_lines():
            return
        # a fixed corner: loc="best" searches for free space on every draw
        corner = "upper right" if axes is self.loss_axes else "lower right"
        legend = axes.legend(fontsize=7, loc=corner, facecolor=_BACKGROUND, edgecolor="#555a66")
        for text in legend.get_texts():
            text.set_color(_FOREGROUND)

    def _animated_lines(self) -> list:
        return [self._raw_line, self._smooth_line, *self._dice_lines]

    def redraw(self) -> None:
        """Push the stored points into the lines and show them: a blit, or a full draw if the limits grew."""
        self._dirty = False
        self._raw_line.set_data(self.steps, self.losses)
        self._smooth_line.set_data(self.steps, self.smoothed)
        for index, line in enumerate(self._dice_lines):
            line.set_data(self.val_steps, [d[index] if index < len(d) else float("nan") for d in self.dice])
        if self._update_limits() or self._background is None:
            self.canvas.draw_idle()  # the background is captured again in _on_full_draw
        else:
            self._blit()

    def _update_limits(self) -> bool:
        """Grow the axis limits in jumps (so full draws stay rare); True if they changed."""
        last_step = max(self.steps[-1] if self.steps else 0, self.val_steps[-1] if self.val_steps else 0)
        x_low, x_high = self.loss_axes.get_xlim()
        want_x = 10.0 if (last_step == 0 or x_high < 10.0) else x_high
        if last_step > want_x:
            want_x = 2.0 * last_step
        y_low, y_high = self.loss_axes.get_ylim()
        want_y = (0.0, 1.0)
        if self.losses:
            low, high = min(0.0, min(self.losses) * 1.1), max(self.losses) * 1.1 or 1.0
            # grow only, so that a falling loss does not redraw the axes at every point
            want_y = (min(low, y_low), max(high, y_high)) if self._loss_axis_set else (low, high)
        changed = (x_low, x_high) != (0.0, want_x) or (y_low, y_high) != want_y
        if changed:
            for axes in (self.loss_axes, self.dice_axes):
                axes.set_xlim(0.0, want_x)
            self.loss_axes.set_ylim(*want_y)
        self._loss_axis_set = bool(self.losses)
        return changed

    _loss_axis_set = False  # the loss axis holds real data limits (not the placeholder 0..1)

    def _on_full_draw(self, event) -> None:
        """After matplotlib drew everything but the curves: cache it, then put the curves on."""
        if self._exporting:
            return
        self.full_draws += 1
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _blit(self) -> None:
        self.canvas.restore_region(self._background)
        self._draw_lines()

    def _draw_lines(self) -> None:
        for line in self._animated_lines():
            line.axes.draw_artist(line)
        self.canvas.blit(self.figure.bbox)

    def _redraw_if_dirty(self) -> None:
        if self._dirty and self.isVisible():
            self.redraw()

    # -- export --------------------------------------------------------------------------------

    def export_png(self, path: str | Path, dpi: int = 150) -> Path:
        """Save both plots as a PNG file (the current points, whatever the redraw timer did)."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            path = path.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.redraw()
        lines = self._animated_lines()
        for line in lines:  # a saved figure draws everything in one go
            line.set_animated(False)
        self._exporting = True
        try:
            self.figure.savefig(path, dpi=dpi, facecolor=self.figure.get_facecolor())
        finally:
            self._exporting = False
            for line in lines:
                line.set_animated(True)
            self._background = None
            self.canvas.draw_idle()
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

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self._timer.stop()
        super().closeEvent(event)
