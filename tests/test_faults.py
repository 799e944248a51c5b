"""Fault catalogue, engine and command line: every way a run can go wrong, one test each.

Each test's docstring says the case in the user's words (first line) and what the user sees
("You see: ..."); ``scripts/fault_table.py`` turns them into the README's table. Each failing case
checks the one plain sentence (CLI: exit status 1, or 2 for a mistyped command line; exactly one
``napari-unet: error: ...`` line on stderr; no traceback) and that nothing was lost or half-written.
The widget side is in ``tests/_qt/test_faults_gui.py``.
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unet import cli, inference
from napari_unet.checkpoint import save_checkpoint
from napari_unet.models import build_model

TINY = ["--width", "4", "--depth", "2", "--patch-size", "32", "--batch-size", "2", "--quiet", "--device", "cpu",
        "--tta-candidates", "1"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_error(code, err, *fragments, status=1, alone=True):
    """Exit ``status``, exactly one ``napari-unet: error:`` line (the last; with ``alone`` the only
    line), no traceback, and every fragment in it."""
    assert code == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("napari-unet: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if alone:
        assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny 2D and 3D checkpoints (weights do not matter for faults)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_checkpoint(folder / "m2.pt", build_model("unet", width=4, depth=2))
    save_checkpoint(folder / "m3.pt", build_model("unet3d", width=4, depth=2))
    return folder


def save(folder: Path, name: str, array: np.ndarray) -> Path:
    path = folder / name
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        tifffile.imwrite(path, array)
    return path


def stack(shape=(2, 40, 40), dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 200, shape).astype(dtype)


def labels_for(shape=(4, 40, 40)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[..., : shape[-1] // 3] = 1
    return labels


def predict_cli(capsys, models, tmp_path, image, *extra, model="m2.pt", output="out.tif", name="image.npy"):
    path = save(tmp_path, name, image)
    return run(capsys, "predict", "--model", models / model, "--images", path, "--output", tmp_path / output,
               "--device", "cpu", "--quiet", *extra)


def train_cli(capsys, tmp_path, image, labels, *extra, output="model.pt"):
    images_path = save(tmp_path, "images.tif", image)
    labels_path = save(tmp_path, "labels.tif", labels)
    return run(capsys, "train", "--images", images_path, "--labels", labels_path, "--steps", "1",
               "--output", tmp_path / output, *TINY, *extra)


# ---------------------------------------------------------------------------------------------- images


def test_16_bit_image_is_segmented(models, tmp_path, capsys):
    """A 16-bit image is segmented like an 8-bit one.

    You see: it works (a class map of the image's size)."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack(dtype=np.uint16) * 300)
    assert code == 0, err
    assert tifffile.imread(tmp_path / "out.tif").shape == (2, 40, 40)


def test_float_image_is_segmented(models, tmp_path, capsys):
    """A floating-point image is segmented.

    You see: it works (a class map of the image's size)."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack().astype(np.float32) / 7.0)
    assert code == 0, err
    assert tifffile.imread(tmp_path / "out.tif").shape == (2, 40, 40)


def test_rgb_image_into_a_one_channel_model(models, tmp_path, capsys):
    """An RGB image given to a model that takes one grey channel.

    You see: "image.npy is an RGB image (40 x 48 x 3) but the model takes 1 channel; convert it to grayscale first"."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack((40, 48, 3)))
    assert_error(code, err, "is an RGB image", "convert it to grayscale")
    assert not (tmp_path / "out.tif").exists()


def test_rgba_image_into_a_one_channel_model(models, tmp_path, capsys):
    """An RGBA image (with alpha) given to a model that takes one grey channel.

    You see: "image.npy is an RGB image (40 x 48 x 4) but the model takes 1 channel; convert it to grayscale first"."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack((40, 48, 4)))
    assert_error(code, err, "is an RGB image", "40 x 48 x 4")
    assert not (tmp_path / "out.tif").exists()


def test_2d_image_into_a_3d_model(models, tmp_path, capsys):
    """A single 2D image given to a 3D model.

    You see: "a 3D model with 1 input channel(s) takes (Z, Y, X) or (C, Z, Y, X) with C = 1, but the image has shape (40, 40)"."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack((40, 40)), model="m3.pt")
    assert_error(code, err, "a 3D model", "(40, 40)")
    assert not (tmp_path / "out.tif").exists()


def test_2d_image_to_train_a_3d_model(tmp_path, capsys):
    """Training a 3D model on a single 2D image.

    You see: "A 3D model needs images shaped (Z, Y, X), not (40, 40)."."""
    code, _, err = train_cli(capsys, tmp_path, stack((40, 40)), labels_for((40, 40)), "--model", "unet3d")
    assert_error(code, err, "A 3D model needs images shaped (Z, Y, X)")
    assert not (tmp_path / "model.pt").exists()


def test_multichannel_volume_into_a_one_channel_2d_model(models, tmp_path, capsys):
    """A 4D volume (several channels of a 3D volume) given to a one-channel 2D model.

    You see: "a 2D model with 1 input channel(s) takes (Y, X), (C, Y, X), (Z, Y, X) or (Z, C, Y, X) with C = 1, but the image has shape (3, 2, 40, 40)"."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack((3, 2, 40, 40)))
    assert_error(code, err, "a 2D model", "(3, 2, 40, 40)")
    assert not (tmp_path / "out.tif").exists()


def test_image_smaller_than_the_network_field(models, tmp_path, capsys):
    """An image smaller than the network's field of view (3 x 3 pixels).

    You see: it works (the image is padded; a 3 x 3 class map)."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack((2, 3, 3)))
    assert code == 0, err
    assert tifffile.imread(tmp_path / "out.tif").shape == (2, 3, 3)


def test_one_pixel_thin_image_is_segmented(models, tmp_path, capsys):
    """A 1-pixel-thin image (a single row) is segmented.

    You see: it works (a 1 x 40 class map per slice)."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack((2, 1, 40)))
    assert code == 0, err
    assert tifffile.imread(tmp_path / "out.tif").shape == (2, 1, 40)


def test_one_pixel_thin_image_to_train_on(tmp_path, capsys):
    """Training on a 1-pixel-thin image.

    You see: "The images are 1 x 40 pixels, too thin for this model: with depth 2 every side must be at least 4 pixels."."""
    code, _, err = train_cli(capsys, tmp_path, stack((4, 1, 40)), labels_for((4, 1, 40)))
    assert_error(code, err, "too thin for this model", "at least 4 pixels")
    assert not (tmp_path / "model.pt").exists()


def test_nan_in_the_image(models, tmp_path, capsys):
    """An image with NaN pixels.

    You see: "the image image.npy contains 1 NaN pixels; replace them (e.g. with 0) before segmenting"."""
    image = stack().astype(np.float32)
    image[1, 5, 5] = np.nan
    code, _, err = predict_cli(capsys, models, tmp_path, image)
    assert_error(code, err, "NaN pixels", "replace them")
    assert not (tmp_path / "out.tif").exists()


def test_infinite_values_in_the_training_image(tmp_path, capsys):
    """A training image with infinite pixels.

    You see: "the image images.tif contains 1 infinite pixels; replace them (e.g. with 0) before segmenting"."""
    image = stack((4, 40, 40)).astype(np.float32)
    image[0, 3, 3] = np.inf
    code, _, err = train_cli(capsys, tmp_path, image, labels_for())
    assert_error(code, err, "infinite pixels")
    assert not (tmp_path / "model.pt").exists()


def test_nan_reaching_the_trainer_directly():
    """NaN pixels given to the training engine (not through the command line or a widget).

    You see: "Image 0 contains NaN or infinite pixels; replace them (e.g. with 0) before training."."""
    from napari_unet.data import DataError
    from napari_unet.training import TrainConfig, Trainer

    image = stack((4, 40, 40)).astype(np.float32)
    image[:, 5:9, 5:9] = np.nan
    with pytest.raises(DataError, match="contains NaN or infinite pixels"):
        Trainer(build_model("unet", width=4, depth=2), image, labels_for().astype(np.int64),
                config=TrainConfig(steps=1, patch_size=32, batch_size=2, device="cpu"))


def test_zarr_with_odd_chunks_is_segmented(models, tmp_path, capsys):
    """A zarr image stored in odd-sized chunks (1 x 7 x 13), written to zarr.

    You see: it works (the class map streams into a zarr of the image's size)."""
    import zarr

    source = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=(3, 40, 52), chunks=(1, 7, 13),
                             dtype="uint8")
    source[...] = stack((3, 40, 52))
    code, _, err = run(capsys, "predict", "--model", models / "m2.pt", "--images", tmp_path / "image.zarr",
                       "--output", tmp_path / "out.zarr", "--tile", "32", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert zarr.open_array(str(tmp_path / "out.zarr"), mode="r").shape == (3, 40, 52)
    assert not [name for name in files(tmp_path) if "probabilities-" in name]


# ---------------------------------------------------------------------------------------------- labels


def test_empty_labels_for_training(tmp_path, capsys):
    """Training labels that are all background (nothing marked).

    You see: "every pixel of labels.tif is class 0; training needs at least two classes (e.g. background 0 and foreground 1)"."""
    code, _, err = train_cli(capsys, tmp_path, stack((4, 40, 40)), np.zeros((4, 40, 40), np.uint8))
    assert_error(code, err, "every pixel of labels.tif is class 0", "at least two classes")
    assert not (tmp_path / "model.pt").exists()


def test_all_one_class_labels_for_training(tmp_path, capsys):
    """Training labels that are all one class (a 0/255 mask that is all 255).

    You see: "every pixel of labels.tif is class 1; training needs at least two classes (e.g. background 0 and foreground 1)"."""
    code, _, err = train_cli(capsys, tmp_path, stack((4, 40, 40)), np.full((4, 40, 40), 255, np.uint8))
    assert_error(code, err, "every pixel of labels.tif is class 1")
    assert not (tmp_path / "model.pt").exists()


def test_labels_of_another_shape(tmp_path, capsys):
    """Labels that are not the image's size.

    You see: "images are 4x40x40 but labels are 4x40x30; they must have the same size"."""
    code, _, err = train_cli(capsys, tmp_path, stack((4, 40, 40)), labels_for((4, 40, 30)))
    assert_error(code, err, "4x40x30", "same size")
    assert not (tmp_path / "model.pt").exists()


def test_label_values_beyond_the_model_classes(models, tmp_path, capsys):
    """Labels with more classes than the model to fine-tune predicts.

    You see: "the labels have 3 classes but the model in m2.pt predicts 2"."""
    labels = labels_for()
    labels[..., 30:] = 2
    code, _, err = train_cli(capsys, tmp_path, stack((4, 40, 40)), labels, "--init", models / "m2.pt")
    assert_error(code, err, "the labels have 3 classes but the model in m2.pt predicts 2")
    assert not (tmp_path / "model.pt").exists()


def test_label_values_that_are_not_classes(tmp_path, capsys):
    """Labels holding odd values (0, 7 and 200) instead of classes 0, 1, 2, ...

    You see: "the labels in labels.tif hold the values {0, 7, 200} (3 distinct), which is not a supported convention: use classes 0, 1, ..., 63 or a binary mask with 0 and 255; (...)"."""
    labels = np.array([0, 7, 200] * 2133 + [0], np.uint8).reshape(4, 40, 40)
    code, _, err = train_cli(capsys, tmp_path, stack((4, 40, 40)), labels)
    assert_error(code, err, "{0, 7, 200}", "not a supported convention")
    assert not (tmp_path / "model.pt").exists()


# ---------------------------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoint(models, tmp_path, capsys):
    """A checkpoint cut short (an interrupted copy or download).

    You see: "checkpoint cut.pt is truncated or corrupt; save or copy it again"."""
    (tmp_path / "cut.pt").write_bytes((models / "m2.pt").read_bytes()[:500])
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), model=tmp_path / "cut.pt")
    assert_error(code, err, "cut.pt is truncated or corrupt")
    assert not (tmp_path / "out.tif").exists()


