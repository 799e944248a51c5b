"""Every newer variant through the GUI: trained in the Fine-tune dock, then segmenting in Segment."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet._qt.finetune_widget import FinetuneWidget
from napari_unet._qt.segment_widget import SegmentWidget
from napari_unet._qt.shared import model_holder
from napari_unet._sample_data import make_em_membranes, make_organelles_3d
from napari_unet.checkpoint import load_checkpoint
from napari_unet.corrections import FinetuneSettings

TINY = FinetuneSettings(
    learning_rate=0.01, time_budget=None, steps=3, patch_size=32, batch_size=2, loss="dice_bce",
    augment=False, val_fraction=0.0, margin=0, device="cpu",
)


@pytest.fixture
def autosave_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_UNET_AUTOSAVE_DIR", str(tmp_path / "autosave"))


def _data(variant: str):
    if variant.endswith("3d"):
        return make_organelles_3d(shape=(16, 32, 32), seed=0)
    return make_em_membranes(shape=(2, 64, 64), seed=0)


@pytest.mark.parametrize("variant", ["unetpp", "transunet", "unetpp3d", "transunet3d"])
def test_a_variant_fine_tunes_then_segments(make_napari_viewer, qtbot, autosave_dir, notifications, variant):
    image, truth = _data(variant)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="image")
    viewer.add_labels(truth.copy(), name="corrections")
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    finetune = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(finetune, name="Fine-tune", tabify=True)

    # Fine-tune: a fresh tiny model of this variant on one reviewed slice
    finetune.start_from.setCurrentIndex(2)  # fresh model
    finetune.variant.setCurrentText(variant)
    assert finetune.variant.currentText() == variant  # the registry's variants are offered
    finetune.width_spin.setValue(4)
    finetune.depth_spin.setValue(2)
    finetune.set_settings(FinetuneSettings(**{**TINY.__dict__, "patch_size": 16 if variant.endswith("3d") else 32}))
    step = list(viewer.dims.current_step)
    step[0] = 1
    viewer.dims.current_step = tuple(step)
    finetune.mark_current_slice_reviewed()
    finetune.start()
    qtbot.waitUntil(lambda: not finetune.is_training, timeout=120_000)
    assert finetune.plots.n_loss_points == 3, notifications
    checkpoint = load_checkpoint(finetune.last_checkpoint)
    assert checkpoint.config["name"] == variant and checkpoint.config["width"] == 4
    holder = model_holder(viewer)
    assert holder.model is not None and holder.model.config["name"] == variant

    # Segment with the fine-tuned model the two docks share
    qtbot.waitUntil(segment.run_button.isEnabled, timeout=120_000)
    segment.select_layer("image")
    assert segment.load_checkpoint(finetune.last_checkpoint) is not None
    qtbot.waitUntil(lambda: segment.run_button.isEnabled() and segment.current_model() is not None
                    and segment.current_model().config["name"] == variant, timeout=30_000)
    assert segment.run() is not None
    qtbot.waitUntil(lambda: segment.run_button.isEnabled() and "image labels" in viewer.layers
                    and "image probabilities" in viewer.layers, timeout=120_000)
    probabilities = np.asarray(viewer.layers["image probabilities"].data)
    assert probabilities.shape[-3:] == image.shape[-3:] and np.isfinite(probabilities).all()
    assert not [message for message in notifications if "error" in message.lower()]
