"""GPU benchmark: 2D throughput, a 256^3 volume, and ISBI training on a CUDA device.

    python benchmarks/bench_gpu.py [--isbi ../shared/data/isbi2012] [--output PATH] [--compile]

Parts (each prints one line and goes into the JSON result):

- ``images_2d``: 512x512 images per second through a width-64 2D UNet (depth 4) in bf16 autocast:
  the forward pass alone (the prediction copy ``predict`` runs, channels-last, batches of 32) and
  the whole engine (``predict`` on a 256-slice uint8 stack: normalisation, transfers, blending).
- ``volume_3d``: a 256^3 float32 volume through ``unet3d`` (width 16 and 32, depth 4) with
  ``predict``'s automatic tile, batch and precision; bf16 and fp32, peak GPU memory.
- ``train_isbi`` (with ``--isbi``): what `napari-unet train --device cuda` trains by default (the
  GPU recipe of ``training/recipe.py``: width, batch and patch scaled to the GPU) on ISBI slices
  0-19 for ``--train-seconds`` (default 300), validating on slices 20-23: time to membrane Dice
  0.80, the final Dice and pixel error with 8-fold TTA, and whether the pixel error meets the
  target of 0.062.

Results: ``benchmarks/results/gpu.json`` (or ``--output``). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from napari_unet import cli, inference, io  # noqa: E402
from napari_unet.models import build_model  # noqa: E402


def synchronized_seconds(function) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def forward_images_per_second(model: torch.nn.Module, batch: int, side: int, seconds: float = 5.0) -> float:
    """Forward passes of ``batch`` images of side x side in bf16 autocast, timed for ~``seconds``."""
    inputs = torch.randn(batch, 1, side, side, device="cuda").contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(inputs)

    for _ in range(3):  # cuDNN picks its algorithms, the allocator fills its cache
        forward()
    one = synchronized_seconds(forward)
    repeats = max(3, int(seconds / max(one, 1e-4)))
    elapsed = synchronized_seconds(lambda: [forward() for _ in range(repeats)])
    return repeats * batch / elapsed


def images_2d(compile_model: bool) -> dict:
    torch.manual_seed(0)
    model = build_model("unet", in_channels=1, out_channels=2, width=64, depth=4).eval()
    lean = inference._lean_model(model).to("cuda", memory_format=torch.channels_last).eval()
    result = {"model": "unet w64 d4, 2 classes", "image": "512x512", "precision": "bf16 autocast",
              "forward_batch": 32,
              "forward_images_per_s": round(forward_images_per_second(lean, 32, 512), 1)}
    if compile_model:
        compiled = torch.compile(lean)
        result["forward_compiled_images_per_s"] = round(forward_images_per_second(compiled, 32, 512), 1)

    stack = np.random.default_rng(0).integers(0, 256, (256, 512, 512), dtype=np.uint8)
    inference.predict(model, stack[:16], tile=512, batch_size=16, device="cuda", precision="bf16")  # warm-up
    start = time.perf_counter()
    probabilities = inference.predict(model, stack, tile=512, batch_size=16, device="cuda", precision="bf16")
    elapsed = time.perf_counter() - start
    assert probabilities.shape == (2, 256, 512, 512) and np.isfinite(probabilities[:, ::64]).all()
    result.update(engine_stack="256x512x512 uint8", engine_tile=512, engine_batch=16,
                  engine_seconds=round(elapsed, 2), engine_images_per_s=round(256 / elapsed, 1))
    print(f"2D w64 bf16 512x512: forward {result['forward_images_per_s']} images/s, "
          f"predict() {result['engine_images_per_s']} images/s", flush=True)
    return result


def volume_3d() -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    volume = rng.normal(0, 1, (256, 256, 256)).astype(np.float32)
    for width in (16, 32):
        torch.manual_seed(0)
        model = build_model("unet3d", in_channels=1, out_channels=2, width=width, depth=4).eval()
        for precision in ("auto", "fp32"):
            # warm-up with the same automatic tile and batch (8 tiles of 128^3)
            inference.predict(model, volume[:160, :160, :160], device="cuda", precision=precision)
            torch.cuda.reset_peak_memory_stats()
            plan = inference.choose_tiling(model, volume.shape, torch.device("cuda"))
            start = time.perf_counter()
            probabilities = inference.predict(model, volume, device="cuda", precision=precision)
            elapsed = time.perf_counter() - start
            assert probabilities.shape == (2, 256, 256, 256)
            row = {"model": f"unet3d w{width} d4", "volume": "256^3 float32", "precision": precision,
                   "tile": list(plan.tile), "batch": plan.batch_size, "seconds": round(elapsed, 2),
                   "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
            print(f"3D {row['model']} 256^3 {precision}: {row['seconds']} s, tile {row['tile']} "
                  f"batch {row['batch']}, peak GPU {row['peak_gpu_mib']} MiB", flush=True)
            rows.append(row)
    return rows


def train_isbi(data: Path, seconds: float) -> dict:
    import train_isbi as isbi  # the CPU benchmark's train-and-score, unchanged

    images = io.read_image(data / "train-volume.tif")
    labels = io.read_labels(data / "train-labels.tif")
    from napari_unet.training.recipe import recipe_for

    recipe = recipe_for(torch.device("cuda"), 2)
    config = cli.default_train_config(time_budget=seconds, device="cuda", batch_size=recipe.batch_size,
                                      patch_size=recipe.patch_size)
    model = cli.build_or_load_model(cli.DEFAULT_MODEL, width=recipe.width, depth=cli.DEFAULT_DEPTH,
                                    in_channels=1, n_classes=2, seed=config.seed)
    torch.cuda.reset_peak_memory_stats()
    run = isbi.train_and_score(model, config, images[isbi.TRAIN_SLICES], labels[isbi.TRAIN_SLICES],
                               images[isbi.VAL_SLICES], labels[isbi.VAL_SLICES],
                               lambda dice: f"membrane {dice[isbi.MEMBRANE]:.4f}  cell {dice[isbi.CELL]:.4f}")
    trainer, final = run["trainer"], run["final_tta"]
    history = trainer.history
    side = recipe.patch_size[0]
    result = {"settings": f"CLI defaults on CUDA: {recipe.why}, unet w{recipe.width} d{cli.DEFAULT_DEPTH}, "
                          f"{side}^2 x {recipe.batch_size}, ce_dice, AdamW 1e-2 cosine, EMA, amp auto",
              "pixel_error_target": 0.062,
              "seconds": seconds, "steps": trainer.step, "steps_per_second": round(run["steps_per_second"], 2),
              "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20),
              "time_to_membrane_dice_0.80_s": isbi.first_time_reaching(history, isbi.MEMBRANE, 0.80),
              "final_tta": {"cell_dice": round(final["dice_per_class"][isbi.CELL], 4),
                            "membrane_dice": round(final["dice_per_class"][isbi.MEMBRANE], 4),
                            "pixel_error": round(final["pixel_error"], 4)},
              "meets_target": bool(final["pixel_error"] <= 0.062),
              "curve": {"elapsed": history["val_elapsed"], "dice": history["val_dice"]}}
    print(f"ISBI on the GPU, {seconds:.0f} s: {trainer.step} steps, membrane 0.80 at "
          f"{result['time_to_membrane_dice_0.80_s']} s, final (TTA) {result['final_tta']}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isbi", type=Path, default=None, help="ISBI 2012 folder (train-volume.tif, train-labels.tif)")
    parser.add_argument("--train-seconds", type=float, default=300.0)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the forward pass")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU; none is visible to PyTorch.", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
              "images_2d": images_2d(args.compile), "volume_3d": volume_3d()}
    if args.isbi is not None:
        result["train_isbi"] = train_isbi(args.isbi, args.train_seconds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
