"""Corrections: what the user confirmed, how it is saved, and how it becomes training data."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_unet import corrections
from napari_unet.corrections import (
    CorrectionsError,
    CorrectionState,
    FinetuneSettings,
    autosave_path_for,
    build_finetune_trainer,
    find_autosave,
    image_fingerprint,
    load_corrections,
    save_corrections,
    training_arrays,
)

# -- recording -----------------------------------------------------------------------------------


def test_record_paint_with_box_and_mask_counts_only_changed_pixels():
    state = CorrectionState((3, 10, 10))
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 1:3, 1:3] = True
    added = state.record_paint((slice(1, 2), slice(2, 6), slice(2, 6)), mask)
    assert added == 4
    assert state.painted.sum() == 4
    assert state.painted[1, 3:5, 3:5].all()
    # the same pixels again add nothing and do not bump the revision
    revision = state.revision
    assert state.record_paint((slice(1, 2), slice(2, 6), slice(2, 6)), mask) == 0
    assert state.revision == revision


def test_record_paint_with_fancy_index_and_whole_box():
    state = CorrectionState((2, 5, 5))
    state.record_paint((np.array([0, 0, 1]), np.array([1, 2, 3]), np.array([4, 4, 0])))
    assert state.painted.sum() == 3 and state.painted[1, 3, 0]
    state.record_paint((slice(0, 1), slice(0, 2), slice(0, 2)), None)  # mask None = whole box changed
    assert state.painted.sum() == 3 + 4


def test_record_history_atoms_understands_both_napari_atom_kinds():
    state = CorrectionState((4, 8, 8))
    masked = SimpleNamespace(
        slice_key=(slice(2, 3), slice(0, 2), slice(0, 3)),
        mask=np.array([[[True, False, True], [False, False, True]]]),
        old_values=np.zeros(3),
        new_value=1,
    )
    legacy = ((np.array([3]), np.array([7]), np.array([7])), np.array([0]), 1)
    assert state.record_history_atoms([masked, legacy]) == 4
    assert state.painted[2, 0, 0] and state.painted[2, 0, 2] and state.painted[2, 1, 2] and state.painted[3, 7, 7]


def test_margin_grows_strokes_in_plane_only():
    state = CorrectionState((3, 20, 20))
    state.record_paint((np.array([1]), np.array([10]), np.array([10])))
    grown = state.grown_painted(margin=2)
    assert grown[1].sum() == 13  # a disk of radius 2
    assert not grown[0].any() and not grown[2].any()
    assert state.painted.sum() == 1  # the recorded strokes themselves stay as they were


def test_reviewed_slices_regions_and_unmark():
    state = CorrectionState((5, 6, 7))
    state.mark_reviewed(1)
    state.mark_reviewed(3)
    assert state.is_reviewed(1) and not state.is_reviewed(2)
    box = state.mark_region((slice(2, 4), slice(0, 3), (1, 99)))
    assert box == ((2, 4), (0, 3), (1, 7))
    confirmed = state.confirmed_mask()
    assert confirmed[1].all() and confirmed[3].all()
    assert confirmed[2, :3, 1:].all() and not confirmed[2, 3:].any() and not confirmed[2, :, 0].any()
    counts = state.counts()
    assert counts.confirmed == 2 * 42 + 3 * 6
    assert counts.reviewed_slices == (1, 3) and counts.reviewed_regions == 1
    state.unmark_reviewed(3)  # drops slice 3 and the region touching it
    assert state.reviewed_slices == {1} and state.reviewed_regions == []
    with pytest.raises(CorrectionsError, match="outside the stack"):
        state.mark_reviewed(5)


def test_single_image_review_marks_everything_and_weights_are_zero_elsewhere():
    state = CorrectionState((4, 4))
    assert state.weights().sum() == 0 and state.is_empty
    state.mark_reviewed()
    assert state.is_reviewed() and state.weights().dtype == np.float32 and state.weights().min() == 1
    state.unmark_reviewed()
    assert state.is_empty


def test_counts_describe_is_plain():
    state = CorrectionState((6, 10, 10))
    for z in (1, 2, 3, 5):
        state.mark_reviewed(z)
    text = state.counts().describe()
    assert text.startswith("400 confirmed pixels (66.7%)") and "reviewed slices: 1-3, 5" in text


# -- saving --------------------------------------------------------------------------------------


def _edited_state() -> tuple[CorrectionState, np.ndarray]:
    state = CorrectionState((3, 16, 16))
    state.record_paint((np.array([0, 0]), np.array([2, 3]), np.array([4, 4])))
    state.mark_reviewed(2)
    state.mark_region(((1, 2), (0, 8), (0, 8)))
    labels = np.random.default_rng(0).integers(0, 2, (3, 16, 16)).astype(np.uint8)
    return state, labels


def test_save_and_load_round_trip(tmp_path):
    state, labels = _edited_state()
    path = save_corrections(tmp_path / "a" / "x.corrections.npz", state, labels, fingerprint="fp", image_name="em", margin=1)
    saved = load_corrections(path)
    assert np.array_equal(saved.labels, labels) and saved.labels.dtype == labels.dtype
    assert np.array_equal(saved.state.painted, state.painted)
    assert saved.state.reviewed_slices == {2}
    assert saved.state.reviewed_regions == [((1, 2), (0, 8), (0, 8))]
    assert saved.fingerprint == "fp" and saved.meta["image_name"] == "em" and saved.meta["margin"] == 1
    assert "confirmed pixels" in saved.describe()
    assert [p.name for p in path.parent.iterdir()] == ["x.corrections.npz"]  # no temp file left


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    state, labels = _edited_state()
    path = save_corrections(tmp_path / "x.corrections.npz", state, labels, fingerprint="old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corrections.np, "savez_compressed", broken)
    with pytest.raises(OSError):
        save_corrections(path, state, labels, fingerprint="new")
    monkeypatch.undo()
    assert load_corrections(path).fingerprint == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.corrections.npz"]


def test_save_refuses_labels_of_another_shape(tmp_path):
    state, labels = _edited_state()
    with pytest.raises(CorrectionsError, match="shape"):
        save_corrections(tmp_path / "x.corrections.npz", state, labels[:2])


def test_load_of_a_stray_file_is_a_plain_error(tmp_path):
    stray = tmp_path / "junk.corrections.npz"
    stray.write_bytes(b"not a zip")
    with pytest.raises(CorrectionsError, match="Could not read"):
        load_corrections(stray)


def test_fingerprint_identifies_the_image():
    image = np.random.default_rng(1).integers(0, 255, (4, 200, 300), dtype=np.uint8)
    same = image.copy()
    other = image.copy()
    other[2, ::4, ::4] += 1  # touches the subsampled positions
    assert image_fingerprint(image) == image_fingerprint(same)
    assert image_fingerprint(image) != image_fingerprint(other)
    assert image_fingerprint(image) != image_fingerprint(image.astype(np.uint16))
    assert image_fingerprint(image).startswith("4x200x300-uint8-")


def test_find_autosave_picks_the_newest_file_of_that_image(tmp_path):
    state, labels = _edited_state()
    first = save_corrections(tmp_path / "one.corrections.npz", state, labels, fingerprint="abc")
    save_corrections(tmp_path / "other.corrections.npz", state, labels, fingerprint="zzz")
    second = save_corrections(tmp_path / "two.corrections.npz", state, labels, fingerprint="abc")
    os.utime(first, (1, 1))
    (tmp_path / "junk.corrections.npz").write_bytes(b"junk")
    assert find_autosave("abc", [tmp_path, tmp_path / "missing"]) == second
    assert find_autosave("nope", [tmp_path]) is None


def test_autosave_path_next_to_the_image_or_in_a_folder(tmp_path, monkeypatch):
    image_file = tmp_path / "data" / "stack.ome.tif"
    image_file.parent.mkdir()
    image_file.write_bytes(b"")
    fp = "4x8x8-uint8-0123456789abcdef"
    assert autosave_path_for(image_file, "stack", fp) == tmp_path / "data" / "stack.corrections.npz"
    picked = autosave_path_for(image_file, "stack", fp, folder=tmp_path / "mine")
    assert picked == tmp_path / "mine" / "stack-01234567.corrections.npz"
    monkeypatch.setenv("NAPARI_UNET_AUTOSAVE_DIR", str(tmp_path / "fallback"))
    assert autosave_path_for(None, "EM: membranes", fp) == tmp_path / "fallback" / "EM_membranes-01234567.corrections.npz"
    # a read-only image folder falls back to the default folder
    monkeypatch.setattr(corrections.os, "access", lambda path, mode: False)
    assert autosave_path_for(image_file, "stack", fp).parent == tmp_path / "fallback"


# -- training data -------------------------------------------------------------------------------


def test_training_arrays_take_only_slices_with_confirmed_pixels():
    image = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    labels = np.ones((4, 8, 8), np.uint8)
    state = CorrectionState(labels.shape)
    state.mark_reviewed(2)
    state.record_paint((np.array([0]), np.array([3]), np.array([3])))
    images, class_maps, weights = training_arrays(image, labels, state, spatial_dims=2, margin=1)
    assert len(images) == 2
    assert np.array_equal(images[0], image[0]) and np.array_equal(images[1], image[2])
    assert weights[0].sum() == 5 and weights[1].sum() == 64
    assert class_maps[0].dtype == np.int64


def test_training_arrays_with_channels_and_instances():
    image = np.zeros((3, 2, 8, 8), np.float32)  # (Z, C, Y, X) stack
    labels = np.zeros((3, 8, 8), np.int32)
    labels[1, 2:4, 2:4] = 7  # an instance id: a binary model learns "foreground"
    state = CorrectionState(labels.shape)
    state.mark_reviewed(1)
    images, class_maps, _ = training_arrays(image, labels, state, spatial_dims=2, n_classes=2)
    assert images[0].shape == (2, 8, 8)
    assert set(np.unique(class_maps[0])) == {0, 1}
    with pytest.raises(CorrectionsError, match="class 7"):
        training_arrays(image, labels, state, spatial_dims=2, n_classes=3)


def test_training_arrays_crop_a_volume_around_the_confirmed_voxels():
    image = np.zeros((40, 50, 60), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    state = CorrectionState(labels.shape)
    state.mark_region(((20, 24), (10, 20), (30, 40)))
    images, class_maps, weights = training_arrays(image, labels, state, spatial_dims=3, context=4)
    assert images[0].shape == class_maps[0].shape == weights[0].shape == (12, 18, 18)
    assert weights[0].sum() == 4 * 10 * 10


def test_training_arrays_explain_what_is_wrong():
    image = np.zeros((2, 8, 8), np.float32)
    state = CorrectionState((2, 8, 8))
    with pytest.raises(CorrectionsError, match="No confirmed pixels"):
        training_arrays(image, np.zeros((2, 8, 8), np.uint8), state, spatial_dims=2)
    state.mark_reviewed(0)
    with pytest.raises(CorrectionsError, match="image has shape"):
        training_arrays(np.zeros((2, 8, 9)), np.zeros((2, 8, 8), np.uint8), state, spatial_dims=2)
    with pytest.raises(CorrectionsError, match="recorded on"):
        training_arrays(image, np.zeros((3, 8, 8), np.uint8), state, spatial_dims=2)


# -- training on corrections ---------------------------------------------------------------------


def _blobs(shape, seed):
    """Random discs (class 1) on background; the image is bright on them."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    seeds = rng.random(shape) > 0.995
    truth = np.stack([ndimage.binary_dilation(s, iterations=4) for s in seeds]).astype(np.uint8)
    image = (60 + 120 * truth + rng.normal(0, 8, shape)).astype(np.float32)
    return image, truth


