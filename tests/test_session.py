"""Sessions: save/open round trip, atomic replacement, plain errors, and crash recovery by autosave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unet import session as sess
from napari_unet.checkpoint import load_checkpoint
from napari_unet.corrections import CorrectionState, FinetuneSettings, image_fingerprint
from napari_unet.models import build_model
from napari_unet.session import SessionAutosaver, SessionData, SessionError, load_session, save_session

SHAPE = (3, 32, 32)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, SHAPE, dtype=np.uint8)
    path = tmp_path / "data" / "stack.npy"
    path.parent.mkdir()
    np.save(path, image)
    return path, image


def make_data(image_path, image, *, seed=0, model=True) -> SessionData:
    rng = np.random.default_rng(seed)
    labels = (rng.random(SHAPE) > 0.5).astype(np.uint8)
    state = CorrectionState(SHAPE)
    state.record_paint((slice(0, 1), slice(2, 6), slice(3, 9)))
    state.mark_reviewed(2)
    state.mark_region(((1, 2), (0, 16), (0, 16)))
    torch.manual_seed(seed)
    return SessionData(
        image_path=str(image_path),
        labels=labels,
        state=state,
        settings=FinetuneSettings(learning_rate=0.002, time_budget=None, steps=40 + seed, patch_size=32, margin=2,
                                  device="cpu"),
        image_name="stack",
        labels_name="stack labels",
        model=build_model("unet", width=4, depth=2) if model else None,
        model_source="fresh unet",
        model_trained=False,
        display={"image": {"scale": (1.0, 2.0, 2.0)}},
    )


def weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# -- round trip ----------------------------------------------------------------------------------


def test_a_saved_session_opens_exactly_as_it_was(tmp_path, image_file):
    path, image = image_file
    data = make_data(path, image)
    folder = tmp_path / "my session"
    manifest_path = save_session(folder, data)
    assert manifest_path == folder / "session.json"

    loaded = load_session(folder)
    assert loaded.image_path == str(path)
    assert np.array_equal(np.asarray(loaded.image), image)
    assert loaded.image_fingerprint == image_fingerprint(image)
    assert np.array_equal(loaded.labels, data.labels) and loaded.labels.dtype == data.labels.dtype
    assert np.array_equal(loaded.state.painted, data.state.painted)
    assert loaded.state.reviewed_slices == {2}
    assert loaded.state.reviewed_regions == [((1, 2), (0, 16), (0, 16))]
    assert loaded.settings == data.settings
    assert loaded.image_name == "stack" and loaded.labels_name == "stack labels"
    assert weights_equal(loaded.model, data.model) and loaded.checkpoint.config == data.model.config
    assert loaded.model_source == "fresh unet" and loaded.model_trained is False
    assert loaded.display == {"image": {"scale": [1.0, 2.0, 2.0]}}
    assert loaded.warnings == []
    manifest = json.loads((folder / "session.json").read_text())
    assert manifest["format"] == sess.FORMAT_NAME and manifest["version"] == sess.FORMAT_VERSION
    # the folder holds the manifest and the files it names, nothing else
    names = {p.name for p in folder.iterdir()}
    assert names == {"session.json", manifest["corrections"]["file"], manifest["model"]["file"]}


def test_a_session_without_a_model_and_with_an_embedded_image(tmp_path, image_file):
    _, image = image_file
    data = make_data("", image, model=False)
    data.image = image
    save_session(tmp_path / "s", data)
    loaded = load_session(tmp_path / "s")
    assert loaded.model is None and loaded.checkpoint is None
    assert loaded.image_path == "" and np.array_equal(np.asarray(loaded.image), image)


def test_the_image_is_found_relative_to_the_session_when_both_moved(tmp_path, image_file):
    path, image = image_file
    save_session(tmp_path / "data" / "session", make_data(path, image))
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    loaded = load_session(moved / "session")
    assert loaded.image_path == str((moved / "stack.npy").resolve())


def test_settings_the_version_does_not_know_are_ignored(tmp_path, image_file):
    path, image = image_file
    folder = tmp_path / "s"
    save_session(folder, make_data(path, image))
    manifest = json.loads((folder / "session.json").read_text())
    manifest["settings"]["a_future_setting"] = 3
    (folder / "session.json").write_text(json.dumps(manifest))
    assert load_session(folder).settings.steps == 40


# -- atomicity -----------------------------------------------------------------------------------


def test_a_save_that_fails_midway_leaves_the_old_session_intact(tmp_path, image_file, monkeypatch):
    path, image = image_file
    folder = tmp_path / "s"
    old = make_data(path, image, seed=0)
    save_session(folder, old)
    before = sorted(p.name for p in folder.iterdir())
    from napari_unet import checkpoint

    real = checkpoint.save_checkpoint

    def crash_midway(target, model, **kwargs):
        real(target, model, **kwargs)  # the corrections and the model are written...
        raise KeyboardInterrupt("killed")  # ...and the process dies before the manifest

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_session(folder, make_data(path, image, seed=1))
    assert sorted(p.name for p in folder.iterdir()) == before  # the new files were removed
    loaded = load_session(folder)
    assert np.array_equal(loaded.labels, old.labels) and loaded.settings.steps == 40
    assert weights_equal(loaded.model, old.model)

    # a manifest that cannot be written (disk full) leaves the old session too
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    monkeypatch.setattr(sess.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(SessionError, match="No space left on device"):
        save_session(folder, make_data(path, image, seed=1))
    monkeypatch.undo()
    assert load_session(folder).settings.steps == 40

    # and a complete save replaces it
    new = make_data(path, image, seed=1)
    save_session(folder, new)
    loaded = load_session(folder)
    assert np.array_equal(loaded.labels, new.labels) and loaded.settings.steps == 41
    assert len(list(folder.iterdir())) == 3  # the old files are gone


def test_a_first_save_killed_before_the_manifest_does_not_open(tmp_path, image_file, monkeypatch):
    path, image = image_file
    folder = tmp_path / "s"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(sess, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        save_session(folder, make_data(path, image))
    (folder / "corrections.0123456789ab.npz").write_bytes(b"half")  # what a SIGKILL could leave
    with pytest.raises(SessionError, match="incomplete"):
        load_session(folder)
    monkeypatch.undo()
    save_session(folder, make_data(path, image))  # the leftovers do not block a new save
    assert load_session(folder).settings.steps == 40
    assert len(list(folder.iterdir())) == 3


# -- errors in plain words -----------------------------------------------------------------------


def test_plain_errors_for_missing_foreign_corrupt_newer_and_damaged_sessions(tmp_path, image_file):
    path, image = image_file
    with pytest.raises(SessionError, match="no session folder"):
        load_session(tmp_path / "nowhere")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(SessionError, match="not a napari-unet session"):
        load_session(foreign)
    with pytest.raises(SessionError, match="already holds other files"):
        save_session(foreign, make_data(path, image))
    (foreign / "session.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SessionError, match="not a napari-unet session"):
        load_session(foreign)

    folder = tmp_path / "s"
    save_session(folder, make_data(path, image))
    manifest = (folder / "session.json").read_text()
    newer = json.loads(manifest)
    newer["version"] = sess.FORMAT_VERSION + 1
    (folder / "session.json").write_text(json.dumps(newer))
    with pytest.raises(SessionError, match="newer napari-unet"):
        load_session(folder)
    (folder / "session.json").write_text(manifest[: len(manifest) // 2])  # truncated
    with pytest.raises(SessionError, match="damaged") as caught:
        load_session(folder)
    assert "\n" not in str(caught.value)
    (folder / "session.json").write_text(manifest)
    model_file = folder / json.loads(manifest)["model"]["file"]
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(SessionError, match="model of the session"):
        load_session(folder)
    model_file.unlink()
    with pytest.raises(SessionError, match="is missing"):
        load_session(folder)


def test_a_missing_image_file_is_a_plain_message(tmp_path, image_file):
    path, image = image_file
    folder = tmp_path / "s"
    save_session(folder, make_data(path, image))
    path.unlink()
    with pytest.raises(SessionError, match="is gone") as caught:
        load_session(folder)
    assert str(path) in str(caught.value)
    with pytest.raises(SessionError, match="is gone"):
        sess.check_session(folder)
    rest = load_session(folder, read_image=False)  # the work itself is still there
    assert rest.image is None and rest.state.reviewed_slices == {2}


def test_an_image_that_changed_gives_a_warning_or_an_error(tmp_path, image_file):
    path, image = image_file
    folder = tmp_path / "s"
    save_session(folder, make_data(path, image))
    np.save(path, 255 - image)
    assert "has changed" in load_session(folder).warnings[0]
    np.save(path, image[:, :16])
    with pytest.raises(SessionError, match="not the image the session was saved with"):
        load_session(folder)


# -- autosave ------------------------------------------------------------------------------------


def test_autosave_updates_corrections_and_throttles_the_model(tmp_path, image_file):
    path, image = image_file
    folder = tmp_path / "s"
    data = make_data(path, image)
    save_session(folder, data)
    saver = SessionAutosaver(folder, model_interval=3600)
    state = data.state.copy()
    state.mark_reviewed(0)
    labels = data.labels.copy()
    labels[0] = 1
    settings = FinetuneSettings(steps=7, time_budget=None)
    assert saver.save_corrections(state, labels, settings=settings)
    older = data.state.copy()
    older.revision = state.revision - 1
    assert not saver.save_corrections(older, data.labels)  # an older snapshot never wins
    loaded = load_session(folder)
    assert loaded.state.reviewed_slices == {0, 2} and np.array_equal(loaded.labels, labels)
    assert loaded.settings.steps == 7
    other = CorrectionState((2, 8, 8))
    other.revision = 10**6
    with pytest.raises(SessionError, match="not the session's"):
        saver.save_corrections(other, np.zeros((2, 8, 8), np.uint8))

    from types import SimpleNamespace

    trainer = SimpleNamespace(model=build_model("unet", width=4, depth=2), normalization=None, history={})
    assert saver.on_training_event(trainer, SimpleNamespace(kind="validation", step=5))  # first: saved
    assert not saver.on_training_event(trainer, SimpleNamespace(kind="preview", step=6))  # too soon
    assert not saver.on_training_event(trainer, SimpleNamespace(kind="step", step=7))
    manifest = sess.read_manifest(folder)
    assert manifest["model"]["step"] == 5 and manifest["model"]["autosaved"]
    assert weights_equal(load_session(folder).model, trainer.model)
    assert len(list(folder.iterdir())) == 3


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from napari_unet.corrections import CorrectionState, FinetuneSettings, build_finetune_trainer
    from napari_unet.models import build_model
    from napari_unet.session import SessionAutosaver, SessionData, save_session

    folder, image_path = sys.argv[1], sys.argv[2]
    image = np.load(image_path)
    labels = (image > 127).astype(np.uint8)
    state = CorrectionState(labels.shape)
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2)
    settings = FinetuneSettings(learning_rate=0.01, time_budget=120.0, patch_size=32, batch_size=2,
                                augment=False, val_fraction=0.5, val_every=2, margin=0, device="cpu")
    save_session(folder, SessionData(image_path=image_path, labels=labels, state=state, settings=settings,
                                     image=image, model=model, model_source="fresh unet", model_trained=False))
    saver = SessionAutosaver(folder, model_interval=0.3)
    state.mark_reviewed(0)            # the user's work after the session was saved
    state.mark_reviewed(2)
    state.record_paint((slice(1, 2), slice(4, 8), slice(4, 8)))
    saver.save_corrections(state, labels)
    trainer = build_finetune_trainer(model, image, labels, state, settings,
                                     preview_fn=lambda m: None, preview_interval=0.2)
    saver.attach(trainer)
    print("training", flush=True)
    trainer.fit()                      # 120 s: the test kills it long before
    """
)


