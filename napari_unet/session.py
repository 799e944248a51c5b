"""Sessions: one folder that holds everything needed to go on correcting and fine-tuning later.

A session folder holds::

    session.json                     the manifest (format name and version, what the other files are)
    corrections.<token>.npz          labels + painted pixels + reviewed slices/regions
                                     (the :func:`~napari_unet.corrections.save_corrections` format)
    model.<token>.pt                 the model (a :func:`~napari_unet.checkpoint.save_checkpoint` file)
    image.<token>.npy                only for an image that was not opened from a file

The manifest names the image file (absolute path, and relative to the session folder so that the
two can move together), its :func:`~napari_unet.corrections.image_fingerprint`, the Fine-tune
settings (:meth:`FinetuneSettings.to_dict`) and how the layers were shown.

**Atomic.** Data files get a fresh token in their name at every save and are written (each one
atomically) before the manifest; the manifest is then swapped in with ``os.replace``, and only
after that are the files of the previous manifest deleted. The manifest is the commit point: a
crash at any moment leaves either the old session whole or the new one whole (stray files of an
interrupted save are ignored and cleaned up by the next save). A folder without a manifest is
not a session (:class:`SessionError`).

**Autosave.** :class:`SessionAutosaver` keeps an open session up to date while the user works:
the corrections at the widget's autosave cadence (:meth:`~SessionAutosaver.save_corrections`), and
during fine-tuning the current weights at validation and preview events, at most every
``model_interval`` seconds (:meth:`~SessionAutosaver.on_training_event`). Killing the process
loses at most that interval.

Pure Python + NumPy + the engine: no napari or Qt imports.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from napari_unet.corrections import (
    CorrectionsError,
    CorrectionState,
    FinetuneSettings,
    image_fingerprint,
    load_corrections,
    save_corrections,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_AUTOSAVE_INTERVAL",
    "SessionAutosaver",
    "SessionData",
    "SessionError",
    "check_session",
    "check_writable_folder",
    "is_session",
    "load_session",
    "read_manifest",
    "save_session",
]

FORMAT_NAME = "napari-unet-session"
FORMAT_VERSION = 1
MANIFEST_NAME = "session.json"
MODEL_AUTOSAVE_INTERVAL = 15.0  # seconds: the most fine-tuning a crash can lose
LAZY_BYTES = 1 << 30  # images bigger than this are opened lazily (as the napari reader does)

# files a session writes: "<kind>.<12 hex>.<ext>", and the temporary files of an unfinished write
_DATA_FILE = re.compile(r"^(corrections|model|image)\.[0-9a-f]{12}\.(npz|pt|npy)$")
_TEMP_FILE = re.compile(r"^\.(tmp-|session\.json\.|corrections\.|model\.|image\.).*")


class SessionError(ValueError):
    """A session cannot be saved or opened; the message says why in one plain sentence."""


@dataclass
class SessionData:
    """What a session holds (given to :func:`save_session`, returned by :func:`load_session`).

    ``image_path`` is the image file ("" for an image kept inside the session, then ``image`` is
    required to save). ``model`` is any ``build_model`` model (None: the session has no model);
    ``checkpoint`` (a loaded :class:`~napari_unet.checkpoint.Checkpoint`) lends its class names,
    history and provenance when it belongs to ``model``. ``display`` is free-form (the widget keeps
    layer names, scale and translate there). After loading, ``image`` holds the image array (lazy
    for big files), ``image_meta`` what :func:`~napari_unet.io.read_image_with_metadata` said,
    ``checkpoint``/``model`` the model, ``warnings`` plain sentences to show (e.g. the image file
    changed since the session was saved).
    """

    image_path: str
    labels: np.ndarray
    state: CorrectionState
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)
    image_name: str = ""
    labels_name: str = ""
    image_fingerprint: str = ""
    image: Any = None
    model: Any = None
    checkpoint: Any = None
    model_source: str = ""
    model_trained: bool = True
    display: dict = field(default_factory=dict)
    # filled by load_session
    folder: Path | None = None
    manifest: dict = field(default_factory=dict)
    image_meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Small helpers


_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(folder: Path) -> threading.RLock:
    """One lock per session folder: saves and autosaves of one process never interleave."""
    key = os.path.normcase(os.path.abspath(folder))
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.RLock())


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


def _token() -> str:
    return uuid.uuid4().hex[:12]


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _package_version() -> str:
    try:
        from napari_unet import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def _plain_words(exc: BaseException) -> str:
    text = str(getattr(exc, "strerror", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def settings_from_dict(values: dict) -> FinetuneSettings:
    """FinetuneSettings from a saved dict; keys this version does not know are ignored."""
    known = {f.name for f in fields(FinetuneSettings)}
    try:
        return FinetuneSettings(**{k: v for k, v in dict(values or {}).items() if k in known})
    except TypeError as exc:
        raise SessionError(f"The saved Fine-tune settings are damaged: {exc}.") from exc


# ---------------------------------------------------------------------------------------------
# The manifest


def is_session(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds a session manifest of this format (any version)."""
    try:
        read_manifest(folder, check_version=False)
    except SessionError:
        return False
    return True


