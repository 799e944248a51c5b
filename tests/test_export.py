"""TorchScript and ONNX export: the same probabilities as the PyTorch model, any size, nothing half-written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import export, io
from napari_unet._sample_data import SAMPLE_MODEL
from napari_unet.checkpoint import load_checkpoint, save_checkpoint
from napari_unet.models import available_models, build_model

needs_onnx = pytest.mark.skipif(not export.onnx_available(), reason="onnx/onnxscript not installed "
                                "(pip install 'napari-unet[export]')")


def _onnxruntime_missing() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return True
    return False


needs_runtime = pytest.mark.skipif(_onnxruntime_missing(), reason="onnxruntime not installed (optional)")


@pytest.fixture
def trained(tmp_path):
    """The demo's trained membrane UNet (a real model, not random weights)."""
    return load_checkpoint(SAMPLE_MODEL)


@pytest.fixture
def isbi_slice(shared_data):
    """One real ISBI 2012 slice, normalised as napari-unet normalises it: (1, 1, 512, 512)."""
    image = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")[7]
    stats = io.compute_normalization(image)
    return torch.from_numpy(io.apply_normalization(image, stats))[None, None]


def _eager(checkpoint, x):
    with torch.no_grad():
        return export.ProbabilityNetwork(checkpoint.model.eval())(x).numpy()


def test_torchscript_matches_the_model_on_a_real_isbi_slice(trained, isbi_slice, tmp_path):
    path = export.export_torchscript(trained, tmp_path / "membranes.ts")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        scripted = loaded(isbi_slice).numpy()
    assert np.abs(scripted - _eager(trained, isbi_slice)).max() <= 1e-4
    # another size (a multiple of 2**depth) and batch: the traced graph is not bound to one size
    crop = isbi_slice[..., :240, :368].repeat(2, 1, 1, 1)
    with torch.no_grad():
        assert np.abs(loaded(crop).numpy() - _eager(trained, crop)).max() <= 1e-4
    metadata = export.load_torchscript_metadata(path)
    assert metadata["config"] == trained.config
    assert metadata["normalization"] == trained.normalization
    assert metadata["size_multiple"] == 2 ** trained.config["depth"]


@needs_onnx
@needs_runtime
def test_onnx_matches_the_model_on_a_real_isbi_slice(trained, isbi_slice, tmp_path):
    path = export.export_onnx(trained, tmp_path / "membranes.onnx")
    result = export.run_onnx(path, isbi_slice.numpy())
    assert np.abs(result - _eager(trained, isbi_slice)).max() <= 1e-4
    crop = isbi_slice[..., :240, :368].repeat(3, 1, 1, 1)
    assert np.abs(export.run_onnx(path, crop.numpy()) - _eager(trained, crop)).max() <= 1e-4
    import onnx

    props = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
    assert json.loads(props["napari_unet"])["class_names"] == trained.class_names


@pytest.mark.parametrize("name", ["unetpp", "transunet", "attention_unet3d", "transunet3d"])
def test_every_kind_of_variant_exports(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, in_channels=2, out_channels=3, width=4, depth=2)
    save_checkpoint(tmp_path / "model.pt", model)
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    sides = (8, 12, 16)[: model.spatial_dims]
    x = torch.rand(2, 2, *sides)
    loaded = torch.jit.load(str(export.export_torchscript(checkpoint, tmp_path / "model.ts")))
    with torch.no_grad():
        scripted = loaded(x).numpy()
    assert np.abs(scripted - _eager(checkpoint, x)).max() <= 1e-4
    assert np.allclose(scripted.sum(axis=1), 1, atol=1e-5)  # softmax over the 3 classes
    if export.onnx_available() and not _onnxruntime_missing():
        path = export.export_onnx(checkpoint, tmp_path / "model.onnx")
        assert np.abs(export.run_onnx(path, x.numpy()) - _eager(checkpoint, x)).max() <= 1e-4


def test_every_registered_variant_is_exportable_to_torchscript(tmp_path):
    for name in available_models():
        model = build_model(name, width=2, depth=1)
        save_checkpoint(tmp_path / f"{name}.pt", model)
        export.export_torchscript(load_checkpoint(tmp_path / f"{name}.pt"), tmp_path / f"{name}.ts")
    assert sorted(path.stem for path in tmp_path.glob("*.ts")) == sorted(available_models())


# ------------------------------------------------------------------------------------ bad input


@needs_onnx
def test_an_old_opset_is_one_sentence_and_writes_nothing(trained, tmp_path):
    with pytest.raises(export.ExportError, match=r"^ONNX opset 11 is too old: napari-unet writes opset 18 or newer$"):
        export.export_onnx(trained, tmp_path / "old.onnx", opset=11)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else False,
                    reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_sentence(trained, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(export.ExportError, match="is not writable"):
            export.export_torchscript(trained, folder / "model.ts")
    finally:
        folder.chmod(0o755)


def test_a_folder_that_is_not_writable_is_refused_before_any_work(trained, tmp_path, monkeypatch):
    # the access check itself (root can write anywhere, so the test above may skip)
    monkeypatch.setattr(export.os, "access", lambda path, mode: False)
    with pytest.raises(export.ExportError, match=r"cannot write .*model\.ts: the folder .* is not writable"):
        export.export_torchscript(trained, tmp_path / "model.ts")
    with pytest.raises(export.ExportError, match="does not exist"):
        export.export_torchscript(trained, tmp_path / "missing" / "model.ts")


def test_an_unsupported_op_is_one_sentence_and_leaves_nothing(trained, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::fancy_op\nlong trace ...")

    monkeypatch.setattr(export.torch.jit, "trace", refuse)
    with pytest.raises(export.ExportError, match=r"^this model cannot be exported to TorchScript: "
                                                 r"Unsupported operator aten::fancy_op$"):
        export.export_torchscript(trained, tmp_path / "model.ts")
    assert list(tmp_path.iterdir()) == []


@needs_onnx
def test_an_onnx_exporter_failure_leaves_no_partial_file(trained, tmp_path, monkeypatch):
    def half_write(model, args, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half an onnx file")
        raise RuntimeError("Failed to convert the exported program to an ONNX model.")

    monkeypatch.setattr(export.torch.onnx, "export", half_write)
    with pytest.raises(export.ExportError, match="cannot be exported to ONNX: Failed to convert"):
        export.export_onnx(trained, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_graph_that_does_not_match_is_not_written(trained, tmp_path, monkeypatch):
    real_trace = torch.jit.trace

    def wrong_trace(network, example, **kwargs):
        class Off(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = network

            def forward(self, x):
                return self.inner(x) + 0.01

        return real_trace(Off(), example, **kwargs)

    monkeypatch.setattr(export.torch.jit, "trace", wrong_trace)
    with pytest.raises(export.ExportError, match="differs from the model by up to 0.01"):
        export.export_torchscript(trained, tmp_path / "model.ts")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_format_is_refused(trained, tmp_path):
    with pytest.raises(export.ExportError, match="unknown export format 'keras'; use one of torchscript, onnx, bioimageio"):
        export.export_model(trained, tmp_path / "model.h5", "keras")
