"""Screenshot of the docked Segment widget over a segmented EM stack, for the README.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py [--checkpoint best.pt]

Without a checkpoint, a small UNet is first trained for ``--train-seconds`` on the EM sample (with
napari_unet.training.Trainer), so the picture shows a real segmentation rather than the noise of
an untrained model. The viewer opens with the EM sample, the Segment widget docked on the right,
runs the segmentation through the widget (its worker, as a user's click would) and saves
``docs/images/segment.png`` (``viewer.screenshot(canvas_only=False)``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "images" / "segment.png"
WINDOW_SIZE = (1500, 940)


def train_small_model(seconds: float):
    """A UNet (width 16, depth 3) trained for ``seconds`` on the EM sample's ground truth."""
    from napari_unet._sample_data import load_sample
    from napari_unet.models import build_model
    from napari_unet.training import TrainConfig, Trainer

    image, labels = load_sample("em_membranes")
    model = build_model("unet", width=16, depth=3)
    config = TrainConfig(patch_size=128, batch_size=4, time_budget=seconds, warmup_steps=10,
                         val_fraction=0.25, device="auto", seed=0)
    trainer = Trainer(model, image, labels, config=config)
    history = trainer.fit()
    print(f"trained {trainer.step} steps in {seconds:.0f} s; history keys: {sorted(history)}")
    return trainer.model


def wait_until(condition, timeout: float = 300.0) -> None:
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the segmentation did not finish in time")
        QApplication.processEvents()
        time.sleep(0.02)


def close_notifications(viewer) -> None:
    """Close the notification toasts (e.g. napari's PyQt5 deprecation notice) before the shot."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    for widget in QApplication.topLevelWidgets():
        if isinstance(widget, NapariQtNotification):
            widget.close()
    QApplication.processEvents()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of training")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    # keep the backend deprecation notice out of the picture
    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari

    from napari_unet._qt.segment_widget import SegmentWidget
    from napari_unet._qt.shared import model_holder

    model = None if args.checkpoint else train_small_model(args.train_seconds)

    viewer = napari.Viewer(title="napari-unet")
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    viewer.open_sample("napari-unet", "em_membranes")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment", area="right")
    widget.select_layer("EM membranes")

    if args.checkpoint:
        widget.load_checkpoint(args.checkpoint)
        wait_until(lambda: widget.run_button.isEnabled())
    else:
        model_holder(viewer).set(
            model, source=f"trained {args.train_seconds:.0f} s on the EM membranes sample",
            trained=True,
        )
    widget.instances_combo.setCurrentText("watershed")  # one id per cell, split at weak membranes
    widget.run()
    wait_until(lambda: widget.run_button.isEnabled() and "EM membranes instances" in viewer.layers)

    # one colour per cell reads better than one colour for all of class 1
    viewer.layers["EM membranes labels"].visible = False
    viewer.layers["EM membranes instances"].opacity = 0.5
    viewer.layers.selection.active = viewer.layers["EM membranes instances"]
    viewer.dims.set_point(0, 3 * viewer.layers["EM membranes"].scale[0])
    viewer.reset_view()
    close_notifications(viewer)
    wait_until(lambda: True)
    time.sleep(0.5)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    print(f"saved {args.out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
