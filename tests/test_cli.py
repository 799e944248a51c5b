"""The napari-unet command line: happy paths and one-line errors for every subcommand."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import tifffile

from napari_unet import cli
from napari_unet.checkpoint import load_checkpoint

TINY = ["--width", "4", "--depth", "2", "--patch-size", "32", "--batch-size", "2", "--quiet"]


def make_data(folder, n=4, size=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, size, size), np.uint8)
    labels[:, 8:30, 10:25] = 255
    images = (labels // 3 + rng.integers(0, 60, labels.shape)).astype(np.uint8)
    tifffile.imwrite(folder / "images.tif", images)
    tifffile.imwrite(folder / "labels.tif", labels)
    return folder / "images.tif", folder / "labels.tif"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("napari-unet: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained through the CLI once for the module."""
    folder = tmp_path_factory.mktemp("cli")
    images, labels = make_data(folder)
    output = folder / "model.pt"
    code = cli.main(["train", "--images", str(images), "--labels", str(labels), "--steps", "3",
                     "--output", str(output), "--device", "cpu", *TINY])
    assert code == 0
    return folder, images, labels, output


# ---------------------------------------------------------------------------------------------
# train


def test_train_writes_a_checkpoint_with_provenance(trained):
    _, images, _, output = trained
    ckpt = load_checkpoint(output)
    assert ckpt.config["name"] == "unet" and ckpt.config["width"] == 4
    assert ckpt.provenance["steps"] == 3
    assert str(images.resolve()) in ckpt.provenance["data_paths"]
    assert ckpt.history["loss"] and ckpt.history["val_dice"]  # default val fraction validates


def test_train_fine_tunes_from_a_checkpoint(trained, tmp_path, capsys):
    _, images, labels, output = trained
    code, out, _ = run(capsys, "train", "--images", images, "--labels", labels, "--init", output, "--steps", "2",
                       "--output", tmp_path / "tuned.pt", "--val-fraction", "0", *TINY, "--width", "8")
    assert code == 0 and json.loads(out.splitlines()[-1])["steps"] == 2
    assert load_checkpoint(tmp_path / "tuned.pt").config["width"] == 4  # the checkpoint's architecture


def test_train_init_replays_the_checkpoints_own_training_data(trained, tmp_path, capsys):
    _, images, labels, output = trained
    new_images, new_labels = make_data(tmp_path, n=2, seed=3)
    code, out, _ = run(capsys, "train", "--images", new_images, "--labels", new_labels, "--init", output,
                       "--replay", "0.5", "--steps", "2", "--output", tmp_path / "tuned.pt", *TINY)
    assert code == 0
    provenance = load_checkpoint(tmp_path / "tuned.pt").provenance
    assert provenance["replayed"] == [str(images.resolve()), str(labels.resolve())]
    assert provenance["train_config"]["replay_share"] == 0.5
    assert provenance["replay_samples"] == 3  # 4 replayed slices, one held out for validation


def test_train_replay_needs_an_init_checkpoint_that_names_its_data(trained, tmp_path, capsys):
    _, images, labels, output = trained
    code, _, err = run(capsys, "train", "--images", images, "--labels", labels, "--replay", "0.5", "--steps", "1",
                       "--output", tmp_path / "x.pt", *TINY)
    assert_one_line_error(code, err, "--replay", "give --init")
    moved = tmp_path / "moved.pt"
    from napari_unet.checkpoint import save_checkpoint

    ckpt = load_checkpoint(output)
    save_checkpoint(moved, ckpt.model, provenance={"data_paths": [str(tmp_path / "gone.tif"), str(labels)]})
    code, _, err = run(capsys, "train", "--images", images, "--labels", labels, "--init", moved, "--replay", "0.5",
                       "--steps", "1", "--output", tmp_path / "x.pt", *TINY)
    assert_one_line_error(code, err, "gone.tif", "is not there any more")
    code, _, err = run(capsys, "train", "--images", images, "--labels", labels, "--init", output, "--replay", "1",
                       "--steps", "1", "--output", tmp_path / "x.pt", *TINY)
    assert code == 2 and "must be in [0, 1)" in err


