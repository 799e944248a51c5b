"""Fault catalogue, widgets: what the Segment and Fine-tune docks say when a run goes wrong.

Each test's docstring says the case in the user's words (first line) and what the user sees
("You see: ..."); ``scripts/fault_table.py`` turns them into the README's table. Each case checks a
napari notification in one plain sentence, that nothing was lost (no half-written layer, the labels
unchanged, the saved files kept) and that the viewer still works afterwards. The engine and command
line side is in ``tests/test_faults.py``.
"""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest
import torch

from napari_unet._qt.finetune_widget import FinetuneWidget
from napari_unet._qt.segment_widget import SegmentWidget
from napari_unet._qt.shared import model_holder
from napari_unet._sample_data import make_em_membranes
from napari_unet.corrections import FinetuneSettings

TINY = FinetuneSettings(
    learning_rate=0.01, time_budget=None, steps=2, patch_size=32, batch_size=2, loss="dice_bce",
    augment=False, val_fraction=0.25, val_every=2, margin=0, device="cpu",
)
LONG = FinetuneSettings(**{**TINY.__dict__, "steps": None, "time_budget": 60.0})


def plain(message: str) -> bool:
    """One sentence for a person: one line, no traceback, no exception class name up front."""
    return "\n" not in message.strip() and "Traceback" not in message and "Unexpected error" not in message


def errors_with(notifications, fragment):
    return [m for m in notifications if fragment in m]


# ---------------------------------------------------------------------------------- Segment


@pytest.fixture
def segment(viewer, qtbot):
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment", area="right")
    return widget


def wait_for(qtbot, widget, timeout=30_000):
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=timeout)


def outputs(viewer, name):
    return [n for n in (f"{name} probabilities", f"{name} labels", f"{name} instances") if n in viewer.layers]


def still_segments(viewer, widget, qtbot):
    """The second action works: a small segmentation runs to the end."""
    assert widget.run_button.isEnabled()
    viewer.add_image(np.random.default_rng(0).random((32, 32)).astype(np.float32), name="check")
    widget.select_layer("check")
    widget.set_fresh_model("unet", width=4, depth=2)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("auto"))
    assert widget.run() is not None
    wait_for(qtbot, widget)
    assert viewer.layers["check labels"].data.shape == (32, 32)


def long_segmentation(viewer, widget, qtbot, name="stack"):
    """Start a segmentation of several seconds and wait until its first tiles are done."""
    image, _ = make_em_membranes(shape=(4, 256, 256), seed=2)
    viewer.add_image(image, name=name)
    widget.select_layer(name)
    widget.set_fresh_model("unet", width=8, depth=2)
    widget.tile_spin.setValue(64)
    widget.tta_check.setChecked(True)
    reports = []
    worker = widget.run()
    worker.yielded.connect(reports.append)
    qtbot.waitUntil(lambda: any(getattr(r, "total", 0) > 0 for r in reports), timeout=30_000)
    return worker


def test_segment_16_bit_and_float_images(viewer, segment, qtbot, notifications):
    """Segmenting a 16-bit image and a float image.

    You see: it works (a labels layer of the image's size)."""
    image, _ = make_em_membranes(shape=(2, 48, 48), seed=3)
    viewer.add_image(image.astype(np.uint16) * 200, name="sixteen")
    viewer.add_image(image.astype(np.float32) / 3.0, name="float")
    segment.set_fresh_model("unet", width=4, depth=2)
    for name in ("sixteen", "float"):
        segment.select_layer(name)
        segment.run()
        wait_for(qtbot, segment)
        assert viewer.layers[f"{name} labels"].data.shape == (2, 48, 48)
    assert not notifications


def test_segment_rgb_into_a_one_channel_model(viewer, segment, qtbot, notifications):
    """Segmenting an RGB layer with a model that takes one grey channel.

    You see: "'colour' is an RGB image but the model takes 1 channel: convert it to grayscale (tick 'Convert RGB to grayscale') or load a 3-channel model." with a "Convert and run" button."""
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8), name="colour", rgb=True)
    segment.set_fresh_model("unet", width=4, depth=2)
    assert segment.run() is None
    (message,) = errors_with(notifications, "RGB")
    assert "convert it to grayscale" in message and plain(message)
    assert outputs(viewer, "colour") == []
    still_segments(viewer, segment, qtbot)


