"""bioimage.io model packages: write one from a checkpoint, open one that holds our model.

A package is a zip with ``rdf.yaml`` (model spec 0.5, built and checked by the official
``bioimageio.spec``), the weights as ``pytorch_state_dict`` (architecture
``napari_unet.export:probability_network``), a traced ``torchscript`` file and, when onnx is
installed, ``onnx`` (those two need no napari-unet), a test input and its expected output, our percentile normalisation as the
``scale_range`` preprocessing, a cover image, a README, and our own checkpoint as an attachment,
which is what :func:`import_bioimageio` opens (so every safety check of ``load_checkpoint`` applies).
"""

from __future__ import annotations

import getpass
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from . import io
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .export import (
    DEFAULT_OPSET,
    ExportError,
    _atomic_target,
    _eval_copy,
    check_output,
    export_metadata,
    export_onnx,
    export_torchscript,
    onnx_available,
    size_multiple,
)

CHECKPOINT_ATTACHMENT = "napari_unet_checkpoint.pt"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
# the test input is a centre crop of at most this many pixels per side (2D) / voxels (3D)
TEST_SIDE = {2: 256, 3: 64}
CITATIONS = {
    "unet": ("Ronneberger, Fischer, Brox (2015). U-Net: Convolutional Networks for Biomedical Image "
             "Segmentation. MICCAI.", "10.1007/978-3-319-24574-4_28"),
    "unet3d": ("Cicek et al. (2016). 3D U-Net: Learning Dense Volumetric Segmentation from Sparse "
               "Annotation. MICCAI.", "10.1007/978-3-319-46723-8_49"),
    "resunet": ("Zhang, Liu, Wang (2018). Road Extraction by Deep Residual U-Net. IEEE GRSL.",
                "10.1109/LGRS.2018.2802944"),
    "attention_unet": ("Oktay et al. (2018). Attention U-Net: Learning Where to Look for the Pancreas. "
                       "MIDL.", "10.48550/arXiv.1804.03999"),
    "unetpp": ("Zhou et al. (2018). UNet++: A Nested U-Net Architecture for Medical Image Segmentation. "
               "DLMIA.", "10.1007/978-3-030-00889-5_1"),
    "transunet": ("Chen et al. (2021). TransUNet: Transformers Make Strong Encoders for Medical Image "
                  "Segmentation.", "10.48550/arXiv.2102.04306"),
}
DEFAULT_LICENSE = "CC-BY-4.0"


def spec_available() -> bool:
    """Whether ``bioimageio.spec`` is installed (``pip install 'napari-unet[export]'``)."""
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        return False
    return True


def is_bioimageio_package(path: str | os.PathLike) -> bool:
    """A zip with an ``rdf.yaml`` (or ``bioimageio.yaml``) at its top."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name in archive.namelist() for name in RDF_NAMES)
    except (OSError, zipfile.BadZipFile):
        return False


def import_bioimageio(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """The checkpoint inside a bioimage.io package written by napari-unet.

    Raises CheckpointError for a package of another program (it holds no napari-unet checkpoint).
    """
    path = Path(path)
    if not is_bioimageio_package(path):
        raise CheckpointError(f"{path} is not a bioimage.io model package (a zip with rdf.yaml)")
    with zipfile.ZipFile(path) as archive:
        if CHECKPOINT_ATTACHMENT not in archive.namelist():
            raise CheckpointError(
                f"{path.name} is a bioimage.io package of another program: it holds no napari-unet "
                "model; open it with bioimageio.core or deepImageJ"
            )
        with tempfile.TemporaryDirectory() as folder:
            extracted = Path(archive.extract(CHECKPOINT_ATTACHMENT, folder))
            checkpoint = load_checkpoint(extracted, map_location=map_location)
    checkpoint.path = path
    return checkpoint


# ------------------------------------------------------------------------------------------ test data


def _test_image(checkpoint: Checkpoint, image: np.ndarray | None) -> np.ndarray:
    """A real image for the package's test tensors: given, else the training data, else the sample."""
    if image is None:
        data = checkpoint.provenance.get("data_paths") or []
        if data:
            try:
                image = io.read_image(data[0])
            except (OSError, ValueError):
                image = None
    if image is None:
        from ._sample_data import load_sample

        image = load_sample("organelles_3d" if checkpoint.model.spatial_dims == 3 else "em_membranes")[0]
    return np.asarray(image)