def _fine_tuned_accuracy(image, labels, state, truth) -> float:
    import torch

    from napari_unet.inference import predict, probabilities_to_labels
    from napari_unet.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", in_channels=1, out_channels=1, width=4, depth=2)
    settings = corrections.FinetuneSettings(
        learning_rate=0.02, time_budget=None, steps=25, patch_size=32, batch_size=4,
        loss="dice_bce", augment=False, val_fraction=0.0, margin=0, device="cpu",
        balance_classes=False,  # this test is about the ignored pixels alone
    )
    trainer = corrections.build_finetune_trainer(model, image, labels, state, settings)
    trainer.fit()
    pred = probabilities_to_labels(predict(trainer.model, image[:1], device="cpu"))
    return float((pred == truth[:1]).mean())


def test_a_3d_crop_is_normalised_as_the_whole_volume_that_segment_predicts():
    # corrections in a dim corner of a volume: a crop normalised on its own percentiles would
    # look brighter in training than in prediction, which measures the whole volume
    from napari_unet import io
    from napari_unet.models import build_model

    rng = np.random.default_rng(5)
    image = rng.normal(100, 10, (24, 64, 240)).astype(np.float32)
    image[:, :, 160:] += 800  # the far side is much brighter
    labels = (image > 105).astype(np.uint8)
    state = CorrectionState(labels.shape)
    state.mark_region(((4, 12), (4, 12), (4, 12)))
    model = build_model("unet3d", in_channels=1, out_channels=1, width=4, depth=2)
    settings = corrections.FinetuneSettings(steps=1, val_fraction=0.0, device="cpu")
    trainer = corrections.build_finetune_trainer(model, image, labels, state, settings)
    crop = trainer.train_samples[0]
    whole = io.compute_normalization(image)
    box = tuple(slice(0, n) for n in crop.spatial_shape)  # the crop starts at the corner
    np.testing.assert_allclose(crop.image[0], io.apply_normalization(image[box], whole), rtol=1e-6)
    assert crop.spatial_shape[2] < 160  # the bright side is outside the crop
    assert "lo" not in trainer.normalization and "lo" not in model.normalization


