"""The engine must import and run without napari or Qt (headless clusters, CLI, notebooks)."""

import subprocess
import sys

ENGINE_MODULES = [
    "napari_unet.devices",
    "napari_unet.models",
    "napari_unet.losses",
    "napari_unet.metrics",
    "napari_unet.io",
    "napari_unet.checkpoint",
    "napari_unet.data",
    "napari_unet.training",
    "napari_unet.inference",
    "napari_unet.instances",
    "napari_unet.uncertainty",
    "napari_unet.session",
    "napari_unet.corrections",
    "napari_unet.cli",
]
GUI_PACKAGES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "psygnal", "vispy")


def test_engine_imports_without_gui_packages():
    code = (
        "import importlib, sys\n"
        f"for name in {ENGINE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_PACKAGES!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"engine imported GUI packages: {result.stdout.strip()}"