def read_manifest(folder: str | os.PathLike, *, check_version: bool = True) -> dict:
    """The manifest of the session in ``folder``; SessionError for a missing, damaged, foreign or
    newer one."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise SessionError(f"There is no session folder at {folder}.")
    if not folder.is_dir():
        raise SessionError(f"{folder} is a file, not a session folder.")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        if any(_DATA_FILE.match(p.name) or _TEMP_FILE.match(p.name) for p in folder.iterdir()):
            raise SessionError(
                f"The session in {folder} is incomplete (its {MANIFEST_NAME} is missing): its first save was interrupted."
            )
        raise SessionError(f"{folder} is not a napari-unet session (it has no {MANIFEST_NAME}).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionError(f"The session manifest {path} is damaged and cannot be read ({_plain_words(exc)}).") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SessionError(f"{folder} is not a napari-unet session ({MANIFEST_NAME} belongs to something else).")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 1:
        raise SessionError(f"The session manifest {path} is damaged (no valid format version).")
    if check_version and version > FORMAT_VERSION:
        raise SessionError(
            f"The session in {folder} was saved by a newer napari-unet (session format {version}; this version "
            f"reads up to {FORMAT_VERSION}): update napari-unet to open it."
        )
    return manifest


def _check_entries(manifest: dict, folder: Path) -> None:
    """The manifest names its files, and they exist."""
    try:
        corrections = manifest["corrections"]["file"]
        image = manifest["image"]
        image_name_ok = isinstance(image.get("path", ""), str) and isinstance(image.get("fingerprint", ""), str)
    except (KeyError, TypeError, AttributeError) as exc:
        raise SessionError(f"The session manifest in {folder} is damaged (no entry {exc}).") from exc
    if not image_name_ok:
        raise SessionError(f"The session manifest in {folder} is damaged (the image entry is not valid).")
    names = [corrections]
    if manifest.get("model"):
        names.append(manifest["model"].get("file"))
    if image.get("embedded"):
        names.append(image["embedded"])
    for name in names:
        if not isinstance(name, str) or not _DATA_FILE.match(name):
            raise SessionError(f"The session manifest in {folder} is damaged (bad file name {name!r}).")
        if not (folder / name).is_file():
            raise SessionError(f"The session in {folder} is damaged: its file {name} is missing.")


def _image_candidates(manifest: dict, folder: Path) -> list[Path]:
    image = manifest["image"]
    if image.get("embedded"):
        return [folder / image["embedded"]]
    found = []
    if image.get("path"):
        found.append(Path(image["path"]).expanduser())
    if image.get("relative_path"):
        found.append((folder / image["relative_path"]).resolve())
    return found


def _image_file(manifest: dict, folder: Path) -> Path:
    """The session's image file (the absolute path, else the path relative to the session)."""
    candidates = _image_candidates(manifest, folder)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    where = candidates[0] if candidates else "(no path)"
    raise SessionError(
        f"The image of this session, {where}, is gone (moved, renamed or deleted): put it back there and open the "
        "session again."
    )


