"""Lucchi++ mitochondria benchmark: a 2D or 3D model trained on z 0-71, scored on held-out z 72-95.

    python benchmarks/train_lucchi.py [--time-budget 900] [--data ../shared/data/lucchi_pp]
    python benchmarks/train_lucchi.py --model unet3d --name mitochondria_3d

Uses the CLI's defaults (the same model and TrainConfig as `napari-unet train`) unless an option
changes them. A 2D model treats the volume as a stack of slices; a 3D model (``--model unet3d``)
trains on 3D patches of the z 0-71 sub-volume and is validated on the z 72-95 sub-volume. Validates
during training for the Dice-vs-time curve and scores the final model with and without flip TTA.
Writes benchmarks/results/<name>.json and <name>_curve.png and prints a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_isbi import RESULTS, apply_recipe, benchmark_parser, result_record, train_and_score  # noqa: E402

from napari_unet import cli, inference, io, metrics  # noqa: E402

TRAIN_SLICES = slice(0, 72)
VAL_SLICES = slice(72, 96)
MITO = 1


def parse_args(argv=None) -> argparse.Namespace:
    defaults = cli.default_train_config()
    parser = benchmark_parser(__doc__, REPO.parent / "shared" / "data" / "lucchi_pp", "mitochondria")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's recipe (as the CLI)")
    parser.add_argument("--patch-size", type=cli._sides, default=None,
                        help="patch side(s), e.g. 192 or 32,96,96 (default: the CLI's for the model)")
    parser.add_argument("--tta-candidates", type=int, default=defaults.tta_candidates)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cpu", help="training device (the figures in the README are CPU ones)")
    parser.add_argument("--save", type=Path, default=None, help="also save the trained model's checkpoint here")
    return parser.parse_args(argv)


def plot_curve(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = np.asarray(history["val_dice"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(history["val_elapsed"], dice[:, MITO], label="mitochondria Dice")
    ax.axhline(0.92, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation Dice, z 72-95 (no TTA)")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_recipe(args, spatial_dims=3 if args.model.endswith("3d") else 2)
    volume = io.read_image(args.data / "volume.tif")
    labels = io.read_labels(args.data / "labels.tif")
    config = cli.default_train_config(time_budget=args.time_budget, learning_rate=args.lr, loss=args.loss, device=args.device,
                                      batch_size=args.batch_size, patch_size=args.patch_size,
                                      tta_candidates=args.tta_candidates, seed=args.seed)
    model = cli.build_or_load_model(args.model, width=args.width, depth=args.depth, in_channels=1, n_classes=2,
                                   seed=config.seed)

    run = train_and_score(model, config, volume[TRAIN_SLICES], labels[TRAIN_SLICES], volume[VAL_SLICES],
                          labels[VAL_SLICES], lambda dice: f"mitochondria Dice {dice[MITO]:.4f}")
    trainer, history, final, final_tta = run["trainer"], run["trainer"].history, run["final"], run["final_tta"]
    steps_per_second = run["steps_per_second"]
    dims = f"{model.spatial_dims}D"
    # the label offset the trainer measured, against none (the data README finds the masks registered)
    offset = tuple(getattr(trainer.model, "label_offset", ()) or ())
    if any(offset):
        unshifted = inference.predict(trainer.model, volume[VAL_SLICES], tta=True, device=config.device,
                                      label_offset=(0.0,) * len(offset))
        prediction = inference.probabilities_to_labels(unshifted)
        run["final_tta_without_label_offset"] = metrics.evaluate_segmentation(
            prediction, labels[VAL_SLICES], n_classes=2, per_slice=True)
        print(f"  without the label offset {offset}: mitochondria Dice "
              f"{run['final_tta_without_label_offset']['dice_per_class'][MITO]:.4f} (TTA)", flush=True)
    if args.save:
        trainer.save(args.save)
    result = result_record(f"Lucchi++ (training crop): {dims} model on z 0-71, validate on z 72-95", "train_lucchi.py",
                           argv, args, config, run)
    if "final_tta_without_label_offset" in run:
        result["final_tta_without_label_offset"] = run["final_tta_without_label_offset"]
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    title = (f"Lucchi++ z 72-95: {dims} {args.model} w{args.width} d{args.depth}, {args.time_budget:.0f} s on "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    plot_curve(history, RESULTS / f"{args.name}_curve.png", title)
    print(f"Lucchi {args.name}: mitochondria Dice {final_tta['dice_per_class'][MITO]:.4f} (TTA), "
          f"{final['dice_per_class'][MITO]:.4f} without; {trainer.step} steps ({steps_per_second:.2f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
