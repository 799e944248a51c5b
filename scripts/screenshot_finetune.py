"""Screenshots of the Fine-tune dock for the README, taken mid-training.

* ``docs/images/finetune.png``: the whole window, with the Fine-tune dock (next to Segment) showing
  the live loss and Dice plots while training runs;
* ``docs/images/finetune_preview.png``: the canvas with the preview layer the model paints as it
  learns the corrections.

The scene: the EM sample, a weak start model (trained a few seconds on slice 0) whose prediction is
the labels layer; slice 2 corrected to the ground truth and marked reviewed, a few strokes on slice 3;
then fine-tuning from the dock with its default settings (shorter budget).

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/screenshot_finetune.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# autosaves and the checkpoint of this demo go to a scratch folder, not the user's home
os.environ.setdefault("NAPARI_UNET_AUTOSAVE_DIR", tempfile.mkdtemp(prefix="napari-unet-screenshot-"))

import napari  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_unet._qt.finetune_widget import FinetuneWidget  # noqa: E402
from napari_unet._qt.segment_widget import SegmentWidget  # noqa: E402
from napari_unet._qt.shared import model_holder  # noqa: E402
from napari_unet._sample_data import EM_SCALE, load_sample  # noqa: E402
from napari_unet.corrections import FinetuneSettings  # noqa: E402
from napari_unet.inference import predict, probabilities_to_labels  # noqa: E402
from napari_unet.models import build_model  # noqa: E402
from napari_unet.training import TrainConfig, Trainer  # noqa: E402

OUT = ROOT / "docs" / "images"
START_SECONDS = 15  # the weak start model's training on slice 0
FINETUNE_SECONDS = 90


def close_notifications(viewer) -> None:
    """Toasts (e.g. napari's PyQt5 deprecation notice) would cover the canvas."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    pump(0.3)


def pump(seconds: float) -> None:
    """Let Qt run (paint, deliver worker signals) for a while."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.002)


class StallMeter:
    """Largest gaps between ticks of a 10 ms timer: how long the event loop was busy."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self._last = time.perf_counter()
        self._timer = QTimer(interval=10)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now

    def summary(self) -> str:
        self._timer.stop()
        gaps = np.array(self.gaps[1:]) * 1000
        return (f"event-loop gaps: median {np.median(gaps):.0f} ms, 99th percentile {np.percentile(gaps, 99):.0f} ms, "
                f"max {gaps.max():.0f} ms")


def weak_start_model(image: np.ndarray, truth: np.ndarray):
    model = build_model("unet", in_channels=1, out_channels=1, width=8, depth=3)
    Trainer(model, image[:1], truth[:1], config=TrainConfig(time_budget=START_SECONDS, val_fraction=0.0, seed=0)).fit()
    return model


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    image, truth = load_sample("em_membranes")
    model = weak_start_model(image, truth)
    prediction = probabilities_to_labels(predict(model, image))

    viewer = napari.Viewer(title="napari-unet: fine-tune on corrections")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.add_image(image, name="EM membranes", scale=EM_SCALE)
    labels = viewer.add_labels(prediction.copy(), name="EM membranes labels", scale=EM_SCALE, opacity=0.35)
    model_holder(viewer).set(model, source=f"unet trained {START_SECONDS} s on slice 0", trained=True)
    segment = SegmentWidget(viewer)
    finetune = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment", area="right")
    dock = viewer.window.add_dock_widget(finetune, name="Fine-tune", area="right", tabify=True)
    viewer.window._qt_window.resizeDocks([dock], [520], Qt.Horizontal)

    # the user's corrections: slice 2 fixed everywhere and reviewed, a few strokes on slice 3
    labels.data[2] = truth[2]
    labels.refresh()
    viewer.dims.current_step = (2, 0, 0)
    finetune.mark_current_slice_reviewed()
    labels.brush_size = 6
    wrong = np.argwhere(prediction[3] != truth[3])
    rng = np.random.default_rng(0)
    for y, x in wrong[rng.choice(len(wrong), size=min(40, len(wrong)), replace=False)]:
        labels.paint((3, y, x), int(truth[3, y, x]))

    finetune.start_from.setCurrentIndex(0)  # the Segment widget's model
    finetune.set_settings(FinetuneSettings(time_budget=FINETUNE_SECONDS, device="auto"))
    finetune.preview_spin.setValue(3.0)
    viewer.dims.current_step = (3, 0, 0)
    labels.visible = False
    finetune.start()
    finetune.show_plots()
    meter = StallMeter()

    started = time.perf_counter()
    # mid-training: the plots hold a few validations and the preview has been painted
    while time.perf_counter() - started < FINETUNE_SECONDS * 0.6:
        pump(0.5)
        preview = finetune.preview_layer
        ready = finetune.plots.n_dice_points >= 3 and preview is not None and np.asarray(preview.data)[3].any()
        if ready and time.perf_counter() - started > FINETUNE_SECONDS * 0.4:
            break
    finetune.plots.redraw()
    close_notifications(viewer)
    viewer.screenshot(str(OUT / "finetune.png"), canvas_only=False)
    print("window:", finetune.plots.n_loss_points, "loss points,", finetune.plots.n_dice_points, "validations")
    # later on: the preview layer alone on the image, zoomed in
    while finetune.is_training and time.perf_counter() - started < FINETUNE_SECONDS * 0.9:
        pump(0.5)
    viewer.camera.zoom *= 2
    close_notifications(viewer)
    viewer.screenshot(str(OUT / "finetune_preview.png"), canvas_only=True)
    print("preview after", round(time.perf_counter() - started), "s,", finetune.plots.n_loss_points, "steps")
    finetune.stop()
    deadline = time.perf_counter() + 20
    while finetune.is_training and time.perf_counter() < deadline:
        pump(0.2)
    print("checkpoint:", finetune.last_checkpoint)
    print("stop latency (click to end of the training loop):", round(finetune.last_stop_latency or -1, 3), "s")
    print(meter.summary())
    viewer.close()


if __name__ == "__main__":
    main()
