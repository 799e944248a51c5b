"""``napari-unet demo``: napari with the EM sample loaded and the plugin's widgets docked.

    napari-unet demo            # opens napari, ready to click Run
    napari-unet demo --no-block # (tests, screenshots) set everything up and return at once
    napari-unet demo --screenshot demo.png  # save what the window shows, then close it

``NAPARI_UNET_DEMO_NO_BLOCK=1`` in the environment has the same effect as ``--no-block``.
On a Linux machine without a screen (no DISPLAY), the demo starts Xvfb itself, saves a screenshot of
the window (``napari-unet-demo.png`` unless ``--screenshot`` says otherwise) and exits, so the command
still proves that everything installed and docks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari

PLUGIN = "napari-unet"
NO_BLOCK_ENV = "NAPARI_UNET_DEMO_NO_BLOCK"
# Viewers opened without blocking stay referenced here, so they are not garbage-collected.
OPEN_VIEWERS: list[Any] = []


def launch(block: bool = True) -> napari.Viewer:
    """Open a viewer with the EM sample and the Segment, Fine-tune and Correct next widgets docked.

    With ``block=True`` this runs napari's event loop until the window closes.
    """
    import warnings

    import napari

    # the demo installs PyQt5 on purpose (the wheel that works everywhere): no toast about it
    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend")
    viewer = napari.Viewer(title="napari-unet demo")
    _load_em_sample(viewer)
    segment_dock, segment = _dock(viewer, "Segment", "napari_unet._qt.segment_widget", "SegmentWidget")
    # a tab beside Segment: each widget keeps the full height of the dock
    _dock(viewer, "Fine-tune", "napari_unet._qt.finetune_widget", "FinetuneWidget", tabify=True)
    _dock(viewer, "Correct next", "napari_unet._qt.review_widget", "ReviewWidget", tabify=True)
    if segment_dock is not None:
        from qtpy.QtCore import QTimer

        # the first step is Run: show Segment's tab (once the window has laid the tabs out)
        QTimer.singleShot(0, segment_dock.raise_)
    if segment is not None and hasattr(segment, "select_layer"):
        segment.select_layer("EM membranes")
        _load_sample_model(segment)
    if block:
        napari.run()
    else:
        OPEN_VIEWERS.append(viewer)
    return viewer


def _load_sample_model(segment: Any) -> None:
    """Load the small UNet trained on the EM sample, so the first Run gives a real segmentation."""
    from napari_unet._sample_data import SAMPLE_MODEL

    if SAMPLE_MODEL.is_file():  # absent from an installed wheel: the widget offers a fresh model
        segment.set_model_source("checkpoint")
        segment.load_checkpoint(SAMPLE_MODEL)


def _load_em_sample(viewer: napari.Viewer) -> None:
    try:
        viewer.open_sample(PLUGIN, "em_membranes")
    except Exception:  # noqa: BLE001 - plugin not installed (source checkout): same data directly
        from napari_unet._sample_data import em_membranes

        for data, kwargs, layer_type in em_membranes():
            getattr(viewer, f"add_{layer_type}")(data, **kwargs)


def _dock(
    viewer: napari.Viewer, name: str, module: str, class_name: str, tabify: bool = False
) -> tuple[Any, Any]:
    """Dock a widget through the plugin manifest, or directly when the plugin is not installed.

    Returns (dock widget, widget), both None when the widget cannot be made.
    """
    try:
        return viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=tabify)
    except Exception:  # noqa: BLE001 - fall back to constructing the widget ourselves
        pass
    try:
        import importlib

        widget_class = getattr(importlib.import_module(module), class_name)
    except (ImportError, AttributeError) as exc:
        from napari.utils.notifications import show_warning

        show_warning(f"The {name} widget is not available: {exc}")
        return None, None
    widget = widget_class(viewer)
    dock = viewer.window.add_dock_widget(widget, name=name, area="right", tabify=tabify)
    return dock, widget


def _die_with_parent() -> None:
    """In the Xvfb child: end when the demo's process ends (after Qt let go of the display).

    Killing Xvfb earlier, while Qt is still connected, makes Qt abort with an X I/O error.
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_virtual_screen() -> subprocess.Popen | None:
    """Start Xvfb on a free display when this Linux machine has no screen; None where one exists."""
    has_screen = any(os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY"))
    if sys.platform != "linux" or has_screen or os.environ.get("QT_QPA_PLATFORM"):
        return None
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError(
            "this machine has no screen (DISPLAY is not set) and Xvfb is not installed: "
            "run the demo on a desktop, or install xvfb (bash scripts/install.sh does)"
        )
    display = next(n for n in range(99, 200) if not Path(f"/tmp/.X{n}-lock").exists())
    screen = subprocess.Popen(
        [xvfb, f":{display}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{display}").exists():
        if screen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("could not start a virtual screen (Xvfb) for the demo")
        time.sleep(0.1)
    os.environ["DISPLAY"] = f":{display}"
    return screen


def _save_screenshot(viewer: napari.Viewer, path: Path) -> None:
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + 2  # let docks and layers lay themselves out
    while time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(path), canvas_only=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``napari-unet demo``; returns the exit status.

    ``argv`` are the demo's own options (not ``sys.argv``: the CLI has parsed those already).
    """
    parser = argparse.ArgumentParser(prog="napari-unet demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-block", action="store_true",
                        help="set up the viewer and return without running the event loop")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="save a screenshot of the window to this PNG, then close it")
    args = parser.parse_args([] if argv is None else argv)
    block = not (args.no_block or os.environ.get(NO_BLOCK_ENV, "") not in ("", "0"))
    try:
        screen = _start_virtual_screen()
    except RuntimeError as error:
        print(f"napari-unet: error: {error}", file=sys.stderr)
        return 1
    screenshot = args.screenshot
    if screen is not None and screenshot is None:
        screenshot = Path("napari-unet-demo.png")
    viewer = launch(block=block and screenshot is None)
    if screenshot is not None:
        _save_screenshot(viewer, screenshot)
        viewer.close()
        where = " on a virtual screen (this machine has none)" if screen is not None else ""
        print(f"napari-unet demo ran{where}; screenshot saved to {screenshot.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
