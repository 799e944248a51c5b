"""ISBI 2012 benchmark: train on slices 0-19 with the CLI's defaults, score held-out slices 20-23.

    python benchmarks/train_isbi.py [--time-budget 900] [--data ../shared/data/isbi2012]

Trains exactly what `napari-unet train` trains (same model defaults, same TrainConfig defaults,
same code path), validating on slices 20-23 during training to record Dice against wall time.
The final model is scored on slices 20-23 with and without 8-fold test-time augmentation (flips
in x and y, each also transposed). Writes benchmarks/results/isbi.json and isbi_curve.png and prints a summary line.
Options other than --time-budget/--data exist for the experiments that chose the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_unet import cli, inference, io, metrics  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TRAIN_SLICES = slice(0, 20)
VAL_SLICES = slice(20, 24)
MEMBRANE, CELL = 0, 1


def machine_info() -> dict:
    """What the figures depend on: cores, threads, torch, platform and the load when the run ended."""
    return {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(),
            "load_average_at_end": os.getloadavg()}


def benchmark_parser(description: str, data: Path, name: str) -> argparse.ArgumentParser:
    """The options every training benchmark has; the defaults are the CLI's."""
    defaults = cli.default_train_config()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-budget", type=float, default=900.0, help="training seconds (default 900)")
    parser.add_argument("--data", type=Path, default=data)
    parser.add_argument("--name", default=name, help=f"result file stem (default {name})")
    parser.add_argument("--model", default=cli.DEFAULT_MODEL)
    parser.add_argument("--width", type=int, default=None, help="default: the device's recipe (as the CLI)")
    parser.add_argument("--depth", type=int, default=cli.DEFAULT_DEPTH)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--loss", default=defaults.loss)
    return parser


def apply_recipe(args: argparse.Namespace, spatial_dims: int) -> None:
    """Width, batch and patch not given: the training device's recipe, as `napari-unet train` picks them."""
    from napari_unet import devices
    from napari_unet.training.recipe import recipe_for

    recipe = recipe_for(devices.resolve_device(args.device), spatial_dims)
    args.width = args.width or recipe.width
    args.batch_size = args.batch_size or recipe.batch_size
    args.patch_size = args.patch_size or recipe.patch_size


def parse_args(argv=None) -> argparse.Namespace:
    defaults = cli.default_train_config()
    parser = benchmark_parser(__doc__, REPO.parent / "shared" / "data" / "isbi2012", "isbi")
    # experiment overrides; the defaults are the CLI's
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's recipe")
    parser.add_argument("--patch-size", type=int, default=None, help="default: the device's recipe")
    parser.add_argument("--amp", default=defaults.amp)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--loss-options", type=json.loads, default={}, help='JSON, e.g. {"dice_weight": 1}')
    parser.add_argument("--steps", type=int, default=None, help="step budget instead of the time budget")
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--border-weights", type=int, default=int(defaults.border_weights))
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout at the bottleneck (model option)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--tta-candidates", type=int, default=defaults.tta_candidates)
    parser.add_argument("--min-lr-fraction", type=float, default=defaults.min_lr_fraction,
                        help="the cosine schedule's last learning rate, as a fraction of the peak")
    parser.add_argument("--device", default="cpu", help="training device (the figures of the issue are CPU ones)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-label-offset", action="store_true", help="do not measure the labels' sub-pixel offset")
    parser.add_argument("--save", type=Path, default=None, help="also save the trained model's state_dict here")
    return parser.parse_args(argv)


