"""The Segment widget driven in a real viewer: sample data, run, rerun, cancel, errors, heartbeat."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from napari.layers import Image, Labels
from napari.utils.notifications import notification_manager
from qtpy.QtCore import QTimer

from napari_unet._qt.segment_widget import SegmentWidget
from napari_unet._qt.shared import model_holder
from napari_unet._sample_data import EM_SCALE, make_em_membranes
from napari_unet.checkpoint import save_checkpoint
from napari_unet.models import build_model

# The event loop must keep ticking while a prediction runs: this catches a frozen viewer on any
# machine. The 50 ms target is measured by benchmarks/gui_responsiveness.py (timings are not tests).
HEARTBEAT_LIMIT_MS = float(os.environ.get("NAPARI_UNET_HEARTBEAT_LIMIT_MS", "250"))
# Cancel must stop a prediction "within a second or so" (the batch in flight finishes first).
CANCEL_LIMIT_S = float(os.environ.get("NAPARI_UNET_CANCEL_LIMIT_S", "2.0"))




@pytest.fixture
def widget(viewer, qtbot):
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment", area="right")
    return segment


@pytest.fixture
def em_crop(viewer):
    """A small crop of the EM sample (3 slices of 64 x 96) with the sample's voxel size."""
    image, _ = make_em_membranes(shape=(3, 64, 96), seed=1)
    return viewer.add_image(image, name="crop", scale=EM_SCALE, translate=(0.0, 8.0, 4.0))


def wait_for(qtbot, widget, timeout=30_000):
    """Wait until the widget's worker is done and its results reached the main thread."""
    assert widget.worker is not None
    # the Run button comes back on the worker's `finished` signal (not racy like is_running,
    # which is False until the thread pool starts the worker)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=timeout)


def output_names(viewer, name):
    return [n for n in (f"{name} probabilities", f"{name} labels", f"{name} instances")
            if n in viewer.layers]


# ---------------------------------------------------------------------------------- happy path


def test_sample_through_plugin_then_segment_and_rerun_in_place(viewer, widget, qtbot):
    layers = viewer.open_sample("napari-unet", "em_membranes")
    image = viewer.layers["EM membranes"]
    assert isinstance(image, Image) and image.data.shape == (8, 256, 256)
    assert isinstance(viewer.layers["EM membranes ground truth"], Labels)
    assert len(layers) == 2
    assert widget.layer_combo.currentText() == "EM membranes"  # ground truth is not offered

    widget.select_layer("EM membranes")
    assert widget.set_fresh_model("unet", width=4, depth=2) is not None
    assert "untrained" in widget.summary_label.text()
    widget.instances_combo.setCurrentText("components")
    widget.tile_spin.setValue(128)
    worker = widget.run()
    assert worker is not None and not widget.run_button.isEnabled()
    wait_for(qtbot, widget)

    labels = viewer.layers["EM membranes labels"]
    probabilities = viewer.layers["EM membranes probabilities"]
    instances = viewer.layers["EM membranes instances"]
    assert isinstance(labels, Labels) and isinstance(probabilities, Image)
    for layer in (labels, probabilities, instances):
        assert layer.data.shape == image.data.shape
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    assert set(np.unique(labels.data)) <= {0, 1}
    assert 0.0 <= probabilities.data.min() and probabilities.data.max() <= 1.0
    assert widget.layer_combo.findText("EM membranes probabilities") < 0  # outputs are not inputs

    # a rerun with a different threshold updates the same layers instead of adding new ones
    n_layers = len(viewer.layers)
    widget.threshold_spin.setValue(0.95)
    widget.run()
    wait_for(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["EM membranes labels"] is labels
    expected = (probabilities.data >= 0.95).astype(np.uint8)
    np.testing.assert_array_equal(labels.data, expected)


def test_layer_picker_follows_the_viewer(viewer, widget):
    assert widget.layer_combo.count() == 0
    viewer.add_image(np.zeros((16, 16)), name="a")
    viewer.add_labels(np.zeros((16, 16), dtype=np.uint8), name="not an image")
    viewer.add_image(np.zeros((16, 16)), name="b")
    assert [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())] == ["a", "b"]
    widget.select_layer("b")
    viewer.layers["a"].name = "renamed"
    assert widget.layer_combo.findText("renamed") >= 0
    assert widget.selected_layer() is viewer.layers["b"]
    viewer.layers.remove("b")
    assert widget.layer_combo.findText("b") < 0
    assert widget.selected_layer() is viewer.layers["renamed"]


