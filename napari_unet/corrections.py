"""What the user confirmed while correcting a prediction, and how it becomes fine-tuning data.

A biologist corrects a predicted labels map by painting, filling and erasing, and marks whole
slices (2D stacks) or sub-volumes (3D) as "reviewed" once the prediction there is right. Only
those pixels are trusted: everything else is *unlabelled* and gets weight 0 in the loss (it is not
treated as background).

:class:`CorrectionState` records the painted pixels and the reviewed slices/regions, turns them into
a confirmed mask and a weight map, and saves itself (with the corrected label values) atomically
so that a crash loses at most the last few seconds of strokes. :func:`build_finetune_trainer` is
the one place that turns an image, its corrected labels and a state into a :class:`~napari_unet.
training.Trainer`; the Fine-tune widget and ``benchmarks/human_in_the_loop.py`` both use it.

Pure Python + NumPy (+ the engine): no napari or Qt imports, so it runs headless.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "AUTOSAVE_SUFFIX",
    "CorrectionCounts",
    "CorrectionState",
    "CorrectionsError",
    "FinetuneSettings",
    "SavedCorrections",
    "autosave_path_for",
    "build_finetune_trainer",
    "default_autosave_folder",
    "find_autosave",
    "finetune_provenance",
    "image_fingerprint",
    "load_corrections",
    "save_corrections",
    "training_arrays",
]

AUTOSAVE_SUFFIX = ".corrections.npz"
FORMAT_VERSION = 1

Box = tuple[tuple[int, int], ...]  # one (start, stop) pair per axis, stop exclusive


class CorrectionsError(ValueError):
    """Corrections that cannot be used: nothing confirmed, shapes that differ, an unreadable file."""


# ---------------------------------------------------------------------------------------------
# Recording what the user confirmed


@dataclass(frozen=True)
class CorrectionCounts:
    """Numbers for the widget's "what will be trained on" line."""

    painted: int  # pixels changed by strokes (before growing by the margin)
    confirmed: int  # pixels with weight > 0 (strokes grown by the margin, plus reviewed parts)
    total: int  # pixels in the labels
    reviewed_slices: tuple[int, ...]
    reviewed_regions: int

    @property
    def confirmed_share(self) -> float:
        return self.confirmed / self.total if self.total else 0.0

    def describe(self) -> str:
        """One line for people, e.g. ``"12,345 confirmed pixels (1.2%), reviewed slices: 4, 5"``."""
        text = f"{self.confirmed:,} confirmed pixels ({100 * self.confirmed_share:.1f}%)"
        if self.reviewed_slices:
            text += ", reviewed slices: " + _compact_ranges(self.reviewed_slices)
        if self.reviewed_regions:
            text += f", {self.reviewed_regions} reviewed region(s)"
        return text


def _compact_ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts: list[str] = []
    values = sorted(values)
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