def test_segment_2d_image_into_a_3d_model(viewer, segment, qtbot, notifications):
    """Segmenting a single 2D image with a 3D model.

    You see: a sentence saying the layer is a single 2D image but the model is 3D."""
    viewer.add_image(np.zeros((40, 40), dtype=np.uint8), name="flat")
    segment.set_fresh_model("unet3d", width=4, depth=2)
    assert segment.run() is None
    (message,) = errors_with(notifications, "single 2D image but the model is 3D")
    assert plain(message) and outputs(viewer, "flat") == []
    still_segments(viewer, segment, qtbot)


def test_segment_nan_in_the_image(viewer, segment, qtbot, notifications):
    """Segmenting an image with NaN pixels.

    You see: "the image 'holes' contains 1 NaN pixels; replace them (e.g. with 0) before segmenting"."""
    data = np.ones((2, 32, 32), dtype=np.float32)
    data[1, 3, 4] = np.nan
    viewer.add_image(data, name="holes")
    segment.set_fresh_model("unet", width=4, depth=2)
    segment.run()
    wait_for(qtbot, segment)
    (message,) = errors_with(notifications, "NaN")
    assert "replace them" in message and plain(message)
    assert outputs(viewer, "holes") == []
    still_segments(viewer, segment, qtbot)


def test_segment_unreadable_checkpoints(viewer, segment, qtbot, notifications, tmp_path):
    """Loading a corrupt checkpoint, or one whose pickle would run code, in the Segment dock.

    You see: "broken.pt is not a napari-unet checkpoint (...)" / "checkpoint evil.pt contains Python objects that could run code; it was refused (...)"; the model in use is kept."""
    model = segment.set_fresh_model("unet", width=4, depth=2)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    (tmp_path / "broken.pt").write_bytes(b"this is not a checkpoint" * 10)
    for name in ("broken.pt", "evil.pt"):
        segment.load_checkpoint(tmp_path / name)
        wait_for(qtbot, segment)
        assert name in notifications[-1] and plain(notifications[-1])
    assert "could run code" in notifications[-1] and not marker.exists()
    assert model_holder(viewer).model is model
    still_segments(viewer, segment, qtbot)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_segment_cuda_without_a_gpu(viewer, segment, qtbot, notifications):
    """Choosing CUDA in the Segment dock on a machine without a GPU.

    You see: "cuda was requested but this machine has no usable CUDA GPU; choose 'auto' or 'cpu'"."""
    viewer.add_image(np.zeros((2, 32, 32), np.float32), name="image")
    segment.set_fresh_model("unet", width=4, depth=2)
    segment.set_device("cuda")
    assert segment.run() is None
    (message,) = errors_with(notifications, "no usable CUDA GPU")
    assert plain(message)
    still_segments(viewer, segment, qtbot)


def test_segment_out_of_memory(viewer, segment, qtbot, notifications, monkeypatch):
    """Running out of memory while segmenting.

    You see: "Out of memory on cpu: try a smaller tile or batch."."""
    import napari_unet.inference

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    viewer.add_image(np.zeros((2, 32, 32), np.float32), name="image")
    monkeypatch.setattr(napari_unet.inference, "predict", out_of_memory)
    segment.set_fresh_model("unet", width=4, depth=2)
    segment.set_device("cpu")
    segment.run()
    wait_for(qtbot, segment)
    assert "Out of memory on cpu: try a smaller tile or batch." in notifications
    assert outputs(viewer, "image") == []
    monkeypatch.undo()
    still_segments(viewer, segment, qtbot)


def test_segment_cancel_mid_run(viewer, segment, qtbot, notifications):
    """Cancel pressed half-way through a segmentation.

    You see: "Segmentation cancelled; no layer was changed." (no half-written layer is added)."""
    worker = long_segmentation(viewer, segment, qtbot)
    segment.cancel()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    wait_for(qtbot, segment)
    assert "Cancelled" in segment.status_label.text()
    assert outputs(viewer, "stack") == [] and notifications == ["Segmentation cancelled; no layer was changed."]
    still_segments(viewer, segment, qtbot)