def test_instances_choice_components_or_watershed(viewer, widget, qtbot, monkeypatch):
    """The choice reaches the worker: a membrane gap merges two cells as components, not as watershed."""
    import napari_unet.inference

    assert [widget.instances_combo.itemText(i) for i in range(widget.instances_combo.count())] == [
        "none", "components", "watershed"]
    assert widget.instances_combo.currentText() == "none"
    # two square cells; the membrane column between them has a gap the model was unsure about
    interior = np.full((40, 81), 0.95, np.float32)
    interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = 0.05, 0.05, 0.05, 0.05
    interior[:, 39:42] = 0.05
    interior[18:22, 39:42] = 0.6
    probabilities = np.stack([1.0 - interior, interior])
    monkeypatch.setattr(napari_unet.inference, "predict", lambda *args, **kwargs: probabilities.copy())
    viewer.add_image(np.zeros(probabilities.shape[1:], np.float32), name="cells")
    widget.select_layer("cells")
    widget.set_fresh_model("unet", width=4, depth=2)

    widget.run()
    wait_for(qtbot, widget)
    assert "cells instances" not in viewer.layers  # none: no instances layer
    counts = {}
    for method in ("components", "watershed"):
        widget.instances_combo.setCurrentText(method)
        widget.run()
        wait_for(qtbot, widget)
        instances = viewer.layers["cells instances"]
        assert isinstance(instances, Labels) and instances.data.shape == probabilities.shape[1:]
        counts[method] = len(set(np.unique(instances.data)) - {0})
    assert counts == {"components": 1, "watershed": 2}


def test_watershed_instances_of_a_stack_are_unique_per_slice(viewer, widget, em_crop, qtbot):
    widget.set_fresh_model("unet", width=4, depth=2)
    widget.instances_combo.setCurrentText("watershed")
    widget.threshold_spin.setValue(0.3)
    widget.run()
    wait_for(qtbot, widget)
    instances = viewer.layers["crop instances"].data
    assert instances.shape == em_crop.data.shape and instances.dtype == np.int32
    ids = [set(np.unique(plane)) - {0} for plane in instances]
    assert all(ids) and not (ids[0] & ids[1]) and not (ids[1] & ids[2])  # a 2D model: slice by slice


def test_current_slice_only_writes_one_slice(viewer, widget, em_crop, qtbot):
    widget.set_fresh_model("unet", width=4, depth=2)
    viewer.dims.set_point(0, 2 * EM_SCALE[0])  # the third slice
    widget.current_slice_check.setChecked(True)
    widget.run()
    wait_for(qtbot, widget)
    probabilities = viewer.layers["crop probabilities"].data
    assert probabilities.shape == em_crop.data.shape
    assert np.all(probabilities[:2] == 0) and np.any(probabilities[2] > 0)


def test_a_3d_models_current_slice_is_normalised_as_its_whole_volume(viewer, widget, qtbot):
    # the slab around the slice must be scaled as the volume the 3D model sees whole, not on its
    # own percentiles (here the volume brightens with depth, so they differ)
    from napari_unet import io
    from napari_unet.inference import predict

    rng = np.random.default_rng(0)
    volume = rng.normal(100, 10, (40, 24, 24)).astype(np.float32)
    volume += np.linspace(0, 2000, 40, dtype=np.float32)[:, None, None]
    viewer.add_image(volume, name="vol")
    widget.select_layer("vol")
    widget.set_fresh_model("unet3d", width=4, depth=2)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))
    viewer.dims.set_point(0, 5)
    widget.current_slice_check.setChecked(True)
    widget.run()
    wait_for(qtbot, widget)
    kept = viewer.layers["vol probabilities"].data[5]
    model = model_holder(viewer).model
    window = volume[:14]  # slice 5 with 8 slices of context below it
    options = dict(tile=widget.tile_spin.value() or None, overlap=widget.overlap_spin.value(), device="cpu")
    whole = io.compute_normalization(volume, getattr(model, "normalization", None) or io.DEFAULT_NORMALIZATION)
    np.testing.assert_allclose(kept, predict(model, window, normalization=whole, **options)[1, 5], atol=1e-5)
    assert np.abs(kept - predict(model, window, **options)[1, 5]).max() > 1e-3


