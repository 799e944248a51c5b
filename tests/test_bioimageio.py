"""bioimage.io packages: written valid by the official spec, opened back as our checkpoint."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from napari_unet import bioimageio, export
from napari_unet._sample_data import SAMPLE_MODEL
from napari_unet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from napari_unet.models import build_model

yaml = pytest.importorskip("yaml")
pytestmark = pytest.mark.skipif(not bioimageio.spec_available(),
                                reason="bioimageio.spec not installed (pip install 'napari-unet[export]')")


def _core_missing() -> str | None:
    try:
        import bioimageio.core  # noqa: F401
    except ImportError as exc:
        return f"bioimageio.core does not import here ({exc})"
    return None


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The demo's trained membrane UNet as a package, with a real EM slice as its test image."""
    folder = tmp_path_factory.mktemp("package")
    checkpoint = load_checkpoint(SAMPLE_MODEL)
    checkpoint.provenance["authors"] = ["A. Biologist"]
    path = bioimageio.export_bioimageio(checkpoint, folder / "membranes.zip", license="MIT")
    return path, checkpoint


def test_the_package_holds_what_the_spec_asks_for(package):
    path, checkpoint = package
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        test_input = np.load(archive.open("test_input.npy"))
        test_output = np.load(archive.open("test_output.npy"))
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "test_input.npy", "test_output.npy",
            "cover.png", "README.md", bioimageio.CHECKPOINT_ATTACHMENT} <= names
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5")
    assert [author["name"] for author in rdf["authors"]] == ["A. Biologist"]
    assert rdf["license"] == "MIT"
    assert any("10.1007/978-3-319-24574-4_28" in str(entry.get("doi")) for entry in rdf["cite"])
    assert set(rdf["weights"]) >= {"pytorch_state_dict", "torchscript"}
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["callable"] == "probability_network"
    scale = next(step for step in rdf["inputs"][0]["preprocessing"] if step["id"] == "scale_range")
    assert (scale["kwargs"]["min_percentile"], scale["kwargs"]["max_percentile"]) == (1.0, 99.8)
    sizes = [axis.get("size") for axis in rdf["inputs"][0]["axes"] if axis.get("type") == "space"]
    assert sizes == [{"min": 8, "step": 8}] * 2  # depth 3
    assert rdf["config"]["napari_unet"]["config"] == checkpoint.config
    # the test output is what napari-unet computes for the test input
    channels = checkpoint.config["out_channels"]
    assert test_input.shape == (1, 1, 256, 256) and test_output.shape == (1, channels, 256, 256)
    assert 0 <= test_output.min() and test_output.max() <= 1 and test_output[:, -1].std() > 0.1
    np.testing.assert_allclose(test_output.sum(axis=1), 1, atol=1e-5)  # softmax probabilities


def test_the_package_opens_as_our_checkpoint(package):
    path, checkpoint = package
    opened = load_checkpoint(path)
    assert opened.config == checkpoint.config
    assert opened.normalization == checkpoint.normalization
    assert opened.class_names == checkpoint.class_names
    for key, value in checkpoint.model.state_dict().items():
        assert torch.equal(opened.model.state_dict()[key], value)
    assert opened.path == path


def test_its_torchscript_weights_reproduce_the_test_output(package):
    path, _ = package
    with zipfile.ZipFile(path) as archive:
        test_input = np.load(archive.open("test_input.npy"))
        expected = np.load(archive.open("test_output.npy"))
        scripted = torch.jit.load(archive.open("weights_torchscript.pt"))
    lo, hi = np.percentile(test_input, (1, 99.8))
    with torch.no_grad():
        result = scripted(torch.from_numpy(((test_input - lo) / (hi - lo)).astype(np.float32))).numpy()
    assert np.abs(result - expected).max() <= 1e-4


def test_official_validation_passes(package):
    reason = _core_missing()
    if reason:
        pytest.skip(reason)
    passed, summary = bioimageio.validate_package(package[0])
    assert passed, summary


def test_a_3d_transunet_package_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("transunet3d", width=4, depth=2)
    save_checkpoint(tmp_path / "volume.pt", model)
    volume = np.random.default_rng(0).normal(100, 20, (20, 40, 36)).astype(np.float32)
    path = bioimageio.export_bioimageio(load_checkpoint(tmp_path / "volume.pt"), tmp_path / "volume.zip",
                                        test_image=volume, authors=["Me"])
    with zipfile.ZipFile(path) as archive:
        assert np.load(archive.open("test_input.npy")).shape == (1, 1, 20, 40, 36)
    assert load_checkpoint(path).config == model.config


def test_a_package_of_another_program_is_one_sentence(tmp_path):
    foreign = tmp_path / "stardist.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("rdf.yaml", "type: model\nname: StarDist\n")
        archive.writestr("weights.pt", b"not ours")
    with pytest.raises(CheckpointError, match=r"^stardist\.zip is a bioimage\.io package of another program: "
                                              r"it holds no napari-unet model"):
        load_checkpoint(foreign)


def test_a_test_image_smaller_than_the_network_is_one_sentence(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model("unet", width=2, depth=4))
    with pytest.raises(export.ExportError, match="smaller than 16 pixels on a side"):
        bioimageio.export_bioimageio(load_checkpoint(tmp_path / "m.pt"), tmp_path / "m.zip",
                                     test_image=np.ones((8, 64), np.float32))
    assert not (tmp_path / "m.zip").exists()
