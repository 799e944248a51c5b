"""The Fine-tune dock's corrections: the labels layer's paint events into a CorrectionState.

:class:`CorrectionsRecorder` is mixed into :class:`~napari_unet._qt.finetune_widget.FinetuneWidget`
(it uses the form's fields): it follows the chosen labels layer's ``paint`` and ``data`` events,
marks slices reviewed (button or Shift-R), keeps the counts line and the confirmed-pixels overlay
up to date, and autosaves a moment after the last edit (:mod:`._qt.finetune_autosave`).
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels, Layer
from napari.utils.notifications import show_info

from napari_unet._qt.workers import notify_error
from napari_unet.corrections import CorrectionState

__all__ = ["CorrectionsRecorder"]


class CorrectionsRecorder:
    """Records the corrections of the chosen labels layer (a mixin of the Fine-tune widget)."""

    @property
    def image_layer(self):
        return self.image_picker.layer

    @property
    def labels_layer(self) -> Labels | None:
        return self.labels_picker.layer

    @property
    def state(self) -> CorrectionState | None:
        """The corrections of the chosen labels layer (None when no labels layer is chosen)."""
        layer = self.labels_layer
        if layer is None:
            return None
        state = self.states.get(id(layer))
        shape = tuple(layer.data.shape)
        if state is None or state.shape != shape:
            if len(shape) not in (2, 3):
                return None
            state = CorrectionState(shape)
            self.states[id(layer)] = state
        return state

    def _on_labels_changed(self, index=None) -> None:
        layer = self.labels_layer
        if layer is self._labels_layer:
            return
        if self._labels_layer is not None:
            self.flush_autosave()
            self._unfollow_labels()
        self._labels_layer = layer
        self._labels_snapshot = None
        if layer is not None:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self._on_labels_data_replaced)
        self.confirmed_overlay.remove()
        self._refresh_counts()

    def _unfollow_labels(self) -> None:
        self._labels_layer.events.paint.disconnect(self._on_paint)
        self._labels_layer.events.data.disconnect(self._on_labels_data_replaced)

    def _on_paint(self, event) -> None:
        state = self.state
        if state is None:
            return
        if state.record_history_atoms(event.value):
            self._edited()

    def _on_labels_data_replaced(self, event=None) -> None:
        """The labels layer got new data (e.g. a new prediction): keep the user's corrections.

        Confirmed pixels get back the values they had at the last autosave; a layer of another
        shape starts a new set of corrections (the old ones stay on disk).
        """
        layer = self._labels_layer
        state = self.states.get(id(layer)) if layer is not None else None
        if self._restoring_data or layer is None or state is None or state.is_empty:
            self._refresh_counts()
            return
        snapshot = self._labels_snapshot
        if tuple(layer.data.shape) != state.shape or snapshot is None or snapshot.shape != state.shape:
            self._refresh_counts()
            return
        confirmed = state.confirmed_mask(0)
        data = np.array(layer.data)
        if np.array_equal(data[confirmed], snapshot[confirmed]):
            return
        data[confirmed] = snapshot[confirmed]
        self._restoring_data = True
        try:
            layer.data = data
        finally:
            self._restoring_data = False
        show_info(f"Your corrections on '{layer.name}' were kept on top of the new labels.")

    def current_slice(self, layer: Layer | None = None) -> int | None:
        """The index along axis 0 of ``layer`` (default: the labels) that the viewer shows."""
        layer = layer or self.labels_layer
        if layer is None or layer.ndim < 3:
            return None
        data_point = layer.world_to_data(self.viewer.dims.point)
        return int(np.clip(np.round(data_point[0]), 0, layer.data.shape[0] - 1))

    def _shortcut_mark_reviewed(self, viewer=None) -> None:
        self.mark_current_slice_reviewed()

    def mark_current_slice_reviewed(self) -> None:
        """Mark the slice in view (or a sub-volume of ``Review depth`` slices) as reviewed."""
        state = self._state_or_warn()
        if state is None:
            return
        z = self.current_slice()
        depth = int(self.review_depth.value())
        if state.ndim == 2:
            state.mark_reviewed()
            text = "Image marked as reviewed."
        elif depth <= 1:
            state.mark_reviewed(z)
            text = f"Slice {z} marked as reviewed."
        else:
            start = max(0, z - (depth - 1) // 2)
            box = state.mark_region((slice(start, min(state.shape[0], start + depth)), slice(None), slice(None)))
            text = f"Slices {box[0][0]}-{box[0][1] - 1} marked as reviewed."
        self.status_label.setText(text)
        self._edited()

    def unmark_current_slice(self) -> None:
        state = self._state_or_warn()
        if state is None:
            return
        state.unmark_reviewed(self.current_slice())
        self._edited()

    def forget_current_strokes(self) -> None:
        state = self._state_or_warn()
        if state is None:
            return
        state.forget_painted(self.current_slice())
        self._edited()

    def _state_or_warn(self) -> CorrectionState | None:
        state = self.state
        if state is None:
            notify_error("Pick the labels layer you are correcting first (a (Y, X) or (Z, Y, X) labels layer).")
        return state

    def _schedule_counts(self, *args) -> None:
        self._counts_timer.start()

    def _refresh_counts(self) -> None:
        state = self.state
        if state is None:
            self.counts_label.setText("No labels layer to correct yet.")
            return
        self.counts_label.setText(state.counts(self.margin_spin.value()).describe())
        self._update_confirmed_overlay()

    # -- confirmed overlay ---------------------------------------------------------------------

    @property
    def confirmed_layer(self):
        """The confirmed-pixels overlay layer (None while it is off)."""
        return self.confirmed_overlay.layer

    def _toggle_confirmed_overlay(self, on: bool) -> None:
        if on:
            self._update_confirmed_overlay()
        else:
            self.confirmed_overlay.remove()

    def _update_confirmed_overlay(self) -> None:
        state, labels = self.state, self.labels_layer
        if not self.show_confirmed.isChecked() or state is None or labels is None:
            return
        self.confirmed_overlay.show(state.confirmed_mask(self.margin_spin.value()), labels)