def test_3d_model_segments_a_volume(viewer, widget, qtbot):
    viewer.open_sample("napari-unet", "organelles_3d")
    volume = viewer.layers["Organelles"]
    volume.data = volume.data[:16, :48, :48]
    widget.select_layer("Organelles")
    widget.set_fresh_model("unet3d", width=4, depth=2)
    widget.run()
    wait_for(qtbot, widget)
    labels = viewer.layers["Organelles labels"]
    assert labels.data.shape == (16, 48, 48)
    np.testing.assert_allclose(labels.scale, volume.scale)


def test_checkpoint_is_loaded_summarised_and_shared(viewer, widget, em_crop, qtbot, tmp_path):
    model = build_model("resunet", width=4, depth=2)
    path = save_checkpoint(tmp_path / "tiny.pt", model,
                           provenance={"data_paths": ["sample_data/em_membranes_image.tif"]})
    shared = model_holder(viewer)
    changes = []
    shared.changed.connect(changes.append)
    widget.load_checkpoint(path)
    wait_for(qtbot, widget)
    assert shared.checkpoint is not None and changes
    assert type(shared.model).__name__ == type(model).__name__
    summary = widget.summary_label.text()
    assert "resunet" in summary and "em_membranes_image.tif" in summary  # what it was trained on
    assert "untrained" not in summary
    assert widget.checkpoint_page.isVisibleTo(widget) and not widget.fresh_page.isVisibleTo(widget)
    assert str(path) in shared.source

    # a model the Fine-tune widget puts in the holder shows up here and is what Run uses
    tuned = build_model("attention_unet", width=4, depth=2)
    shared.set(tuned, source="fine-tuned in napari on 'crop'")
    assert "attention_unet" in widget.summary_label.text()
    assert "fine-tuned" in widget.summary_label.text()
    widget.run()
    wait_for(qtbot, widget)
    assert "crop labels" in viewer.layers

    # switching back to "New model" after a checkpoint builds the form's variant again
    widget.load_checkpoint(path)
    wait_for(qtbot, widget)
    assert shared.checkpoint is not None
    widget.fresh_radio.setChecked(True)
    qtbot.waitUntil(lambda: shared.checkpoint is None, timeout=5000)
    assert shared.source.startswith("fresh") and not shared.trained


def test_multichannel_stack_into_a_2_channel_model(viewer, widget, qtbot):
    # (Z, C, Y, X): the output drops the channel axis and its scale
    data = np.random.default_rng(5).random((3, 2, 32, 40)).astype(np.float32)
    viewer.add_image(data, name="two channels", scale=(50.0, 1.0, 4.0, 4.0))
    model_holder(viewer).set(build_model("unet", in_channels=2, width=4, depth=2),
                             source="fresh unet, 2 channels", trained=False)
    widget.run()
    wait_for(qtbot, widget)
    labels = viewer.layers["two channels labels"]
    assert labels.data.shape == (3, 32, 40)
    np.testing.assert_allclose(labels.scale, (50.0, 4.0, 4.0))


def test_rgb_into_a_3_channel_model(viewer, widget, qtbot):
    rgb = np.random.default_rng(6).integers(0, 255, (2, 36, 44, 3), dtype=np.uint8)
    viewer.add_image(rgb, name="colour stack", rgb=True, scale=(2.0, 0.5, 0.5))
    model_holder(viewer).set(build_model("unet", in_channels=3, width=4, depth=2),
                             source="fresh unet, RGB", trained=False)
    widget.run()
    wait_for(qtbot, widget)
    labels = viewer.layers["colour stack labels"]
    assert labels.data.shape == (2, 36, 44)
    np.testing.assert_allclose(labels.scale, (2.0, 0.5, 0.5))


# ---------------------------------------------------------------------------------- cancel