def test_train_with_one_seed_repeats_exactly(trained, tmp_path, capsys):
    import torch

    _, images, labels, _ = trained
    states = {}
    for name, seed in (("first", "5"), ("again", "5"), ("other", "6")):
        torch.manual_seed(int(seed) + 100)  # whatever the caller's random state, the seed decides
        output = tmp_path / f"{name}.pt"
        code, _, _ = run(capsys, "train", "--images", images, "--labels", labels, "--steps", "2", "--seed", seed,
                         "--val-fraction", "0", "--output", output, *TINY)
        assert code == 0
        states[name] = load_checkpoint(output).model.state_dict()
    assert all(torch.equal(states["first"][key], states["again"][key]) for key in states["first"])
    assert not all(torch.equal(states["first"][key], states["other"][key]) for key in states["first"])


def test_a_fresh_model_seed_leaves_the_global_random_state_alone():
    import torch

    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    first = cli.build_or_load_model("unet", width=4, depth=2, in_channels=1, n_classes=2, seed=0)
    assert torch.equal(torch.rand(3), expected)
    again = cli.build_or_load_model("unet", width=4, depth=2, in_channels=1, n_classes=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_train_no_label_offset_keeps_the_offset_at_zero(trained, tmp_path, capsys, monkeypatch):
    from napari_unet import label_offset

    _, images, labels, _ = trained
    # any measurement would find an offset: --no-label-offset must not measure at all
    monkeypatch.setattr(label_offset, "estimate_offset", lambda *args: (0.5, 0.5))
    outputs = {}
    for flag in ([], ["--no-label-offset"]):
        output = tmp_path / f"model{len(flag)}.pt"
        code, out, _ = run(capsys, "train", "--images", images, "--labels", labels, "--steps", "2",
                           "--output", output, *TINY, *flag)
        assert code == 0
        outputs[bool(flag)] = (json.loads(out.splitlines()[-1])["label_offset"], load_checkpoint(output).label_offset)
    assert outputs[False] == ([0.5, 0.5], (0.5, 0.5))
    assert outputs[True] == ([0.0, 0.0], (0.0, 0.0))


@pytest.mark.parametrize(
    "option, field, cases, bad",
    [
        ("--dice-fade", "dice_fade", [([], 0.3), (["0.5"], 0.5), (["0"], None)], ("2", "must be in [0, 1]")),
        ("--augment-ramp", "augment_ramp", [([], 0.2), (["0.5"], 0.5), (["0"], None)], ("2", "must be in [0, 1]")),
        ("--tta-candidates", "tta_candidates", [([], 4), (["1"], 1), (["6"], 6)], ("0", "must be at least 1")),
    ],
)
def test_train_options_reach_the_config(trained, tmp_path, capsys, monkeypatch, option, field, cases, bad):
    _, images, labels, _ = trained
    seen = []
    real_train_model = cli.train_model

    def recording_train_model(*args, **kwargs):
        seen.append(getattr(kwargs["config"], field))
        return real_train_model(*args, **kwargs)

    monkeypatch.setattr(cli, "train_model", recording_train_model)
    for value, _expected in cases:
        code, _, _ = run(capsys, "train", "--images", images, "--labels", labels, "--steps", "1",
                         "--output", tmp_path / "model.pt", *TINY, *([option, *value] if value else []))
        assert code == 0
    assert seen == [expected for _value, expected in cases]
    code, _, err = run(capsys, "train", "--images", images, "--labels", labels, "--steps", "1",
                       "--output", tmp_path / "model.pt", *TINY, option, bad[0])
    assert code == 2 and bad[1] in err


def test_augment_ramp_defaults_to_none_when_fine_tuning(trained, tmp_path, capsys, monkeypatch):
    _, images, labels, output = trained
    seen = []
    real_train_model = cli.train_model

    def recording_train_model(*args, **kwargs):
        seen.append(kwargs["config"].augment_ramp)
        return real_train_model(*args, **kwargs)

    monkeypatch.setattr(cli, "train_model", recording_train_model)
    for extra in ([], ["--augment-ramp", "0.4"]):
        code, _, _ = run(capsys, "train", "--images", images, "--labels", labels, "--init", output, "--steps", "1",
                         "--output", tmp_path / "tuned.pt", *TINY, *extra)
        assert code == 0
    assert seen == [None, 0.4]


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda a: a.update(images="missing.tif"), ("images not found", "missing.tif")),
        (lambda a: a.update(labels="short.tif"), ("same size",)),
        (lambda a: a.update(labels="odd.tif"), ("7",)),
        (lambda a: a.update(output="no/such/folder/model.pt"), ("cannot write",)),
        (lambda a: a.update(model="transformer9000"), ("unknown model", "transformer9000")),
        (lambda a: a.update(device="tpu"), ("unknown device",)),
        (lambda a: a.update(device="cuda:7"), ("cuda:7",)),
        (lambda a: a.update(init="corrupt.pt"), ("corrupt.pt",)),
        (lambda a: a.update(steps=None), ("budget",)),
    ],
)
def test_train_errors_are_one_clear_line(tmp_path, capsys, monkeypatch, change, fragments):
    images, labels = make_data(tmp_path)
    tifffile.imwrite(tmp_path / "short.tif", np.zeros((4, 40, 39), np.uint8))
    tifffile.imwrite(tmp_path / "odd.tif", np.array([0, 7, 200] * 2133 + [0], np.uint8).reshape(4, 40, 40))
    (tmp_path / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    monkeypatch.chdir(tmp_path)
    options = {"images": images, "labels": labels, "output": tmp_path / "out.pt", "model": "unet",
               "device": "cpu", "steps": 1, "init": None}
    change(options)
    argv = ["train"]
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key}", value]
    code, _, err = run(capsys, *argv, *TINY)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out.pt").exists()


