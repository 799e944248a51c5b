"""The shared model holder and the one place that starts workers (napari_unet._qt.shared / workers)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from napari.utils.notifications import notification_manager

from napari_unet._qt.shared import UNTRAINED_NOTE, ModelHolder, describe_model, model_holder
from napari_unet._qt.workers import (
    Cancelled,
    Job,
    Progress,
    describe_error,
    notify_error,
    start_worker,
)
from napari_unet.models import build_model


@pytest.fixture
def notifications():
    """Messages of the napari notifications dispatched during the test."""
    messages: list[str] = []

    def record(event) -> None:
        messages.append(event.message if hasattr(event, "message") else str(event))

    notification_manager.notification_ready.connect(record)
    yield messages
    notification_manager.notification_ready.disconnect(record)


def tiny_model(name: str = "unet"):
    return build_model(name, width=4, depth=2)


# ---------------------------------------------------------------------------------- shared


def test_model_holder_is_one_per_viewer():
    class FakeViewer:
        pass

    first, second = FakeViewer(), FakeViewer()
    assert model_holder(first) is model_holder(first)
    assert model_holder(first) is not model_holder(second)


def test_holder_set_emits_changed_and_summarises():
    holder = ModelHolder()
    received = []
    holder.changed.connect(received.append)
    assert "No model" in holder.summary()

    model = tiny_model()
    holder.set(model, source="fresh unet, width 4, depth 2", trained=False)
    assert received == [model]
    assert holder.model is model and not holder.trained
    summary = holder.summary()
    assert "unet (2D, width 4, depth 2)" in summary
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in summary
    assert UNTRAINED_NOTE in summary

    assert "offset" not in summary
    model.label_offset = (-0.5, 0.25)  # what training measured
    holder.set(model, source="fine-tuned in napari on 'EM membranes'")
    assert holder.trained and UNTRAINED_NOTE not in holder.summary()
    assert "Label offset: y -0.50, x +0.25 px" in holder.summary()
    holder.clear()
    assert holder.model is None and received[-1] is None


def test_describe_model_names_channels_and_classes():
    model = build_model("unet3d", in_channels=2, out_channels=3, width=4, depth=2)
    text = describe_model(model)
    assert text.startswith("unet3d (3D, width 4, depth 2)")
    assert "2 input channels" in text and "3 classes" in text


def test_holder_is_busy_while_another_thread_holds_the_lock():
    holder = ModelHolder()
    inside, release = threading.Event(), threading.Event()

    def use_model():
        with holder.lock:
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=use_model)
    thread.start()
    inside.wait(5)
    assert holder.busy
    release.set()
    thread.join(5)
    assert not holder.busy


# ---------------------------------------------------------------------------------- workers


def test_describe_error_speaks_plainly():
    assert describe_error(ValueError("the image is empty\nmore")) == "the image is empty"
    assert describe_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried"), device="cuda:0") == (
        "Out of memory on cuda:0: try a smaller tile or batch."
    )
    assert describe_error(MemoryError()).startswith("Out of memory on this computer")
    unknown = describe_error(KeyError("weights"))
    assert unknown == "Unexpected error (KeyError): 'weights'"
    assert "Traceback" not in unknown


def test_notify_error_shows_one_line(notifications):
    try:
        raise RuntimeError("boom\nline two")
    except RuntimeError as exc:
        notify_error(exc)
    assert notifications == ["Unexpected error (RuntimeError): boom"]


def _wait_until(qtbot, flag: list, timeout=10_000):
    qtbot.waitUntil(lambda: bool(flag), timeout=timeout)


def test_start_worker_returns_value_and_drives_progress(qtbot):
    seen, returned, finished = [], [], []

    def job():
        yield Progress(1, 4, "step")
        yield "not progress"
        yield Progress(4, 4)
        return 42

    worker = start_worker(job(), on_yield=seen.append, on_return=returned.append,
                          on_finished=lambda: finished.append(True), description="test job")
    _wait_until(qtbot, finished)
    assert seen == ["not progress"]  # progress reports go to the progress bar, not on_yield
    assert returned == [42]
    assert worker.pbar.total == 4


def test_start_worker_turns_errors_into_notifications(qtbot, notifications):
    errors = []

    def job():
        yield Progress(0, 1)
        raise ValueError("the checkpoint is corrupt")

    finished = []
    start_worker(job(), on_error=errors.append, on_finished=lambda: finished.append(True))
    _wait_until(qtbot, finished)
    assert "the checkpoint is corrupt" in notifications
    assert isinstance(errors[0], ValueError)


def test_job_cancel_stops_a_blocking_call_and_is_not_an_error(qtbot, notifications):
    job = Job()
    cancelled, returned, errors = [], [], []
    started = threading.Event()

    def blocking_engine_call():
        started.set()
        for step in range(500):  # like predict(): checks cancel() before every batch
            if job.cancelled():
                raise Cancelled()
            job.report(step, 500)
            time.sleep(0.01)
        return "finished"

    def generator():
        yield Progress(0, 500)
        return blocking_engine_call()

    finished = []
    start_worker(generator(), job=job, on_return=returned.append, on_error=errors.append,
                 on_cancelled=lambda: cancelled.append(True), on_finished=lambda: finished.append(1))
    assert started.wait(5)
    t0 = time.perf_counter()
    job.cancel()
    _wait_until(qtbot, finished)
    assert time.perf_counter() - t0 < 1.0
    assert cancelled
    assert not returned and not errors and not notifications


def test_worker_quit_from_activity_dock_cancels_the_job(qtbot):
    job = Job()
    cancelled = []

    def generator():
        while not job.cancelled():
            time.sleep(0.005)
        job.check()
        yield  # never reached
        return None

    finished = []
    worker = start_worker(generator(), job=job, on_cancelled=lambda: cancelled.append(True),
                          on_finished=lambda: finished.append(1))
    qtbot.wait(50)
    worker.quit()  # what napari's activity dock cancel button calls
    _wait_until(qtbot, finished)
    assert cancelled


def test_runtime_errors_from_torch_still_finish_the_worker(qtbot, notifications):
    # superqt would take a RuntimeError for "worker deleted" and never emit finished
    errors, finished = [], []

    def job():
        yield Progress(0, 1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    start_worker(job(), on_error=errors.append, on_finished=lambda: finished.append(1),
                 device="cuda:0")
    _wait_until(qtbot, finished)
    assert isinstance(errors[0], torch.cuda.OutOfMemoryError)
    assert notifications == ["Out of memory on cuda:0: try a smaller tile or batch."]


def test_plain_callables_run_too(qtbot):
    returned, finished = [], []
    start_worker(lambda: "done", on_return=returned.append, on_finished=lambda: finished.append(1))
    _wait_until(qtbot, finished)
    assert returned == ["done"]


def test_workers_leave_qts_global_thread_pool_free(qtbot):
    # Qt's own image scaling waits on the global pool with the GIL held: Python workers there
    # deadlocked the viewer (the activity dock's spinner) on a 2-core machine
    from qtpy.QtCore import QThreadPool

    from napari_unet._qt.workers import worker_pool

    running, release, finished = threading.Event(), threading.Event(), []

    def job():
        running.set()
        release.wait(5)
        yield Progress(1, 1)

    start_worker(job(), on_finished=lambda: finished.append(1))
    qtbot.waitUntil(running.is_set, timeout=5000)
    assert worker_pool().activeThreadCount() == 1
    assert QThreadPool.globalInstance().activeThreadCount() == 0
    release.set()
    _wait_until(qtbot, finished)
