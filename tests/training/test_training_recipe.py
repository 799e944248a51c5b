"""The width, batch and patch each training device gets by default (recipe.py), and the CLI using them."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import cli, devices
from napari_unet.training import recipe
from napari_unet.training.recipe import recipe_for


def test_a_cpu_gets_the_benchmarked_settings():
    two, three = recipe_for(torch.device("cpu"), 2), recipe_for(torch.device("cpu"), 3)
    assert (two.width, two.batch_size, two.patch_size) == (16, 4, (192, 192))
    assert (three.width, three.batch_size, three.patch_size) == (8, 2, (32, 96, 96))


@pytest.mark.parametrize("free_gib, batch_2d, batch_3d, patch_3d", [(70, 16, 4, (64, 128, 128)),
                                                                       (6, 8, 2, (32, 96, 96))])
def test_a_gpu_gets_a_wider_model_and_batches_scaled_to_its_memory(monkeypatch, free_gib, batch_2d, batch_3d,
                                                                    patch_3d):
    monkeypatch.setattr(recipe.devices, "free_memory", lambda device: free_gib * 2**30)
    gpu = torch.device("cuda", 0)
    two, three = recipe_for(gpu, 2), recipe_for(gpu, 3)
    assert (two.width, two.batch_size, two.patch_size) == (32, batch_2d, (256, 256))
    assert (three.width, three.batch_size, three.patch_size) == (16, batch_3d, patch_3d)
    assert f"{free_gib} GiB free" in two.why


def _tiny_data(folder):
    labels = np.zeros((3, 48, 48), np.uint8)
    labels[:, 8:30, 10:25] = 1
    images = (labels * 80 + np.random.default_rng(0).integers(0, 60, labels.shape)).astype(np.uint8)
    tifffile.imwrite(folder / "images.tif", images)
    tifffile.imwrite(folder / "labels.tif", labels)
    return ["--images", str(folder / "images.tif"), "--labels", str(folder / "labels.tif")]


def test_the_cli_takes_the_devices_recipe_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli, "train_model", lambda model, *a, config, **k: seen.append(
        (model.config["width"], config.batch_size, config.patch_size)) or _NoTrainer())
    data = _tiny_data(tmp_path)
    base = ["train", *data, "--steps", "1", "--output", str(tmp_path / "m.pt"), "--device", "cpu", "--depth", "2"]
    cli.main(base)
    assert "CPU: the benchmarked ISBI defaults: width 16, batch 4, patch 192x192" in capsys.readouterr().err
    cli.main([*base, "--width", "4", "--batch-size", "2", "--patch-size", "32", "--quiet"])
    cli.main([*base, "--model", "unet3d", "--quiet"])
    assert seen == [(16, 4, (192, 192)), (4, 2, 32), (8, 2, (32, 96, 96))]


class _NoTrainer:
    """What the CLI needs of a trainer after train_model, without training."""

    history = {"best_val_dice": None, "elapsed": [], "label_offset": []}
    step = 0

    def save(self, path, **kwargs):
        return path


@pytest.mark.gpu
def test_the_gpu_recipe_trains_on_cuda(tmp_path, capsys):
    from napari_unet.checkpoint import load_checkpoint

    data = _tiny_data(tmp_path)
    code = cli.main(["train", *data, "--steps", "5", "--output", str(tmp_path / "gpu.pt"), "--device", "cuda",
                     "--val-fraction", "0.34"])
    assert code == 0, capsys.readouterr().err
    expected = recipe_for(devices.resolve_device("cuda"), 2)
    checkpoint = load_checkpoint(tmp_path / "gpu.pt")
    assert checkpoint.config["width"] == expected.width
    assert checkpoint.provenance["train_config"]["batch_size"] == expected.batch_size