def train_and_score(model, config, train_images, train_labels, val_images, val_labels,
                    dice_text: Callable[[list], str]) -> dict:
    """Train through the CLI's code path, printing each validation; score with and without TTA."""
    cpu_seconds = []  # process CPU time at each validation: a load-independent measure of work

    def log(event) -> None:
        if event.kind == "validation":
            cpu_seconds.append(round(time.process_time() - cpu_start, 1))
            print(f"  {event.elapsed:7.1f} s  step {event.step:5d}  {dice_text(event.dice)}", flush=True)
        elif event.kind == "finished":
            print(f"  {event.message}", flush=True)

    cpu_start = time.process_time()
    trainer = cli.train_model(model, train_images, train_labels, config=config,
                              val_images=val_images, val_labels=val_labels, on_event=log)
    return {
        "trainer": trainer,
        "cpu_seconds": cpu_seconds,
        "steps_per_second": trainer.step / max(trainer.history["elapsed"][-1], 1e-9),
        "final": score(trainer.model, val_images, val_labels, tta=False, device=config.device),
        "final_tta": score(trainer.model, val_images, val_labels, tta=True, device=config.device),
    }


def result_record(benchmark: str, script: str, argv, args: argparse.Namespace, config, run: dict) -> dict:
    """What a training benchmark writes to its JSON file (RESULTS is created here)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    trainer = run["trainer"]
    history = trainer.history
    return {
        "benchmark": benchmark,
        "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"model": args.model, "width": args.width, "depth": args.depth, **dataclasses.asdict(config)},
        "machine": machine_info(),
        "steps": trainer.step,
        "steps_per_second": round(run["steps_per_second"], 3),
        "best_step": history["best_step"],
        "tta_choice": history.get("tta_choice"),
        "label_offset": list(getattr(trainer.model, "label_offset", ()) or ()),
        "final": run["final"],
        "final_tta": run["final_tta"],
        **({"thresholds": run["thresholds"]} if "thresholds" in run else {}),
        "curve": {"elapsed": history["val_elapsed"], "step": history["val_step"], "dice": history["val_dice"],
                  "cpu_seconds": run["cpu_seconds"]},
    }


def first_time_reaching(history: dict, class_index: int, threshold: float) -> float | None:
    for elapsed, dice in zip(history["val_elapsed"], history["val_dice"]):
        if dice[class_index] >= threshold:
            return float(elapsed)
    return None


def score(model, images: np.ndarray, labels: np.ndarray, tta: bool, device: str = "cpu") -> dict:
    start = time.perf_counter()
    probabilities = inference.predict(model, images, tta=tta, device=device)
    prediction = inference.probabilities_to_labels(probabilities)
    result = metrics.evaluate_segmentation(prediction, labels, n_classes=2, per_slice=True)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


THRESHOLDS = np.round(np.arange(0.30, 0.701, 0.02), 2)


def threshold_sweep(model, images: np.ndarray, labels: np.ndarray, device: str = "cpu") -> dict:
    """Cell Dice, membrane Dice and pixel error (8-fold TTA) at each cell-probability threshold."""
    probabilities = inference.predict(model, images, tta=True, device=device)
    sweep = {}
    for threshold in THRESHOLDS:
        prediction = inference.probabilities_to_labels(probabilities, threshold=float(threshold))
        confusion = metrics.confusion_matrix(prediction, labels, 2)
        dice = [2 * confusion[k, k] / max(1, confusion[k, :].sum() + confusion[:, k].sum()) for k in (0, 1)]
        error = 1.0 - np.trace(confusion) / max(1, confusion.sum())
        sweep[f"{threshold:.2f}"] = {"cell": round(float(dice[CELL]), 4), "membrane": round(float(dice[MEMBRANE]), 4),
                                     "pixel_error": round(float(error), 4)}
    return sweep


def plot_curve(history: dict, path: Path, title: str) -> None:
    """Dice against wall time (left) and against optimisation steps (right, load-independent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = np.asarray(history["val_dice"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "val_elapsed", "wall time (s)"), (axes[1], "val_step", "optimisation steps")):
        x = np.asarray(history[key])
        ax.plot(x, dice[:, CELL], label="cell interior Dice")
        ax.plot(x, dice[:, MEMBRANE], label="membrane Dice")
        for level, colour in ((0.955, "C0"), (0.82, "C1"), (0.80, "grey")):
            ax.axhline(level, color=colour, ls=":", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].axvline(90, color="grey", ls="--", lw=0.8)
    axes[0].set_ylabel("validation Dice, slices 20-23 (no TTA)")
    axes[0].set_ylim(0.6, 1.0)
    axes[1].legend(loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_recipe(args, spatial_dims=2)
    images = io.read_image(args.data / "train-volume.tif")
    labels = io.read_labels(args.data / "train-labels.tif")
    train_images, train_labels = images[TRAIN_SLICES], labels[TRAIN_SLICES]
    val_images, val_labels = images[VAL_SLICES], labels[VAL_SLICES]

    config = cli.default_train_config(
        time_budget=None if args.steps else args.time_budget, steps=args.steps, val_every=args.val_every,
        loss_options=args.loss_options, border_weights=bool(args.border_weights),
        batch_size=args.batch_size, patch_size=args.patch_size,
        learning_rate=args.lr, loss=args.loss, amp=args.amp, warmup_steps=args.warmup_steps,
        augment=not args.no_augment, seed=args.seed, device=args.device, ema_decay=args.ema_decay,
        weight_decay=args.weight_decay, fit_label_offset=not args.no_label_offset,
        min_lr_fraction=args.min_lr_fraction, tta_candidates=args.tta_candidates,
    )
    if args.dropout:  # a model option the CLI does not expose
        from napari_unet.models import build_model

        torch.manual_seed(args.seed)
        model = build_model(args.model, in_channels=1, out_channels=1, width=args.width, depth=args.depth,
                            dropout=args.dropout)
    else:
        model = cli.build_or_load_model(args.model, width=args.width, depth=args.depth, in_channels=1, n_classes=2,
                                         seed=args.seed)

    def dice_text(dice) -> str:
        return f"membrane {dice[MEMBRANE]:.4f}  cell {dice[CELL]:.4f}"

    run = train_and_score(model, config, train_images, train_labels, val_images, val_labels, dice_text)
    # where would another cell-probability threshold put the figures? (chosen on the training slices)
    on_train = threshold_sweep(run["trainer"].model, train_images, train_labels, args.device)
    on_val = threshold_sweep(run["trainer"].model, val_images, val_labels, args.device)
    chosen = min(on_train, key=lambda t: on_train[t]["pixel_error"])
    run["thresholds"] = {"chosen_on_train_slices": float(chosen), "at_chosen_on_val": on_val[chosen],
                         "train": on_train, "val": on_val}
    print(f"  threshold {chosen} (least pixel error on slices 0-19): validation {on_val[chosen]}", flush=True)
    if args.save:
        torch.save(run["trainer"].model.state_dict(), args.save)
    trainer, history, final, final_tta = run["trainer"], run["trainer"].history, run["final"], run["final_tta"]
    steps_per_second = run["steps_per_second"]
    result = result_record("ISBI 2012: train slices 0-19, validate on 20-23", "train_isbi.py", argv, args,
                           config, run)
    result["time_to_membrane_dice_0.80_s"] = first_time_reaching(history, MEMBRANE, 0.80)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    title = (f"ISBI 2012 held-out slices 20-23: {args.model} w{args.width} d{args.depth}, "
             f"{args.time_budget:.0f} s on {os.cpu_count()} CPU cores, torch {torch.__version__}")
    plot_curve(history, RESULTS / f"{args.name}_curve.png", title)
    print(
        f"ISBI {args.name}: cell Dice {final_tta['dice_per_class'][CELL]:.4f}, membrane Dice "
        f"{final_tta['dice_per_class'][MEMBRANE]:.4f}, pixel error {final_tta['pixel_error']:.4f} (TTA); "
        f"without TTA {final['dice_per_class'][CELL]:.4f} / {final['dice_per_class'][MEMBRANE]:.4f} / "
        f"{final['pixel_error']:.4f}; time to membrane Dice 0.80: {result['time_to_membrane_dice_0.80_s']} s; "
        f"{trainer.step} steps ({steps_per_second:.2f}/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