def test_checkpoint_with_a_pickled_code_payload(models, tmp_path, capsys):
    """A checkpoint whose pickle would run code when loaded.

    You see: "checkpoint evil.pt contains Python objects that could run code; it was refused (...)" (the code never runs)."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    torch.save({"payload": Evil()}, tmp_path / "evil_zip.pt")
    for name in ("evil.pt", "evil_zip.pt"):
        code, _, err = predict_cli(capsys, models, tmp_path, stack(), model=tmp_path / name)
        assert_error(code, err, name)
    assert "could run code" in err
    assert not marker.exists() and not (tmp_path / "out.tif").exists()


def test_plain_pytorch_state_dict_as_checkpoint(models, tmp_path, capsys):
    """A checkpoint from another program: bare PyTorch weights (a state_dict).

    You see: "weights.pt is not a napari-unet checkpoint (...); it looks like bare PyTorch weights without the model configuration napari-unet needs"."""
    torch.save(build_model("unet", width=4, depth=2).state_dict(), tmp_path / "weights.pt")
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), model=tmp_path / "weights.pt")
    assert_error(code, err, "weights.pt is not a napari-unet checkpoint", "bare PyTorch weights")


def test_random_file_as_checkpoint(models, tmp_path, capsys):
    """A file that is no checkpoint at all (random bytes).

    You see: "noise.pt is not a napari-unet checkpoint (it was not saved by napari-unet's save_checkpoint)"."""
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), model=tmp_path / "noise.pt")
    assert_error(code, err, "noise.pt is not a napari-unet checkpoint")


def test_checkpoint_from_a_newer_format_version(models, tmp_path, capsys):
    """A checkpoint written by a newer napari-unet (a format version this one does not know).

    You see: "checkpoint new.pt was written by a newer napari-unet (format version 99); update napari-unet to load it"."""
    payload = torch.load(models / "m2.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "new.pt")
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), model=tmp_path / "new.pt")
    assert_error(code, err, "newer napari-unet", "update napari-unet")


# ---------------------------------------------------------------------------------------------- devices and memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_asked_for_without_a_gpu(models, tmp_path, capsys):
    """CUDA asked for (--device cuda) on a machine without a GPU.

    You see: "cuda was requested but this machine has no usable CUDA GPU; choose 'auto' or 'cpu'"."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), "--device", "cuda")
    assert_error(code, err, "no usable CUDA GPU")
    assert not (tmp_path / "out.tif").exists()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")],
                         ids=["OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_while_predicting(models, tmp_path, capsys, monkeypatch, error):
    """Out of memory while predicting, even with the smallest tile and a batch of 1.

    You see: "out of memory; use a smaller tile, batch or patch size"."""
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(inference.runner, "_run_batch", out_of_memory)
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), output="out.zarr")
    assert_error(code, err, "out of memory; use a smaller tile, batch or patch size")
    assert files(tmp_path) == ["image.npy"]  # no output, no temporary store


