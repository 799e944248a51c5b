"""State the Segment and Fine-tune widgets share: the model currently loaded in a viewer.

One :class:`ModelHolder` exists per viewer (:func:`model_holder`). The Segment widget puts a fresh
variant or a loaded checkpoint there; the Fine-tune widget reads it, trains it and puts the
fine-tuned model back. Whoever changes it calls :meth:`ModelHolder.set`, and every widget listening
to :attr:`ModelHolder.changed` refreshes its summary.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from psygnal import Signal

from napari_unet.label_offset import describe_offset, model_offset

if TYPE_CHECKING:
    import torch.nn as nn

    from napari_unet.checkpoint import Checkpoint

UNTRAINED_NOTE = "untrained: fine-tune it or load a checkpoint"


class ModelHolder:
    """The model a viewer's widgets segment with and fine-tune.

    Attributes
    ----------
    model : torch.nn.Module or None
        The model itself (``.config``, ``.spatial_dims``, ``.in_channels``, ``.out_channels``;
        ``.normalization`` when it came from a checkpoint or training).
    checkpoint : Checkpoint or None
        The checkpoint the model was loaded from, if any (for its summary and provenance).
    source : str
        Where the model came from, in words ("fresh unet, width 8, depth 2", "checkpoint
        /path/best.pt", "fine-tuned in napari on 'EM membranes'").
    trained : bool
        False for a freshly initialised model, whose predictions are noise.
    changed : psygnal.Signal
        Emitted with the new model (or None) after every :meth:`set` / :meth:`clear`.
    lock : threading.RLock
        Held by whoever runs the model in a worker thread (prediction, training) so the model is
        not swapped under its feet; :meth:`set` does not take it, widgets check :attr:`busy`.
    """

    changed = Signal(object)

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.checkpoint: Checkpoint | None = None
        self.source: str = ""
        self.trained: bool = False
        self.lock = threading.RLock()

    def set(
        self,
        model: nn.Module | None,
        *,
        checkpoint: Checkpoint | None = None,
        source: str = "",
        trained: bool | None = None,
    ) -> None:
        """Replace the shared model and tell every listener.

        ``trained`` defaults to True when a checkpoint is given or the source does not say
        "fresh"; pass it explicitly when in doubt.
        """
        self.model = model
        self.checkpoint = checkpoint
        self.source = source
        if trained is None:
            trained = checkpoint is not None or not source.lower().startswith("fresh")
        self.trained = bool(trained) and model is not None
        self.changed.emit(model)

    def clear(self) -> None:
        """Forget the model (for example after a failed load)."""
        self.set(None, source="", trained=False)

    @property
    def busy(self) -> bool:
        """True while a worker thread is using the model."""
        acquired = self.lock.acquire(blocking=False)
        if acquired:
            self.lock.release()
        return not acquired

    def summary(self) -> str:
        """A few plain lines about the model: variant, size, channels, classes, provenance."""
        if self.model is None:
            return "No model loaded yet: pick a variant or load a checkpoint."
        # a checkpoint describes itself best (classes, what it was trained on, validation score)
        described = _checkpoint_description(self.checkpoint) if self.checkpoint is not None else ""
        lines = [described or describe_model(self.model)]
        if not described:  # a model trained here: its label offset is not in a checkpoint yet
            lines.append(_offset_description(self.model))
        if self.source:
            lines.append(f"Source: {self.source}")
        if not self.trained:
            lines.append(f"This model is {UNTRAINED_NOTE}.")
        return "\n".join(line for line in lines if line)


def describe_model(model: nn.Module) -> str:
    """One line: variant, dimensionality, width/depth, parameter count, channels and classes."""
    config: dict[str, Any] = dict(getattr(model, "config", {}) or {})
    name = config.get("name", type(model).__name__)
    dims = getattr(model, "spatial_dims", "?")
    n_params = sum(p.numel() for p in model.parameters())
    in_channels = getattr(model, "in_channels", config.get("in_channels", "?"))
    out_channels = getattr(model, "out_channels", config.get("out_channels", 1))
    n_classes = max(2, int(out_channels)) if isinstance(out_channels, int) else "?"
    size = ""
    if "width" in config and "depth" in config:
        size = f", width {config['width']}, depth {config['depth']}"
    return (
        f"{name} ({dims}D{size}), {n_params:,} parameters, "
        f"{in_channels} input channel{'s' if in_channels != 1 else ''}, {n_classes} classes"
    )


def _offset_description(model: nn.Module) -> str:
    try:
        return describe_offset(model_offset(model)).capitalize()
    except (ValueError, TypeError, AttributeError):  # a foreign model: no offset to show
        return ""


def _checkpoint_description(checkpoint: Checkpoint) -> str:
    # describe_checkpoint belongs to the engine; a summary must never break the widget
    try:
        from napari_unet.checkpoint import describe_checkpoint

        return describe_checkpoint(checkpoint)
    except Exception:  # noqa: BLE001 - best effort text only
        return ""


_HOLDERS: dict[int, ModelHolder] = {}


def model_holder(viewer: Any) -> ModelHolder:
    """The one :class:`ModelHolder` of ``viewer`` (created on first use, dropped with the viewer)."""
    key = id(viewer)
    holder = _HOLDERS.get(key)
    if holder is None:
        holder = ModelHolder()
        _HOLDERS[key] = holder
        # keyed by id (viewers compare by value); forget the holder when the viewer goes away
        weakref.finalize(viewer, _HOLDERS.pop, key, None)
    return holder


def image_layer_named(viewer: Any, name: str) -> Any:
    """The Image layer called ``name`` in ``viewer`` (the pickers' current text), or None."""
    from napari.layers import Image

    layer = viewer.layers[name] if name and name in viewer.layers else None
    return layer if isinstance(layer, Image) else None


def select_layer_in(combo: Any, name: str) -> None:
    """Make the layer called ``name`` the current entry of a layer picker (ValueError if absent)."""
    index = combo.findText(name)
    if index < 0:
        raise ValueError(f"no image layer called {name!r}")
    combo.setCurrentIndex(index)
