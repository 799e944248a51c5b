"""The engine must import and run without napari or Qt (headless clusters, CLI, notebooks)."""

import pkgutil
import subprocess
import sys

import napari_unet

# Every module but the Qt views and the demo launcher: a new engine module is checked without a list edit.
NOT_ENGINE = ("napari_unet._qt", "napari_unet._demo")
ENGINE_MODULES = sorted(
    info.name for info in pkgutil.walk_packages(napari_unet.__path__, "napari_unet.")
    if not info.name.startswith(NOT_ENGINE)
)
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


def test_engine_module_list_is_complete():
    # A guard that the discovery above found the engine, not an empty list.
    for name in ("napari_unet.io", "napari_unet.training", "napari_unet.inference", "napari_unet.cli"):
        assert any(module == name or module.startswith(name + ".") for module in ENGINE_MODULES)