class CorrectionState:
    """The painted pixels and reviewed slices/regions of one labels map of shape ``shape``.

    ``painted`` is a bool array the size of the labels (1 byte per pixel; a 1 GB uint8 labels
    volume costs another 1 GB here: napari keeps editable labels in memory anyway). Reviewed
    slices are indices along axis 0 of a (Z, Y, X) stack; reviewed regions are boxes (3D
    sub-volumes, or the whole image of a single 2D image). ``revision`` goes up on every change so
    that the GUI knows when to autosave.
    """

    def __init__(self, shape: Sequence[int]):
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise CorrectionsError(f"Corrections need labels shaped (Y, X) or (Z, Y, X), not {shape}.")
        self.shape = shape
        self.painted = np.zeros(shape, dtype=bool)
        self.reviewed_slices: set[int] = set()
        self.reviewed_regions: list[Box] = []
        self.revision = 0

    def copy(self) -> CorrectionState:
        """An independent copy (a snapshot for a background save or a training run)."""
        other = CorrectionState(self.shape)
        other.painted = self.painted.copy()
        other.reviewed_slices = set(self.reviewed_slices)
        other.reviewed_regions = list(self.reviewed_regions)
        other.revision = self.revision
        return other

    # -- recording -----------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _changed(self) -> None:
        self.revision += 1

    def record_paint(self, index: tuple, mask: np.ndarray | None = None) -> int:
        """Mark pixels as painted; returns how many were newly marked.

        ``index`` is either a NumPy fancy index (a tuple of integer arrays, one per axis) or a
        tuple of slices (a bounding box); with slices, ``mask`` (bool, the box's shape) says which
        pixels inside the box changed, None meaning all of them.
        """
        index = tuple(index)
        if len(index) != self.ndim:
            raise CorrectionsError(f"A paint index needs {self.ndim} axes, not {len(index)}.")
        if all(isinstance(i, slice) for i in index):
            region = self.painted[index]
            before = int(np.count_nonzero(region))
            if mask is None:
                region[...] = True
            else:
                mask = np.asarray(mask, dtype=bool)
                region |= mask.reshape(region.shape)
            added = int(np.count_nonzero(region)) - before
        else:
            coords = tuple(np.asarray(i, dtype=np.intp).ravel() for i in np.broadcast_arrays(*index))
            if coords and coords[0].size == 0:
                return 0
            coords = tuple(np.clip(c, 0, s - 1) for c, s in zip(coords, self.shape))
            added = int(np.count_nonzero(~self.painted[coords]))
            self.painted[coords] = True
        if added:
            self._changed()
        return added

    def record_history_atoms(self, atoms: Iterable[Any]) -> int:
        """Record one napari Labels ``paint`` event (its ``value``: a list of history atoms).

        napari >= 0.6 stores brush/fill/polygon edits as atoms with ``slice_key`` and ``mask``
        (``mask`` None = the whole box changed) and ``data_setitem`` edits as a tuple
        ``(indices, old_values, new_values)``. Duck-typed here so this module needs no napari.
        """
        added = 0
        for atom in atoms:
            if hasattr(atom, "slice_key"):
                added += self.record_paint(tuple(atom.slice_key), getattr(atom, "mask", None))
            else:
                added += self.record_paint(tuple(atom[0]))
        return added

    def forget_painted(self, z: int | None = None) -> None:
        """Forget the strokes on slice ``z`` (None: everywhere)."""
        if z is None:
            self.painted[...] = False
        else:
            self.painted[self._check_slice(z)] = False
        self._changed()

    def _check_slice(self, z: int) -> int:
        if self.ndim != 3:
            raise CorrectionsError("Only a (Z, Y, X) stack or volume has slices to review.")
        z = int(z)
        if not 0 <= z < self.shape[0]:
            raise CorrectionsError(f"Slice {z} is outside the stack (0..{self.shape[0] - 1}).")
        return z

    def mark_reviewed(self, z: int | None = None) -> None:
        """Mark slice ``z`` of a stack as reviewed (correct everywhere); a 2D image: the whole image."""
        if self.ndim == 2:
            self.mark_region(tuple(slice(0, s) for s in self.shape))
            return
        z = self._check_slice(z if z is not None else 0)
        if z not in self.reviewed_slices:
            self.reviewed_slices.add(z)
            self._changed()

    def unmark_reviewed(self, z: int | None = None) -> None:
        """Undo :meth:`mark_reviewed` for slice ``z`` and drop reviewed regions that touch it."""
        if self.ndim == 2:
            if self.reviewed_regions:
                self.reviewed_regions.clear()
                self._changed()
            return
        z = self._check_slice(z if z is not None else 0)
        kept = [box for box in self.reviewed_regions if not box[0][0] <= z < box[0][1]]
        if z in self.reviewed_slices or len(kept) != len(self.reviewed_regions):
            self.reviewed_slices.discard(z)
            self.reviewed_regions = kept
            self._changed()

    def is_reviewed(self, z: int | None = None) -> bool:
        """Whether slice ``z`` (2D image: the image) is wholly reviewed."""
        if self.ndim == 2:
            return any(self._box_covers_all(box) for box in self.reviewed_regions)
        z = int(z if z is not None else 0)
        if z in self.reviewed_slices:
            return True
        return any(box[0][0] <= z < box[0][1] and self._box_covers_all(box, skip_first=True) for box in self.reviewed_regions)

    def _box_covers_all(self, box: Box, skip_first: bool = False) -> bool:
        pairs = list(zip(box, self.shape))[1 if skip_first else 0:]
        return all(start <= 0 and stop >= size for (start, stop), size in pairs)

    def mark_region(self, region: Sequence[slice | tuple[int, int]]) -> Box:
        """Mark a box (slices or (start, stop) pairs, one per axis) as reviewed; returns it clipped."""
        region = tuple(region)
        if len(region) != self.ndim:
            raise CorrectionsError(f"A reviewed region needs {self.ndim} axes, not {len(region)}.")
        box: list[tuple[int, int]] = []
        for item, size in zip(region, self.shape):
            if isinstance(item, slice):
                start, stop, step = item.indices(size)
                if step != 1:
                    raise CorrectionsError("A reviewed region must be a solid box (step 1).")
            else:
                start, stop = (int(v) for v in item)
                start, stop = max(0, start), min(size, stop)
            if stop <= start:
                raise CorrectionsError("A reviewed region must not be empty.")
            box.append((int(start), int(stop)))
        box_t = tuple(box)
        if box_t not in self.reviewed_regions:
            self.reviewed_regions.append(box_t)
            self._changed()
        return box_t

    def clear(self) -> None:
        """Forget everything (strokes, reviewed slices and regions)."""
        self.painted[...] = False
        self.reviewed_slices.clear()
        self.reviewed_regions.clear()
        self._changed()

    # -- what will be trained on ---------------------------------------------------------------

    def grown_painted(self, margin: int = 0) -> np.ndarray:
        """The painted mask grown by ``margin`` pixels within each (Y, X) plane.

        Strokes are drawn in a plane, so the margin grows them in-plane. Only the bounding box of
        each slice's strokes is dilated, which keeps this fast on big, sparsely painted stacks.
        """
        margin = int(margin)
        if margin <= 0 or not self.painted.any():
            return self.painted.copy()
        yy, xx = np.ogrid[-margin : margin + 1, -margin : margin + 1]
        disk = (yy * yy + xx * xx) <= margin * margin
        grown = self.painted.copy()
        planes = [(...,)] if self.ndim == 2 else [(z,) for z in np.flatnonzero(self.painted.any(axis=(1, 2)))]
        for lead in planes:
            plane = self.painted[lead]
            rows = np.flatnonzero(plane.any(axis=1))
            cols = np.flatnonzero(plane.any(axis=0))
            y0, y1 = max(0, rows[0] - margin), min(plane.shape[0], rows[-1] + margin + 1)
            x0, x1 = max(0, cols[0] - margin), min(plane.shape[1], cols[-1] + margin + 1)
            window = ndimage.binary_dilation(plane[y0:y1, x0:x1], structure=disk)
            grown[lead][y0:y1, x0:x1] |= window
        return grown

    def confirmed_mask(self, margin: int = 0) -> np.ndarray:
        """Bool mask of the pixels to train on: strokes grown by ``margin``, OR reviewed parts."""
        confirmed = self.grown_painted(margin)
        for z in self.reviewed_slices:
            confirmed[z] = True
        for box in self.reviewed_regions:
            confirmed[tuple(slice(a, b) for a, b in box)] = True
        return confirmed

    def weights(self, margin: int = 0) -> np.ndarray:
        """Float32 loss weights: 1 where confirmed, 0 (ignored) everywhere else."""
        return self.confirmed_mask(margin).astype(np.float32)

    def counts(self, margin: int = 0) -> CorrectionCounts:
        return CorrectionCounts(
            painted=int(np.count_nonzero(self.painted)),
            confirmed=int(np.count_nonzero(self.confirmed_mask(margin))),
            total=int(np.prod(self.shape)),
            reviewed_slices=tuple(sorted(self.reviewed_slices)),
            reviewed_regions=len(self.reviewed_regions),
        )

    @property
    def is_empty(self) -> bool:
        return not (self.reviewed_slices or self.reviewed_regions or self.painted.any())

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path, labels: np.ndarray, **meta: Any) -> Path:
        """Save this state and the corrected ``labels`` atomically; see :func:`save_corrections`."""
        return save_corrections(path, self, labels, **meta)

    @classmethod
    def load(cls, path: str | Path) -> SavedCorrections:
        return load_corrections(path)


