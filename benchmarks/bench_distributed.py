"""Prediction on a dask.distributed LocalCluster: 1 vs 2 worker processes on a 256x384x384 volume.

    python benchmarks/bench_distributed.py [--data ../shared/data/lucchi_pp] [--model unet3d --width 16]

The volume is the Lucchi++ FIB-SEM crop (96x384x384) mirrored along z to 256 planes (random
smooth noise where the data are absent), stored as zarr in 64x192x192 chunks. The model is a
seeded untrained UNet (time does not depend on the weights) saved as a checkpoint. Timed:
single-process ``predict`` (torch on every core) and ``predict_on_cluster`` with 1 worker (1 and
2 torch threads) and 2 workers (1 thread each), each writing probabilities to zarr; every
cluster result is compared with the single-process one (max abs difference). Run it alone: it
times the CPU. Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_unet import io  # noqa: E402
from napari_unet.checkpoint import save_checkpoint  # noqa: E402
from napari_unet.inference import distributed, predict  # noqa: E402
from napari_unet.models import build_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHAPE = (256, 384, 384)


def volume(data: Path) -> np.ndarray:
    """The Lucchi++ volume mirrored along z to 256 planes, else smooth noise of that shape."""
    path = data / "volume.tif"
    if path.exists():
        stack = np.asarray(io.read_image(path))
        mirrored = np.concatenate([stack, stack[::-1], stack, stack[::-1]])[:SHAPE[0]]
        return np.ascontiguousarray(mirrored[:, :SHAPE[1], :SHAPE[2]])
    from scipy import ndimage

    noise = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    return (ndimage.gaussian_filter(noise, 3) * 255).astype(np.float32)


def timed_cluster(scheduler: str, threads: int, checkpoint: Path, source: Path, out: Path, tile) -> tuple[float, float]:
    """Seconds from connecting to the last chunk written, and seconds of the prediction alone."""
    import dask.array as da

    started = time.perf_counter()
    with distributed.connect(scheduler) as client:
        connected = time.perf_counter()
        probabilities = distributed.predict_on_cluster(client, checkpoint, da.from_zarr(str(source)), tile=tile,
                                                       device="cpu", threads=threads)
        target = io.open_zarr_output(out, probabilities.shape, np.float32,
                                     chunks=distributed.zarr_chunks(probabilities))
        client.gather(client.compute(da.store(probabilities, target, lock=False, compute=False)))
        finished = time.perf_counter()
        loads = client.run(distributed.worker_loads)
    print(f"  {scheduler} x {threads} thread(s): {finished - connected:.1f} s "
          f"(+{connected - started:.1f} s starting the cluster); model loads per worker: "
          f"{[sum(v.values()) for v in loads.values()]}", flush=True)
    return finished - started, finished - connected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lucchi_pp")
    parser.add_argument("--model", default="unet3d")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--name", default="distributed")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        torch.manual_seed(0)
        model = build_model(args.model, in_channels=1, out_channels=1, width=args.width, depth=args.depth).eval()
        checkpoint = save_checkpoint(work / "model.pt", model)
        image = volume(args.data)
        source = io.open_zarr_output(work / "volume.zarr", image.shape, np.float32, chunks=(64, 192, 192))
        source[...] = image
        print(f"volume {image.shape}, {args.model} w{args.width} d{args.depth}, tile {args.tile}, "
              f"{os.cpu_count()} CPU cores", flush=True)

        start = time.perf_counter()
        expected = predict(model, image, tile=args.tile, device="cpu")
        single = time.perf_counter() - start
        print(f"  single process, torch {torch.get_num_threads()} threads: {single:.1f} s", flush=True)
        runs = []
        for scheduler, threads in (("local:1", 1), ("local:1", 2), ("local:2", 1)):
            out = work / f"out-{scheduler.replace(':', '')}-{threads}.zarr"
            total, predicting = timed_cluster(scheduler, threads, checkpoint, work / "volume.zarr", out, args.tile)
            difference = float(np.abs(np.asarray(io.read_image(out)) - expected).max())
            runs.append({"scheduler": scheduler, "torch_threads_per_worker": threads,
                         "seconds_with_cluster_start": round(total, 1), "seconds": round(predicting, 1),
                         "max_abs_difference_vs_single_process": difference})
        one = next(r for r in runs if r["scheduler"] == "local:1" and r["torch_threads_per_worker"] == 1)
        two = next(r for r in runs if r["scheduler"] == "local:2")
        result = {
            "benchmark": "predict on a dask.distributed LocalCluster", "command": "python benchmarks/bench_distributed.py",
            "volume": list(image.shape), "input_chunks": [64, 192, 192],
            "model": f"{args.model} w{args.width} d{args.depth}", "tile": args.tile, "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "single_process_seconds": round(single, 1),
            "single_process_torch_threads": torch.get_num_threads(), "cluster": runs,
            "speedup_2_workers_vs_1": round(one["seconds"] / two["seconds"], 2),
            "voxels_per_second_per_worker": round(float(np.prod(image.shape)) / one["seconds"]),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "cluster"}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
