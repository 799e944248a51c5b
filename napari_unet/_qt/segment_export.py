"""The Segment dock's *Export model…*: the shared model to a bioimage.io package, ONNX or TorchScript.

The export itself is the engine's (``napari_unet.export``); this file picks the file, cuts a test
image from the selected layer (bioimage.io packages carry one) and runs the export in a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QFileDialog

from napari_unet._qt.workers import Progress, notify_error, start_worker

if TYPE_CHECKING:
    from napari.layers import Image

# the save dialog's choices, in the order offered, and the suffix each writes
EXPORT_FILTERS = {
    "bioimage.io model package (*.zip)": ("bioimageio", ".zip"),
    "ONNX (*.onnx)": ("onnx", ".onnx"),
    "TorchScript (*.pt)": ("torchscript", ".pt"),
}
# a 3D model's test image: this many slices around the one in view
TEST_SLAB = 64


def export_format(path: str | Path, chosen_filter: str = "") -> tuple[str, Path]:
    """The format a path asks for (by its suffix, else the dialog's filter) and the path with it."""
    path = Path(path)
    for fmt, suffix in EXPORT_FILTERS.values():
        if path.suffix.lower() == suffix:
            return fmt, path
    fmt, suffix = EXPORT_FILTERS.get(chosen_filter, next(iter(EXPORT_FILTERS.values())))
    return fmt, path.with_name(path.name + suffix)


class ExportMixin:
    """Mixed into the Segment widget (``holder``, ``worker``, ``viewer``, ``status_label``...)."""

    def export_model(self, path: str | Path | None = None):
        """Export the shared model in a worker (asks for a file when ``path`` is None); returns the worker."""
        from napari_unet import export

        model = self.holder.model
        if model is None:
            notify_error("There is no model to export yet: build one, load a checkpoint or fine-tune first.")
            return None
        chosen = ""
        if path is None:
            path, chosen = QFileDialog.getSaveFileName(self, "Export the model", "", ";;".join(EXPORT_FILTERS))
            if not path:
                return None
        fmt, path = export_format(path, chosen)
        if self._is_busy():
            return None
        if self.holder.busy:
            notify_error("The model is being fine-tuned: stop the training or wait for it to finish.")
            return None
        if not self.holder.trained:
            show_warning("This model is untrained: its predictions are noise. It is exported anyway.")
        checkpoint = export.checkpoint_for(model, self.holder.checkpoint)
        test_image = self._export_test_image(self.selected_layer(), model) if fmt == "bioimageio" else None
        holder = self.holder

        def job():
            yield Progress(0, 0, f"exporting to {path.name}")
            with holder.lock:
                return export.export_model(checkpoint, path, fmt, test_image=test_image)

        self._set_running(True, f"Exporting the model to {path.name}…")
        self.worker = start_worker(job(), on_return=self._on_exported, on_finished=lambda: self._set_running(False),
                                   description=f"Exporting to {path.name}")
        return self.worker

    def _on_exported(self, path: Path) -> None:
        self.status_label.setText(f"Exported the model to {path}.")
        show_info(f"Exported the model to {path}.")

    def _export_test_image(self, layer: Image | None, model: Any) -> np.ndarray | None:
        """The slice in view (2D model) or a slab around it (3D model) of a grey image; else None."""
        if layer is None or layer.rgb:
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        dims = int(model.spatial_dims)
        extra = data.ndim - dims - (1 if int(model.in_channels) > 1 else 0)
        if extra < 0 or (dims == 3 and extra > 0):
            return None
        if dims == 2 and extra > 0:
            step = self.viewer.dims.current_step[:extra]
            return np.asarray(data[tuple(min(int(s), n - 1) for s, n in zip(step, data.shape, strict=False))])
        if dims == 3:
            z = min(int(self.viewer.dims.current_step[0]), data.shape[0] - 1)
            start = max(0, min(z - TEST_SLAB // 2, data.shape[0] - TEST_SLAB))
            return np.asarray(data[start:start + TEST_SLAB])
        return np.asarray(data)