def check_session(folder: str | os.PathLike) -> dict:
    """Quick checks before opening (manifest, files, image file present); returns the manifest."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    _check_entries(manifest, folder)
    _image_file(manifest, folder)
    return manifest


# ---------------------------------------------------------------------------------------------
# Writing


def check_writable_folder(folder: str | os.PathLike) -> None:
    """SessionError unless ``folder`` is new, empty or a session (the only things a session may replace)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SessionError(f"{folder} is a file: pick a folder for the session.")
    if not folder.exists():
        return
    entries = list(folder.iterdir())
    if not entries:
        return
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = {"format": FORMAT_NAME}  # a damaged session of ours may be replaced
        if isinstance(data, dict) and data.get("format") == FORMAT_NAME:
            return
        raise SessionError(f"{folder} holds something that is not a napari-unet session: pick an empty folder.")
    if all(_DATA_FILE.match(p.name) or _TEMP_FILE.match(p.name) for p in entries):
        return  # the leftovers of an interrupted first save
    raise SessionError(
        f"{folder} already holds other files: pick an empty folder (or a new one) or an existing session to replace."
    )


def _write_manifest(folder: Path, manifest: dict) -> None:
    """The commit point: the new manifest replaces the old one in one rename."""
    path = folder / MANIFEST_NAME
    temporary = folder / f".{MANIFEST_NAME}.{_token()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, indent=2, sort_keys=False)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(folder)


def _referenced(manifest: dict) -> set[str]:
    names = {MANIFEST_NAME}
    try:
        names.add(manifest["corrections"]["file"])
    except (KeyError, TypeError):
        pass
    if manifest.get("model"):
        names.add(manifest["model"].get("file"))
    if isinstance(manifest.get("image"), dict) and manifest["image"].get("embedded"):
        names.add(manifest["image"]["embedded"])
    return names


def _clean_up(folder: Path, manifest: dict) -> None:
    """Delete the session files the manifest no longer names (old saves, interrupted writes)."""
    keep = _referenced(manifest)
    for path in folder.iterdir():
        if path.name in keep or not (_DATA_FILE.match(path.name) or _TEMP_FILE.match(path.name)):
            continue
        try:
            path.unlink()
        except OSError:  # a file another program holds open: the next save tries again
            pass


def _save_corrections_file(folder: Path, state: CorrectionState, labels: np.ndarray, meta: dict,
                           written: list[Path]) -> str:
    name = f"corrections.{_token()}.npz"
    written.append(folder / name)  # before writing: a failure midway removes it
    try:
        save_corrections(folder / name, state, labels, **meta)
    except CorrectionsError as exc:
        raise SessionError(str(exc)) from exc
    return name


def _save_model_file(folder: Path, written: list[Path], model: Any, checkpoint: Any = None, **overrides: Any) -> str:
    from napari_unet import checkpoint as checkpoints

    name = f"model.{_token()}.pt"
    written.append(folder / name)
    kwargs: dict[str, Any] = {}
    if checkpoint is not None and getattr(checkpoint, "model", None) is model:
        kwargs = {
            "normalization": checkpoint.normalization,
            "class_names": checkpoint.class_names,
            "history": checkpoint.history,
            "provenance": checkpoint.provenance,
            "extra": checkpoint.extra,
        }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        checkpoints.save_checkpoint(folder / name, model, **kwargs)
    except checkpoints.CheckpointError as exc:
        raise SessionError(f"Could not save the model into the session: {exc}.") from exc
    return name


def _save_embedded_image(folder: Path, image: Any, written: list[Path]) -> str:
    name = f"image.{_token()}.npy"
    written.append(folder / name)
    temporary = folder / f".{name}.tmp"
    try:
        with open(temporary, "wb") as stream:
            np.save(stream, np.asarray(image), allow_pickle=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, folder / name)
    finally:
        temporary.unlink(missing_ok=True)
    return name


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), folder.resolve())
    except ValueError:  # another drive (Windows)
        return ""