def _test_input(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """(1, C, *spatial) float32: the image's first sample, centre-cropped to the size rule."""
    dims, channels = int(model.spatial_dims), int(model.in_channels)
    array = np.asarray(image, dtype=np.float32)
    wanted_ndim = dims + (1 if channels > 1 else 0)
    while array.ndim > wanted_ndim:  # a stack: its first slice (2D model) / volume (3D model)
        array = array[0]
    if array.ndim != wanted_ndim:
        raise ExportError(
            f"the test image has {np.asarray(image).ndim} dimensions; a {dims}D model with {channels} "
            f"channel(s) needs {wanted_ndim}"
        )
    if channels == 1:
        array = array[None]
    multiple = size_multiple(model)
    crop = []
    for side in array.shape[1:]:
        keep = min(side, TEST_SIDE[dims]) // multiple * multiple
        if keep == 0:
            raise ExportError(f"the test image is smaller than {multiple} pixels on a side; give a bigger one")
        start = (side - keep) // 2
        crop.append(slice(start, start + keep))
    return np.ascontiguousarray(array[(slice(None), *crop)][None])


def _expected_output(checkpoint: Checkpoint, test_input: np.ndarray) -> np.ndarray:
    stats = io.compute_normalization(test_input[0], checkpoint.normalization)
    normalised = torch.from_numpy(io.apply_normalization(test_input, stats))
    with torch.no_grad():
        return _eval_copy(checkpoint)(normalised).numpy().astype(np.float32)


def _cover(test_input: np.ndarray, output: np.ndarray, path: Path) -> Path:
    """Input and output side by side (their middle slice in 3D), 8-bit grey PNG."""
    from PIL import Image

    def plane(array: np.ndarray) -> np.ndarray:
        plane = array[0, 0] if array.ndim == 4 else array[0, 0, array.shape[2] // 2]
        lo, hi = np.percentile(plane, (1, 99.8))
        return (np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)

    foreground = output[:, -1:] if output.shape[1] > 1 else output
    picture = np.concatenate([plane(test_input), np.full((plane(test_input).shape[0], 8), 255, np.uint8),
                              plane(foreground)], axis=1)
    Image.fromarray(picture).save(path)
    return path


# -------------------------------------------------------------------------------------------- writing


def _readme(checkpoint: Checkpoint, name: str) -> str:
    config = checkpoint.config
    return (
        f"# {name}\n\n"
        f"A `{config['name']}` ({config['width']} features, depth {config['depth']}) trained with "
        f"napari-unet. Input: {config['in_channels']} channel(s); output: "
        f"{'the probability of ' + checkpoint.class_names[-1] if config['out_channels'] == 1 else 'class probabilities'}"
        f" ({', '.join(checkpoint.class_names)}).\n\n"
        "Preprocessing: per image, `(x - p_low) / (p_high - p_low)` with the percentiles in rdf.yaml.\n"
        f"Every spatial side must be a multiple of {size_multiple(checkpoint.model)}: pad the image first.\n\n"
        "In napari-unet: `napari-unet predict --model this.zip ...`, or *Load checkpoint* in the Segment dock.\n\n"
        "# Validation\n\n"
        "The test tensors are a centre crop of a real image and the output napari-unet computed for it; "
        "bioimageio.core checks that every weight format reproduces it.\n"
    )


def export_bioimageio(
    checkpoint: Checkpoint, output: str | os.PathLike, *, test_image: np.ndarray | None = None,
    name: str | None = None, description: str | None = None, authors: list[str] | None = None,
    license: str = DEFAULT_LICENSE, tags: list[str] | None = None,
) -> Path:
    """Write a bioimage.io model package (zip) for ``checkpoint`` at ``output``.

    Authors default to the checkpoint's provenance ``"authors"``, else the user's login name.
    """
    path = check_output(output)
    if not spec_available():
        raise ExportError("bioimage.io packages need bioimageio.spec: pip install 'napari-unet[export]'")
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    model = checkpoint.model
    dims = int(model.spatial_dims)
    config = checkpoint.config
    variant = str(config["name"]).removesuffix("3d")
    name = name or f"napari-unet {config['name']} {Path(checkpoint.path).stem if checkpoint.path else ''}".strip()
    authors = authors or list(checkpoint.provenance.get("authors") or []) or [getpass.getuser()]
    test_input = _test_input(model, _test_image(checkpoint, test_image))
    test_output = _expected_output(checkpoint, test_input)

    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        np.save(folder / "test_input.npy", test_input)
        np.save(folder / "test_output.npy", test_output)
        tifffile.imwrite(folder / "sample_input.tif", test_input)
        tifffile.imwrite(folder / "sample_output.tif", test_output)
        torch.save(_eval_copy(checkpoint).state_dict(), folder / "weights.pt")
        export_torchscript(checkpoint, folder / "weights_torchscript.pt")
        onnx_weights = None
        if onnx_available():  # a third format for hosts without PyTorch (e.g. deepImageJ, ilastik)
            export_onnx(checkpoint, folder / "weights.onnx")
            onnx_weights = spec.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=DEFAULT_OPSET,
                                                 parent="pytorch_state_dict")
        save_checkpoint(folder / CHECKPOINT_ATTACHMENT, model, normalization=checkpoint.normalization,
                        class_names=checkpoint.class_names, history=checkpoint.history,
                        provenance=checkpoint.provenance, extra=checkpoint.extra)
        (folder / "README.md").write_text(_readme(checkpoint, name))
        _cover(test_input, test_output, folder / "cover.png")

        space = ["z", "y", "x"][-dims:]
        multiple = size_multiple(model)
        input_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[
            spec.Identifier(f"channel{index}") for index in range(int(model.in_channels))])]
        input_axes += [spec.SpaceInputAxis(id=spec.AxisId(axis), size=spec.ParameterizedSize(min=multiple, step=multiple))
                       for axis in space]
        output_names = checkpoint.class_names[-1:] if model.out_channels == 1 else checkpoint.class_names
        output_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[
            spec.Identifier(_identifier(label)) for label in output_names])]
        output_axes += [spec.SpaceOutputAxis(id=spec.AxisId(axis), size=spec.SizeReference(
            tensor_id=spec.TensorId("image"), axis_id=spec.AxisId(axis))) for axis in space]
        normalization = checkpoint.normalization
        method = normalization.get("method", "percentile")
        low, high = ((0.0, 100.0) if method == "minmax"
                     else (float(normalization.get("low", 1.0)), float(normalization.get("high", 99.8))))
        preprocessing = [] if method == "none" else [spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
            axes=[spec.AxisId("channel"), *(spec.AxisId(axis) for axis in space)],
            min_percentile=low, max_percentile=high))]
        text, doi = CITATIONS.get(variant, CITATIONS["unet"])
        citations = [spec.CiteEntry(text=text, doi=spec.Doi(doi))]
        if variant != "unet":
            citations.insert(0, spec.CiteEntry(text=CITATIONS["unet"][0], doi=spec.Doi(CITATIONS["unet"][1])))
        torch_version = spec.Version(torch.__version__.split("+")[0])
        try:
            description_object = spec.ModelDescr(
                name=name,
                description=description or f"{config['name']} segmentation model trained with napari-unet",
                authors=[spec.Author(name=author) for author in authors],
                cite=citations,
                license=license,
                documentation=spec.FileDescr(source=folder / "README.md"),
                covers=[spec.FileDescr(source=folder / "cover.png")],
                tags=tags or ["napari-unet", "unet", "segmentation", f"{dims}d", str(config["name"])],
                inputs=[spec.InputTensorDescr(
                    id=spec.TensorId("image"), axes=input_axes,
                    test_tensor=spec.FileDescr(source=folder / "test_input.npy"),
                    sample_tensor=spec.FileDescr(source=folder / "sample_input.tif"),
                    preprocessing=preprocessing,
                )],
                outputs=[spec.OutputTensorDescr(
                    id=spec.TensorId("probabilities"), axes=output_axes,
                    test_tensor=spec.FileDescr(source=folder / "test_output.npy"),
                    sample_tensor=spec.FileDescr(source=folder / "sample_output.tif"),
                )],
                weights=spec.WeightsDescr(
                    pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                        source=folder / "weights.pt", pytorch_version=torch_version,
                        architecture=spec.ArchitectureFromLibraryDescr(
                            import_from="napari_unet.export", callable=spec.Identifier("probability_network"),
                            kwargs=dict(config)),
                    ),
                    torchscript=spec.TorchscriptWeightsDescr(
                        source=folder / "weights_torchscript.pt", pytorch_version=torch_version,
                        parent="pytorch_state_dict"),
                    onnx=onnx_weights,
                ),
                attachments=[spec.FileDescr(source=folder / CHECKPOINT_ATTACHMENT)],
                config={"napari_unet": export_metadata(checkpoint)},
            )
        except Exception as exc:
            raise ExportError(f"the bioimage.io description is not valid: {_first_error(exc)}") from exc
        with _atomic_target(path) as partial:
            try:
                save_bioimageio_package(description_object, output_path=partial.with_suffix(".zip"))
                os.replace(partial.with_suffix(".zip"), partial)
            except OSError as exc:
                raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
            finally:
                partial.with_suffix(".zip").unlink(missing_ok=True)
    return path


def _identifier(label: str) -> str:
    """A class name as a bioimage.io identifier (letters, digits, underscores)."""
    cleaned = "".join(char if char.isalnum() else "_" for char in str(label)).strip("_")
    return cleaned or "class"


def _first_error(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__


def validate_package(path: str | os.PathLike) -> tuple[bool, str]:
    """Run ``bioimageio.core``'s test of the package (format, test tensors through each weight format).

    Returns ``(passed, summary)``; ExportError when bioimageio.core is not installed.
    """
    try:
        from bioimageio.core import test_model
    except ImportError as exc:
        raise ExportError("validating a package needs bioimageio.core: pip install 'napari-unet[export]'") from exc
    summary = test_model(str(path))
    return summary.status == "passed", summary.format()
