"""Lucchi++ mitochondria benchmark: a 2D model on z slices 0-71, scored on held-out slices 72-95.

    python benchmarks/train_lucchi.py [--time-budget 900] [--data ../shared/data/lucchi_pp]

Uses the CLI's defaults (the same model and TrainConfig as `napari-unet train`), treating the
volume as a stack of 2D slices (2D UNet; 3D convolutions cost too much on a 2-core CPU for a
15-minute budget). Validates on slices 72-95 during training for the Dice-vs-time curve and
scores the final model with and without flip TTA. Writes benchmarks/results/mitochondria.json and
mitochondria_curve.png and prints a summary line.
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

from train_isbi import RESULTS, benchmark_parser, result_record, train_and_score  # noqa: E402

from napari_unet import cli, io  # noqa: E402

TRAIN_SLICES = slice(0, 72)
VAL_SLICES = slice(72, 96)
MITO = 1


def parse_args(argv=None) -> argparse.Namespace:
    return benchmark_parser(__doc__, REPO.parent / "shared" / "data" / "lucchi_pp", "mitochondria").parse_args(argv)


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
    volume = io.read_image(args.data / "volume.tif")
    labels = io.read_labels(args.data / "labels.tif")
    config = cli.default_train_config(time_budget=args.time_budget, learning_rate=args.lr, loss=args.loss, device="cpu")
    model = cli.build_or_load_model(args.model, width=args.width, depth=args.depth, in_channels=1, n_classes=2,
                                   seed=config.seed)

    run = train_and_score(model, config, volume[TRAIN_SLICES], labels[TRAIN_SLICES], volume[VAL_SLICES],
                          labels[VAL_SLICES], lambda dice: f"mitochondria Dice {dice[MITO]:.4f}")
    trainer, history, final, final_tta = run["trainer"], run["trainer"].history, run["final"], run["final_tta"]
    steps_per_second = run["steps_per_second"]
    result = result_record("Lucchi++ (training crop): 2D model on z 0-71, validate on z 72-95", "train_lucchi.py",
                           argv, args, config, run)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    title = (f"Lucchi++ z 72-95: 2D {args.model} w{args.width} d{args.depth}, {args.time_budget:.0f} s on "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    plot_curve(history, RESULTS / f"{args.name}_curve.png", title)
    print(f"Lucchi {args.name}: mitochondria Dice {final_tta['dice_per_class'][MITO]:.4f} (TTA), "
          f"{final['dice_per_class'][MITO]:.4f} without; {trainer.step} steps ({steps_per_second:.2f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
