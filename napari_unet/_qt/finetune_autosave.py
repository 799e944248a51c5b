"""The Fine-tune dock's autosave of the corrections, and the offer to restore them.

:class:`AutosaveMixin` is mixed into :class:`~napari_unet._qt.finetune_widget.FinetuneWidget`: a
moment after the last edit (at most 5 s late) it snapshots the corrections on the GUI thread and
writes them in a worker with the engine's :class:`~napari_unet.finetuning.AutosaveWriter` (and into
the open session, if any); :meth:`~AutosaveMixin.flush_autosave` writes at once (closing, switching
layers). When an image is chosen whose corrections were saved before, a banner offers them back.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QFileDialog

from napari_unet import session as sessions
from napari_unet._qt.finetune_layers import raw_image_data, source_path
from napari_unet._qt.workers import notify_error, start_worker
from napari_unet.corrections import (
    CorrectionsError,
    default_autosave_folder,
    find_autosave,
    image_fingerprint,
    load_corrections,
)
from napari_unet.finetuning import AutosaveTarget, autosave_snapshot, save_job

__all__ = ["AUTOSAVE_DELAY_MS", "AUTOSAVE_MAX_DELAY_S", "AutosaveMixin"]

AUTOSAVE_DELAY_MS = 1500  # save this long after the last edit...
AUTOSAVE_MAX_DELAY_S = 5.0  # ...but never let unsaved strokes get older than this


class AutosaveMixin:
    """Autosave and restore of the corrections (a mixin of the Fine-tune widget)."""

    def _edited(self) -> None:
        """After any change to the corrections: schedule the autosave and the counts."""
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
        if time.monotonic() - self._unsaved_since > AUTOSAVE_MAX_DELAY_S:
            self.autosave()  # a long run of edits: do not postpone forever
        else:
            self._autosave_timer.start()
        self._schedule_counts()

    def _fingerprint(self, layer) -> str:
        key = id(layer)
        if key not in self._fingerprints:
            self._fingerprints[key] = image_fingerprint(raw_image_data(layer))
        return self._fingerprints[key]

    def _autosave_folder(self) -> Path | None:
        text = self.autosave_folder.text().strip()
        return Path(text).expanduser() if text else None

    def autosave_path(self) -> Path | None:
        """Where the chosen image's corrections are saved (None without an image)."""
        return self._target.path if self._target is not None else None

    def _make_target(self) -> AutosaveTarget | None:
        image = self.image_layer
        if image is None:
            return None
        return AutosaveTarget.for_image(tuple(raw_image_data(image).shape), image.name, self._fingerprint(image),
                                        source_path(image), self._autosave_folder())

    def _autosave_snapshot(self) -> tuple | None:
        """Copies of what to save, taken on the GUI thread (the worker never touches layers).

        Uses the layer whose strokes were recorded and the image chosen when they were made, so
        that a layer deleted or a picker switched a moment after an edit still gets it saved.
        """
        labels = self._labels_layer
        state = self.states.get(id(labels)) if labels is not None else None
        snapshot = autosave_snapshot(self._target, state, labels.data if labels is not None else None,
                                     int(self.margin_spin.value()))
        if snapshot is not None:
            self._labels_snapshot = snapshot[2]
        return snapshot

    def _session_of_labels(self) -> sessions.SessionAutosaver | None:
        labels = self._labels_layer
        return self.session if labels is not None and labels is self._session_labels else None

    def autosave(self) -> None:
        """Save the corrections now, in a worker (called by the debounce timer)."""
        self._autosave_timer.stop()
        snapshot = self._autosave_snapshot()
        self._unsaved_since = None
        if snapshot is None:
            return
        path = snapshot[0]
        session = self._session_of_labels()
        start_worker(
            save_job(self._writer, *snapshot, session=session, settings=self.settings()),
            on_return=lambda saved: self._autosaved(saved or path),
            on_error=lambda exc: self._session_failed(session, exc),
            description="Saving corrections",
        )

    def flush_autosave(self) -> Path | None:
        """Save pending corrections right away, on this thread (closing, switching layers)."""
        if self._unsaved_since is None and not self._autosave_timer.isActive():
            return self.last_autosave
        self._autosave_timer.stop()
        self._unsaved_since = None
        snapshot = self._autosave_snapshot()
        if snapshot is None:
            return None
        try:
            saved = self._writer.write(*snapshot)
        except OSError as exc:
            notify_error(f"Could not save the corrections to {snapshot[0]}: {exc.strerror or exc}.")
            return None
        session = self._session_of_labels()
        if session is not None:
            try:
                session.save_corrections(snapshot[1], snapshot[2], settings=self.settings())
            except (OSError, ValueError) as exc:
                notify_error(exc)
                self._session_failed(session, exc)
        self._autosaved(saved or snapshot[0])
        return self.last_autosave

    def _autosaved(self, path: Path) -> None:
        self.last_autosave = Path(path)
        self.autosave_label.setText(f"Corrections saved to {path} at {dt.datetime.now():%H:%M:%S}.")

    def _on_image_changed(self, index=None) -> None:
        """A different image (or autosave folder): save for the old one, offer the new one's."""
        self.flush_autosave()
        self._target = self._make_target()
        self.restore_box.setVisible(False)
        image = self.image_layer
        if image is None:
            return
        fingerprint = self._fingerprint(image)
        folders = [default_autosave_folder()]
        if self._autosave_folder() is not None:
            folders.insert(0, self._autosave_folder())
        source = source_path(image)
        if source:
            folders.insert(0, Path(source).parent)
        found = find_autosave(fingerprint, dict.fromkeys(folders))
        if found is None or found == self.last_autosave:
            return
        try:
            saved = load_corrections(found)
        except CorrectionsError as exc:
            notify_error(exc)
            return
        self._pending_restore = found
        self.restore_label.setText(f"Saved corrections found for '{image.name}': {saved.describe()}.")
        self.restore_box.setVisible(True)
        if fingerprint not in self._offered:
            self._offered.add(fingerprint)
            show_info(f"Saved corrections found for '{image.name}': press Restore in the Fine-tune dock to get them back.")

    def restore_corrections(self) -> Labels | None:
        """Add the saved corrections as a new labels layer and follow it (never overwrites a layer)."""
        image, path = self.image_layer, self._pending_restore
        if image is None or path is None:
            return None
        try:
            saved = load_corrections(path)
        except CorrectionsError as exc:
            notify_error(exc)
            return None
        layer = self.viewer.add_labels(
            saved.labels,
            name=f"{image.name} corrections",
            scale=image.scale[-saved.labels.ndim :],
            translate=image.translate[-saved.labels.ndim :],
        )
        self.states[id(layer)] = saved.state
        self.margin_spin.setValue(int(saved.meta.get("margin", self.margin_spin.value())))
        self.labels_picker.set_layer(layer)
        self._labels_snapshot = np.array(saved.labels)
        self.last_autosave = path
        self.restore_box.setVisible(False)
        self._refresh_counts()
        self.status_label.setText(f"Corrections restored from {path}.")
        return layer

    def _browse_autosave_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save corrections in")
        if folder:
            self.autosave_folder.setText(folder)
            self._on_image_changed()
