"""Benchmark of napari_unet.inference.predict (CPU), side by side with MONAI's sliding window.

    python benchmarks/bench_inference.py            # the sizes of issue 4 (tens of minutes on 2 cores)
    python benchmarks/bench_inference.py --quick    # smaller sizes, a few minutes
    python benchmarks/bench_inference.py --only throughput --repeats 3

Every configuration runs in its own subprocess, so its peak RSS (``ru_maxrss`` of that child) is
honest. Parts:

- ``compare``: the same network, volume, tile, overlap and batch through our ``predict`` and through
  MONAI's ``sliding_window_inference`` (mode="gaussian", sigma_scale=0.125), 3D and 2D-stack.
  MONAI is only imported here, for comparison (``pip install monai``); napari_unet never imports it.
- ``scaling``: time and peak RSS against volume size (three sizes), in memory (NumPy in and out)
  and streamed (zarr in, zarr out), where peak RSS should stay flat.
- ``throughput``: forward-pass GFLOP/s of a width-32 2D UNet at 512x512 against this machine's
  sgemm GFLOP/s (torch.matmul), in eager fp32, channels-last fp32 and channels-last bf16 autocast.

Results: a table on stdout and ``benchmarks/results/inference[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

FULL = {
    "compare": [
        {"dims": 3, "model": "unet3d", "width": 16, "shape": (128, 384, 384), "tile": 128, "batch": 1},
        {"dims": 2, "model": "unet", "width": 32, "shape": (30, 512, 512), "tile": 256, "batch": 4},
    ],
    "scaling": {"model": "unet3d", "width": 16, "tile": 64, "plane": (384, 384), "depths": (64, 128, 256)},
}
QUICK = {
    "compare": [
        {"dims": 3, "model": "unet3d", "width": 16, "shape": (64, 160, 160), "tile": 64, "batch": 1},
        {"dims": 2, "model": "unet", "width": 32, "shape": (8, 256, 256), "tile": 128, "batch": 4},
    ],
    "scaling": {"model": "unet3d", "width": 8, "tile": 32, "plane": (96, 96), "depths": (48, 96, 192)},
}
OVERLAP = 0.25


# ------------------------------------------------------------------------------------- the children


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def build(name: str, width: int):
    import torch

    from napari_unet.models import build_model

    torch.manual_seed(0)
    return build_model(name, in_channels=1, out_channels=1, width=width, depth=4).eval()


def synthetic_volume(shape) -> np.ndarray:
    """uint8 noise with some structure (what an EM stack looks like to the memory system)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def child_compare(config: dict) -> dict:
    """One engine on one configuration: time of the whole call and peak RSS."""
    import torch

    model = build(config["model"], config["width"])
    image = synthetic_volume(tuple(config["shape"]))
    baseline = peak_rss_mib()
    start = time.perf_counter()
    if config["engine"] == "monai":
        result = monai_predict(model, image, config)
    else:
        from napari_unet.inference import predict

        # float16 probabilities: two channels in the bytes of MONAI's one float32 channel
        result = predict(model, image, tile=config["tile"], overlap=OVERLAP, dtype=config.get("out_dtype", "float32"),
                         batch_size=config["batch"], device="cpu", precision=config["precision"])
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
            "output_shape": list(result.shape), "threads": torch.get_num_threads(),
            "mean_p1": float(np.asarray(result[-1]).mean())}


