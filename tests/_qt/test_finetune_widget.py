"""The Fine-tune dock: corrections from paint events, autosave/restore, training with plots, Stop."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.key_bindings import KeyBinding
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_unet import finetuning
from napari_unet._qt import finetune_autosave, finetune_corrections, finetune_session_io
from napari_unet._qt import finetune_widget as fw
from napari_unet._qt.finetune_widget import FinetuneWidget
from napari_unet._qt.shared import model_holder
from napari_unet._sample_data import make_em_membranes, make_organelles_3d
from napari_unet.corrections import FinetuneSettings

SHAPE = (3, 64, 64)




@pytest.fixture(scope="module")
def em():
    """A small crop of the EM sample: (image, ground truth), 1 = cell interior, 0 = membrane."""
    return make_em_membranes(shape=SHAPE, seed=0)


@pytest.fixture
def messages(monkeypatch):
    """Every notification the widget shows, as (kind, text)."""
    shown: list[tuple[str, str]] = []
    for module in (fw, finetune_autosave, finetune_corrections, finetune_session_io):
        for name, record in (("notify_error", lambda exc, **kw: shown.append(("error", str(exc)))),
                             ("show_warning", lambda text: shown.append(("warning", text))),
                             ("show_info", lambda text: shown.append(("info", text)))):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, record)
    return shown


@pytest.fixture
def autosave_dir(tmp_path, monkeypatch):
    folder = tmp_path / "autosave"
    monkeypatch.setenv("NAPARI_UNET_AUTOSAVE_DIR", str(folder))
    return folder


def open_viewer(make_napari_viewer, em, *, prediction=None):
    """A viewer with the EM crop, a predicted labels layer to correct, and the docked widget."""
    image, truth = em
    viewer = make_napari_viewer()
    viewer.add_image(image.copy(), name="EM")
    labels = truth.copy() if prediction is None else prediction.copy()
    viewer.add_labels(labels, name="EM labels")
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    assert widget.image_layer.name == "EM" and widget.labels_layer.name == "EM labels"
    return viewer, widget


TINY = FinetuneSettings(
    learning_rate=0.01, time_budget=None, steps=6, patch_size=32, batch_size=2, loss="dice_bce",
    augment=False, val_fraction=0.25, val_every=2, margin=0, device="cpu",
)


def use_tiny_fresh_model(widget, settings=TINY, variant="unet"):
    widget.start_from.setCurrentIndex(2)  # fresh model
    widget.variant.setCurrentText(variant)
    widget.width_spin.setValue(4)
    widget.depth_spin.setValue(2)
    widget.set_settings(settings)
    widget.preview_spin.setValue(0.5)


def go_to_slice(viewer, z):
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)


# -- corrections ---------------------------------------------------------------------------------


def test_strokes_and_a_reviewed_slice_give_the_confirmed_count(make_napari_viewer, em, qtbot, autosave_dir, messages):
    viewer, widget = open_viewer(make_napari_viewer, em)
    widget.margin_spin.setValue(0)
    layer = widget.labels_layer
    before = np.array(layer.data)
    layer.brush_size = 7
    layer.paint((0, 20, 20), 0)  # erase to membrane (class 0) around a point inside a cell
    layer.paint((0, 40, 30), 1)
    layer.fill((0, 5, 60), 1)
    changed = int(np.count_nonzero(np.array(layer.data) != before))
    assert changed > 0
    assert widget.state.counts().painted == changed

    go_to_slice(viewer, 2)
    qtbot.mouseClick(widget.review_button, Qt.LeftButton)
    counts = widget.state.counts()
    assert counts.reviewed_slices == (2,)
    assert counts.confirmed == changed + 64 * 64
    qtbot.waitUntil(lambda: f"{counts.confirmed:,} confirmed pixels" in widget.counts_label.text(), timeout=2000)

    # the keyboard shortcut marks the slice in view too
    go_to_slice(viewer, 1)
    viewer.keymap[KeyBinding.from_str("Shift-R")](viewer)
    assert widget.state.counts().reviewed_slices == (1, 2)

    # the overlay shows exactly the confirmed pixels
    widget.show_confirmed.setChecked(True)
    assert widget.confirmed_layer.data.sum() == widget.state.counts().confirmed
    widget.show_confirmed.setChecked(False)
    assert widget.confirmed_layer is None


def test_corrections_are_autosaved_and_offered_back_after_reopening(make_napari_viewer, em, qtbot, autosave_dir, messages):
    viewer, widget = open_viewer(make_napari_viewer, em)
    layer = widget.labels_layer
    layer.brush_size = 5
    layer.paint((1, 30, 30), 0)
    go_to_slice(viewer, 0)
    widget.mark_current_slice_reviewed()
    # debounced: the file appears shortly after the last edit, without any explicit save
    qtbot.waitUntil(lambda: widget.last_autosave is not None and widget.last_autosave.exists(), timeout=5000)
    edited = np.array(layer.data)
    expected = widget.state.counts(widget.margin_spin.value())
    assert widget.last_autosave.parent == autosave_dir
    # strokes right before closing are flushed by the close itself
    layer.paint((2, 10, 10), 0)
    edited = np.array(layer.data)
    expected = widget.state.counts(widget.margin_spin.value())
    widget.close()
    viewer.close()

    viewer2, widget2 = open_viewer(make_napari_viewer, em)  # the same image, opened again
    assert widget2.restore_box.isVisibleTo(widget2)
    assert any("Saved corrections found" in text for _, text in messages)
    restored = widget2.restore_corrections()
    assert restored is widget2.labels_layer and restored.name == "EM corrections"
    assert np.array_equal(np.asarray(restored.data), edited)
    assert widget2.state.counts(widget2.margin_spin.value()) == expected
    assert len(viewer2.layers) == 3  # a new layer: the existing labels are left alone


def test_a_different_image_is_not_offered_the_corrections(make_napari_viewer, em, qtbot, autosave_dir, messages):
    viewer, widget = open_viewer(make_napari_viewer, em)
    widget.mark_current_slice_reviewed()
    assert widget.flush_autosave().exists()
    image, truth = em
    other = (255 - image, truth)
    viewer2, widget2 = open_viewer(make_napari_viewer, other)
    assert not widget2.restore_box.isVisibleTo(widget2)


def test_a_new_prediction_on_the_corrected_layer_keeps_the_corrections(make_napari_viewer, em, qtbot, autosave_dir, messages):
    viewer, widget = open_viewer(make_napari_viewer, em)
    layer = widget.labels_layer
    layer.brush_size = 5
    layer.paint((0, 30, 30), 0)
    corrected = np.array(layer.data)
    widget.flush_autosave()
    layer.data = np.ones(SHAPE, np.uint8)  # e.g. Segment re-run into the same layer
    painted = widget.state.painted
    assert np.array_equal(np.asarray(layer.data)[painted], corrected[painted])
    assert np.asarray(layer.data)[~painted].min() == 1


# -- errors in plain words -----------------------------------------------------------------------


def test_start_explains_missing_corrections_and_shape_mismatch(make_napari_viewer, em, qtbot, autosave_dir, messages):
    viewer, widget = open_viewer(make_napari_viewer, em)
    use_tiny_fresh_model(widget)
    widget.start()
    assert not widget.is_training
    assert messages[-1][0] == "error" and "No confirmed pixels yet" in messages[-1][1]
    viewer.add_labels(np.zeros((3, 32, 32), np.uint8), name="wrong size")
    widget.labels_picker.set_layer(viewer.layers["wrong size"])
    widget.mark_current_slice_reviewed()
    widget.start()
    assert not widget.is_training and "has shape" in messages[-1][1]
    widget.start_from.setCurrentIndex(0)  # the Segment widget's model, which does not exist yet
    widget.labels_picker.set_layer(viewer.layers["EM labels"])
    widget.mark_current_slice_reviewed()
    widget.start()
    assert "Segment widget has no model" in messages[-1][1]


# -- training ------------------------------------------------------------------------------------


def wait_for_training(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: not widget.is_training, timeout=timeout)


def start_with_reviewed_slice(viewer, widget, qtbot, settings, z=1):
    use_tiny_fresh_model(widget, settings)
    go_to_slice(viewer, z)
    widget.mark_current_slice_reviewed()
    widget.start()
    assert widget.is_training


def test_fine_tune_fills_plots_saves_a_checkpoint_and_updates_the_preview(make_napari_viewer, em, qtbot, autosave_dir, messages):
    image, truth = em
    prediction = truth.copy()
    prediction[1, :, :32] = 1  # a wrong "prediction" to correct
    viewer, widget = open_viewer(make_napari_viewer, em, prediction=prediction)
    layer = widget.labels_layer
    layer.brush_size = 9
    layer.paint((1, 20, 10), 0)
    # a time budget (not a step count) so that the 0.5 s previews fire however fast the machine is
    settings = FinetuneSettings(**{**TINY.__dict__, "steps": None, "time_budget": 3.0})
    start_with_reviewed_slice(viewer, widget, qtbot, settings, z=2)
    preview = widget.preview_layer
    assert preview is not None and preview.name == "EM preview" and not np.asarray(preview.data).any()
    wait_for_training(qtbot, widget)

    assert widget.plots.n_loss_points >= 1  # a loaded CI machine may manage few steps in 3 s
    assert widget.plots.n_dice_points >= 1 and len(widget.plots.dice[-1]) == 2
    assert widget.last_checkpoint is not None and widget.last_checkpoint.exists()
    assert np.asarray(preview.data)[2].any()  # the slice in view was predicted during training
    holder = model_holder(viewer)
    assert holder.model is not None and "fine-tuned" in holder.source and holder.trained

    from napari_unet.checkpoint import load_checkpoint

    ckpt = load_checkpoint(widget.last_checkpoint)
    assert ckpt.provenance["reviewed_slices"] == [2]
    assert ckpt.provenance["confirmed_pixels"] == widget.state.counts(0).confirmed
    assert ckpt.provenance["image_name"] == "EM" and ckpt.provenance["steps"] == widget.plots.steps[-1]
    assert str(widget.last_checkpoint) in widget.status_label.text()
    assert widget.resume_button.isEnabled() and widget.start_button.isEnabled()

    # Resume goes on from the saved weights: the step count continues
    last = widget.plots.steps[-1]
    widget.set_settings(FinetuneSettings(**{**TINY.__dict__, "steps": 3}))
    widget.resume()
    wait_for_training(qtbot, widget)
    assert widget.plots.steps[-1] == last + 3


def test_stop_ends_training_within_a_second_and_keeps_the_weights(make_napari_viewer, em, qtbot, autosave_dir, messages):
    viewer, widget = open_viewer(make_napari_viewer, em)
    start_with_reviewed_slice(viewer, widget, qtbot, FinetuneSettings(**{**TINY.__dict__, "steps": None, "time_budget": 60}))
    qtbot.waitUntil(lambda: widget.plots.n_loss_points >= 3, timeout=30000)
    qtbot.mouseClick(widget.stop_button, Qt.LeftButton)
    # the training loop ends within a second of the click (its "finished" event reaches the GUI)...
    qtbot.waitUntil(lambda: widget.last_stop_latency is not None, timeout=5000)
    assert widget.last_stop_latency < 1.0
    print(f"stop latency: {widget.last_stop_latency * 1000:.0f} ms")
    # ...then the best weights are saved and shared
    wait_for_training(qtbot, widget, timeout=20000)
    assert widget.last_checkpoint.exists() and "stopped by the user" in widget.status_label.text()
    assert model_holder(viewer).model is not None


def test_deleting_the_image_mid_run_stops_cleanly_with_a_message(make_napari_viewer, em, qtbot, autosave_dir, messages):
    viewer, widget = open_viewer(make_napari_viewer, em)
    start_with_reviewed_slice(viewer, widget, qtbot, FinetuneSettings(**{**TINY.__dict__, "steps": None, "time_budget": 60}))
    qtbot.waitUntil(lambda: widget.plots.n_loss_points >= 2, timeout=30000)
    viewer.layers.remove("EM")
    wait_for_training(qtbot, widget, timeout=20000)
    assert any(kind == "warning" and "'EM' was deleted during training" in text for kind, text in messages)
    assert widget.last_checkpoint is not None and widget.last_checkpoint.exists()  # weights kept
    assert model_holder(viewer).model is not None
    assert not [text for kind, text in messages if kind == "error"]


def test_out_of_memory_retries_once_with_half_the_batch(make_napari_viewer, em, qtbot, autosave_dir, messages, monkeypatch):
    from napari_unet.training import TrainingOutOfMemory

    real = finetuning.build_finetune_trainer
    batches = []

    def flaky(*args, **kwargs):
        settings = args[4]
        batches.append(settings.batch_size)
        if len(batches) == 1:
            raise TrainingOutOfMemory("The cpu device ran out of memory.")
        return real(*args, **kwargs)

    monkeypatch.setattr(finetuning, "build_finetune_trainer", flaky)
    viewer, widget = open_viewer(make_napari_viewer, em)
    start_with_reviewed_slice(viewer, widget, qtbot, FinetuneSettings(**{**TINY.__dict__, "batch_size": 4, "steps": 2}))
    wait_for_training(qtbot, widget)
    assert batches == [4, 2]
    assert any("retrying with batch size 2" in text for _, text in messages)
    assert widget.last_checkpoint.exists()


def test_a_3d_model_fine_tunes_on_a_reviewed_sub_volume_and_painted_voxels(make_napari_viewer, qtbot, autosave_dir, messages):
    image, truth = make_organelles_3d(shape=(16, 48, 48), seed=0)
    viewer, widget = open_viewer(make_napari_viewer, (image, truth))
    settings = FinetuneSettings(**{**TINY.__dict__, "patch_size": 16, "steps": 3, "val_fraction": 0.0})
    use_tiny_fresh_model(widget, settings, variant="unet3d")
    layer = widget.labels_layer
    layer.brush_size = 5
    layer.paint((3, 10, 10), 1)
    go_to_slice(viewer, 10)
    widget.review_depth.setValue(4)
    widget.mark_current_slice_reviewed()
    state = widget.state
    assert state.reviewed_regions == [((9, 13), (0, 48), (0, 48))]
    widget.start()
    wait_for_training(qtbot, widget)
    assert widget.plots.n_loss_points == 3
    assert model_holder(viewer).model.spatial_dims == 3 and widget.last_checkpoint.exists()


def test_the_preview_normalises_a_slice_as_training_and_segment_do():
    # sections of one stack at different brightness: the preview of slice 2 must be what Segment
    # (predict on the stack) and training (each slice on its own statistics) see, not slice 2
    # scaled by the whole stack's statistics
    from types import SimpleNamespace

    from napari_unet import io
    from napari_unet.inference import predict, probabilities_to_labels
    from napari_unet.models import build_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2).eval()
    image, _ = make_em_membranes(shape=(1, 64, 64), seed=1)
    raw = (image[0] - image.min()) / (image.max() - image.min())
    stack = np.stack([raw * 1000 + 100, raw * 300 + 5000, raw * 3000]).astype(np.uint16)
    run = SimpleNamespace(preview_region=(2, slice(0, 64), slice(0, 64)), image=stack,
                          settings=SimpleNamespace(device="cpu"), stop_requested=False)
    from napari_unet.inference import volume_statistics

    stats = volume_statistics(model, stack)
    region, labels = finetuning.preview_prediction(model, run, stats)
    assert region == run.preview_region
    expected = probabilities_to_labels(predict(model, stack, device="cpu"))[2]
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(labels, probabilities_to_labels(predict(model, stack[2], device="cpu")))
    whole_stack = io.compute_normalization(stack)
    assert (probabilities_to_labels(predict(model, stack[2], device="cpu", normalization=whole_stack))
            != expected).any()


def test_re_running_segment_after_training_keeps_the_corrections(make_napari_viewer, em, qtbot, autosave_dir, messages):
    """Segment writes its output into 'EM labels', the very layer the user corrected."""
    from napari_unet._qt.segment_widget import SegmentWidget

    viewer, widget = open_viewer(make_napari_viewer, em)
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    layer = widget.labels_layer
    layer.brush_size = 5
    layer.paint((0, 30, 30), 0)
    widget.rerun_check.setChecked(True)
    start_with_reviewed_slice(viewer, widget, qtbot, FinetuneSettings(**{**TINY.__dict__, "steps": 2}), z=1)
    corrected = np.array(layer.data)
    wait_for_training(qtbot, widget)
    qtbot.waitUntil(lambda: segment.worker is not None and not segment.worker.is_running, timeout=30000)
    qtbot.waitUntil(lambda: not np.array_equal(np.asarray(layer.data), corrected), timeout=5000)
    confirmed = widget.state.confirmed_mask(0)
    assert np.array_equal(np.asarray(layer.data)[confirmed], corrected[confirmed])  # the user's work stays
    assert any("kept on top of the new labels" in text for _, text in messages)


def test_the_form_defaults_are_the_benchmarked_defaults(make_napari_viewer, em, autosave_dir, messages):
    """benchmarks/human_in_the_loop.py uses FinetuneSettings(); the dock must start from the same."""
    from napari_unet.training import TrainConfig

    viewer, widget = open_viewer(make_napari_viewer, em)
    expected = FinetuneSettings(learning_rate=TrainConfig().learning_rate)
    assert widget.settings() == expected
    assert expected.train_config(2) == FinetuneSettings().train_config(2)
    widget.set_settings(TINY)
    assert widget.settings() == TINY
    assert widget.lr_spin.toolTip() and widget.time_spin.toolTip() and widget.loss_combo.toolTip()
    assert f"fades to 0 over the first {TrainConfig().dice_fade:.0%}" in widget.loss_combo.toolTip()


# -- sessions ------------------------------------------------------------------------------------


def choose_folder(monkeypatch, folder):
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *args, **kwargs: str(folder)))


def wait_for_session_job(qtbot, widget, timeout=30000):
    qtbot.waitUntil(lambda: widget.session_worker is None, timeout=timeout)


def test_a_saved_session_opens_in_a_fresh_viewer_as_it_was(make_napari_viewer, em, qtbot, tmp_path, autosave_dir,
                                                            messages, monkeypatch):
    import torch

    from napari_unet.models import build_model
    from napari_unet.session import load_session, read_manifest

    image, truth = em
    image_path = tmp_path / "em.npy"
    np.save(image_path, image)
    viewer = make_napari_viewer()
    viewer.add_image(image.copy(), name="EM", metadata={"napari_unet_source": str(image_path)}, scale=(1, 2, 2))
    viewer.add_labels(truth.copy(), name="EM labels", scale=(1, 2, 2))
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    layer = widget.labels_layer
    layer.brush_size = 5
    layer.paint((0, 30, 30), 0)
    go_to_slice(viewer, 2)
    widget.mark_current_slice_reviewed()
    widget.set_settings(TINY)
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2)
    model_holder(viewer).set(model, source="a test model", trained=True)
    edited, state = np.array(layer.data), widget.state.copy()

    folder = tmp_path / "session"
    choose_folder(monkeypatch, folder)
    qtbot.mouseClick(widget.save_session_button, Qt.LeftButton)
    wait_for_session_job(qtbot, widget)
    assert widget.session is not None and str(folder) in widget.session_label.text()
    assert not [text for kind, text in messages if kind == "error"]
    widget.close()
    viewer.close()

    viewer2 = make_napari_viewer()
    widget2 = FinetuneWidget(viewer2)
    viewer2.window.add_dock_widget(widget2, name="Fine-tune")
    qtbot.mouseClick(widget2.open_session_button, Qt.LeftButton)
    wait_for_session_job(qtbot, widget2)
    assert not [text for kind, text in messages if kind == "error"]
    assert [lay.name for lay in viewer2.layers] == ["EM", "EM labels"]
    assert widget2.image_layer is viewer2.layers["EM"] and widget2.labels_layer is viewer2.layers["EM labels"]
    assert np.array_equal(np.asarray(viewer2.layers["EM"].data), image)
    assert np.array_equal(np.asarray(widget2.labels_layer.data), edited)
    assert tuple(widget2.labels_layer.scale) == (1, 2, 2)
    assert widget2.state.reviewed_slices == {2} and np.array_equal(widget2.state.painted, state.painted)
    assert widget2.settings() == TINY
    holder = model_holder(viewer2)
    assert holder.source == "a test model" and holder.trained and widget2.start_from.currentIndex() == 0
    assert all(torch.equal(a, b) for a, b in zip(holder.model.state_dict().values(), model.state_dict().values()))
    assert not widget2.restore_box.isVisibleTo(widget2)  # its own autosave is not offered on top

    # the work goes on in the session: strokes on the autosave cadence, the model after fine-tuning
    painted = int(widget2.state.painted.sum())
    widget2.labels_layer.paint((1, 10, 10), 0)
    qtbot.waitUntil(lambda: load_session(folder, read_image=False).state.painted.sum() > painted, timeout=10000)
    widget2.set_settings(FinetuneSettings(**{**TINY.__dict__, "steps": 2}))
    widget2.start()
    wait_for_training(qtbot, widget2)
    manifest = read_manifest(folder)
    assert "fine-tuned in napari" in manifest["model"]["source"] and manifest["model"]["step"] == 2
    assert manifest["settings"]["steps"] == 2


def test_a_failing_open_says_why_and_leaves_the_viewer_usable(make_napari_viewer, em, qtbot, tmp_path, autosave_dir,
                                                              messages, monkeypatch):
    viewer, widget = open_viewer(make_napari_viewer, em)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "session.json").write_text("{not json")
    choose_folder(monkeypatch, broken)
    qtbot.mouseClick(widget.open_session_button, Qt.LeftButton)
    assert messages[-1][0] == "error" and "damaged" in messages[-1][1] and "\n" not in messages[-1][1]
    widget.open_session(tmp_path / "nowhere")
    assert messages[-1][0] == "error" and "no session folder" in messages[-1][1]
    assert [lay.name for lay in viewer.layers] == ["EM", "EM labels"] and widget.session_worker is None

    # an image that was moved away since: the session's message names it
    image_path = tmp_path / "em.npy"
    np.save(image_path, em[0])
    viewer.layers["EM"].metadata["napari_unet_source"] = str(image_path)
    widget.mark_current_slice_reviewed()
    widget.save_session(tmp_path / "s")
    wait_for_session_job(qtbot, widget)
    # saving into a folder of other files is refused in plain words
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert widget.save_session(tmp_path / "other") is None
    assert messages[-1][0] == "error" and "already holds other files" in messages[-1][1]
    assert widget.session.folder == tmp_path / "s"  # still the session saved before
    image_path.unlink()
    widget.open_session(tmp_path / "s")
    assert "is gone" in messages[-1][1] and str(image_path) in messages[-1][1]

    # the viewer and the dock still work
    assert [lay.name for lay in viewer.layers] == ["EM", "EM labels"]
    go_to_slice(viewer, 0)
    widget.mark_current_slice_reviewed()
    assert widget.state.reviewed_slices == {0, 1}


# -- replay of the start model's training data ---------------------------------------------------


def _checkpoint_naming_its_data(tmp_path, em, *, files_exist=True):
    import tifffile

    from napari_unet.checkpoint import save_checkpoint
    from napari_unet.models import build_model

    image, truth = em
    images_path, labels_path = tmp_path / "train-volume.tif", tmp_path / "train-labels.tif"
    if files_exist:
        tifffile.imwrite(images_path, image, photometric="minisblack")
        tifffile.imwrite(labels_path, (truth * 255).astype(np.uint8), photometric="minisblack")
    path = tmp_path / "start.pt"
    save_checkpoint(path, build_model("unet", width=4, depth=2),
                    provenance={"data_paths": [str(images_path), str(labels_path)]})
    return path, (images_path, labels_path)


@pytest.mark.parametrize("files_exist", [True, False])
def test_fine_tuning_replays_the_training_data_its_checkpoint_names(make_napari_viewer, em, qtbot, tmp_path,
                                                                     autosave_dir, messages, files_exist):
    checkpoint, data = _checkpoint_naming_its_data(tmp_path, em, files_exist=files_exist)
    viewer, widget = open_viewer(make_napari_viewer, em)
    widget.set_settings(TINY)
    assert widget.replay_check.isChecked()  # on by default
    widget.start_from.setCurrentIndex(1)
    widget.checkpoint_in.setText(str(checkpoint))
    layer = widget.labels_layer
    layer.brush_size = 5
    layer.paint((1, 20, 10), 0)
    widget.start()
    wait_for_training(qtbot, widget)

    from napari_unet.checkpoint import load_checkpoint

    provenance = load_checkpoint(widget.last_checkpoint).provenance
    texts = " ".join(text for _, text in messages)
    if files_exist:
        assert ("info", "Replaying the model's training data (train-volume.tif) beside your corrections, so that "
                "it keeps what it knew.") in messages
        assert provenance["replay_data_paths"] == [str(p) for p in data]  # passed on to the next fine-tuning
        assert provenance["settings"]["replay"] is True
    else:
        assert "is not there any more. Fine-tuning on your corrections alone." in texts
        assert "replay_data_paths" not in provenance
    assert not any(kind == "error" for kind, _ in messages)


def test_replay_can_be_turned_off(make_napari_viewer, em, qtbot, tmp_path, autosave_dir, messages):
    checkpoint, _ = _checkpoint_naming_its_data(tmp_path, em)
    viewer, widget = open_viewer(make_napari_viewer, em)
    widget.set_settings(FinetuneSettings(**{**TINY.__dict__, "replay": False}))
    assert not widget.replay_check.isChecked()
    widget.start_from.setCurrentIndex(1)
    widget.checkpoint_in.setText(str(checkpoint))
    widget.labels_layer.paint((1, 20, 10), 0)
    widget.start()
    wait_for_training(qtbot, widget)
    assert not any("Replaying" in text for _, text in messages)
