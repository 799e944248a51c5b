"""Models that leave napari-unet: TorchScript and ONNX files, bioimage.io model packages, and back.

Every exported graph is a ``ProbabilityNetwork``: a normalised image in, class probabilities out,
(N, C, *spatial), every spatial side a multiple of ``2**depth``. Our own ``predict`` pads any size
to that multiple; an exported graph leaves the padding to its host (bioimage.io says so with
``ParameterizedSize(min=2**depth, step=2**depth)``), which keeps the graph free of shape logic and
so valid at every such size. Normalisation is ``(x - p_low) / (p_high - p_low)`` per image, the
spec stored beside the weights (bioimage.io: the ``scale_range`` preprocessing).

Files are written to a hidden temporary name in the target folder and renamed when complete: a
failed export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import io as _stdlib_io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .models import build_model

EXPORT_FORMATS = ("torchscript", "onnx", "bioimageio")
# torch's ONNX exporter (torch.export based) writes opset 18 and later
MIN_OPSET = 18
DEFAULT_OPSET = 18
# an exported graph must match the PyTorch model to this (probabilities)
MATCH_TOLERANCE = 1e-4
METADATA_NAME = "napari_unet.json"


class ExportError(ValueError):
    """A model cannot be exported (or imported); the message says why in plain words."""


class ProbabilityNetwork(nn.Module):
    """``model`` followed by its activation: sigmoid for one output channel, else softmax."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.binary = model.out_channels == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)


def probability_network(**config: Any) -> ProbabilityNetwork:
    """The exported architecture rebuilt from a model ``config`` (bioimage.io's ``architecture``)."""
    return ProbabilityNetwork(build_model(**config))


def checkpoint_for(model: nn.Module, checkpoint: Checkpoint | None = None) -> Checkpoint:
    """``checkpoint`` when it holds ``model``, else one made from what the model carries (a fresh
    or fine-tuned model in the viewer): its config, normalisation, class names and label offset."""
    from .checkpoint import default_class_names, n_classes_of
    from .io import DEFAULT_NORMALIZATION

    if checkpoint is not None and checkpoint.model is model:
        return checkpoint
    config = dict(model.config)
    return Checkpoint(
        model=model, config=config,
        normalization=dict(getattr(model, "normalization", None) or DEFAULT_NORMALIZATION),
        class_names=list(getattr(model, "class_names", None) or default_class_names(n_classes_of(config))),
        provenance=dict(checkpoint.provenance) if checkpoint is not None else {},
        label_offset=tuple(getattr(model, "label_offset", ()) or ()),
    )


def size_multiple(model: nn.Module) -> int:
    """Every spatial side of an exported graph's input is a multiple of this."""
    return 2 ** int(model.depth)


def export_metadata(checkpoint: Checkpoint) -> dict:
    """What a host needs beside the graph: config, normalisation, classes, size rule, provenance."""
    model = checkpoint.model
    return {
        "format": "napari-unet-export",
        "config": dict(checkpoint.config),
        "normalization": dict(checkpoint.normalization),
        "class_names": list(checkpoint.class_names),
        "output": "sigmoid probability of class 1" if model.out_channels == 1 else "softmax probabilities",
        "input": "normalised image, (N, C, *spatial), every spatial side a multiple of size_multiple",
        "size_multiple": size_multiple(model),
        "spatial_dims": int(model.spatial_dims),
        "label_offset": [float(value) for value in checkpoint.label_offset],
        "provenance": _json_safe(checkpoint.provenance),
    }


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------------- writing files


def check_output(path: str | os.PathLike) -> Path:
    """``path`` as a Path whose folder exists and is writable, else ExportError."""
    path = Path(path).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ExportError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: the folder {folder} is not writable")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a folder; give a file name")
    return path


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A hidden temporary path beside ``path``, renamed onto it when the block succeeds."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _example_input(model: nn.Module, sides: int = 2) -> torch.Tensor:
    """A random input whose sides are ``sides`` multiples of the size rule."""
    side = size_multiple(model) * sides
    return torch.rand(1, int(model.in_channels), *([side] * int(model.spatial_dims)))


def _second_input(model: nn.Module) -> torch.Tensor:
    """Another size (and batch) than the trace example: proves the graph is not size-bound."""
    multiple = size_multiple(model)
    sides = [multiple * (3 + axis) for axis in range(int(model.spatial_dims))]
    return torch.rand(2, int(model.in_channels), *sides)


