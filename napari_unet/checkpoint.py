"""Saving and loading trained models as one self-describing, safe file.

A checkpoint is a ``torch.save`` of plain containers only::

    {"format": "napari-unet-checkpoint", "format_version": 1,
     "config": {...},            # build_model(**config) rebuilds the architecture
     "state_dict": {...},        # CPU tensors
     "normalization": {...},     # the spec (method, low, high); stats are recomputed per image
     "class_names": [...], "history": {...}, "provenance": {...}, "extra": {...},
     "label_offset": [...]}       # pixels per spatial axis (label_offset.py); absent = zeros

Loading uses ``torch.load(..., weights_only=True)`` only, so a file holding Python objects that
could run code is refused before anything in it executes.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import pickle
import pickletools
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .io import DEFAULT_NORMALIZATION, NORMALIZATION_METHODS
from .label_offset import describe_offset, model_offset, validate_offset

FORMAT_NAME = "napari-unet-checkpoint"
FORMAT_VERSION = 1
# Prefixes that wrappers add to parameter names: torch.compile and (Distributed)DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Pickle opcodes that import or call Python objects (the way a malicious file runs code).
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message says why in plain words."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode) and everything stored beside it."""

    model: nn.Module
    config: dict
    normalization: dict
    class_names: list[str]
    history: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    label_offset: tuple[float, ...] = ()
    path: Path | None = None


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    normalization: dict | None = None,
    class_names: list[str] | None = None,
    history: dict | None = None,
    provenance: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Save ``model`` and its context to ``path`` atomically; returns the path.

    ``normalization``, ``class_names`` default to ``model.normalization`` / ``model.class_names`` when
    the model carries them (else the default spec and generic names). Provenance gains the save time,
    torch and napari-unet versions; name the training data under ``"data_paths"`` (list of str) and
    the number of steps under ``"steps"`` so :func:`describe_checkpoint` can show them. All values must
    be plain data (numbers, strings, lists, dicts, tensors); numpy values are converted.
    """
    path = Path(path).expanduser()
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise CheckpointError(
            "this model has no .config; build it with napari_unet.models.build_model so it can be saved"
        )
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": _plain(dict(config), "config"),
        "state_dict": _cpu_state_dict(model),
        "normalization": _normalization_spec(normalization if normalization is not None
                                             else getattr(model, "normalization", None)),
        "class_names": _class_names(class_names if class_names is not None
                                    else getattr(model, "class_names", None), config),
        "history": _plain(dict(history or {}), "history"),
        "provenance": _plain(_provenance(provenance), "provenance"),
        "extra": _plain(dict(extra or {}), "extra"),
        "label_offset": _saved_offset(model),
    }
    _atomic_torch_save(payload, path)
    return path


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _strip_wrapper_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        _strip_wrapper_prefixes(name): tensor.detach().to("cpu", copy=True)
        for name, tensor in model.state_dict().items()
    }


def _saved_offset(model: nn.Module) -> list[float]:
    try:
        return list(model_offset(model))
    except ValueError as error:
        raise CheckpointError(f"cannot save the model's {error}") from None


def _normalization_spec(spec: dict | None) -> dict:
    """The spec only: per-image stats ("lo"/"hi") are recomputed on every new image."""
    spec = dict(DEFAULT_NORMALIZATION if spec is None else spec)
    spec.pop("lo", None)
    spec.pop("hi", None)
    if spec.get("method", "percentile") not in NORMALIZATION_METHODS:
        raise CheckpointError(
            f"unknown normalisation method '{spec.get('method')}'; use one of {', '.join(NORMALIZATION_METHODS)}"
        )
    return _plain(spec, "normalization")


def n_classes_of(config: dict) -> int:
    """Classes a model predicts: a single output channel is binary (background/foreground)."""
    return max(2, int(config.get("out_channels", 1)))


def default_class_names(n_classes: int) -> list[str]:
    if n_classes == 2:
        return ["background", "foreground"]
    return ["background"] + [f"class {index}" for index in range(1, n_classes)]


def _class_names(names: Any, config: dict) -> list[str]:
    n_classes = n_classes_of(config)
    if names is None:
        return default_class_names(n_classes)
    names = [str(name) for name in names]
    if len(names) != n_classes:
        raise CheckpointError(
            f"{len(names)} class names were given ({', '.join(names)}) but the model predicts {n_classes} classes"
        )
    return names


def _package_version() -> str:
    try:
        from . import __version__

        return str(__version__)
    except ImportError:
        return "unknown"


def _provenance(provenance: dict | None) -> dict:
    base = {
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "napari_unet_version": _package_version(),
    }
    base.update(provenance or {})
    return base


def _plain(value: Any, where: str) -> Any:
    """``value`` as containers, numbers, strings and tensors only (what weights_only loading allows)."""
    if value is None or isinstance(value, bool):
        return value
    for plain_type in (int, float, str):  # subclasses (torch.__version__, IntEnum) are not plain
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value)).clone()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, torch.Size):
        return list(value)
    if isinstance(value, dict):
        return {_plain_key(key, where): _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item, where) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    raise CheckpointError(
        f"cannot save {where}: a value of type {type(value).__name__} is not plain data "
        "(use numbers, strings, lists, dicts or tensors)"
    )


def _plain_key(key: Any, where: str) -> str | int:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    if isinstance(key, np.integer):
        return int(key)
    raise CheckpointError(f"cannot save {where}: dictionary key {key!r} is not a string or an integer")


def _atomic_torch_save(payload: dict, path: Path) -> None:
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (safely: plain data only), or the one
    inside a bioimage.io package written by ``napari-unet export``.

    The model is rebuilt from its config, gets the weights, is put in eval mode and carries
    ``model.normalization`` and ``model.class_names``. Raises :class:`CheckpointError` for a missing,
    truncated, foreign or unsafe file, an unknown model, or weights that do not fit the model.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    from .bioimageio import import_bioimageio, is_bioimageio_package  # it builds on this module

    if is_bioimageio_package(path):
        return import_bioimageio(path, map_location=map_location)
    payload = _safe_torch_load(path, map_location)
    _check_payload(payload, path)
    config = dict(payload["config"])
    model = _rebuild_model(config, payload["state_dict"], path)
    normalization = _normalization_spec(payload.get("normalization"))
    class_names = _loaded_class_names(payload.get("class_names"), config, path)
    offset = _loaded_offset(payload.get("label_offset"), model, path)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)  # the weights were loaded there; keep the model with them
    model.eval()
    model.normalization = normalization
    model.class_names = class_names
    model.label_offset = offset
    return Checkpoint(
        model=model,
        config=config,
        normalization=normalization,
        class_names=class_names,
        history=dict(payload.get("history") or {}),
        provenance=dict(payload.get("provenance") or {}),
        extra=dict(payload.get("extra") or {}),
        path=path,
        label_offset=offset,
    )


def _safe_torch_load(path: Path, map_location: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # noise for foreign files
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if _pickle_imports_objects(path):
            raise CheckpointError(
                f"checkpoint {path.name} contains Python objects that could run code; it was refused "
                "(only napari-unet checkpoints holding plain data are loaded)"
            ) from None
        raise CheckpointError(_not_ours(path)) from None
    except PermissionError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, AttributeError) as error:
        if _looks_like_damaged_zip(path, error):
            raise CheckpointError(
                f"checkpoint {path.name} is truncated or corrupt; save or copy it again"
            ) from None
        raise CheckpointError(_not_ours(path)) from None


def _not_ours(path: Path) -> str:
    return f"{path.name} is not a napari-unet checkpoint (it was not saved by napari-unet's save_checkpoint)"


def _looks_like_damaged_zip(path: Path, error: BaseException) -> bool:
    """torch files are zip archives: a zip header whose archive cannot be read is a damaged file."""
    with open(path, "rb") as file:
        starts_like_zip = file.read(4) == b"PK\x03\x04"
    if not starts_like_zip:
        return False
    if not zipfile.is_zipfile(path):
        return True  # no readable central directory: cut off or overwritten
    try:
        with zipfile.ZipFile(path) as archive:
            has_torch_data = any(name.endswith("/data.pkl") for name in archive.namelist())
            damaged = archive.testzip() is not None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError):
        return True
    return damaged or (has_torch_data and "central directory" in str(error))


def _pickle_imports_objects(path: Path) -> bool:
    """Scan (never run) the pickle for opcodes that import or call Python objects.

    Only a whole, well-formed pickle counts: random bytes can begin with what reads as an import
    opcode (about 1 file in 150 of 4 KiB did), and those are foreign files, not code."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = archive.read(name)
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False
    imports = False
    try:
        for opcode, _, _ in pickletools.genops(data):
            imports = imports or opcode.name in _CODE_OPCODES
    except Exception:  # noqa: BLE001 - not a pickle at all (random bytes): genops stops at the first bad opcode
        return False
    return imports


