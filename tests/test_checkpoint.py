"""Tests for napari_unet.checkpoint: round trips, and refusing unsafe or foreign files."""

from __future__ import annotations

import os
import pathlib
import pickle

import pytest
import torch

from napari_unet.checkpoint import (
    FORMAT_NAME,
    CheckpointError,
    describe_checkpoint,
    format_parameter_count,
    load_checkpoint,
    save_checkpoint,
)
from napari_unet.models import build_model


def _tiny_model(name: str = "unet", out_channels: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, out_channels=out_channels, width=4, depth=2)
    # Make batch-norm running statistics non-trivial so a lost buffer would change predictions.
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, *([16] * model.spatial_dims)))
    return model.eval()




@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    return _tiny_model()


@pytest.fixture
def saved(tmp_path, tiny_unet):
    model = tiny_unet
    path = save_checkpoint(
        tmp_path / "model.pt",
        model,
        normalization={"method": "percentile", "low": 2.0, "high": 99.0, "lo": 3.0, "hi": 200.0},
        class_names=["membrane", "cell"],
        history={"loss": [0.9, 0.5], "val_dice": [[0.4, 0.6], [0.7, 0.9]], "step": [10, 20],
                 "best_val_dice": [0.7, 0.9], "best_step": 20, "stop_reason": ""},
        provenance={"data_paths": [pathlib.Path("/data/train-volume.tif")], "steps": 20},
        extra={"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3}]}},
    )
    return model, path


def test_round_trip_predicts_identically(saved):
    model, path = saved
    checkpoint = load_checkpoint(path)
    loaded = checkpoint.model
    assert not loaded.training
    image = torch.randn(1, 1, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image), rtol=0, atol=0)
    assert checkpoint.config == model.config
    assert checkpoint.path == path


def test_context_is_stored_and_attached(saved):
    _, path = saved
    checkpoint = load_checkpoint(path)
    # only the spec is kept: stats are recomputed on every image
    assert checkpoint.normalization == {"method": "percentile", "low": 2.0, "high": 99.0}
    assert checkpoint.model.normalization == checkpoint.normalization
    assert checkpoint.class_names == checkpoint.model.class_names == ["membrane", "cell"]
    assert checkpoint.history["loss"] == [0.9, 0.5]
    assert checkpoint.provenance["data_paths"] == ["/data/train-volume.tif"]
    assert checkpoint.provenance["torch_version"] == torch.__version__
    assert "saved_at" in checkpoint.provenance and "napari_unet_version" in checkpoint.provenance
    torch.testing.assert_close(checkpoint.extra["optimizer"]["state"][0]["exp_avg"], torch.ones(3))


def test_defaults_for_a_binary_3d_model(tmp_path):
    model = _tiny_model("unet3d", out_channels=1)
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "m3d.pt", model))
    assert checkpoint.class_names == ["background", "foreground"]
    assert checkpoint.normalization == {"method": "percentile", "low": 1.0, "high": 99.8}
    assert checkpoint.model.spatial_dims == 3


def test_label_offset_round_trip_and_damaged_values(tmp_path):
    model = _tiny_model()
    assert load_checkpoint(save_checkpoint(tmp_path / "plain.pt", model)).label_offset == (0.0, 0.0)
    model.label_offset = (-0.5, 0.25)
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "moved.pt", model))
    assert checkpoint.label_offset == checkpoint.model.label_offset == (-0.5, 0.25)
    assert "label offset: y -0.50, x +0.25 px" in describe_checkpoint(checkpoint)
    # written before offsets existed: none; a damaged value: refused with a plain message
    raw = torch.load(tmp_path / "moved.pt", weights_only=True)
    del raw["label_offset"]
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").model.label_offset == (0.0, 0.0)
    raw["label_offset"] = [0.5, float("nan")]
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt is damaged: its label_offset"):
        load_checkpoint(tmp_path / "bad.pt")
    model.label_offset = (3.0, 0.0)
    with pytest.raises(CheckpointError, match="label_offset"):
        save_checkpoint(tmp_path / "x.pt", model)


def test_save_is_atomic_and_strips_compile_prefix(tmp_path, tiny_unet):
    model = tiny_unet

    class Compiled(torch.nn.Module):  # what torch.compile returns: the model under ``_orig_mod``
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    path = save_checkpoint(tmp_path / "compiled.pt", Compiled(model))
    assert [p.name for p in tmp_path.iterdir()] == ["compiled.pt"]
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == 1
    assert not any(key.startswith("_orig_mod.") for key in raw["state_dict"])
    assert load_checkpoint(path).config == model.config


def test_save_refuses_non_plain_data(tmp_path, tiny_unet):
    with pytest.raises(CheckpointError, match="not plain data"):
        save_checkpoint(tmp_path / "x.pt", tiny_unet, provenance={"when": object()})
    with pytest.raises(CheckpointError, match="3 class names"):
        save_checkpoint(tmp_path / "x.pt", tiny_unet, class_names=["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []


def test_describe_checkpoint(saved):
    _, path = saved
    text = describe_checkpoint(load_checkpoint(path))
    assert "unet (2D)" in text
    assert "membrane, cell" in text
    assert "train-volume.tif (20 steps" in text
    assert "best validation Dice (mean over classes): 0.800" in text
    assert format_parameter_count(7_812_345) == "7.8 M"


class _Exploit:
    """Unpickling this creates ``marker``: the way a malicious checkpoint runs code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _ShellExploit(_Exploit):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("exploit", [_Exploit, _ShellExploit])
def test_malicious_torch_checkpoint_is_refused_without_running(tmp_path, exploit):
    marker = tmp_path / "pwned"
    payload = {"format": FORMAT_NAME, "format_version": 1, "config": {}, "state_dict": {}, "x": exploit(marker)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt contains Python objects that could run code; it was refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as file:
        pickle.dump(_Exploit(marker), file)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_truncated_checkpoint(saved, tmp_path):
    _, path = saved
    content = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_foreign_files_are_not_checkpoints(tmp_path, tiny_unet):
    torch.save(tiny_unet.state_dict(), tmp_path / "bare.pt")
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    (tmp_path / "notes.txt").write_text("these are my lab notes\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    import zipfile

    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    for name in ("bare.pt", "random.bin", "notes.txt", "empty.pt", "archive.zip"):
        with pytest.raises(CheckpointError, match=f"{name} is not a napari-unet checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="bare PyTorch weights"):
        load_checkpoint(tmp_path / "bare.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file: .*nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def _edit_saved(path: pathlib.Path, edit) -> pathlib.Path:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def test_unknown_model_name(saved):
    _, path = saved
    _edit_saved(path, lambda payload: payload["config"].update(name="transformer_xl"))
    with pytest.raises(CheckpointError, match="uses the model 'transformer_xl'.*known: unet"):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_config(saved):
    _, path = saved
    _edit_saved(path, lambda payload: payload["config"].update(width=8))
    with pytest.raises(CheckpointError, match="weights in model.pt do not match its model configuration"):
        load_checkpoint(path)


def test_checkpoint_from_a_newer_version(saved):
    _, path = saved
    _edit_saved(path, lambda payload: payload.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer napari-unet"):
        load_checkpoint(path)