def test_out_of_memory_while_training(tmp_path, capsys, monkeypatch):
    """Out of memory while training.

    You see: "The cpu device ran out of memory; use a smaller batch size (now 2) or patch size (now 32x32)."."""
    def out_of_memory(self, x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(build_model("unet", width=4, depth=2)), "forward", out_of_memory)
    code, _, err = train_cli(capsys, tmp_path, stack((4, 40, 40)), labels_for())
    assert_error(code, err, "ran out of memory", "smaller batch size")
    assert not (tmp_path / "model.pt").exists()


# ---------------------------------------------------------------------------------------------- disks


def test_disk_full_while_saving_the_checkpoint(tmp_path, capsys, monkeypatch):
    """The disk fills up while the trained checkpoint is written (an older one is there).

    You see: "cannot write .../model.pt: No space left on device" (the old checkpoint is kept, no partial file)."""
    (tmp_path / "model.pt").write_bytes(b"the previous checkpoint")
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    images_path = save(tmp_path, "images.tif", stack((4, 40, 40)))
    labels_path = save(tmp_path, "labels.tif", labels_for())
    monkeypatch.setattr(torch, "save", disk_full)
    code, _, err = run(capsys, "train", "--images", images_path, "--labels", labels_path, "--steps", "1",
                       "--output", tmp_path / "model.pt", *TINY)
    monkeypatch.setattr(torch, "save", real_save)
    assert_error(code, err, "cannot write", "model.pt: No space left on device", alone=False)
    assert (tmp_path / "model.pt").read_bytes() == b"the previous checkpoint"
    assert files(tmp_path) == ["images.tif", "labels.tif", "model.pt"]