def _check_payload(payload: Any, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        hint = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = "; it looks like bare PyTorch weights without the model configuration napari-unet needs"
        raise CheckpointError(_not_ours(path) + hint)
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path.name} was written by a newer napari-unet (format version {version}); "
            "update napari-unet to load it"
        )
    for key in ("config", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"checkpoint {path.name} is incomplete: its {key.replace('_', ' ')} is missing")


def _loaded_offset(value: Any, model: nn.Module, path: Path) -> tuple[float, ...]:
    dims = int(model.spatial_dims)
    if value is None:  # written before offsets were measured
        return (0.0,) * dims
    try:
        return validate_offset(value, dims)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path.name} is damaged: its {error}") from None


def _rebuild_model(config: dict, state_dict: dict, path: Path) -> nn.Module:
    from .models import available_models, build_model

    name = config.get("name")
    if name not in available_models():
        raise CheckpointError(
            f"checkpoint {path.name} uses the model '{name}', which this napari-unet does not know "
            f"(known: {', '.join(available_models())}); update napari-unet"
        )
    try:
        model = build_model(**config)
    except (ValueError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {path.name} has a model configuration that cannot be built: {error}"
        ) from None
    state_dict = {_strip_wrapper_prefixes(key): value for key, value in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"the weights in {path.name} do not match its model configuration ({_mismatch_summary(model, state_dict)})"
        ) from error
    return model


