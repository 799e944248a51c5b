"""``napari-unet demo``: napari with the EM sample loaded and the plugin's widgets docked.

    napari-unet demo            # opens napari, ready to click Run
    napari-unet demo --no-block # (tests, screenshots) set everything up and return at once

``NAPARI_UNET_DEMO_NO_BLOCK=1`` in the environment has the same effect as ``--no-block``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari

PLUGIN = "napari-unet"
NO_BLOCK_ENV = "NAPARI_UNET_DEMO_NO_BLOCK"
# Viewers opened without blocking stay referenced here, so they are not garbage-collected.
OPEN_VIEWERS: list[Any] = []


def launch(block: bool = True) -> napari.Viewer:
    """Open a viewer with the EM sample and the Segment and Fine-tune widgets docked.

    With ``block=True`` this runs napari's event loop until the window closes.
    """
    import napari

    viewer = napari.Viewer(title="napari-unet demo")
    _load_em_sample(viewer)
    segment = _dock(viewer, "Segment", "napari_unet._qt.segment_widget", "SegmentWidget")
    _dock(viewer, "Fine-tune", "napari_unet._qt.finetune_widget", "FinetuneWidget")
    if segment is not None and hasattr(segment, "select_layer"):
        segment.select_layer("EM membranes")
    if block:
        napari.run()
    else:
        OPEN_VIEWERS.append(viewer)
    return viewer


def _load_em_sample(viewer: napari.Viewer) -> None:
    try:
        viewer.open_sample(PLUGIN, "em_membranes")
    except Exception:  # noqa: BLE001 - plugin not installed (source checkout): same data directly
        from napari_unet._sample_data import em_membranes

        for data, kwargs, layer_type in em_membranes():
            getattr(viewer, f"add_{layer_type}")(data, **kwargs)


def _dock(viewer: napari.Viewer, name: str, module: str, class_name: str) -> Any:
    """Dock a widget through the plugin manifest, or directly when the plugin is not installed."""
    try:
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        return widget
    except Exception:  # noqa: BLE001 - fall back to constructing the widget ourselves
        pass
    try:
        import importlib

        widget_class = getattr(importlib.import_module(module), class_name)
    except (ImportError, AttributeError) as exc:
        from napari.utils.notifications import show_warning

        show_warning(f"The {name} widget is not available: {exc}")
        return None
    widget = widget_class(viewer)
    viewer.window.add_dock_widget(widget, name=name, area="right")
    return widget


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``napari-unet demo``; returns the exit status.

    ``argv`` are the demo's own options (not ``sys.argv``: the CLI has parsed those already).
    """
    parser = argparse.ArgumentParser(prog="napari-unet demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-block", action="store_true",
                        help="set up the viewer and return without running the event loop")
    args = parser.parse_args([] if argv is None else argv)
    block = not (args.no_block or os.environ.get(NO_BLOCK_ENV, "") not in ("", "0"))
    launch(block=block)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
