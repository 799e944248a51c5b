"""Prediction on a dask.distributed cluster: the chunked engine of ``out_of_core.py`` on many workers.

The graph is the one ``predict`` runs for a dask input (two ``map_overlap`` passes, every tile
computed once, identical to in-memory ``predict`` up to float rounding); here each worker loads the
model once (:class:`WorkerModel`, cached per process) and writes its chunks' region of the output
zarr itself. Workers on other machines need the checkpoint, the input and the output folder at the
same paths (a shared file system), as for any dask cluster writing zarr.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import devices
from .. import label_offset as offsets
from .layout import _input_layout
from .normalization import _normalization_stats
from .out_of_core import _measure_plane_statistics, blended_dask_prediction
from .prediction import _check_options, probabilities_to_labels
from .runner import _lean_model
from .tiling import TilePlan, choose_tiling

# per worker process: (checkpoint, its version, device) -> (lean model, device); and load counts
_WORKER_MODELS: dict[tuple, tuple[nn.Module, torch.device]] = {}
_WORKER_LOADS: dict[str, int] = {}
_WORKER_LOCK = threading.Lock()


class DistributedError(ValueError):
    """The cluster cannot be used: dask.distributed missing, a bad address, or no answer."""


@contextlib.contextmanager
def connect(scheduler: str, *, quiet: bool = True, timeout: float = 20.0) -> Iterator[Any]:
    """A dask.distributed ``Client`` for ``scheduler``: ``"local:N"`` starts a LocalCluster of N
    worker processes on this machine (one task each; torch shares the cores among them),
    ``"tcp://host:port"`` connects to a running scheduler. Closed (and a local cluster stopped)
    on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise DistributedError("--scheduler needs dask.distributed: pip install 'napari-unet[distributed]'") from error
    if scheduler.startswith("local:"):
        count = scheduler.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise DistributedError(f"--scheduler {scheduler}: give the number of workers, e.g. local:2")
        cluster = LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40 if quiet else 30)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    if not scheduler.startswith(("tcp://", "tls://")):
        raise DistributedError(f"--scheduler must be local:N or the address of a dask scheduler "
                               f"(tcp://host:8786), got {scheduler!r}")
    try:
        client = Client(scheduler, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as error:
        raise DistributedError(f"cannot reach the dask scheduler at {scheduler}: {error}") from error
    with client:
        yield client


def local_threads(client: Any) -> int | None:
    """torch threads per worker of a local cluster (this machine's cores shared out), else None."""
    workers = client.scheduler_info().get("workers", {})
    hosts = {info.get("host") for info in workers.values()}
    if not workers or hosts - {"127.0.0.1", "localhost"}:
        return None
    return max(1, (os.cpu_count() or 1) // len(workers))


@dataclass(frozen=True)
class WorkerModel:
    """A model source for the chunked engine: loads ``checkpoint`` once per worker process.

    Small to pickle (a path), so the graph does not carry the weights to every task. ``device``
    "auto" picks the worker's best device; on a machine with several GPUs, worker k of a local
    cluster takes GPU k mod count. ``threads`` sets torch's threads in the worker (None: torch's).
    """

    checkpoint: str
    device: str = "auto"
    threads: int | None = None

    def __call__(self) -> tuple[nn.Module, torch.device]:
        stat = os.stat(self.checkpoint)
        key = (self.checkpoint, stat.st_mtime_ns, stat.st_size, self.device)
        with _WORKER_LOCK:
            if key not in _WORKER_MODELS:
                from ..checkpoint import load_checkpoint

                if self.threads:
                    torch.set_num_threads(self.threads)
                model = load_checkpoint(self.checkpoint).model
                _WORKER_MODELS[key] = (_lean_model(model), _worker_device(self.device))
                _WORKER_LOADS[self.checkpoint] = _WORKER_LOADS.get(self.checkpoint, 0) + 1
            return _WORKER_MODELS[key]


def worker_loads() -> dict[str, int]:
    """How often this process loaded each checkpoint (``client.run(worker_loads)`` asks every worker)."""
    return dict(_WORKER_LOADS)


def _worker_device(spec: str) -> torch.device:
    device = devices.resolve_device(spec)
    if spec == "auto" and device.type == "cuda" and torch.cuda.device_count() > 1:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            name = get_worker().name
            index = int(name) if str(name).isdigit() else abs(hash(name))
            device = torch.device("cuda", index % torch.cuda.device_count())
    return device


def _plan_on_worker(source: WorkerModel, grid: tuple[int, ...], tile: Any, batch_size: int | None) -> TilePlan:
    """The tile plan for the workers' device (its free memory), worked out on a worker."""
    model, device = source()
    return choose_tiling(model, grid, device, tile=tile, batch_size=batch_size)


def predict_on_cluster(
    client: Any, checkpoint: str | os.PathLike, image: Any, *, tile: int | Sequence[int] | None = None,
    overlap: float = 0.25, blend: str = "gaussian", batch_size: int | None = None, device: str = "auto",
    precision: str = "auto", tta: bool = False, chunks: Sequence[int] | None = None, threads: int | None = None,
) -> Any:
    """The lazy (n_classes, *spatial) probabilities of ``image`` computed on ``client``'s workers.

    ``image``: a dask (or NumPy) array; a zarr-backed dask array is read by the workers themselves.
    ``chunks``: the smallest chunk side per (Z, Y, X) axis (default: the input's chunks, at least
    one tile). ``threads``: torch threads per worker (None: a local cluster shares this machine's
    cores among its workers, remote workers keep torch's default). Store the result
    (``da.store``) or ``.compute()`` it on the cluster.
    """
    import dask.array as da

    from ..checkpoint import load_checkpoint

    _check_options(overlap, blend, batch_size)
    checkpoint = str(Path(checkpoint).expanduser().resolve())
    model = load_checkpoint(checkpoint).model
    if not hasattr(image, "dask"):
        image = da.from_array(np.asarray(image))
    layout = _input_layout(image, model)
    source = WorkerModel(checkpoint, device, threads if threads is not None else local_threads(client))
    plan = client.submit(_plan_on_worker, source, layout.grid, tile, batch_size, pure=False).result()
    stats = _normalization_stats(model, image, None)
    _measure_plane_statistics(image, layout, stats, {})
    offset = offsets.model_offset(model)
    return blended_dask_prediction(source, model, image, layout, plan, stats, overlap, blend, precision,
                                   tta, offset, chunk_sides=chunks)


def labels_from(probabilities: Any, threshold: float = 0.5) -> Any:
    """The lazy class map of lazy probabilities, chunk by chunk (``probabilities_to_labels``)."""
    return probabilities.map_blocks(probabilities_to_labels, threshold=threshold, drop_axis=0, dtype=np.uint8)


def zarr_chunks(array: Any) -> tuple[int, ...]:
    """Zarr chunks for storing a dask array whose every chunk covers whole zarr chunks: the
    regular chunk side of each axis (the last chunk of an axis may be larger: it holds the rest)."""
    return tuple(int(sizes[0]) for sizes in array.chunks)
