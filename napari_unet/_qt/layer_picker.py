"""A combo box of the viewer's layers of one type, kept in sync with the layer list.

Layers a dock made for itself (a preview, an overlay) carry ``metadata[ROLE_KEY]`` and are not
offered: they are not inputs. The Fine-tune and Correct next docks share it.
"""

from __future__ import annotations

from napari.layers import Layer
from qtpy.QtWidgets import QComboBox, QWidget

__all__ = ["ROLE_KEY", "LayerPicker"]

ROLE_KEY = "napari_unet_role"  # layer metadata marking the helper layers a dock made


class LayerPicker(QComboBox):
    """A combo box of the viewer's layers of one type, kept in sync with the layer list."""

    def __init__(self, viewer, layer_type: type, parent: QWidget | None = None, *,
                 skip_tags: tuple[str, ...] = (ROLE_KEY,)):
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.skip_tags = skip_tags  # metadata keys that mark layers not to offer
        self._layers: list[Layer] = []
        for signal in self.viewer_events():
            signal.connect(self.refresh)
        self.refresh()

    def _wanted(self, layer: Layer) -> bool:
        return isinstance(layer, self.layer_type) and not any(layer.metadata.get(tag) for tag in self.skip_tags)

    def refresh(self, event=None) -> None:
        current = self.layer
        self._layers = [layer for layer in self.viewer.layers if self._wanted(layer)]
        for layer in self._layers:
            try:
                layer.events.name.disconnect(self._rename)
            except (TypeError, ValueError, RuntimeError):
                pass
            layer.events.name.connect(self._rename)
        self.blockSignals(True)
        self.clear()
        self.addItems([layer.name for layer in self._layers])
        index = self._layers.index(current) if current in self._layers else (0 if self._layers else -1)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if current is not self.layer:
            self.currentIndexChanged.emit(self.currentIndex())

    def _rename(self, event=None) -> None:
        for i, layer in enumerate(self._layers):
            self.setItemText(i, layer.name)

    @property
    def layer(self) -> Layer | None:
        index = self.currentIndex()
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def set_layer(self, layer: Layer) -> None:
        self.refresh()
        if layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer))

    def viewer_events(self) -> tuple:
        """The viewer's layer-list events the picker follows."""
        events = self.viewer.layers.events
        return events.inserted, events.removed, events.reordered

    def disconnect_viewer(self) -> None:
        for signal in self.viewer_events():
            signal.disconnect(self.refresh)