def test_unlabelled_pixels_are_ignored_not_background():
    """Three unconfirmed slices hold the opposite class: trained on, they would flip the result."""
    image, truth = _blobs((4, 48, 48), seed=3)
    labels = truth.copy()
    labels[1:] = 1 - truth[1:]  # what the user did NOT confirm says the opposite
    confirmed = CorrectionState(labels.shape)
    confirmed.mark_reviewed(0)
    everything = CorrectionState(labels.shape)
    for z in range(4):
        everything.mark_reviewed(z)
    assert _fine_tuned_accuracy(image, labels, confirmed, truth) > 0.85
    assert _fine_tuned_accuracy(image, labels, everything, truth) < 0.3  # the majority flips it


def test_balanced_weights_give_each_class_the_same_total_weight():
    image = np.zeros((2, 10, 10), np.float32)
    labels = np.ones((2, 10, 10), np.uint8)
    labels[0, :2] = 0  # 20 membrane pixels, 180 cell pixels, all confirmed
    state = CorrectionState(labels.shape)
    state.mark_reviewed(0)
    state.mark_reviewed(1)
    _, class_maps, weights = training_arrays(image, labels, state, spatial_dims=2, balance_classes=True)
    w = np.concatenate([x.ravel() for x in weights])
    c = np.concatenate([x.ravel() for x in class_maps])
    assert np.isclose(w[c == 0].sum(), w[c == 1].sum())
    assert np.isclose(w.mean(), 1.0)
    _, _, plain = training_arrays(image, labels, state, spatial_dims=2)
    assert all(np.array_equal(p, np.ones_like(p)) for p in plain)