def test_killing_a_fine_tune_keeps_the_autosaved_session(tmp_path, image_file):
    started = time.perf_counter()
    path, image = image_file
    folder = tmp_path / "crash"
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), str(folder), str(path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                manifest = sess.read_manifest(folder)
            except SessionError:
                manifest = {}
            if (manifest.get("model") or {}).get("autosaved"):
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert (manifest.get("model") or {}).get("autosaved"), "no model autosave within 60 s"
        time.sleep(0.4)  # let it go on: the kill may land in the middle of the next autosave
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    manifest = sess.check_session(folder)  # the manifest is valid and names existing files
    loaded = load_session(folder)
    assert loaded.state.reviewed_slices == {0, 2} and loaded.state.painted[1, 4:8, 4:8].all()
    assert loaded.model is not None and manifest["model"]["autosaved"] and manifest["model"]["step"] > 0
    ckpt = load_checkpoint(folder / manifest["model"]["file"])  # a loadable checkpoint on its own
    torch.manual_seed(0)
    fresh = build_model("unet", width=4, depth=2)
    assert not weights_equal(ckpt.model, fresh)  # the weights of the fine-tuning, not the start
    assert loaded.model.normalization["method"] == "percentile"
    elapsed = time.perf_counter() - started
    print(f"SIGKILL test: {elapsed:.1f} s, model autosaved at step {manifest['model']['step']}")