def test_train_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "train", "--images", "x.tif")
    assert code == 2 and err.startswith("napari-unet: error:")


# ---------------------------------------------------------------------------------------------
# predict


def test_predict_writes_labels_and_probabilities(trained, capsys):
    folder, images, _, model = trained
    code, _, err = run(capsys, "predict", "--model", model, "--images", images, "--output", folder / "pred.tif",
                       "--probabilities", folder / "prob.tif", "--tile", "32", "--tta", "--device", "cpu", "--quiet")
    assert code == 0, err
    labels = tifffile.imread(folder / "pred.tif")
    probabilities = tifffile.imread(folder / "prob.tif")
    assert labels.shape == (4, 40, 40) and set(np.unique(labels)) <= {0, 1}
    assert probabilities.shape == (2, 4, 40, 40)
    np.testing.assert_array_equal(labels, (probabilities[1] >= 0.5).astype(labels.dtype))


def test_predict_streams_to_zarr(trained, capsys):
    import zarr

    folder, images, _, model = trained
    code, _, err = run(capsys, "predict", "--model", model, "--images", images, "--output", folder / "pred.zarr",
                       "--tile", "32", "--device", "cpu", "--quiet")
    assert code == 0, err
    labels = np.asarray(zarr.open_array(str(folder / "pred.zarr"), mode="r")[...])
    reference = tifffile.imread(folder / "pred.tif") if (folder / "pred.tif").exists() else None
    assert labels.shape == (4, 40, 40)
    if reference is not None:  # same model, same tiles: the same class map (TTA aside) in shape and range
        assert set(np.unique(labels)) <= {0, 1}
    assert not [p for p in folder.iterdir() if "probabilities-" in p.name]  # temporary store removed


@pytest.mark.parametrize("method", ["components", "watershed"])
def test_predict_writes_instances(trained, capsys, method):
    from napari_unet.inference import labels_to_instances

    folder, images, _, model = trained
    code, out, err = run(capsys, "predict", "--model", model, "--images", images, "--output", folder / "i-pred.tif",
                         "--instances", method, "--instances-output", folder / f"{method}.tif",
                         "--tile", "32", "--device", "cpu", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["instances"] == str(folder / f"{method}.tif") and summary["instances_method"] == method
    instances = tifffile.imread(folder / f"{method}.tif")
    assert instances.shape == (4, 40, 40)
    ids = [set(np.unique(plane)) - {0} for plane in instances]
    for first, second in zip(ids, ids[1:]):
        assert not first & second  # a 2D model's stack: slice by slice, ids unique in the stack
    if method == "components":
        labels = tifffile.imread(folder / "i-pred.tif")
        np.testing.assert_array_equal(instances, labels_to_instances(labels, per_slice=True))


def test_predict_instances_with_zarr_output_default_to_watershed(trained, capsys):
    import zarr

    folder, images, _, model = trained
    code, out, err = run(capsys, "predict", "--model", model, "--images", images, "--output", folder / "z.zarr",
                         "--instances-output", folder / "z-instances.zarr", "--tile", "32", "--device", "cpu",
                         "--quiet")
    assert code == 0, err
    assert json.loads(out)["instances_method"] == "watershed"
    instances = np.asarray(zarr.open_array(str(folder / "z-instances.zarr"), mode="r")[...])
    assert instances.shape == (4, 40, 40)
    assert not [p for p in folder.iterdir() if "probabilities-" in p.name]  # temporary store removed


@pytest.mark.parametrize("what", ["no_output", "bad_suffix", "same_file", "missing_folder"])
def test_predict_instances_errors_are_one_clear_line(trained, tmp_path, capsys, what):
    _, images, _, model = trained
    argv = ["predict", "--model", model, "--images", images, "--output", tmp_path / "p.tif", "--device", "cpu",
            "--quiet"]
    extra, fragment = {
        "no_output": (["--instances", "watershed"], "--instances-output"),
        "bad_suffix": (["--instances-output", tmp_path / "i.png"], "i.png"),
        "same_file": (["--instances-output", tmp_path / "p.tif"], "same file"),
        "missing_folder": (["--instances-output", tmp_path / "nope" / "i.tif"], "does not exist"),
    }[what]
    code, _, err = run(capsys, *argv, *extra)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "p.tif").exists()  # refused before predicting