def test_cancel_mid_run_leaves_no_half_written_layer(viewer, widget, qtbot, capsys):
    image, _ = make_em_membranes(shape=(8, 256, 256), seed=2)
    viewer.add_image(image, name="stack")
    widget.set_fresh_model("unet", width=8, depth=2)
    widget.tile_spin.setValue(64)  # 200 tiles in batches of 4: cancel lands between batches
    widget.tta_check.setChecked(True)  # four passes per tile: a run of several seconds
    reports = []
    worker = widget.run()
    worker.yielded.connect(reports.append)
    qtbot.waitUntil(lambda: any(getattr(r, "total", 0) > 0 for r in reports), timeout=30_000)
    t0 = time.perf_counter()
    widget.cancel()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    stop_seconds = time.perf_counter() - t0
    wait_for(qtbot, widget)
    with capsys.disabled():
        print(f"\ncancel: the worker stopped {stop_seconds:.2f} s after Cancel")
    assert stop_seconds < CANCEL_LIMIT_S, f"cancel took {stop_seconds:.2f} s"
    assert output_names(viewer, "stack") == []
    assert "Cancelled" in widget.status_label.text()

    # with outputs present from an earlier run, a cancelled rerun leaves them untouched
    widget.tta_check.setChecked(False)
    widget.current_slice_check.setChecked(True)
    widget.run()
    wait_for(qtbot, widget)
    labels = viewer.layers["stack labels"]
    before = labels.data.copy()
    widget.current_slice_check.setChecked(False)
    widget.tta_check.setChecked(True)
    widget.threshold_spin.setValue(0.05)
    reports.clear()
    worker = widget.run()
    worker.yielded.connect(reports.append)
    qtbot.waitUntil(lambda: any(getattr(r, "total", 0) > 0 for r in reports), timeout=30_000)
    widget.cancel()
    wait_for(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers["stack labels"].data, before)
    assert viewer.layers["stack labels"] is labels


# ---------------------------------------------------------------------------------- errors


def viewer_still_works(viewer, widget, qtbot):
    """After an error: the buttons are usable and a small segmentation still runs."""
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    viewer.add_image(np.random.default_rng(0).random((32, 32)).astype(np.float32), name="check")
    widget.select_layer("check")
    widget.set_fresh_model("unet", width=4, depth=2)
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("auto"))
    widget.run()
    wait_for(qtbot, widget)
    assert viewer.layers["check labels"].data.shape == (32, 32)


def test_no_image_layer_says_so(viewer, widget, notifications):
    assert widget.run() is None
    assert any("Pick an image layer" in m for m in notifications)


def test_2d_image_into_3d_model_is_refused(viewer, widget, qtbot, notifications):
    viewer.add_image(np.zeros((40, 40), dtype=np.uint8), name="flat")
    widget.set_fresh_model("unet3d", width=4, depth=2)
    assert widget.run() is None
    assert any("single 2D image but the model is 3D" in m for m in notifications)
    assert output_names(viewer, "flat") == []
    viewer_still_works(viewer, widget, qtbot)


def test_rgb_into_1_channel_model_offers_conversion(viewer, widget, qtbot):
    offered = []

    def record(event) -> None:
        offered.append(event)

    notification_manager.notification_ready.connect(record)
    try:
        rgb = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
        viewer.add_image(rgb, name="colour", rgb=True)
        widget.set_fresh_model("unet", width=4, depth=2)
        assert not widget.grayscale_check.isHidden()  # offered for RGB layers
        assert widget.run() is None
    finally:
        notification_manager.notification_ready.disconnect(record)
    notice = next(n for n in offered if "RGB" in n.message)
    assert "convert it to grayscale" in notice.message
    (label, convert_and_run), = notice.actions
    assert label == "Convert and run"
    convert_and_run(None)  # what the notification's button does
    assert widget.grayscale_check.isChecked()
    wait_for(qtbot, widget)
    assert viewer.layers["colour labels"].data.shape == (48, 40)
    assert viewer.layers["colour"].data.shape == (48, 40, 3)  # the input is left as it was


def test_16_bit_images_are_fine(viewer, widget, qtbot):
    image, _ = make_em_membranes(shape=(2, 48, 48), seed=3)
    viewer.add_image(image.astype(np.uint16) * 200, name="sixteen")
    widget.set_fresh_model("unet", width=4, depth=2)
    widget.run()
    wait_for(qtbot, widget)
    assert viewer.layers["sixteen labels"].data.shape == (2, 48, 48)


def test_nan_image_gives_a_message(viewer, widget, qtbot, notifications):
    data = np.ones((2, 32, 32), dtype=np.float32)
    data[1, 3, 4] = np.nan
    viewer.add_image(data, name="holes")
    widget.set_fresh_model("unet", width=4, depth=2)
    widget.run()
    wait_for(qtbot, widget)
    assert any("NaN" in m for m in notifications)
    assert output_names(viewer, "holes") == []
    viewer_still_works(viewer, widget, qtbot)


