"""The one place that starts background work in the GUI, and the one that reports its errors.

Widgets build a generator (the job) and hand it to :func:`start_worker`, which runs it in a napari
``thread_worker`` with a progress bar in napari's activity dock. A job reports progress by yielding
:class:`Progress` (or by calling :meth:`Job.report` from inside a long engine call); anything else
it yields goes to ``on_yield``. Exceptions become a napari notification in plain words
(:func:`notify_error`), never a traceback dump; the traceback goes to the log.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import FunctionWorker, GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QThread, QThreadPool, QTimer

logger = logging.getLogger(__name__)

Worker = GeneratorWorker | FunctionWorker


@dataclass(frozen=True)
class Progress:
    """A progress report: ``done`` of ``total`` steps (``total=0``: unknown), with a short text."""

    done: int
    total: int
    text: str = ""


class Cancelled(Exception):
    """Raised inside a job when the user cancelled it; never shown as an error."""


class _RuntimeErrorCarrier(Exception):
    """Carries a RuntimeError out of a job.

    superqt's generator worker takes any RuntimeError for "the worker was deleted" and then
    never emits ``errored`` nor ``finished``; torch raises RuntimeError for real problems (out
    of memory, shape mismatch), so the job wrapper hands them over inside this exception.
    """

    def __init__(self, original: RuntimeError) -> None:
        super().__init__(str(original))
        self.original = original


class Job:
    """What a job generator shares with its widget: a cancel flag and a progress channel.

    The widget creates the Job, passes it to the generator (which passes ``job.cancelled`` to
    the engine's ``cancel=`` and ``job.report`` to its ``progress=``) and to :func:`start_worker`.
    Both the widget's Cancel button (:meth:`cancel`) and the activity dock's cancel (which calls
    ``worker.quit()``) stop the job at the engine's next check, typically well under a second.
    """

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._worker: Worker | None = None

    def cancel(self) -> None:
        """Ask the job to stop (thread-safe)."""
        self._cancel.set()
        if self._worker is not None:
            self._worker.quit()

    def cancelled(self) -> bool:
        """True once the user asked to stop (also when napari's activity dock cancelled)."""
        worker = self._worker
        return self._cancel.is_set() or (worker is not None and worker.abort_requested)

    def check(self) -> None:
        """Raise :class:`Cancelled` if the user asked to stop."""
        if self.cancelled():
            raise Cancelled()

    def report(self, done: int, total: int, text: str = "") -> None:
        """Report progress from the worker thread, even from inside a blocking engine call."""
        worker = self._worker
        if worker is not None:
            # a Qt signal emitted off the main thread is delivered on the main thread (queued)
            worker.yielded.emit(Progress(int(done), int(total), text))


def describe_error(exc: BaseException | str, device: str | None = None) -> str:
    """One plain sentence for ``exc``: the message of input errors, a hint for out-of-memory."""
    if isinstance(exc, str):
        return exc
    if _is_out_of_memory(exc):
        where = device or _device_in_message(str(exc))
        return f"Out of memory on {where}: try a smaller tile or batch."
    if isinstance(exc, ValueError):
        # engine input errors (ImageIOError, CheckpointError, DeviceError, ...) speak plainly
        message = str(exc).strip() or type(exc).__name__
        return message.splitlines()[0]
    first_line = (str(exc).strip().splitlines() or [""])[0]
    if len(first_line) > 200:
        first_line = first_line[:200] + "..."
    name = type(exc).__name__
    return f"Unexpected error ({name}): {first_line}" if first_line else f"Unexpected error ({name})."


def notify_error(exc_or_message: BaseException | str, *, device: str | None = None) -> None:
    """Show ``exc_or_message`` as a napari error notification in plain words.

    The traceback of unexpected exceptions goes to the log, not on screen.
    """
    if isinstance(exc_or_message, BaseException) and not isinstance(exc_or_message, ValueError):
        logger.error(
            "napari-unet background job failed",
            exc_info=(type(exc_or_message), exc_or_message, exc_or_message.__traceback__),
        )
    show_error(describe_error(exc_or_message, device=device))


def notify_info(message: str) -> None:
    """Show a plain napari info notification."""
    show_info(message)


def start_worker(
    generator: Generator | Callable[[], Any],
    *,
    on_yield: Callable[[Any], None] | None = None,
    on_return: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    on_cancelled: Callable[[], None] | None = None,
    description: str = "",
    job: Job | None = None,
    device: str | None = None,
    activity_bar: bool = True,
) -> Worker:
    """Run ``generator`` in a napari thread worker with a progress bar; start it and return it.

    ``generator`` is a generator object (the usual case), a generator function or a plain
    callable. Yielded :class:`Progress` objects drive the progress bar in napari's activity dock;
    other yielded values go to ``on_yield`` (on the main thread). ``on_return`` gets the job's
    return value, unless the job was cancelled (then ``on_cancelled`` is called instead).
    Any exception is shown with :func:`notify_error` (``device`` names where it ran, for
    out-of-memory hints) and then passed to ``on_error`` for clean-up; :class:`Cancelled`
    counts as a cancellation, not an error. ``on_finished`` always runs last.
    ``activity_bar=False`` leaves napari's activity dock alone, for jobs whose widget shows their
    progress itself (making the bar costs ~60 ms on the GUI thread).

    While any job runs, Python's garbage collector leaves the objects that existed before it
    alone (:func:`gc.freeze`): a full collection walks napari's millions of objects and held the
    GIL, so the viewer, for 140-240 ms, several times per training run.
    """
    function = _as_function(generator)
    worker: Worker = create_worker(
        function,
        _start_thread=False,
        _ignore_errors=True,  # errors are shown by notify_error, not re-raised as a dump
        _progress={"desc": description or "napari-unet"} if activity_bar else False,
    )
    if job is None:
        job = Job()
    job._worker = worker
    worker.job = job  # so tests and widgets can reach the cancel flag
    on_yield, on_return, on_error, on_finished, on_cancelled = (
        _unless_widget_deleted(callback)
        for callback in (on_yield, on_return, on_error, on_finished, on_cancelled)
    )

    def handle_yield(value: Any) -> None:
        if isinstance(value, Progress):
            _update_progress_bar(worker, value)
        elif on_yield is not None:
            on_yield(value)

    def handle_return(value: Any) -> None:
        if job.cancelled():
            if on_cancelled is not None:
                on_cancelled()
        elif on_return is not None:
            on_return(value)

    def handle_error(exc: BaseException) -> None:
        if isinstance(exc, _RuntimeErrorCarrier):
            exc = exc.original
        if isinstance(exc, Cancelled) or _is_engine_cancellation(exc):
            if on_cancelled is not None:
                on_cancelled()
            return
        notify_error(exc, device=device)
        if on_error is not None:
            on_error(exc)

    def handle_aborted() -> None:
        if on_cancelled is not None:
            on_cancelled()

    if isinstance(worker, GeneratorWorker):
        worker.yielded.connect(handle_yield)
        worker.aborted.connect(handle_aborted)
    worker.returned.connect(handle_return)
    worker.errored.connect(handle_error)
    if on_finished is not None:
        worker.finished.connect(on_finished)
    _freeze_garbage_collection()
    worker.finished.connect(_thaw_garbage_collection)
    _start_on_own_pool(worker)
    return worker


def _unless_widget_deleted(callback: Callable | None) -> Callable | None:
    """Run ``callback``, ignoring that its widget was closed while the job ran.

    A job may finish after the user closed the dock or the viewer; Qt has then deleted the widgets
    the callback would update, and there is nothing left to update.
    """
    if callback is None:
        return None

    def guarded(*args: Any) -> None:
        try:
            callback(*args)
        except RuntimeError as error:
            if "has been deleted" not in str(error):
                raise

    return guarded


# Workers run on napari-unet's own thread pool, never on Qt's global one: Qt converts and scales
# images (e.g. the activity dock's spinner, a QMovie) with tasks on the global pool while the
# main thread waits, holding the GIL. With the global pool's few threads (one per core) taken by
# Python workers that wait for the GIL, that wait never ends: the viewer froze in our tests.
_POOL: QThreadPool | None = None
_RUNNING: set = set()  # keeps started workers alive until they finish


def worker_pool() -> QThreadPool:
    """The thread pool napari-unet's workers run on (created on first use)."""
    global _POOL
    if _POOL is None:
        _POOL = QThreadPool()
        _POOL.setMaxThreadCount(max(4, QThreadPool.globalInstance().maxThreadCount()))
    return _POOL


def _start_on_own_pool(worker: Worker) -> None:
    """What ``worker.start()`` does, on :func:`worker_pool` instead of the global pool."""
    _RUNNING.add(worker)
    worker.finished.connect(lambda: _RUNNING.discard(worker))
    pool = worker_pool()
    if QThread.currentThread().loopLevel():
        # inside a running event loop: start once control is back in the loop, as superqt does
        QTimer.singleShot(1, lambda: pool.start(worker))
    else:
        pool.start(worker)


_FROZEN_BY_JOBS = 0  # running jobs that asked for gc.freeze()


def _freeze_garbage_collection() -> None:
    """Keep the garbage collector off the objects that exist now, until the last job ends."""
    global _FROZEN_BY_JOBS
    if _FROZEN_BY_JOBS == 0:
        gc.freeze()
    _FROZEN_BY_JOBS += 1


def _thaw_garbage_collection() -> None:
    """The last job ended: the frozen objects are collected normally again (no leak)."""
    global _FROZEN_BY_JOBS
    _FROZEN_BY_JOBS = max(0, _FROZEN_BY_JOBS - 1)
    if _FROZEN_BY_JOBS == 0:
        gc.unfreeze()


_LOWERED_THREADS: set[int] = set()
# How far below the GUI thread workers run (Unix nice steps): enough that the GUI thread gets a
# core as soon as it wakes up, while the worker still has every core whenever the GUI is idle.
WORKER_NICENESS = 10


def lower_thread_priority() -> None:
    """Run the calling worker thread (and the torch threads it starts) below the GUI thread.

    Training and prediction keep every core busy; at equal priority the kernel shares them with
    the GUI thread, which then answers late (100 ms stalls measured while fine-tuning on 2 cores).
    On Linux, niceness is per thread and inherited by the OpenMP threads torch creates from this
    one, so the whole computation yields to the GUI; elsewhere Qt's thread priority is used.
    """
    native_id = threading.get_native_id()
    if native_id in _LOWERED_THREADS:
        return
    _LOWERED_THREADS.add(native_id)
    try:
        if hasattr(os, "setpriority") and sys.platform.startswith("linux"):
            current = os.getpriority(os.PRIO_PROCESS, native_id)
            os.setpriority(os.PRIO_PROCESS, native_id, min(19, current + WORKER_NICENESS))
        else:
            thread = QThread.currentThread()
            if thread is not None:
                thread.setPriority(QThread.LowPriority)
    except (OSError, RuntimeError, AttributeError):  # not allowed here: run at normal priority
        logger.debug("could not lower the priority of worker thread %s", native_id)


def _as_function(generator: Generator | Callable[[], Any]) -> Callable[[], Any]:
    """A zero-argument generator function napari's create_worker can run safely."""
    if inspect.isgenerator(generator):
        source = generator
    elif inspect.isgeneratorfunction(generator):
        source = None
    elif callable(generator):
        source = None
    else:
        raise TypeError(f"start_worker needs a generator or a callable, got {type(generator).__name__}")

    def run_job() -> Generator:
        lower_thread_priority()
        try:
            if source is not None:
                return (yield from source)
            result = generator()
            if inspect.isgenerator(result):
                return (yield from result)
            return result
        except RuntimeError as exc:
            raise _RuntimeErrorCarrier(exc) from exc

    return run_job


def _update_progress_bar(worker: Worker, report: Progress) -> None:
    pbar = getattr(worker, "pbar", None)
    if pbar is None:
        return
    if report.total > 0 and pbar.total != report.total:
        pbar.total = report.total
    if report.total > 0 and report.done != pbar.n:
        pbar.update(report.done - pbar.n)
    if report.text:
        pbar.set_description(report.text)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        from napari_unet.devices import is_out_of_memory

        return bool(is_out_of_memory(exc))
    except ImportError:
        return "out of memory" in str(exc).lower()


def _is_engine_cancellation(exc: BaseException) -> bool:
    try:
        from napari_unet.inference import PredictionCancelled
    except ImportError:
        return False
    return isinstance(exc, PredictionCancelled)


def _device_in_message(message: str) -> str:
    lowered = message.lower()
    if "cuda" in lowered or "gpu" in lowered:
        return "the GPU"
    if "mps" in lowered:
        return "the Apple GPU (MPS)"
    return "this computer (CPU memory)"