def test_one_class_warning_when_strokes_are_nearly_all_one_class():
    labels = np.ones((2, 20, 20), np.uint8)
    labels[:, :, :2] = 0
    state = CorrectionState(labels.shape)
    state.record_paint((np.zeros(30, int), np.arange(30) % 20, np.zeros(30, int)))  # column 0: class 0
    names = ["membrane", "cell"]
    warning = corrections.one_class_warning(labels, state, names)
    assert warning.startswith("100% of your corrections are 'membrane'") and "Keep what it knew" in warning
    assert "keeps the model's own prediction" in corrections.one_class_warning(labels, state, names, anchor_weight=0.1)
    state.record_paint((np.ones(30, int), np.arange(30) % 20, np.full(30, 10)))  # class 1 as well
    assert corrections.one_class_warning(labels, state, names) is None
    reviewed = CorrectionState(labels.shape)
    reviewed.mark_reviewed(0)
    assert corrections.one_class_warning(labels, reviewed, names) is None  # a reviewed slice has every class


def test_fine_tuning_augments_fully_from_the_first_step():
    from napari_unet.training import TrainConfig

    assert TrainConfig().augment_ramp is not None  # training from scratch ramps augmentation in
    assert corrections.FinetuneSettings().train_config(2).augment_ramp is None
    assert corrections.FinetuneSettings().train_config(3).augment