def _plain_display(display: dict) -> dict:
    """The display dict as JSON (tuples to lists, numpy numbers to Python ones)."""
    try:
        return json.loads(json.dumps(display or {}, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
    except (TypeError, ValueError):
        return {}


def save_session(folder: str | os.PathLike, data: SessionData) -> Path:
    """Write ``data`` as the session in ``folder`` atomically; returns the manifest's path.

    ``folder`` must be new, empty or an existing session (which is replaced only once the new
    one is completely written). SessionError in plain words when it cannot be written.
    """
    folder = Path(folder).expanduser()
    labels = np.asarray(data.labels)
    if tuple(labels.shape) != data.state.shape:
        raise SessionError(
            f"The labels have shape {labels.shape} but the corrections were recorded on {data.state.shape}."
        )
    image_path = Path(data.image_path).expanduser().absolute() if data.image_path else None
    if image_path is None and data.image is None:
        raise SessionError("The session needs the image: its file path, or the image itself.")
    if image_path is not None and not image_path.exists():
        raise SessionError(f"The image file {image_path} does not exist.")
    fingerprint = data.image_fingerprint
    image_shape = list(data.image.shape) if data.image is not None else None
    if not fingerprint or image_shape is None:
        image = data.image
        if image is None:
            image = _read_image(image_path)[0]
        fingerprint = fingerprint or image_fingerprint(image)
        image_shape = [int(s) for s in image.shape]
    if tuple(image_shape[-labels.ndim:]) != tuple(labels.shape):
        raise SessionError(
            f"The image has shape {tuple(image_shape)} but the labels have shape {tuple(labels.shape)}; "
            "a session keeps labels made for its image."
        )

    with _lock(folder):
        check_writable_folder(folder)
        written: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            meta = {
                "fingerprint": fingerprint,
                "image_name": data.image_name,
                "image_source": str(image_path or ""),
                "margin": int(data.settings.margin),
            }
            corrections = _save_corrections_file(folder, data.state, labels, meta, written)
            model_entry = None
            if data.model is not None:
                model_file = _save_model_file(folder, written, data.model, data.checkpoint)
                model_entry = {
                    "file": model_file,
                    "source": data.model_source,
                    "trained": bool(data.model_trained),
                    "saved_at": _now(),
                    "autosaved": False,
                }
            embedded = None
            if image_path is None:
                embedded = _save_embedded_image(folder, data.image, written)
            manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "saved_at": _now(),
                "saved_by": f"napari-unet {_package_version()}",
                "image": {
                    "path": str(image_path or ""),
                    "relative_path": _relative(image_path, folder) if image_path else "",
                    "embedded": embedded,
                    "name": data.image_name,
                    "fingerprint": fingerprint,
                    "shape": [int(s) for s in image_shape],
                },
                "labels": {"name": data.labels_name, "shape": list(labels.shape), "dtype": str(labels.dtype)},
                "corrections": {"file": corrections, "saved_at": _now(), **_counts(data.state, data.settings.margin)},
                "model": model_entry,
                "settings": data.settings.to_dict(),
                "display": _plain_display(data.display),
            }
            _write_manifest(folder, manifest)
        except BaseException as exc:
            for path in written:  # never leave an unreferenced half of a session behind
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise SessionError(f"Could not write the session to {folder}: {_plain_words(exc)}.") from exc
            raise
        _clean_up(folder, manifest)
    return folder / MANIFEST_NAME


def _counts(state: CorrectionState, margin: int) -> dict:
    counts = state.counts(int(margin))
    return {
        "confirmed_pixels": counts.confirmed,
        "painted_pixels": counts.painted,
        "reviewed_slices": list(counts.reviewed_slices),
        "reviewed_regions": counts.reviewed_regions,
    }


# ---------------------------------------------------------------------------------------------
# Reading


def _read_image(path: Path) -> tuple[Any, dict]:
    from napari_unet import io

    try:
        lazy = _is_big(path)
        return io.read_image_with_metadata(path, lazy=lazy)
    except (io.ImageIOError, OSError) as exc:
        raise SessionError(f"Could not read the session's image {path}: {_plain_words(exc)}.") from exc


def _is_big(path: Path) -> bool:
    if path.suffix.lower() == ".zarr" or (path / ".zarray").exists() or (path / "zarr.json").exists():
        return True
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) > LAZY_BYTES
    return path.suffix.lower() != ".png" and path.stat().st_size > LAZY_BYTES


