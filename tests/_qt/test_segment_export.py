"""The Segment dock's Export model…: the shared model leaves as a package napari-unet opens again."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from napari_unet import bioimageio, export
from napari_unet._qt import segment_export
from napari_unet._qt.segment_widget import SegmentWidget
from napari_unet._sample_data import SAMPLE_MODEL, make_em_membranes
from napari_unet.checkpoint import load_checkpoint


@pytest.fixture
def widget(viewer, qtbot):
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment", area="right")
    image, _ = make_em_membranes(shape=(3, 96, 128), seed=2)
    viewer.add_image(image, name="EM")
    return segment


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: widget.run_button.isEnabled() and widget.export_button.isEnabled(), timeout=120_000)


def test_the_export_format_follows_the_suffix_or_the_chosen_filter(tmp_path):
    assert segment_export.export_format(tmp_path / "m.onnx") == ("onnx", tmp_path / "m.onnx")
    assert segment_export.export_format(tmp_path / "m.ZIP") == ("bioimageio", tmp_path / "m.ZIP")
    assert segment_export.export_format(tmp_path / "m", "TorchScript (*.pt)") == ("torchscript", tmp_path / "m.pt")


@pytest.mark.skipif(not bioimageio.spec_available(), reason="bioimageio.spec not installed")
def test_export_button_writes_a_package_cut_from_the_slice_in_view(viewer, widget, qtbot, tmp_path, monkeypatch,
                                                                   notifications):
    target = tmp_path / "membranes"
    monkeypatch.setattr(segment_export.QFileDialog, "getSaveFileName",
                        lambda *a, **k: (str(target), "bioimage.io model package (*.zip)"))
    assert widget.load_checkpoint(SAMPLE_MODEL) is not None
    _wait(qtbot, widget)
    step = list(viewer.dims.current_step)
    step[0] = 2
    viewer.dims.current_step = tuple(step)
    widget.export_button.click()
    _wait(qtbot, widget)
    package = tmp_path / "membranes.zip"
    assert package.is_file(), notifications
    assert f"Exported the model to {package}" in widget.status_label.text()
    with zipfile.ZipFile(package) as archive:
        test_input = np.load(archive.open("test_input.npy"))
    # the test tensor is slice 2 of the layer, centre-cropped to the network's size rule (8)
    image = viewer.layers["EM"].data[2]
    assert test_input.shape == (1, 1, 96, 128)
    np.testing.assert_array_equal(test_input[0, 0], image.astype(np.float32))
    reopened = load_checkpoint(package)
    for key, value in widget.holder.model.state_dict().items():
        assert torch.equal(reopened.model.state_dict()[key], value)


def test_a_fresh_model_exports_to_torchscript_with_a_warning(viewer, widget, qtbot, tmp_path, notifications):
    widget.set_fresh_model("transunet", width=4, depth=2)
    widget.export_model(tmp_path / "fresh.pt")
    _wait(qtbot, widget)
    assert any("untrained" in message for message in notifications)
    assert export.load_torchscript_metadata(tmp_path / "fresh.pt")["config"]["name"] == "transunet"


def test_export_without_a_model_or_into_a_missing_folder_says_why(viewer, widget, qtbot, tmp_path, notifications):
    widget.holder.clear()
    widget.set_model_source("checkpoint")
    assert widget.export_model(tmp_path / "m.pt") is None
    assert any("no model to export" in message for message in notifications)
    widget.set_fresh_model("unet", width=4, depth=2)
    widget.export_model(tmp_path / "missing" / "m.pt")
    _wait(qtbot, widget)
    assert any("the folder" in message and "does not exist" in message for message in notifications)
    assert not (tmp_path / "missing").exists()
    # the dock still works afterwards
    assert widget.run() is not None
    _wait(qtbot, widget)
    assert "EM labels" in viewer.layers