def _eager(network: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return network(x).numpy()


def _check_match(name: str, exported: np.ndarray, expected: np.ndarray) -> None:
    difference = float(np.abs(exported - expected).max())
    if not difference <= MATCH_TOLERANCE:
        raise ExportError(
            f"the {name} graph differs from the model by up to {difference:.2g} "
            f"(more than {MATCH_TOLERANCE:g}); it was not written"
        )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _eval_copy(checkpoint: Checkpoint) -> ProbabilityNetwork:
    """The checkpoint's model on the CPU in eval mode, wrapped with its activation (a copy)."""
    model = build_model(**checkpoint.config)
    model.load_state_dict({key: value.detach().cpu() for key, value in checkpoint.model.state_dict().items()})
    return ProbabilityNetwork(model).eval()


# ---------------------------------------------------------------------------------------- formats


def export_torchscript(checkpoint: Checkpoint, output: str | os.PathLike) -> Path:
    """A traced TorchScript file (``torch.jit.load`` opens it; metadata in ``napari_unet.json``)."""
    path = check_output(output)
    network = _eval_copy(checkpoint)
    example = _example_input(network.model)
    try:
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(network, example, check_trace=False)
    except Exception as exc:
        raise ExportError(f"this model cannot be exported to TorchScript: {_first_line(exc)}") from exc
    second = _second_input(network.model)
    with torch.no_grad():
        _check_match("TorchScript", traced(second).numpy(), _eager(network, second))
    extra = {METADATA_NAME: json.dumps(export_metadata(checkpoint))}
    with _atomic_target(path) as partial:
        try:
            traced.save(str(partial), _extra_files=extra)
        except OSError as exc:
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def load_torchscript_metadata(path: str | os.PathLike) -> dict:
    """The metadata stored in a TorchScript file written by :func:`export_torchscript`."""
    extra = {METADATA_NAME: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA_NAME])


def onnx_available() -> bool:
    """Whether this environment can write ONNX (``pip install napari-unet[export]``)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(checkpoint: Checkpoint, output: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """An ONNX file with a dynamic batch and spatial sides (multiples of ``2**depth``).

    Checked against the PyTorch model with onnxruntime when it is installed.
    """
    path = check_output(output)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old: napari-unet writes opset {MIN_OPSET} or newer")
    if not onnx_available():
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install 'napari-unet[export]'")
    import onnx

    network = _eval_copy(checkpoint)
    model = network.model
    steps = {0: torch.export.Dim("batch", min=1, max=1024)}
    for axis in range(int(model.spatial_dims)):
        steps[2 + axis] = size_multiple(model) * torch.export.Dim(f"blocks{axis}", min=1, max=4096)
    with _atomic_target(path) as partial:
        try:
            with _quiet():
                torch.onnx.export(
                    network, (_example_input(model),), str(partial), dynamo=True, opset_version=opset,
                    input_names=["image"], output_names=["probabilities"], dynamic_shapes=(steps,),
                    external_data=False, verbose=False,
                )
        except OSError as exc:
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
        except Exception as exc:
            raise ExportError(f"this model cannot be exported to ONNX: {_first_line(exc)}") from exc
        graph = onnx.load(str(partial))
        onnx.helper.set_model_props(graph, {"napari_unet": json.dumps(export_metadata(checkpoint))})
        onnx.save(graph, str(partial))
        second = _second_input(model)
        result = run_onnx(partial, second.numpy())
        if result is not None:
            _check_match("ONNX", result, _eager(network, second))
    return path


def run_onnx(path: str | os.PathLike, image: np.ndarray) -> np.ndarray | None:
    """Run an exported ONNX file on a normalised (N, C, *spatial) batch; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image.astype(np.float32)})[0]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and tracer warnings; the caller reports in its own words."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(_stdlib_io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------- entry


def export_model(
    model_source: str | os.PathLike | Checkpoint, output: str | os.PathLike, fmt: str, *,
    opset: int = DEFAULT_OPSET, test_image: np.ndarray | None = None, **package_fields: Any,
) -> Path:
    """Export a checkpoint (path or loaded) to ``fmt`` (one of ``EXPORT_FORMATS``) at ``output``.

    ``test_image`` and ``package_fields`` (authors, license, ...) are for bioimage.io packages.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    checkpoint = model_source if isinstance(model_source, Checkpoint) else load_checkpoint(model_source)
    if fmt == "torchscript":
        return export_torchscript(checkpoint, output)
    if fmt == "onnx":
        return export_onnx(checkpoint, output, opset=opset)
    from .bioimageio import export_bioimageio

    return export_bioimageio(checkpoint, output, test_image=test_image, **package_fields)


__all__ = [
    "DEFAULT_OPSET", "EXPORT_FORMATS", "MIN_OPSET", "CheckpointError", "ExportError", "ProbabilityNetwork",
    "check_output", "checkpoint_for", "export_metadata", "export_model", "export_onnx", "export_torchscript",
    "load_torchscript_metadata", "onnx_available", "probability_network", "run_onnx", "size_multiple",
]