def load_session(folder: str | os.PathLike, *, read_image: bool = True, map_location: Any = "cpu") -> SessionData:
    """Open the session in ``folder``: corrections, labels, settings, model and (by default) image.

    SessionError in plain words for a missing, incomplete, damaged, foreign or newer session, and
    when the image file is gone (``read_image=False`` skips the image: the rest still opens).
    """
    from napari_unet.checkpoint import CheckpointError, load_checkpoint

    folder = Path(folder).expanduser()
    with _lock(folder):  # not while an autosave of this process swaps files
        manifest = read_manifest(folder)
        _check_entries(manifest, folder)
        try:
            saved = load_corrections(folder / manifest["corrections"]["file"])
        except CorrectionsError as exc:
            raise SessionError(f"The corrections of the session in {folder} are damaged: {exc}") from exc
        checkpoint = None
        model_entry = manifest.get("model") or None
        if model_entry:
            try:
                checkpoint = load_checkpoint(folder / model_entry["file"], map_location=map_location)
            except CheckpointError as exc:
                raise SessionError(f"The model of the session in {folder} cannot be loaded: {exc}.") from exc
    image_entry = manifest["image"]
    data = SessionData(
        image_path=str(image_entry.get("path", "")),
        labels=saved.labels,
        state=saved.state,
        settings=settings_from_dict(manifest.get("settings") or {}),
        image_name=str(image_entry.get("name", "")),
        labels_name=str((manifest.get("labels") or {}).get("name", "")),
        image_fingerprint=str(image_entry.get("fingerprint", "")),
        model=checkpoint.model if checkpoint is not None else None,
        checkpoint=checkpoint,
        model_source=str((model_entry or {}).get("source", "")),
        model_trained=bool((model_entry or {}).get("trained", True)),
        display=dict(manifest.get("display") or {}),
        folder=folder,
        manifest=manifest,
    )
    if read_image:
        path = _image_file(manifest, folder)
        image, meta = _read_image(path)
        if not image_entry.get("embedded"):
            data.image_path = str(path)
        shape = tuple(int(s) for s in image.shape)
        if shape[-data.labels.ndim:] != tuple(data.labels.shape):
            raise SessionError(
                f"The image {path} has shape {shape} now, but the session's labels have shape "
                f"{tuple(data.labels.shape)}: it is not the image the session was saved with."
            )
        if data.image_fingerprint and image_fingerprint(image) != data.image_fingerprint:
            data.warnings.append(
                f"The image {path} has changed since the session was saved; check that the labels still fit it."
            )
        data.image, data.image_meta = image, meta
    return data


# ---------------------------------------------------------------------------------------------
# Autosave into an open session


def _update(folder: Path, change) -> dict:
    """Apply ``change(manifest, folder, written)`` (it lists the files it writes in ``written``)
    and commit; the session must exist."""
    with _lock(folder):
        manifest = read_manifest(folder)
        written: list[Path] = []
        try:
            change(manifest, folder, written)
            manifest["saved_at"] = _now()
            _write_manifest(folder, manifest)
        except BaseException as exc:
            for path in written:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise SessionError(f"Could not update the session in {folder}: {_plain_words(exc)}.") from exc
            raise
        _clean_up(folder, manifest)
        return manifest