def _mismatch_summary(model: nn.Module, state_dict: dict) -> str:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        key for key in expected
        if key in state_dict and tuple(getattr(state_dict[key], "shape", ())) != tuple(expected[key].shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            parts.append(f"{label}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    return "; ".join(parts) or "incompatible tensors"


def _loaded_class_names(names: Any, config: dict, path: Path) -> list[str]:
    try:
        return _class_names(names, config)
    except CheckpointError as error:
        raise CheckpointError(f"checkpoint {path.name} is inconsistent: {error}") from None


# --------------------------------------------------------------------------------------------------
# Describing
# --------------------------------------------------------------------------------------------------


def format_parameter_count(count: int) -> str:
    """7_812_345 -> '7.8 M'; 31_000 -> '31.0 k'."""
    if count >= 1e9:
        return f"{count / 1e9:.1f} G"
    if count >= 1e6:
        return f"{count / 1e6:.1f} M"
    if count >= 1e3:
        return f"{count / 1e3:.1f} k"
    return str(count)


def describe_checkpoint(ckpt: Checkpoint) -> str:
    """A few plain lines about a checkpoint for the widgets and the CLI."""
    config, model = ckpt.config, ckpt.model
    dims = getattr(model, "spatial_dims", None)
    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    lines = [
        f"model: {config.get('name', '?')} ({dims}D), width {config.get('width', '?')}, "
        f"depth {config.get('depth', '?')}, {format_parameter_count(n_parameters)} parameters",
        f"channels: {config.get('in_channels', '?')} in, {config.get('out_channels', '?')} out; "
        f"classes: {', '.join(ckpt.class_names)}",
    ]
    trained_on = _training_summary(ckpt.provenance)
    if trained_on:
        lines.append(trained_on)
    best_dice = best_validation_dice(ckpt.history)
    if best_dice is not None:
        lines.append(f"best validation Dice (mean over classes): {best_dice:.3f}")
    if any(ckpt.label_offset):
        lines.append(describe_offset(ckpt.label_offset))
    spec = ckpt.normalization
    if spec.get("method") == "percentile":
        lines.append(f"normalisation: percentiles {spec.get('low')}-{spec.get('high')}")
    else:
        lines.append(f"normalisation: {spec.get('method')}")
    return "\n".join(lines)


# Provenance keys that name the training data, most specific first ("data_paths" is the convention).
_DATA_KEYS = ("data_paths", "image_paths", "images", "image_source", "image_name", "data")


def _training_summary(provenance: dict) -> str:
    data = next((provenance[key] for key in _DATA_KEYS if provenance.get(key)), None)
    if isinstance(data, (list, tuple)):
        data = ", ".join(Path(str(item)).name for item in data)
    elif data:
        data = Path(str(data)).name
    if provenance.get("kind") == "finetune" and data:
        data = f"{data} (fine-tuned)"
    details = []
    steps = provenance.get("steps")
    if steps is not None:
        details.append(f"{steps} steps")
    date = str(provenance.get("trained_at") or provenance.get("finished_at") or provenance.get("saved_at") or "")
    if date:
        details.append(date[:10])
    if not data and steps is None:
        return f"saved: {date[:10]}" if date else ""
    return f"trained on: {data or 'unknown data'}" + (f" ({', '.join(details)})" if details else "")


def best_validation_dice(history: dict) -> float | None:
    """Best validation Dice in ``history`` (the mean over classes when stored per class), or None.

    Reads the trainer's ``"val_dice"`` (one entry per validation) and ``"best_val_dice"``.
    """
    scores = [_mean_value(entry) for entry in history.get("val_dice") or []]
    scores.append(_mean_value(history.get("best_val_dice")))
    scores = [score for score in scores if score is not None and math.isfinite(score)]
    return max(scores) if scores else None


def _mean_value(entry: Any) -> float | None:
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry)
    if isinstance(entry, torch.Tensor):
        return float(entry.float().mean()) if entry.numel() else None
    if isinstance(entry, (list, tuple)) and entry and all(isinstance(v, (int, float)) for v in entry):
        return float(sum(entry) / len(entry))
    return None