def monai_predict(model, image: np.ndarray, config: dict) -> np.ndarray:
    """What a MONAI user writes: normalise the whole volume, slide, sigmoid, to NumPy.

    Returns class 1 only (1, *spatial), not both classes as our engine does.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from napari_unet import io

    stats = io.compute_normalization(image)
    tensor = torch.from_numpy(io.apply_normalization(image, stats))
    if config["dims"] == 3:
        inputs, roi = tensor[None, None], (config["tile"],) * 3
    else:
        inputs, roi = tensor[:, None], (config["tile"],) * 2  # the stack as a batch of slices
    with torch.inference_mode():
        logits = sliding_window_inference(
            inputs, roi, config["batch"], model, overlap=OVERLAP, mode="gaussian",
            sigma_scale=0.125,
        )
        p1 = torch.sigmoid_(logits)  # in place: MONAI's own output buffer, nothing more
    # (1, Z, Y, X): class 1 only; our engine returns both classes, so this favours MONAI
    return (p1[0] if config["dims"] == 3 else p1[:, 0][None]).numpy()


def child_scaling(config: dict) -> dict:
    """Our engine on one volume size, NumPy in memory or zarr in and out."""
    import zarr

    from napari_unet.inference import predict

    model = build(config["model"], config["width"])
    if config["storage"] == "zarr":
        image = zarr.open_array(config["input"], mode="r")
        out = config["output"]
    else:
        image = synthetic_volume(tuple(config["shape"]))
        out = None
    baseline = peak_rss_mib()
    tiles = []
    start = time.perf_counter()
    result = predict(model, image, tile=config["tile"], overlap=OVERLAP, device="cpu", out=out,
                     progress=lambda done, total: tiles.append(total))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
            "output_shape": list(result.shape), "tiles": tiles[-1],
            "ms_per_tile": 1000 * elapsed / tiles[-1]}


def count_conv_flops(model, inputs) -> int:
    """Multiply-adds x 2 of every convolution in one forward pass (what dominates a UNet)."""
    import torch

    total = 0

    def hook(module, args, output):
        nonlocal total
        kernel = int(np.prod(module.kernel_size))
        if isinstance(module, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            total += 2 * args[0].numel() * module.out_channels * kernel // module.groups
        else:
            total += 2 * output.numel() * module.in_channels * kernel // module.groups

    kinds = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.inference_mode():
        model(inputs)
    for handle in handles:
        handle.remove()
    return total


def child_throughput(config: dict) -> dict:
    import torch

    def best_of(fn, repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    size = 2048
    a, b = torch.randn(size, size), torch.randn(size, size)
    sgemm = 2 * size**3 / best_of(lambda: torch.matmul(a, b), 10) / 1e9

    model = build("unet", 32)
    inputs = torch.randn(1, 1, 512, 512)
    flops = count_conv_flops(model, inputs)
    rows = {}
    with torch.inference_mode():
        rows["eager fp32"] = best_of(lambda: model(inputs), config["repeats"])
        model_cl = model.to(memory_format=torch.channels_last)
        inputs_cl = inputs.contiguous(memory_format=torch.channels_last)
        rows["channels_last fp32"] = best_of(lambda: model_cl(inputs_cl), config["repeats"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows["channels_last bf16 autocast"] = best_of(lambda: model_cl(inputs_cl),
                                                          config["repeats"])
        from napari_unet.models.lean import lean_inference_copy

        lean = lean_inference_copy(model).to(memory_format=torch.channels_last)
        rows["lean copy (what predict runs), channels_last fp32"] = best_of(lambda: lean(inputs_cl),
                                                                              config["repeats"])
        if config.get("compile"):
            compiled = torch.compile(lean)
            rows["lean copy, channels_last fp32, torch.compile"] = best_of(lambda: compiled(inputs_cl),
                                                               config["repeats"])
    return {
        "sgemm_gflops": sgemm, "forward_gflop": flops / 1e9,
        "modes": {name: {"seconds": seconds, "gflops": flops / seconds / 1e9,
                         "percent_of_sgemm": 100 * flops / seconds / 1e9 / sgemm}
                  for name, seconds in rows.items()},
    }


CHILDREN = {"compare": child_compare, "scaling": child_scaling, "throughput": child_throughput}


# --------------------------------------------------------------------------------------- the parent


def run_child(kind: str, config: dict, timeout: float = 3600) -> dict:
    command = [sys.executable, __file__, "--child", kind, json.dumps(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_zarr_volume(path: str, shape) -> None:
    """A uint8 zarr volume written slab by slab (the parent never holds it whole)."""
    import zarr

    array = zarr.open_array(path, mode="w", shape=shape, dtype="uint8",
                            chunks=(1, *shape[1:]))
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], 8):
        depth = min(8, shape[0] - z)
        array[z:z + depth] = rng.integers(0, 256, size=(depth, *shape[1:]), dtype=np.uint8)


def bench_compare(sizes: dict, repeats: int) -> list[dict]:
    """Each engine ``repeats`` times, interleaved, so that a burst of load on a shared machine hits
    them alike; the best time and the largest peak RSS are kept."""
    rows = []
    # (engine, autocast precision, probabilities dtype); MONAI returns float32
    engines = (("ours", "auto", "float32"), ("ours", "fp32", "float32"), ("ours", "fp32", "float16"),
               ("monai", "fp32", "float32"))
    for case in sizes["compare"]:
        runs: dict = {engine: [] for engine in engines}
        for _ in range(repeats):
            for engine, precision, out_dtype in engines:
                config = {**case, "engine": engine, "precision": precision, "out_dtype": out_dtype}
                runs[(engine, precision, out_dtype)].append(run_child("compare", config))
        for (engine, precision, out_dtype), results in runs.items():
            config = {**case, "engine": engine, "precision": precision, "out_dtype": out_dtype}
            good = [r for r in results if "error" not in r]
            result = results[-1] if not good else {
                **min(good, key=lambda r: r["seconds"]),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in good),
                "all_seconds": [r["seconds"] for r in good],
            }
            rows.append({**config, **result})
            print_row(f"{case['dims']}D {engine} ({precision}, {out_dtype} out)", config, result)
    return rows


def bench_scaling(sizes: dict) -> list[dict]:
    spec = sizes["scaling"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for depth in spec["depths"]:
            shape = (depth, *spec["plane"])
            base = {"model": spec["model"], "width": spec["width"], "tile": spec["tile"],
                    "shape": shape}
            config = {**base, "storage": "numpy"}
            result = run_child("scaling", config)
            rows.append({**config, **result})
            print_row(f"scaling numpy {shape}", config, result)

            input_path = os.path.join(folder, f"in-{depth}.zarr")
            write_zarr_volume(input_path, shape)
            config = {**base, "storage": "zarr", "input": input_path,
                      "output": os.path.join(folder, f"out-{depth}.zarr")}
            result = run_child("scaling", config)
            rows.append({**config, **result})
            print_row(f"scaling zarr  {shape}", config, result)
    return rows


def print_row(name: str, config: dict, result: dict) -> None:
    if "error" in result:
        print(f"{name:<44} ERROR {result['error']}", flush=True)
        return
    shape = "x".join(str(s) for s in config["shape"])
    per_tile = ""
    if "tiles" in result:
        per_tile = f"  {result['tiles']:4d} tiles, {result['ms_per_tile']:5.0f} ms/tile"
    print(f"{name:<44} {shape:>13} tile {config['tile']:>3}  {result['seconds']:8.1f} s  "
          f"peak RSS {result['peak_rss_mib']:7.0f} MiB (before the call {result['baseline_rss_mib']:5.0f})"
          f"{per_tile}", flush=True)


def summarise(compare: list[dict]) -> list[dict]:
    """Our time and peak RSS as fractions of MONAI's, per case."""
    summary = []
    for dims in (3, 2):
        monai = next((r for r in compare if r["dims"] == dims and r["engine"] == "monai"
                      and "error" not in r), None)
        for ours in (r for r in compare if r["dims"] == dims and r["engine"] == "ours"
                     and "error" not in r):
            if monai is None:
                continue
            extra = lambda r: r["peak_rss_mib"] - r["baseline_rss_mib"]  # noqa: E731
            summary.append({
                "dims": dims, "precision": ours["precision"], "out_dtype": ours.get("out_dtype", "float32"),
                "time_ratio": ours["seconds"] / monai["seconds"],
                "peak_rss_ratio": ours["peak_rss_mib"] / monai["peak_rss_mib"],
                "working_rss_ratio": extra(ours) / max(1e-9, extra(monai)),
            })
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not hours)")
    parser.add_argument("--only", choices=("compare", "scaling", "throughput"), action="append")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine in the comparison")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, config = args.child
        print(json.dumps(CHILDREN[kind](json.loads(config))))
        return

    sizes = QUICK if args.quick else FULL
    parts = args.only or ["throughput", "compare", "scaling"]
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "note": "wall-clock times on a shared machine are noisy; compare rows of one run only",
    }
    started = time.time()
    if "throughput" in parts:
        throughput = run_child("throughput", {"repeats": 3, "compile": args.compile})
        report["throughput"] = throughput
        if "error" in throughput:
            print("throughput ERROR", throughput["error"])
        else:
            print(f"sgemm {throughput['sgemm_gflops']:.0f} GFLOP/s; UNet w32 512x512 forward "
                  f"{throughput['forward_gflop']:.1f} GFLOP")
            for mode, row in throughput["modes"].items():
                print(f"  {mode:<34} {row['seconds']:6.2f} s  {row['gflops']:6.1f} GFLOP/s  "
                      f"{row['percent_of_sgemm']:5.1f}% of sgemm", flush=True)
    if "compare" in parts:
        report["compare"] = bench_compare(sizes, args.repeats)
        report["compare_summary"] = summarise(report["compare"])
        for row in report["compare_summary"]:
            print(f"{row['dims']}D ours ({row['precision']}, {row['out_dtype']} out) / MONAI: time {row['time_ratio']:.2f}x, "
                  f"peak RSS {row['peak_rss_ratio']:.2f}x, RSS above baseline "
                  f"{row['working_rss_ratio']:.2f}x")
    if "scaling" in parts:
        report["scaling"] = bench_scaling(sizes)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["total_seconds"] = time.time() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("inference_quick.json" if args.quick else "inference.json")
    if args.only and path.exists():
        # a partial run keeps the other parts of the last full run (each part says its command)
        previous = json.loads(path.read_text())
        for part in ("throughput", "compare", "compare_summary", "scaling"):
            if part in previous and part not in report:
                report[part] = previous[part]
                report.setdefault("parts_from_earlier_runs", {})[part] = previous.get("command")
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
