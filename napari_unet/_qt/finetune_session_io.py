"""Save session… / Open session… of the Fine-tune dock.

:class:`SessionIOMixin` is mixed into :class:`~napari_unet._qt.finetune_widget.FinetuneWidget`: it
snapshots the layers, corrections, settings and shared model on the GUI thread, writes or reads a
:mod:`napari_unet.session` folder in a worker, shows an opened session as new layers, and from then
on keeps the session up to date through a :class:`~napari_unet.session.SessionAutosaver`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_warning
from qtpy.QtWidgets import QFileDialog

from napari_unet import session as sessions
from napari_unet._qt.finetune_layers import (
    display,
    layer_kwargs,
    raw_image_data,
    source_path,
)
from napari_unet._qt.workers import notify_error, start_worker
from napari_unet.corrections import CorrectionsError
from napari_unet.finetuning import StartModel
from napari_unet.session import SessionError

__all__ = ["SessionIOMixin"]


class SessionIOMixin:
    """Save and open sessions (a mixin of the Fine-tune widget)."""

    def _save_session_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the session in (a new or empty folder, or a session to replace)")
        if folder:
            self.save_session(folder)

    def _open_session_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a session folder")
        if folder:
            self.open_session(folder)

    def _session_snapshot(self) -> sessions.SessionData:
        """What Save session writes, copied on the GUI thread (the worker never touches layers)."""
        image, labels, state = self.image_layer, self.labels_layer, self.state
        if image is None or labels is None or state is None:
            raise CorrectionsError("Pick the image and the labels layer you correct before saving a session.")
        self.flush_autosave()
        source = source_path(image)
        holder = self.holder
        return sessions.SessionData(
            image_path=source,
            image=raw_image_data(image) if not source else None,  # an image without a file is kept inside
            image_fingerprint=self._fingerprint(image),
            image_name=image.name,
            labels=np.array(labels.data),
            labels_name=labels.name,
            state=state.copy(),
            settings=self.settings(),
            model=holder.model,
            checkpoint=holder.checkpoint,
            model_source=holder.source,
            model_trained=holder.trained,
            display={"image": display(image, "colormap", "contrast_limits", "blending"), "labels": display(labels)},
        )

    def save_session(self, folder: str | Path):
        """Save the session into ``folder`` in a worker; returns the worker (None if refused)."""
        if self.session_worker is not None:
            notify_error("A session is being saved or opened; wait a moment.")
            return None
        try:
            sessions.check_writable_folder(folder)  # plain words at once for the usual problem
            data = self._session_snapshot()
        except (ValueError, OSError) as exc:
            notify_error(exc)
            return None
        folder, labels = Path(folder).expanduser(), self.labels_layer

        def job():
            yield from ()
            sessions.save_session(folder, data)
            return folder

        self.session_label.setText(f"Saving the session to {folder}…")
        self.session_worker = start_worker(
            job(), on_return=lambda saved: self._follow_session(saved, labels, "saved to"),
            on_error=lambda exc: self.session_label.setText("The session was not saved; see the notification for why."),
            on_finished=self._session_job_finished, description="Saving the session",
        )
        return self.session_worker

    def open_session(self, folder: str | Path):
        """Open the session in ``folder`` (checked here, read in a worker); returns the worker or None."""
        if self.session_worker is not None:
            notify_error("A session is being saved or opened; wait a moment.")
            return None
        if self.is_training:
            notify_error("Stop the fine-tuning before opening a session.")
            return None
        try:
            sessions.check_session(folder)  # plain words at once for the usual problems
        except SessionError as exc:
            notify_error(exc)
            return None

        def job():
            yield from ()
            return sessions.load_session(folder)

        self.session_label.setText(f"Opening the session {folder}…")
        self.session_worker = start_worker(
            job(), on_return=self._apply_session,
            on_error=lambda exc: self.session_label.setText("The session could not be opened; see the notification for why."),
            on_finished=self._session_job_finished, description="Opening the session",
        )
        return self.session_worker

    def _session_job_finished(self) -> None:
        self.session_worker = None

    def _apply_session(self, data: sessions.SessionData) -> None:
        """Show an opened session: its image and labels as new layers, its corrections, settings, model."""
        self.flush_autosave()  # the work on the current layers stays on disk
        self._offered.add(data.image_fingerprint)  # its own autosave need not be offered back
        shown = data.display or {}
        image_shown, labels_shown = shown.get("image") or {}, shown.get("labels") or {}
        image_layer = self.viewer.add_image(
            data.image,
            name=data.image_name or image_shown.get("name") or "image",
            metadata={"napari_unet_source": data.image_path} if data.image_path else {},
            # an RGB image's scale has one axis less than its array
            **layer_kwargs(image_shown, (np.ndim(data.image), np.ndim(data.image) - 1),
                           "colormap", "contrast_limits", "blending"),
        )
        labels_layer = self.viewer.add_labels(
            data.labels,
            name=data.labels_name or f"{image_layer.name} labels",
            **layer_kwargs(labels_shown, (data.labels.ndim,)),
        )
        self._fingerprints[id(image_layer)] = data.image_fingerprint
        self.states[id(labels_layer)] = data.state
        self.image_picker.set_layer(image_layer)
        self.labels_picker.set_layer(labels_layer)
        self._labels_snapshot = np.array(data.labels)
        self.set_settings(data.settings)
        if data.model is not None:
            self.holder.set(data.model, checkpoint=data.checkpoint, source=data.model_source or f"session {data.folder}",
                            trained=data.model_trained)
            self.start_from.setCurrentIndex(StartModel.SHARED)  # fine-tune the session's model
        self.restore_box.setVisible(False)
        self._refresh_counts()
        for warning in data.warnings:
            show_warning(warning)
        self._follow_session(data.folder, labels_layer, "opened from")

    def _follow_session(self, folder: Path, labels: Labels | None, how: str) -> None:
        """From now on the work on ``labels`` (and its fine-tuning) is autosaved into ``folder``."""
        self.session = sessions.SessionAutosaver(folder)
        self._session_labels = labels if labels is not None and labels in self.viewer.layers else None
        if self.run is not None and self.is_training and self._run_labels is self._session_labels:
            self.run.session = self.session  # the running fine-tuning autosaves its weights there too
        text = (f"Session {how} {folder}. Labels and corrections are saved into it as you work, "
                f"the weights every {sessions.MODEL_AUTOSAVE_INTERVAL:.0f} s while fine-tuning.")
        self.session_label.setText(text)
        self.status_label.setText(f"Session {how} {folder}.")

    def _session_failed(self, session: sessions.SessionAutosaver | None, exc: BaseException) -> None:
        """An autosave into the session failed (folder gone, disk full): stop autosaving there."""
        if session is None or session is not self.session:
            return
        self.session = None
        self._session_labels = None
        self.session_label.setText(f"The session in {session.folder} is no longer updated: {exc}")