# -- replay of the start model's training data ---------------------------------------------------


def test_replay_share_follows_how_much_of_the_corrected_slices_is_confirmed():
    from napari_unet.corrections import SPARSE_REPLAY_SHARE, replay_share_for

    whole = [np.ones((8, 8), np.float32)] * 2
    strokes = [np.zeros((10, 10), np.float32)]
    strokes[0][:2] = 1  # 20 % confirmed
    assert replay_share_for(whole) == 0.0
    assert replay_share_for(strokes) == pytest.approx(SPARSE_REPLAY_SHARE * 0.8)
    assert replay_share_for(whole + strokes) == pytest.approx(SPARSE_REPLAY_SHARE * 80 / 228)


def test_replay_paths_come_from_a_checkpoints_provenance():
    from napari_unet.corrections import replay_paths

    assert replay_paths({"data_paths": ["/d/im.tif", "/d/lab.tif"]}) == (Path("/d/im.tif"), Path("/d/lab.tif"))
    # a fine-tuned checkpoint passes its replay data on
    assert replay_paths({"replay_data_paths": ["a.tif", "b.tif"], "data_paths": ["x"]}) == (Path("a.tif"), Path("b.tif"))
    assert replay_paths({"data_paths": ["napari-unet sample: EM membranes (generated, seed 0)"]}) is None
    assert replay_paths({}) is None and replay_paths(None) is None


def test_load_replay_reads_thins_and_explains(tmp_path, monkeypatch):
    import tifffile

    from napari_unet import corrections
    from napari_unet.corrections import load_replay

    images = np.random.default_rng(0).integers(0, 255, (10, 16, 16), dtype=np.uint8)
    labels = (images > 128).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "im.tif", images)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    got_images, got_labels = load_replay([tmp_path / "im.tif", tmp_path / "lab.tif"])
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels // 255)
    monkeypatch.setattr(corrections, "REPLAY_MAX_VOXELS", 16 * 16 * 4)  # a stack too big: evenly spaced slices
    got_images, got_labels = load_replay([tmp_path / "im.tif", tmp_path / "lab.tif"])
    assert got_images.shape == (4, 16, 16) and np.array_equal(got_images, images[[0, 3, 6, 9]])
    with pytest.raises(CorrectionsError, match="too big to replay"):
        load_replay([tmp_path / "im.tif", tmp_path / "lab.tif"], spatial_dims=3)
    with pytest.raises(CorrectionsError, match="is not there any more"):
        load_replay([tmp_path / "gone.tif", tmp_path / "lab.tif"])
    tifffile.imwrite(tmp_path / "other.tif", labels[:, :8])
    with pytest.raises(CorrectionsError, match="do not match"):
        load_replay([tmp_path / "im.tif", tmp_path / "other.tif"])


def test_build_finetune_trainer_replays_in_proportion_to_what_the_corrections_leave_out():
    from napari_unet.models import build_model

    images = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    labels = (images > 0.5).astype(np.uint8)
    strokes = CorrectionState(labels.shape)
    mask = np.zeros(labels.shape, bool)
    mask[0, :4] = True
    strokes.record_paint(np.nonzero(mask))
    settings = FinetuneSettings(steps=1, time_budget=None, device="cpu", val_fraction=0.0, margin=0)
    trainer = build_finetune_trainer(build_model("unet", width=4, depth=2), images, labels, strokes, settings,
                                     replay=(images, labels))
    assert trainer.config.replay_share == pytest.approx(0.75 * (1 - 4 / 32))
    assert len(trainer.train_samples) == 1 + 3  # the stroked slice, then the replayed ones
    reviewed = CorrectionState(labels.shape)
    reviewed.mark_reviewed(1)
    trainer = build_finetune_trainer(build_model("unet", width=4, depth=2), images, labels, reviewed, settings,
                                     replay=(images, labels))
    assert trainer.config.replay_share == 0 and len(trainer.train_samples) == 1  # no replay beside a whole slice
    fixed = FinetuneSettings(**{**settings.to_dict(), "replay_share": 0.4})
    trainer = build_finetune_trainer(build_model("unet", width=4, depth=2), images, labels, reviewed, fixed,
                                     replay=(images, labels))
    assert trainer.config.replay_share == 0.4 and len(trainer.train_samples) == 4
