"""FinetuneSession without any GUI: input checks, start / stop / resume, OOM retry, checkpoint, autosave."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from napari_unet import finetuning
from napari_unet._sample_data import make_em_membranes
from napari_unet.checkpoint import load_checkpoint
from napari_unet.corrections import (
    CorrectionsError,
    CorrectionState,
    FinetuneSettings,
    load_corrections,
)
from napari_unet.finetuning import (
    AutosaveTarget,
    AutosaveWriter,
    FinetuneSession,
    Notice,
    StartModel,
    TrainingState,
    autosave_snapshot,
    preview_region,
    save_job,
)

SHAPE = (3, 64, 64)
TINY = FinetuneSettings(
    learning_rate=0.01, time_budget=None, steps=4, patch_size=32, batch_size=2, loss="dice_bce",
    augment=False, val_fraction=0.25, val_every=2, margin=0, device="cpu",
)


@pytest.fixture(scope="module")
def em():
    return make_em_membranes(shape=SHAPE, seed=0)


def tiny_session(em, tmp_path, settings=TINY) -> FinetuneSession:
    """A session on the EM crop with a fresh width-4 model; slice 1 reviewed."""
    image, truth = em
    session = FinetuneSession(settings, review_hint="Shift-R")
    session.set_image(image, name="EM")
    session.set_labels(truth.copy(), name="EM labels")
    session.corrections.mark_reviewed(1)
    session.start_from = StartModel.FRESH
    session.fresh = finetuning.FreshModel("unet", width=4, depth=2)
    session.autosave_folder = tmp_path
    session.preview_interval = 0.0
    return session


def with_settings(**changes) -> FinetuneSettings:
    return FinetuneSettings(**{**TINY.__dict__, **changes})


# -- input checks ----------------------------------------------------------------------------------


def test_input_checks_say_what_is_missing_in_plain_words(em, tmp_path):
    image, truth = em
    session = FinetuneSession(TINY, review_hint="Shift-R")
    with pytest.raises(CorrectionsError, match="Pick the image to fine-tune on"):
        session.check_inputs()
    session.set_image(image, name="EM")
    with pytest.raises(CorrectionsError, match="Pick the corrected labels layer"):
        session.check_inputs()
    session.set_labels(np.zeros((3, 32, 32), np.uint8), name="wrong size")
    with pytest.raises(CorrectionsError, match=r"The image 'EM' has shape \(3, 64, 64\) but the labels 'wrong size'"):
        session.check_inputs()
    session.set_labels(truth.copy(), name="EM labels")
    with pytest.raises(CorrectionsError, match=r"No confirmed pixels yet: .* reviewed \(Shift-R\) first\."):
        session.check_inputs()
    session.corrections.mark_reviewed(0)
    session.settings = with_settings(steps=None, time_budget=None)
    with pytest.raises(CorrectionsError, match="Set a time budget or a step limit"):
        session.check_inputs()
    session.settings = TINY
    session.check_inputs()

    # the shared model: absent, then busy
    with pytest.raises(CorrectionsError, match="Segment widget has no model yet"):
        session.start()
    assert session.status is TrainingState.IDLE and session.run is None
    session.start_from = StartModel.CHECKPOINT
    with pytest.raises(CorrectionsError, match="Pick a checkpoint file"):
        session.start()
    with pytest.raises(CorrectionsError, match="Nothing to resume yet"):
        session.resume()


def test_the_shared_model_is_fine_tuned_as_a_copy_and_keeps_its_anchor(em, tmp_path):
    from napari_unet.models import build_model

    shared = finetuning.SharedModel(build_model("unet", width=4, depth=2), source="a test model", busy=True)
    session = tiny_session(em, tmp_path)
    session.start_from = StartModel.SHARED
    session.shared = shared
    with pytest.raises(CorrectionsError, match="using the model right now"):
        session.start()
    shared.busy = False
    image, truth = em
    session.replay_data = (image[:1], truth[:1])  # arrays given: no files to read
    run = session.start()
    assert run.model is not shared.model and run.start_model == "a test model"
    assert run.settings.anchor_weight == TINY.anchor_weight  # a trained model's own prediction anchors
    events = []
    session.run_to_end(on_event=events.append)
    assert not [e for e in events if isinstance(e, Notice)]  # no replay files to announce or miss
    assert run.model is not shared.model and session.status is TrainingState.DONE


def test_a_fresh_model_fits_the_image_channels_and_the_confirmed_classes(em):
    image, truth = em
    session = FinetuneSession(TINY)
    session.set_image(np.stack([image, image], axis=1), name="two channels")  # (Z, C, Y, X)
    labels = truth.astype(np.uint8)
    labels[0, :4, :4] = 2
    session.set_labels(labels, name="three classes")
    assert session.image_channels("unet") == 2
    assert session.out_channels() == 3  # nothing confirmed: all the labels' values count
    session.corrections.mark_reviewed(1)  # slice 1 holds classes 0 and 1 only
    assert session.out_channels() == 1
    from types import SimpleNamespace

    assert session.starts_untrained()  # no shared model: nothing learnt to keep
    session.shared = SimpleNamespace(trained=True)
    assert not session.starts_untrained()
    session.start_from = StartModel.FRESH
    assert session.starts_untrained()


# -- running ---------------------------------------------------------------------------------------


def test_a_run_reports_its_events_and_states_and_saves_a_checkpoint_that_reloads(em, tmp_path):
    session = tiny_session(em, tmp_path)
    states, events = [], []
    session.add_state_listener(states.append)
    run = session.start()
    assert session.status is TrainingState.TRAINING and run.settings.anchor_weight == 0.0  # fresh: no anchor
    assert run.checkpoint_path.parent == tmp_path and run.checkpoint_path.name.startswith("EM-finetuned-")
    finished = session.run_to_end(on_event=events.append)

    assert finished is run and states == [TrainingState.TRAINING, TrainingState.DONE]
    steps = [e.step for e in events if getattr(e, "kind", None) == "step"]
    assert steps == [1, 2, 3, 4] and run.last_step == 4
    assert any(getattr(e, "kind", None) == "validation" for e in events)
    assert session.history["loss"] and len(session.history["loss"]) == 4
    assert run.saved_path is not None and run.saved_path.exists()
    checkpoint = load_checkpoint(run.saved_path)
    assert checkpoint.provenance["reviewed_slices"] == [1] and checkpoint.provenance["steps"] == 4
    assert checkpoint.provenance["image_name"] == "EM" and "stopped" not in checkpoint.provenance
    assert run.model is run.checkpoint.model and next(run.model.parameters()).device.type == "cpu"
    assert "fine-tuned in napari on 'EM' (4 steps" in finetuning.finetuned_source(run)


def test_stop_mid_run_really_stops_and_resume_goes_on_from_the_saved_weights(em, tmp_path):
    session = tiny_session(em, tmp_path, with_settings(steps=None, time_budget=120.0))
    states = []
    session.add_state_listener(states.append)
    session.start()

    def stop_after_two_steps(event):
        if getattr(event, "kind", None) == "step" and event.step >= 2:
            session.stop()

    run = session.run_to_end(on_event=stop_after_two_steps)
    assert states == [TrainingState.TRAINING, TrainingState.STOPPING, TrainingState.STOPPED]
    assert run.last_step == 2  # the stop takes effect before the next step
    assert run.stop_reason == "stopped by the user"
    assert load_checkpoint(run.saved_path).provenance["stopped"] == "stopped by the user"

    session.settings = with_settings(steps=3)
    resumed = session.resume()
    assert resumed.resume_from == run.saved_path and resumed.start_model == f"resumed from {run.saved_path}"
    steps = []
    session.run_to_end(on_event=lambda e: steps.append(e.step) if getattr(e, "kind", None) == "step" else None)
    assert steps == [3, 4, 5] and session.status is TrainingState.DONE


def test_a_second_start_is_refused_while_a_run_is_going(em, tmp_path):
    session = tiny_session(em, tmp_path)
    run = session.start()
    with pytest.raises(CorrectionsError, match="A fine-tuning is already running"):
        session.start()
    assert session.run is run
    session.stop()
    session.run_to_end()
    assert session.status is TrainingState.STOPPED and run.last_step == 0 and run.saved_path.exists()


def test_out_of_memory_on_the_first_step_halves_the_batch_and_goes_on(em, tmp_path, monkeypatch):
    from napari_unet.training import TrainingOutOfMemory

    real = finetuning.build_finetune_trainer
    batches = []

    def out_of_memory_once(*args, **kwargs):
        trainer = real(*args, **kwargs)
        batches.append(args[4].batch_size)
        if len(batches) == 1:
            def first_step_fails():
                raise TrainingOutOfMemory("The cpu device ran out of memory.")
                yield  # a generator, as Trainer.run is

            trainer.run = first_step_fails
        return trainer

    monkeypatch.setattr(finetuning, "build_finetune_trainer", out_of_memory_once)
    session = tiny_session(em, tmp_path, with_settings(batch_size=4, steps=2))
    session.start()
    events = []
    run = session.run_to_end(on_event=events.append)
    assert batches == [4, 2] and run.settings.batch_size == 2
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert notices == ["Out of memory with batch size 4: retrying with batch size 2."]
    assert run.last_step == 2 and run.saved_path.exists() and session.status is TrainingState.DONE
    assert load_checkpoint(run.saved_path).provenance["settings"]["batch_size"] == 2


def test_a_second_out_of_memory_fails_the_run(em, tmp_path, monkeypatch):
    from napari_unet.training import TrainingOutOfMemory

    def always_out_of_memory(*args, **kwargs):
        raise TrainingOutOfMemory("The cpu device ran out of memory.")

    monkeypatch.setattr(finetuning, "build_finetune_trainer", always_out_of_memory)
    session = tiny_session(em, tmp_path, with_settings(batch_size=4))
    session.start()
    with pytest.raises(TrainingOutOfMemory):
        session.run_to_end()
    assert session.status is TrainingState.FAILED and isinstance(session.error, TrainingOutOfMemory)


# -- preview region policy -------------------------------------------------------------------------


def test_the_preview_region_is_the_slice_in_view_or_a_slab_of_a_volume():
    assert preview_region((40, 50), 2, None) == (slice(0, 40), slice(0, 50))
    assert preview_region((10, 40, 50), 2, 7) == (7, slice(0, 40), slice(0, 50))
    assert preview_region((100, 40, 50), 3, 5) == (slice(0, 32), slice(0, 40), slice(0, 50))
    assert preview_region((100, 40, 50), 3, 60) == (slice(44, 76), slice(0, 40), slice(0, 50))
    assert preview_region((100, 40, 50), 3, 60, volume_view=True) == (slice(0, 100), slice(0, 40), slice(0, 50))
    big = (256, 256, 256)  # over 2**23 voxels: a slab even in a 3D view
    assert preview_region(big, 3, 0, volume_view=True)[0] == slice(0, 32)


def test_the_image_region_keeps_the_channel_axis():
    from types import SimpleNamespace

    stack = np.zeros((5, 2, 8, 8))  # (Z, C, Y, X) for a 2D model
    assert finetuning.image_region(stack, (3, slice(0, 8), slice(0, 4)), SimpleNamespace(spatial_dims=2)).shape == (2, 8, 4)
    volume = np.zeros((2, 5, 8, 8))  # (C, Z, Y, X) for a 3D model
    region = (slice(1, 3), slice(0, 8), slice(0, 8))
    assert finetuning.image_region(volume, region, SimpleNamespace(spatial_dims=3)).shape == (2, 2, 8, 8)


# -- autosave --------------------------------------------------------------------------------------


def test_autosave_writes_the_newest_snapshot_only_and_says_why_it_failed(em, tmp_path, monkeypatch):
    image, truth = em
    target = AutosaveTarget.for_image(image.shape, "EM", "abc123", folder=tmp_path)
    state = CorrectionState(SHAPE)
    assert autosave_snapshot(target, state, truth, margin=0) is None  # nothing to save yet
    state.mark_reviewed(2)
    older = autosave_snapshot(target, state, truth, margin=1)
    state.mark_reviewed(0)
    newer = autosave_snapshot(target, state, truth, margin=1)
    writer = AutosaveWriter()
    assert writer.write(*newer) == target.path
    assert writer.write(*older) is None  # an older snapshot never overwrites a newer one
    saved = load_corrections(target.path)
    assert saved.state.reviewed_slices == {0, 2} and saved.meta["margin"] == 1
    assert autosave_snapshot(target, CorrectionState((3, 32, 32)), truth[:, :32, :32], margin=0) is None

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(finetuning, "save_corrections", disk_full)
    state.mark_reviewed(1)
    job = save_job(writer, *autosave_snapshot(target, state, truth, margin=1))
    with pytest.raises(CorrectionsError, match=r"Could not save the corrections to .*: No space left on device\."):
        next(job)