# ---------------------------------------------------------------------------------------------
# Saving and finding corrections on disk


@dataclass
class SavedCorrections:
    """What :func:`load_corrections` returns: the state, the corrected labels and the metadata."""

    state: CorrectionState
    labels: np.ndarray
    meta: dict
    path: Path

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def describe(self) -> str:
        counts = self.state.counts(int(self.meta.get("margin", 0)))
        saved = str(self.meta.get("saved_at", ""))[:19].replace("T", " ")
        return f"{counts.describe()} (saved {saved} UTC)" if saved else counts.describe()


def image_fingerprint(image: Any) -> str:
    """Identify an image by shape, dtype and a hash of an evenly strided subsample.

    Works on NumPy, dask and zarr arrays without reading everything: at most ~64 positions per
    axis are read (a 24 x 512 x 512 stack: 24 x 64 x 64 values).
    """
    shape = tuple(int(s) for s in image.shape)
    steps = tuple(max(1, s // 64) for s in shape)
    sample = np.ascontiguousarray(np.asarray(image[tuple(slice(None, None, st) for st in steps)]))
    digest = hashlib.sha1(sample.tobytes()).hexdigest()[:16]
    dtype = np.dtype(getattr(image, "dtype", sample.dtype)).name
    return f"{'x'.join(map(str, shape))}-{dtype}-{digest}"


def default_autosave_folder() -> Path:
    """Where corrections go when the image has no file of its own (or its folder is read-only).

    ``$NAPARI_UNET_AUTOSAVE_DIR`` if set, else ``~/.napari-unet/corrections``.
    """
    env = os.environ.get("NAPARI_UNET_AUTOSAVE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".napari-unet" / "corrections"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def autosave_path_for(
    image_source: str | Path | None,
    layer_name: str,
    fingerprint: str,
    folder: str | Path | None = None,
) -> Path:
    """The autosave file for an image.

    With a ``folder``: ``folder/<name>-<hash>.corrections.npz``. Without one, next to the image
    file (``<stem>.corrections.npz`` beside it) when the image came from a file whose folder is
    writable; otherwise in :func:`default_autosave_folder`.
    """
    short = fingerprint.rsplit("-", 1)[-1][:8]
    if folder is None and image_source:
        source = Path(image_source)
        parent = source if source.is_dir() else source.parent
        stem = source.name if source.is_dir() else source.name.split(".")[0]
        if parent.is_dir() and os.access(parent, os.W_OK):
            target = parent.parent if source.is_dir() else parent
            return target / f"{_safe_name(stem)}{AUTOSAVE_SUFFIX}"
    folder = Path(folder) if folder is not None else default_autosave_folder()
    return folder / f"{_safe_name(layer_name)}-{short}{AUTOSAVE_SUFFIX}"


def save_corrections(
    path: str | Path,
    state: CorrectionState,
    labels: np.ndarray,
    *,
    fingerprint: str = "",
    image_name: str = "",
    image_source: str = "",
    margin: int = 0,
) -> Path:
    """Write the state and the corrected labels to ``path`` atomically (temp file, then rename).

    A reader never sees a half-written file: the data go to a temporary file in the same folder,
    are flushed to disk, and ``os.replace`` swaps it in.
    """
    labels = np.asarray(labels)
    if tuple(labels.shape) != state.shape:
        raise CorrectionsError(f"The labels have shape {labels.shape} but the corrections were made on {state.shape}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "image_name": image_name,
        "image_source": str(image_source or ""),
        "shape": list(state.shape),
        "margin": int(margin),
        "saved_at": _dt.datetime.now(_dt.UTC).isoformat(),
    }
    regions = np.array(state.reviewed_regions, dtype=np.int64).reshape(-1, state.ndim, 2)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez_compressed(
                stream,
                labels=labels,
                painted=np.packbits(state.painted.ravel()),
                reviewed_slices=np.array(sorted(state.reviewed_slices), dtype=np.int64),
                reviewed_regions=regions,
                meta=np.array(json.dumps(meta)),
            )
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_corrections(path: str | Path) -> SavedCorrections:
    """Read a file written by :func:`save_corrections`; CorrectionsError if it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            labels = np.array(data["labels"])
            shape = tuple(meta["shape"])
            state = CorrectionState(shape)
            count = int(np.prod(shape))
            state.painted = np.unpackbits(data["painted"], count=count).astype(bool).reshape(shape)
            state.reviewed_slices = {int(z) for z in data["reviewed_slices"]}
            state.reviewed_regions = [tuple((int(a), int(b)) for a, b in box) for box in data["reviewed_regions"]]
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CorrectionsError(f"Could not read saved corrections from {path}: {exc}") from exc
    if tuple(labels.shape) != shape:
        raise CorrectionsError(f"The saved corrections in {path} are damaged (labels and mask shapes differ).")
    return SavedCorrections(state=state, labels=labels, meta=meta, path=path)


def _read_meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"]))
    except Exception:  # noqa: BLE001 - a stray or damaged file is simply not a match
        return None


def find_autosave(fingerprint: str, folders: Iterable[str | Path]) -> Path | None:
    """The most recently saved corrections file for the image ``fingerprint`` in ``folders``."""
    best: tuple[float, Path] | None = None
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for candidate in folder.glob(f"*{AUTOSAVE_SUFFIX}"):
            meta = _read_meta(candidate)
            if meta is None or meta.get("fingerprint") != fingerprint:
                continue
            mtime = candidate.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, candidate)
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------
# From corrections to a Trainer (shared by the widget and the benchmark)


@dataclass
class FinetuneSettings:
    """The Fine-tune widget's settings; defaults are the GUI's defaults.

    ``None`` means "the training engine's default" (``TrainConfig``). The time budget is short
    because the user watches: a minute of fine-tuning on a few corrected slices.
    """

    learning_rate: float | None = None
    time_budget: float | None = 60.0  # seconds; None = use `steps`
    steps: int | None = None
    patch_size: int | None = None  # edge length; None = the engine's default for the model
    batch_size: int | None = None
    loss: str = "ce_dice"  # the engine's benchmarked default: Dice of both classes (membrane too)
    augment: bool = True
    val_fraction: float = 0.2  # share of the confirmed data held out for validation Dice
    val_every: int | None = None
    margin: int = 1  # grow strokes by this many pixels (napari records only pixels that changed)
    balance_classes: bool = False  # weigh every class alike (hurt on ISBI: benchmarks/results/hitl_balanced.json)
    # unconfirmed pixels of the corrected slices learn the start model's own prediction with this
    # weight (0 = ignored): sparse strokes then fix mistakes without unlearning the rest
    anchor_weight: float = 0.5
    # with the model's own training data at hand (replay), this share of the patches comes from
    # it: rehearsal keeps what the model knew while the corrections teach it. None = by how much
    # of the corrected slices is confirmed (replay_share_for; TRAINING.md)
    replay_share: float | None = None
    replay: bool = True  # replay the start model's training data when its checkpoint names the files
    device: str = "auto"
    seed: int = 0

    def train_config(self, spatial_dims: int):
        """The TrainConfig these settings stand for (engine defaults where a setting is None)."""
        from napari_unet.training import TrainConfig

        overrides: dict[str, Any] = {
            "loss": self.loss,
            "augment": self.augment,
            "val_fraction": self.val_fraction,
            "device": self.device,
            "seed": self.seed,
            "time_budget": self.time_budget,
            "steps": self.steps,
            "anchor_weight": self.anchor_weight,
            # a few corrections need augmentation's regularisation from the first step: ramped in
            # (the engine's default for training from scratch), sparse strokes taught "membrane
            # everywhere" on ISBI (benchmarks/results/TRAINING.md)
            "augment_ramp": None,
        }
        if self.time_budget is None and self.steps is None:
            raise CorrectionsError("Give a time budget or a number of steps.")
        if self.learning_rate is not None:
            overrides["learning_rate"] = self.learning_rate
        if self.batch_size is not None:
            overrides["batch_size"] = self.batch_size
        if self.val_every is not None:
            overrides["val_every"] = self.val_every
        if self.patch_size is not None:
            overrides["patch_size"] = (int(self.patch_size),) * spatial_dims
        return TrainConfig(**overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def _class_map(labels: np.ndarray, confirmed: np.ndarray, n_classes: int) -> np.ndarray:
    """Labels as classes 0..n_classes-1 where confirmed.

    A binary model fine-tuned on an instance map (cells numbered 1, 2, 3...) learns foreground
    (> 0) versus background; any other value out of range is an error in plain words.
    """
    values = labels[confirmed]
    if values.size == 0:
        return labels
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise CorrectionsError("The corrected labels contain negative values; use class numbers 0, 1, 2...")
    if high < n_classes:
        return labels
    if n_classes == 2:
        return (labels > 0).astype(np.int64)
    raise CorrectionsError(
        f"The corrected labels contain class {high}, but the model predicts classes 0..{n_classes - 1}."
    )


def _channel_axis(image_ndim: int, labels_ndim: int, spatial_dims: int) -> int | None:
    """Where the image's channel axis is (ARCHITECTURE: (Z, C, Y, X) stacks, (C, Z, Y, X) volumes)."""
    if image_ndim == labels_ndim:
        return None
    if image_ndim == labels_ndim + 1:
        return 1 if (labels_ndim == 3 and spatial_dims == 2) else 0
    raise CorrectionsError(f"An image with {image_ndim} axes does not fit labels with {labels_ndim} axes.")


def _bbox(mask: np.ndarray, context: Sequence[int], minimum: Sequence[int]) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``context`` and to at least ``minimum`` per axis."""
    box = []
    for axis, size in enumerate(mask.shape):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(hits[0]) - context[axis], int(hits[-1]) + 1 + context[axis]
        short = minimum[axis] - (hi - lo)
        if short > 0:
            lo, hi = lo - short // 2, hi + short - short // 2
        lo, hi = max(0, lo), min(size, hi)
        if hi - lo < minimum[axis]:  # clipped at one edge: extend on the other
            lo, hi = max(0, hi - minimum[axis]), min(size, lo + minimum[axis])
        box.append(slice(lo, hi))
    return tuple(box)


def training_arrays(
    image: np.ndarray,
    labels: np.ndarray,
    state: CorrectionState,
    *,
    spatial_dims: int,
    n_classes: int = 2,
    margin: int = 0,
    context: int = 64,
    balance_classes: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The (images, labels, weights) lists to fine-tune on: only what holds confirmed pixels.

    A 2D model gets every slice of a stack with at least one confirmed pixel (whole slices: they
    are small and give the crops context). A 3D model gets the volume cropped to the box around
    the confirmed voxels, grown by ``context`` voxels, so that patches land on the user's work and
    the rest of a big volume stays off the training device. Raises CorrectionsError in plain
    words when nothing is confirmed or the image and labels shapes differ.
    """
    labels = np.asarray(labels)
    if tuple(labels.shape) != state.shape:
        raise CorrectionsError(
            f"The labels layer has shape {labels.shape} but the corrections were recorded on {state.shape}."
        )
    channel_axis = _channel_axis(len(image.shape), labels.ndim, spatial_dims)
    spatial_shape = tuple(s for a, s in enumerate(image.shape) if a != channel_axis)
    if spatial_shape != tuple(labels.shape):
        raise CorrectionsError(
            f"The image has shape {tuple(image.shape)} but the labels have shape {tuple(labels.shape)}; "
            "pick the labels that belong to this image."
        )
    confirmed = state.confirmed_mask(margin)
    if not confirmed.any():
        raise CorrectionsError(
            "No confirmed pixels yet: paint corrections on the labels or mark a slice as reviewed first."
        )
    class_map = _class_map(labels, confirmed, n_classes)

    def image_part(index: tuple) -> np.ndarray:
        if channel_axis is None:
            return np.asarray(image[index])
        full = list(index)
        full.insert(channel_axis, slice(None))
        return np.asarray(image[tuple(full)])

    images_out, labels_out, weights_out = [], [], []
    if spatial_dims == 2 and labels.ndim == 3:
        for z in np.flatnonzero(confirmed.any(axis=(1, 2))):
            images_out.append(image_part((int(z),)))  # (Y, X) or (C, Y, X)
            labels_out.append(class_map[z].astype(np.int64))
            weights_out.append(confirmed[z].astype(np.float32))
    elif spatial_dims == labels.ndim:
        minimum = tuple(min(s, 2 * context) for s in labels.shape)
        box = _bbox(confirmed, [context] * labels.ndim, minimum) if spatial_dims == 3 else tuple(
            slice(0, s) for s in labels.shape
        )
        images_out.append(image_part(box))
        labels_out.append(class_map[box].astype(np.int64))
        weights_out.append(confirmed[box].astype(np.float32))
    else:
        raise CorrectionsError(
            f"A {spatial_dims}D model cannot be fine-tuned on labels shaped {labels.shape}; "
            "use a 3D model for volumes and a 2D model for images and stacks."
        )
    if balance_classes:
        weights_out = _balanced_weights(labels_out, weights_out, n_classes)
    return images_out, labels_out, weights_out


def _balanced_weights(class_maps: list[np.ndarray], weights: list[np.ndarray], n_classes: int) -> list[np.ndarray]:
    """Scale confirmed pixels so that every class present weighs the same in the loss.

    Corrections are lopsided: a user paints where the model was wrong (often one class, e.g. the
    thin membranes it missed). Unbalanced, the fine-tuning would learn "that class everywhere".
    The mean weight over the confirmed pixels stays 1; a class is scaled by at most 10x either way.
    """
    counts = np.zeros(n_classes, np.float64)
    for class_map, weight in zip(class_maps, weights):
        counts += np.bincount(class_map[weight > 0].ravel(), minlength=n_classes)[:n_classes]
    present = counts > 0
    scale = np.ones(n_classes, np.float64)
    scale[present] = counts[present].sum() / (present.sum() * counts[present])
    scale = np.clip(scale, 0.1, 10.0)
    scale /= (scale * counts).sum() / counts.sum()  # keep the mean confirmed weight at 1
    return [(weight * scale[class_map]).astype(np.float32) for class_map, weight in zip(class_maps, weights)]


# The replay share for corrections that confirm nothing but a few strokes: measured best of 0.25,
# 0.5 and 0.75 on ISBI (benchmarks/results/TRAINING.md, human in the loop).
SPARSE_REPLAY_SHARE = 0.75


def replay_share_for(weights: Sequence[np.ndarray]) -> float:
    """The share of patches to replay: ``SPARSE_REPLAY_SHARE`` times the unconfirmed part of the
    corrected images.

    Replay stands in for what the corrections leave unlabelled. Sparse strokes need it (alone
    they pull the model towards the one class they mostly hold; -0.027 membrane Dice on ISBI),
    whole reviewed slices do not (replaying beside them cost 0.011-0.029 Dice).
    """
    total = sum(int(np.asarray(w).size) for w in weights)
    confirmed = sum(int(np.count_nonzero(np.asarray(w) > 0)) for w in weights)
    return SPARSE_REPLAY_SHARE * (1.0 - confirmed / total) if total else SPARSE_REPLAY_SHARE


# Replaying more than this many voxels would hold a big training set in memory beside the
# corrections: a 2D model's stack is thinned to evenly spaced slices, a bigger 3D volume skipped.
REPLAY_MAX_VOXELS = 2**26


def replay_paths(provenance: dict | None) -> tuple[Path, Path] | None:
    """The (images, labels) files a checkpoint's provenance says its model learnt from, if any.

    ``napari-unet train`` records ``data_paths``; a fine-tuned checkpoint passes on the replay
    data it used as ``replay_data_paths``. Anything but two file names (the bundled sample's
    description, say) gives None.
    """
    provenance = provenance or {}
    paths = provenance.get("replay_data_paths") or provenance.get("data_paths")
    if not isinstance(paths, (list, tuple)) or len(paths) != 2 or not all(isinstance(p, str) for p in paths):
        return None
    return Path(paths[0]), Path(paths[1])


def load_replay(paths: Sequence[str | Path], *, spatial_dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Read replay data: (images, labels) arrays, thinned to at most ``REPLAY_MAX_VOXELS``.

    Raises CorrectionsError in plain words when a file is gone, unreadable or does not match.
    """
    from napari_unet import io

    images_path, labels_path = (Path(p) for p in paths)
    for path in (images_path, labels_path):
        if not path.exists():
            raise CorrectionsError(f"The model's training data {path} is not there any more.")
    try:
        images = io.read_image(images_path, lazy=True)
        labels = io.read_labels(labels_path)
    except (OSError, ValueError) as error:
        raise CorrectionsError(f"The model's training data could not be read: {error}") from error
    if tuple(images.shape[-labels.ndim:]) != tuple(labels.shape):
        raise CorrectionsError(
            f"The model's training images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match."
        )
    voxels = int(np.prod(labels.shape))
    if voxels > REPLAY_MAX_VOXELS:
        if spatial_dims != 2 or labels.ndim != 3 or images.ndim != 3:
            raise CorrectionsError(f"The model's training data ({voxels:,} voxels) is too big to replay.")
        keep = max(1, REPLAY_MAX_VOXELS // int(np.prod(labels.shape[1:])))
        chosen = np.unique(np.linspace(0, labels.shape[0] - 1, keep).round().astype(int))
        return np.asarray(images[chosen.tolist()]), labels[chosen]
    return np.asarray(images), labels


def build_finetune_trainer(
    model,
    image: np.ndarray,
    labels: np.ndarray,
    state: CorrectionState,
    settings: FinetuneSettings | None = None,
    *,
    preview_fn: Callable | None = None,
    preview_interval: float = 3.0,
    callbacks: Sequence[Callable] = (),
    resume_from: Any = None,
    replay: tuple[Any, Any] | None = None,
):
    """The Trainer that fine-tunes ``model`` on the confirmed part of ``labels`` (weights 0 elsewhere).

    ``replay``: (images, labels) the model was trained on; a share ``settings.replay_share`` of the
    patches then comes from them (None: :func:`replay_share_for` the corrections).

    Normalisation follows the model's spec (``model.normalization``, the engine's default if it
    has none), with the statistics inference uses: a 2D model's slices each on their own, a 3D
    model's crop on the whole volume's (Segment predicts the volume whole).
    """
    from napari_unet.inference import volume_statistics
    from napari_unet.training import Trainer

    settings = settings or FinetuneSettings()
    spatial_dims = int(getattr(model, "spatial_dims", 2))
    n_classes = max(2, int(getattr(model, "out_channels", 1)))
    images, class_maps, weights = training_arrays(
        image, labels, state, spatial_dims=spatial_dims, n_classes=n_classes, margin=settings.margin,
        balance_classes=settings.balance_classes,
    )
    config = settings.train_config(spatial_dims)
    config.replay_share = (replay_share_for(weights) if settings.replay_share is None
                           else float(settings.replay_share))
    # training_arrays crops a 3D volume: the crop gets the whole volume's statistics
    normalization = volume_statistics(model, image) or getattr(model, "normalization", None)
    return Trainer(
        model,
        images,
        class_maps,
        weights,
        config=config,
        callbacks=tuple(callbacks),
        normalization=normalization,
        preview_fn=preview_fn,
        preview_interval=preview_interval,
        resume_from=resume_from,
        replay_images=None if replay is None or not config.replay_share else replay[0],
        replay_labels=None if replay is None or not config.replay_share else replay[1],
    )


def one_class_warning(
    labels: np.ndarray, state: CorrectionState, class_names: Sequence[str], *, margin: int = 0,
    anchor_weight: float = 0.0, share: float = 0.95,
) -> str | None:
    """A plain warning when nearly all confirmed pixels are one class (None otherwise).

    Users paint where the model was wrong, often one class only (e.g. membrane it missed); trained
    on those alone, a model learns "that class everywhere".
    """
    if len(class_names) < 2 or state.reviewed_slices or state.reviewed_regions:
        return None  # a reviewed slice holds every class; no need to grow the strokes to know
    values = np.asarray(labels)[state.confirmed_mask(margin)]
    if values.size == 0:
        return None
    counts = np.bincount(np.clip(values, 0, len(class_names) - 1).astype(np.int64), minlength=len(class_names))
    top = int(np.argmax(counts))
    if counts[top] < share * values.size:
        return None
    text = (
        f"{100 * counts[top] / values.size:.0f}% of your corrections are '{class_names[top]}'. "
        "Mark a slice you checked as reviewed (Shift-R) so that the other classes are learnt too"
    )
    if anchor_weight > 0:
        return text + "; meanwhile the rest of the stroked slices keeps the model's own prediction."
    return text + ", or raise 'Keep what it knew' above 0: alone, these strokes teach that class everywhere."


def finetune_provenance(
    state: CorrectionState,
    settings: FinetuneSettings,
    *,
    image_name: str,
    image_source: str = "",
    fingerprint: str = "",
    start_model: str = "",
    steps: int | None = None,
    replayed: Sequence[str | Path] | None = None,
) -> dict:
    """What a fine-tuned checkpoint records about where it came from (``replayed``: the replay
    data's two files, passed on to the next fine-tuning)."""
    counts = state.counts(settings.margin)
    replay = {"replay_data_paths": [str(p) for p in replayed]} if replayed else {}
    return {
        **replay,
        "kind": "finetune",
        "image_name": image_name,
        "image_source": str(image_source or ""),
        "image_fingerprint": fingerprint,
        "start_model": start_model,
        "confirmed_pixels": counts.confirmed,
        "painted_pixels": counts.painted,
        "reviewed_slices": list(counts.reviewed_slices),
        "reviewed_regions": [list(map(list, box)) for box in state.reviewed_regions],
        "steps": steps,
        "settings": settings.to_dict(),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
    }