def test_predict_unknown_instances_method_is_a_usage_error(trained, tmp_path, capsys):
    _, images, _, model = trained
    code, _, err = run(capsys, "predict", "--model", model, "--images", images, "--output", tmp_path / "p.tif",
                       "--instances", "magic", "--instances-output", tmp_path / "i.tif")
    assert code == 2 and "invalid choice: 'magic'" in err and len(err.strip().splitlines()) == 1


def test_predict_refuses_a_malicious_pickle_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    images, _ = make_data(tmp_path)
    code, _, err = run(capsys, "predict", "--model", evil, "--images", images, "--output", tmp_path / "p.tif")
    assert_one_line_error(code, err, "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("what", ["missing_model", "corrupt_model", "missing_images", "bad_output", "bad_device"])
def test_predict_errors_are_one_clear_line(trained, tmp_path, capsys, what):
    _, images, _, model = trained
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(300))
    options = {"model": model, "images": images, "output": tmp_path / "p.tif", "device": "cpu"}
    options.update({
        "missing_model": {"model": tmp_path / "nope.pt"},
        "corrupt_model": {"model": corrupt},
        "missing_images": {"images": tmp_path / "nope.tif"},
        "bad_output": {"output": tmp_path / "missing" / "p.tif"},
        "bad_device": {"device": "gpu0"},
    }[what])
    argv = ["predict", "--quiet"]
    for key, value in options.items():
        argv += [f"--{key}", value]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err)


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_prints_one_json_line(tmp_path, capsys):
    _, labels = make_data(tmp_path)
    truth = tifffile.imread(labels)
    prediction = truth.copy()
    prediction[:, 8, 10:25] = 0  # a few wrong pixels
    tifffile.imwrite(tmp_path / "pred.tif", prediction)
    code, out, _ = run(capsys, "evaluate", "--prediction", tmp_path / "pred.tif", "--labels", labels)
    assert code == 0
    (line,) = out.strip().splitlines()
    result = json.loads(line)
    for key in ("dice", "iou", "pixel_error", "adapted_rand_error", "dice_per_class"):
        assert key in result
    assert len(result["dice_per_class"]) == 2
    assert 0 < result["pixel_error"] < 0.02
    assert result["dice_per_class"][1] < 1.0


def test_evaluate_errors(tmp_path, capsys):
    _, labels = make_data(tmp_path)
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((4, 20, 20), np.uint8))
    code, _, err = run(capsys, "evaluate", "--prediction", tmp_path / "small.tif", "--labels", labels)
    assert_one_line_error(code, err, "40")
    code, _, err = run(capsys, "evaluate", "--prediction", tmp_path / "none.tif", "--labels", labels)
    assert_one_line_error(code, err, "none.tif")


# ---------------------------------------------------------------------------------------------
# demo and help


def test_demo_calls_the_lazily_imported_demo(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("napari_unet._demo")
    fake.main = lambda: calls.append(True)
    monkeypatch.setitem(sys.modules, "napari_unet._demo", fake)
    import napari_unet

    monkeypatch.setattr(napari_unet, "_demo", fake, raising=False)
    code, _, _ = run(capsys, "demo")
    assert code == 0 and calls == [True]


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "demo"])
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: napari-unet {command}")


def test_cli_module_does_not_import_napari():
    import subprocess

    code = "import sys, napari_unet.cli; sys.exit('napari' in sys.modules or 'qtpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