def test_segment_image_layer_deleted_mid_run(viewer, segment, qtbot, notifications):
    """The image layer is deleted while it is being segmented.

    You see: no error; the result still arrives as a labels layer of the deleted image's size."""
    long_segmentation(viewer, segment, qtbot)
    segment.tta_check.setChecked(False)
    viewer.layers.remove("stack")
    wait_for(qtbot, segment, timeout=60_000)
    assert notifications == []
    assert "stack" not in viewer.layers and viewer.layers["stack labels"].data.shape == (4, 256, 256)
    still_segments(viewer, segment, qtbot)


# ---------------------------------------------------------------------------------- Fine-tune


@pytest.fixture
def autosave_dir(tmp_path, monkeypatch):
    folder = tmp_path / "autosave"
    monkeypatch.setenv("NAPARI_UNET_AUTOSAVE_DIR", str(folder))
    return folder


@pytest.fixture
def finetune(viewer, autosave_dir):
    """The Fine-tune dock on a small EM crop with a labels layer to correct."""
    image, truth = make_em_membranes(shape=(3, 64, 64), seed=0)
    viewer.add_image(image, name="EM")
    viewer.add_labels(truth.copy(), name="EM labels")
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    widget.start_from.setCurrentIndex(2)  # a fresh model
    widget.variant.setCurrentText("unet")
    widget.width_spin.setValue(4)
    widget.depth_spin.setValue(2)
    widget.set_settings(TINY)
    widget.preview_spin.setValue(0.5)
    return widget


def review_slice(viewer, widget, z=1):
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)
    widget.mark_current_slice_reviewed()


def wait_for_training(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.is_training, timeout=timeout)


def still_fine_tunes(viewer, widget, qtbot):
    """The second action works: a 2-step fine-tuning runs to the end and saves its checkpoint."""
    widget.set_settings(TINY)
    review_slice(viewer, widget, 1)
    widget.start()
    assert widget.is_training
    wait_for_training(qtbot, widget)
    assert widget.last_checkpoint is not None and widget.last_checkpoint.exists()


def test_finetune_without_corrections_or_with_labels_of_another_shape(viewer, finetune, qtbot, notifications):
    """Starting a fine-tuning with no corrections yet, or with a labels layer of another shape.

    You see: "No confirmed pixels yet (...)" / "... has shape (3, 32, 32) ..."; the labels are unchanged."""
    labels = np.array(finetune.labels_layer.data)
    finetune.start()
    assert not finetune.is_training and "No confirmed pixels yet" in notifications[-1] and plain(notifications[-1])
    viewer.add_labels(np.zeros((3, 32, 32), np.uint8), name="wrong size")
    finetune.labels_picker.set_layer(viewer.layers["wrong size"])
    review_slice(viewer, finetune)
    finetune.start()
    assert not finetune.is_training and "has shape" in notifications[-1] and plain(notifications[-1])
    finetune.labels_picker.set_layer(viewer.layers["EM labels"])
    assert np.array_equal(viewer.layers["EM labels"].data, labels)
    still_fine_tunes(viewer, finetune, qtbot)


def test_two_fine_tunes_started_at_once(viewer, finetune, qtbot, notifications):
    """Start pressed again while a fine-tuning is running.

    You see: "A fine-tuning is already running: stop it before starting another."; the first run goes on."""
    finetune.set_settings(FinetuneSettings(**{**TINY.__dict__, "steps": 3}))
    review_slice(viewer, finetune)
    finetune.start()
    run = finetune.run
    finetune.start()
    assert "A fine-tuning is already running: stop it before starting another." in notifications
    assert finetune.run is run
    wait_for_training(qtbot, finetune)
    assert finetune.last_checkpoint.exists()
    still_fine_tunes(viewer, finetune, qtbot)


def test_image_layer_deleted_mid_fine_tune(viewer, finetune, qtbot, notifications):
    """The image layer is deleted while the model is being fine-tuned on it.

    You see: a warning "... 'EM' was deleted during training ..."; the weights so far are saved."""
    finetune.set_settings(LONG)
    review_slice(viewer, finetune)
    finetune.start()
    qtbot.waitUntil(lambda: finetune.plots.n_loss_points >= 1, timeout=30_000)
    viewer.layers.remove("EM")
    wait_for_training(qtbot, finetune, timeout=20_000)
    assert any("'EM' was deleted during training" in m for m in notifications)
    assert all(plain(m) for m in notifications)
    assert finetune.last_checkpoint is not None and finetune.last_checkpoint.exists()
    assert model_holder(viewer).model is not None