class SessionAutosaver:
    """Keeps the session in ``folder`` up to date while it is worked on (thread-safe).

    * :meth:`save_corrections` after edits (the Fine-tune widget calls it on its corrections
      autosave cadence: 1.5 s after the last edit, at most 5 s late);
    * :meth:`on_training_event` with each event of a fine-tuning: at a validation or preview
      event, the weights being trained are saved when the last save is ``model_interval``
      seconds old or more (:meth:`attach` does it through the Trainer's callbacks);
    * :meth:`save_model` at the end of a fine-tuning (``force=True``).

    Each call commits a complete new manifest (see the module docstring): a crash never leaves
    a session that does not open.
    """

    def __init__(self, folder: str | os.PathLike, *, model_interval: float = MODEL_AUTOSAVE_INTERVAL):
        self.folder = Path(folder).expanduser()
        self.model_interval = float(model_interval)
        self._written_revision = -1
        self._last_model_save = -float("inf")
        self._guard = threading.Lock()
        self.last_corrections_save: float | None = None
        self.last_model_step: int | None = None

    def save_corrections(
        self, state: CorrectionState, labels: np.ndarray, *, settings: FinetuneSettings | None = None
    ) -> bool:
        """Save the corrections and labels; False when a newer snapshot was already written."""
        labels = np.asarray(labels)
        with self._guard:
            if state.revision < self._written_revision:
                return False

            def change(manifest: dict, folder: Path, written: list[Path]) -> None:
                if list(labels.shape) != list(manifest.get("labels", {}).get("shape", labels.shape)):
                    raise SessionError(
                        f"These labels (shape {labels.shape}) are not the session's (shape "
                        f"{tuple(manifest['labels']['shape'])})."
                    )
                margin = settings.margin if settings is not None else manifest.get("settings", {}).get("margin", 0)
                image = manifest["image"]
                name = _save_corrections_file(folder, state, labels, {
                    "fingerprint": image.get("fingerprint", ""),
                    "image_name": image.get("name", ""),
                    "image_source": image.get("path", ""),
                    "margin": int(margin),
                }, written)
                manifest["corrections"] = {"file": name, "saved_at": _now(), **_counts(state, int(margin))}
                if settings is not None:
                    manifest["settings"] = settings.to_dict()

            _update(self.folder, change)
            self._written_revision = state.revision
            self.last_corrections_save = time.monotonic()
            return True

    def save_model(
        self,
        model: Any,
        *,
        checkpoint: Any = None,
        source: str | None = None,
        trained: bool = True,
        step: int | None = None,
        force: bool = True,
        autosaved: bool = False,
        normalization: dict | None = None,
        history: dict | None = None,
        provenance: dict | None = None,
        settings: FinetuneSettings | None = None,
    ) -> bool:
        """Save ``model`` as the session's model (and ``settings``, if given); without ``force``
        only every ``model_interval`` seconds."""
        with self._guard:
            now = time.monotonic()
            if not force and now - self._last_model_save < self.model_interval:
                return False

            def change(manifest: dict, folder: Path, written: list[Path]) -> None:
                name = _save_model_file(
                    folder, written, model, checkpoint, normalization=normalization, history=history, provenance=provenance
                )
                previous = manifest.get("model") or {}
                manifest["model"] = {
                    "file": name,
                    "source": source if source is not None else previous.get("source", ""),
                    "trained": bool(trained),
                    "saved_at": _now(),
                    "autosaved": bool(autosaved),
                    "step": step,
                }
                if settings is not None:
                    manifest["settings"] = settings.to_dict()

            _update(self.folder, change)
            self._last_model_save = time.monotonic()
            self.last_model_step = step
            return True

    def on_training_event(self, trainer: Any, event: Any) -> bool:
        """Save the weights being trained at a validation or preview event, if due; True if saved.

        Call it from the thread that runs the trainer (between steps the weights are still).
        """
        if getattr(event, "kind", None) not in ("validation", "preview"):
            return False
        if time.monotonic() - self._last_model_save < self.model_interval:
            return False
        # the averaged weights that validation and previews use, when the trainer keeps them
        model = getattr(trainer, "evaluated_model", None)
        if model is None:
            model = trainer.model
        step = int(getattr(event, "step", 0) or 0)
        return self.save_model(
            model,
            source=f"autosaved during fine-tuning (step {step})",
            step=step,
            force=False,
            autosaved=True,
            normalization=getattr(trainer, "normalization", None),
            history=dict(getattr(trainer, "history", {}) or {}),
            provenance={"kind": "session-autosave", "steps": step},
        )

    def attach(self, trainer: Any) -> None:
        """Autosave through ``trainer``'s callbacks (for ``fit()``; a ``run()`` loop may call
        :meth:`on_training_event` itself instead)."""
        trainer.callbacks.append(lambda event: self.on_training_event(trainer, event))