def test_disk_full_while_writing_the_prediction(models, tmp_path, capsys, monkeypatch):
    """The disk fills up while the class map is written.

    You see: "cannot write .../out.tif: No space left on device" (no partial file)."""
    real_write = tifffile.imwrite

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"half an image")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    image = save(tmp_path, "image.tif", stack())
    monkeypatch.setattr(tifffile, "imwrite", disk_full)
    code, _, err = run(capsys, "predict", "--model", models / "m2.pt", "--images", image,
                       "--output", tmp_path / "out.tif", "--device", "cpu", "--quiet")
    monkeypatch.setattr(tifffile, "imwrite", real_write)
    assert_error(code, err, "out.tif", "No space left on device")
    assert files(tmp_path) == ["image.tif"]


def test_disk_full_during_autosave(tmp_path, monkeypatch):
    """The disk fills up while corrections are autosaved (an earlier autosave is there).

    You see: the disk's error (No space left on device); the earlier autosave is kept and no partial file is left."""
    from napari_unet import corrections
    from napari_unet.corrections import CorrectionState, load_corrections, save_corrections

    state = CorrectionState((2, 16, 16))
    labels = np.zeros((2, 16, 16), np.uint8)
    path = save_corrections(tmp_path / "autosave.npz", state, labels)
    before = path.read_bytes()

    def disk_full(stream, **arrays):
        stream.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(corrections.np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_corrections(path, state, np.ones((2, 16, 16), np.uint8))
    monkeypatch.undo()
    assert path.read_bytes() == before and files(tmp_path) == ["autosave.npz"]
    assert not load_corrections(path).labels.any()


def test_read_only_output_folder(models, tmp_path, capsys, monkeypatch):
    """The output folder cannot be written (read-only; simulated, as root ignores permissions).

    You see: "cannot write .../out.tif: Permission denied", before any work is done."""
    def refuse(self, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    image = save(tmp_path, "image.tif", stack())
    monkeypatch.setattr(Path, "write_bytes", refuse)
    code, _, err = run(capsys, "predict", "--model", models / "m2.pt", "--images", image,
                       "--output", tmp_path / "out.tif", "--device", "cpu", "--quiet")
    monkeypatch.undo()
    assert_error(code, err, "cannot write", "out.tif: Permission denied")
    assert files(tmp_path) == ["image.tif"]


def test_output_path_below_a_file(tmp_path, capsys):
    """An output path whose folder is really a file.

    You see: "cannot write .../images.tif/model.pt: the folder .../images.tif does not exist", before training."""
    images_path = save(tmp_path, "images.tif", stack((4, 40, 40)))
    labels_path = save(tmp_path, "labels.tif", labels_for())
    code, _, err = run(capsys, "train", "--images", images_path, "--labels", labels_path, "--steps", "1",
                       "--output", images_path / "model.pt", *TINY)
    assert_error(code, err, "cannot write", "does not exist")
    assert files(tmp_path) == ["images.tif", "labels.tif"]


# ---------------------------------------------------------------------------------------------- runs and options


def test_cancel_mid_prediction(tmp_path):
    """A prediction cancelled half-way (the engine's cancel callback).

    You see: "prediction was cancelled" (the run stops at the next batch)."""
    model = build_model("unet", width=4, depth=2)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(inference.PredictionCancelled, match="prediction was cancelled"):
        inference.predict(model, stack((4, 64, 64)), tile=32, batch_size=1, device="cpu", cancel=cancel)
    assert len(calls) == 2


def test_interrupted_command_line_run(models, tmp_path, capsys, monkeypatch):
    """Ctrl-C during a command-line prediction to zarr.

    You see: "napari-unet: interrupted" (exit status 130); no output and no temporary store is left."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference.runner, "_run_batch", interrupt)
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), output="out.zarr")
    assert code == 130 and err.strip() == "napari-unet: interrupted"
    assert files(tmp_path) == ["image.npy"]


def test_huge_tile_size(models, tmp_path, capsys):
    """A tile far bigger than the image (--tile 100000).

    You see: it works (the tile is cut down to the image)."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), "--tile", "100000")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "out.tif").shape == (2, 40, 40)


def test_overlap_of_one_or_more(models, tmp_path, capsys):
    """A tile overlap of 1 or more (--overlap 1).

    You see: "argument --overlap: 1 must be in [0, 1)" (exit status 2)."""
    code, _, err = predict_cli(capsys, models, tmp_path, stack(), "--overlap", "1")
    assert_error(code, err, "--overlap", "must be in [0, 1)", status=2)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        inference.predict(build_model("unet", width=4, depth=2), stack(), overlap=1.5, device="cpu")


def test_zero_training_steps(tmp_path, capsys):
    """Zero training steps (--steps 0).

    You see: "argument --steps: 0 must be at least 1" (exit status 2)."""
    code, _, err = train_cli(capsys, tmp_path, stack((4, 40, 40)), labels_for(), "--steps", "0")
    assert_error(code, err, "--steps", "0 must be at least 1", status=2)
    assert not (tmp_path / "model.pt").exists()


def test_mistyped_command_line(capsys):
    """A mistyped subcommand (napari-unet trian).

    You see: "argument {train,predict,evaluate,demo}: invalid choice: 'trian' (choose from 'train', 'predict', 'evaluate', 'demo')" (exit status 2)."""
    code, _, err = run(capsys, "trian", "--images", "x.tif")
    assert_error(code, err, "invalid choice: 'trian'", status=2)


def test_session_folder_that_is_not_a_session(tmp_path):
    """Opening a folder that is not a napari-unet session.

    You see: ".../photos is not a napari-unet session (it has no session.json)."."""
    from napari_unet.session import SessionError, load_session

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(SessionError, match="is not a napari-unet session") as caught:
        load_session(folder)
    assert "\n" not in str(caught.value)
    assert files(folder) == ["holiday.jpg"]  # nothing written into it