def test_corrupt_checkpoint_gives_a_message(viewer, widget, qtbot, notifications, tmp_path):
    shared = model_holder(viewer)
    model = widget.set_fresh_model("unet", width=4, depth=2)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a checkpoint" * 10)
    widget.load_checkpoint(broken)
    wait_for(qtbot, widget)
    assert notifications and "broken.pt" in notifications[-1]
    assert "Traceback" not in notifications[-1]
    assert shared.model is model  # the model in use is kept
    widget.load_checkpoint(tmp_path / "missing.pt")
    assert any("No checkpoint file" in m for m in notifications)
    viewer_still_works(viewer, widget, qtbot)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_gives_a_message(viewer, widget, em_crop, qtbot, notifications):
    widget.set_fresh_model("unet", width=4, depth=2)
    widget.set_device("cuda")
    assert widget.run() is None
    assert any("no usable CUDA GPU" in m for m in notifications)
    viewer_still_works(viewer, widget, qtbot)


# ---------------------------------------------------------------------------------- heartbeat


def test_event_loop_heartbeat_during_prediction(viewer, widget, qtbot, capsys):
    """A QTimer ticking every 10 ms keeps ticking while the sample stack is segmented.

    Measured on a rerun: the first run adds the output layers (napari builds their visuals,
    a one-off cost); reruns update the layers in place, like a user tuning the threshold.
    """
    viewer.open_sample("napari-unet", "em_membranes")
    widget.select_layer("EM membranes")
    widget.set_fresh_model("unet", width=8, depth=2)
    widget.tile_spin.setValue(128)
    widget.current_slice_check.setChecked(True)
    widget.run()
    wait_for(qtbot, widget)
    widget.current_slice_check.setChecked(False)
    widget.tta_check.setChecked(True)  # a few seconds of prediction to watch

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.wait(50)
    start = time.perf_counter()
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60_000)
    end = time.perf_counter()
    qtbot.wait(30)
    timer.stop()
    during = np.array([start] + [t for t in ticks if start < t < end] + [end])
    gaps_ms = np.diff(during) * 1000
    assert len(during) > 10, "the prediction was too short to measure"
    worst = float(gaps_ms.max())
    with capsys.disabled():
        print(f"\nheartbeat: {len(during) - 2} ticks over {end - start:.2f} s of prediction, "
              f"max gap {worst:.1f} ms at {during[int(np.argmax(gaps_ms))] - start:.2f} s, "
              f"median {np.median(gaps_ms):.1f} ms")
    assert worst < HEARTBEAT_LIMIT_MS
    assert viewer.layers["EM membranes labels"].data.shape == (8, 256, 256)


# ---------------------------------------------------------------------------------- plugin


def test_plugin_menus_and_dock_through_npe2(viewer):
    from napari._app_model import get_app_model

    app = get_app_model()

    def titles(menu_id):
        return [getattr(getattr(item, "command", None), "title", None) or getattr(item, "title", "")
                for item in app.menus.get_menu(menu_id)]

    assert "napari-unet" in titles("napari/plugins")
    assert {"Segment (napari-unet)", "Fine-tune (napari-unet)"} <= set(titles("napari/plugins/napari-unet"))
    assert "napari-unet" in titles("napari/layers/segment")
    _, docked = viewer.window.add_plugin_dock_widget("napari-unet", "Segment")
    assert isinstance(docked, SegmentWidget)


# ---------------------------------------------------------------------------------- demo


def test_demo_docks_the_widgets_with_the_sample(qtbot, monkeypatch):
    from napari_unet import _demo

    monkeypatch.setenv("NAPARI_UNET_DEMO_NO_BLOCK", "1")
    viewer = _demo.launch(block=False)
    try:
        assert "EM membranes" in viewer.layers
        docked = dict(viewer.window.dock_widgets)
        assert any("Segment" in name for name in docked)
        segment = next(w for name, w in docked.items() if "Segment" in name)
        assert isinstance(segment, SegmentWidget)
        assert segment.layer_combo.currentText() == "EM membranes"
        try:
            import napari_unet._qt.finetune_widget  # noqa: F401
        except ImportError:
            pass
        else:
            assert any("Fine-tune" in name for name in docked)
        from napari_unet._qt.review_widget import ReviewWidget

        review = next(w for name, w in docked.items() if "Correct next" in name)
        assert isinstance(review, ReviewWidget) and review.layer_combo.currentText() == "EM membranes"
        assert _demo.main(["--no-block"]) == 0
        from napari_unet.cli import main as cli_main

        assert cli_main(["demo"]) == 0  # non-blocking through NAPARI_UNET_DEMO_NO_BLOCK
        assert len(_demo.OPEN_VIEWERS) == 3
    finally:
        for v in list(_demo.OPEN_VIEWERS):
            v.close()
        _demo.OPEN_VIEWERS.clear()