def test_viewer_closed_mid_fine_tune(make_napari_viewer, autosave_dir, qtbot, notifications):
    """The viewer is closed while a fine-tuning runs.

    You see: nothing more (the window is gone); the run stops by itself, and the weights learnt so far and the corrections are saved."""
    viewer = make_napari_viewer()
    image, truth = make_em_membranes(shape=(3, 64, 64), seed=0)
    viewer.add_image(image, name="EM")
    viewer.add_labels(truth.copy(), name="EM labels")
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    widget.start_from.setCurrentIndex(2)
    widget.width_spin.setValue(4)
    widget.depth_spin.setValue(2)
    widget.set_settings(LONG)
    review_slice(viewer, widget)
    widget.start()
    qtbot.waitUntil(lambda: widget.plots.n_loss_points >= 1, timeout=30_000)
    viewer.close()
    # the run's own outcome, not widget.is_training: Qt may delete the closed dock before its
    # worker's finished callback resets that flag. Saved within 30 s of a 60-s budget: it stopped.
    # pathlib's glob also matches the hidden temporary file a save writes before its rename
    def saved():
        return [path for path in autosave_dir.glob("*.pt") if not path.name.startswith(".")]

    qtbot.waitUntil(lambda: bool(saved()), timeout=30_000)
    (checkpoint,) = saved()
    from napari_unet.checkpoint import load_checkpoint

    assert load_checkpoint(checkpoint).provenance["steps"] >= 1
    assert list(autosave_dir.glob("*.npz"))  # the corrections
    assert all(plain(m) for m in notifications)


def test_disk_full_during_autosave(viewer, finetune, qtbot, notifications, monkeypatch):
    """The disk fills up while the corrections are autosaved (an earlier autosave is there).

    You see: "Could not save the corrections to .../EM....npz: No space left on device."; the earlier autosave is kept."""
    layer = finetune.labels_layer
    layer.brush_size = 5
    layer.paint((1, 20, 20), 0)
    first = finetune.flush_autosave()
    assert first is not None and first.exists()
    saved = first.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("napari_unet.finetuning.save_corrections", disk_full)
    layer.paint((1, 40, 40), 0)
    finetune.autosave()  # what the debounce timer calls: in a worker
    qtbot.waitUntil(lambda: any("No space left on device" in m for m in notifications), timeout=10_000)
    layer.paint((1, 50, 50), 0)
    finetune.flush_autosave()  # what closing calls: on the GUI thread
    messages = errors_with(notifications, "No space left on device")
    assert len(messages) == 2 and all(m.startswith("Could not save the corrections to") for m in messages)
    assert all(plain(m) for m in messages)
    assert first.read_bytes() == saved and sorted(p.name for p in first.parent.iterdir()) == [first.name]
    monkeypatch.undo()
    assert finetune.flush_autosave() is not None  # a second autosave works once there is room
    still_fine_tunes(viewer, finetune, qtbot)


def test_disk_full_while_saving_the_fine_tuned_checkpoint(viewer, finetune, qtbot, notifications, monkeypatch):
    """The disk fills up while the fine-tuned checkpoint is saved.

    You see: a warning "Could not save the model to .../EM-finetuned-....pt: cannot write ...: No space left on device. The fine-tuned model is still used." (no partial file)."""
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith(".pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    review_slice(viewer, finetune)
    finetune.start()
    wait_for_training(qtbot, finetune)
    (message,) = errors_with(notifications, "No space left on device")
    assert message.startswith("Could not save the model to") and "The fine-tuned model is still used" in message
    assert plain(message)
    assert not list(finetune_checkpoint_folder(finetune).glob("*.pt*"))
    monkeypatch.undo()
    still_fine_tunes(viewer, finetune, qtbot)


def finetune_checkpoint_folder(widget):
    return widget.run.checkpoint_path.parent


def test_open_a_folder_that_is_not_a_session(viewer, finetune, qtbot, notifications, tmp_path):
    """Open session pointed at a folder that is not a session.

    You see: ".../photos is not a napari-unet session (it has no session.json)."; the layers stay as they were."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    assert finetune.open_session(folder) is None
    (message,) = errors_with(notifications, "is not a napari-unet session")
    assert plain(message)
    assert [layer.name for layer in viewer.layers] == ["EM", "EM labels"]
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]
    still_fine_tunes(viewer, finetune, qtbot)
