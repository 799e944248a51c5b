"""ISBI 2012 instances: connected components vs seeded watershed, scored by adapted Rand error.

    python benchmarks/instances_isbi.py [--seconds 300] [--model CKPT] [--save-model CKPT]
                                        [--data ../shared/data/isbi2012] [--tune]

Trains a UNet with the CLI's defaults on slices 0-19 (the trainer holds out its usual share of
them for validation; slices 20-23 are never seen in training or tuning), or loads ``--model``.
Predicts slices 20-23 slice by slice and scores two ways of turning the prediction into cells:

- ``components``: connected components of the thresholded cell interior (what the plugin did);
- ``watershed``: ``napari_unet.instances`` with its defaults (seeded watershed on the membrane
  probability).

Adapted Rand error (ARE, lower is better; ISBI 2012 convention: membrane pixels of the ground
truth are not scored) per slice and mean. ``--tune`` also sweeps the watershed parameters on
slices 16-19 (the share of 0-19 the trainer holds out for validation; never on 20-23), records the
grid and scores its best on 20-23 as ``watershed_tuned``: that is how the defaults were chosen.
Writes benchmarks/results/instances_isbi.json and prints a summary line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_isbi import TRAIN_SLICES, VAL_SLICES, machine_info  # noqa: E402

from napari_unet import cli, inference, instances, io, metrics  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# --tune sweeps this grid on slices 16-19: the last fifth of 0-19, which the trainer holds out for
# validation (it picks its best weights there but never trains on them); 20-23 stay unseen
TUNE_SLICES = slice(16, 20)
TUNE_GRID = {
    "seed_threshold": (0.5, 0.6, 0.7, 0.8),
    "h": (2.0, 3.0, 5.0, 7.0, 10.0),
    "sigma": (1.0, 2.0, 3.0),
    "distance_weight": (0.0, 0.2),
    "mask_threshold": (0.0, 0.2),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "isbi2012")
    parser.add_argument("--seconds", type=float, default=300.0, help="training seconds (default 300)")
    parser.add_argument("--model", type=Path, default=None, help="score this checkpoint instead of training")
    parser.add_argument("--save-model", type=Path, default=None, help="save the trained checkpoint here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta", action="store_true", help="predict with 8-view test-time augmentation")
    parser.add_argument("--tune", action="store_true", help="sweep the watershed parameters on slices 16-19")
    parser.add_argument("--jobs", type=int, default=1, help="processes for --tune (default 1)")
    parser.add_argument("--name", default="instances_isbi", help="result file stem")
    return parser.parse_args(argv)


def train(args, images: np.ndarray, labels: np.ndarray):
    """The model `napari-unet train` would make from slices 0-19 in `args.seconds`."""
    config = cli.default_train_config(time_budget=args.seconds, device=args.device, seed=args.seed)
    model = cli.build_or_load_model(cli.DEFAULT_MODEL, width=cli.DEFAULT_WIDTH, depth=cli.DEFAULT_DEPTH,
                                    in_channels=1, n_classes=2, seed=args.seed)

    def log(event) -> None:
        if event.kind == "validation":
            print(f"  {event.elapsed:7.1f} s  step {event.step:5d}  dice {event.dice}", flush=True)
        elif event.kind == "finished":
            print(f"  {event.message}", flush=True)

    # no val_images: the trainer validates on its own share of slices 0-19, never on 20-23
    trainer = cli.train_model(model, images, labels, config=config, on_event=log)
    if args.save_model:
        trainer.save(args.save_model, provenance={"command": "benchmarks/instances_isbi.py", "slices": "0-19"})
    return trainer.model, {"steps": trainer.step, "settings": {"model": cli.DEFAULT_MODEL,
                                                              "width": cli.DEFAULT_WIDTH,
                                                              "depth": cli.DEFAULT_DEPTH,
                                                              "time_budget": args.seconds}}


def per_slice_are(pred: np.ndarray, truth_classes: np.ndarray) -> list[float]:
    """ARE of each slice, ground-truth cells = components of the interior class (membrane ignored)."""
    true_instances = metrics.instances_from_classes(truth_classes, per_slice=True)
    return [round(metrics.adapted_rand_error(p, t), 4) for p, t in zip(pred, true_instances, strict=True)]


def score_methods(probabilities: np.ndarray, truth: np.ndarray, **watershed_options) -> dict:
    """Per-slice and mean ARE of components and watershed (seconds each) for one prediction."""
    result = {}
    for method in instances.METHODS:
        if method == "none":
            continue
        start = time.perf_counter()
        options = watershed_options if method == "watershed" else {}
        pred = instances.instances_from_probabilities(probabilities, method=method, per_slice=True, **options)
        seconds = time.perf_counter() - start
        scores = per_slice_are(pred, truth)
        result[method] = {"per_slice": scores, "mean": round(float(np.mean(scores)), 4),
                          "seconds": round(seconds, 2)}
    return result


def _tune_one(job: tuple[dict, np.ndarray, np.ndarray]) -> float:
    options, probabilities, true_instances = job
    pred = instances.watershed_instances(probabilities, per_slice=True, **options)
    return float(np.mean([metrics.adapted_rand_error(p, t) for p, t in zip(pred, true_instances, strict=True)]))


def tune(probabilities: np.ndarray, truth: np.ndarray, jobs: int = 1) -> dict:
    """Mean ARE on the tuning slices over TUNE_GRID; the defaults were picked from this."""
    from concurrent.futures import ProcessPoolExecutor

    true_instances = metrics.instances_from_classes(truth, per_slice=True)
    grid = [dict(zip(TUNE_GRID, values)) for values in itertools.product(*TUNE_GRID.values())]
    work = [(options, probabilities, true_instances) for options in grid]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            scores = list(pool.map(_tune_one, work, chunksize=4))
    else:
        scores = [_tune_one(job) for job in work]
    table = [{**options, "mean_are": round(score, 4)} for options, score in zip(grid, scores)]
    table.sort(key=lambda row: row["mean_are"])
    components = instances.instances_from_probabilities(probabilities, method="components", per_slice=True)
    components_are = float(np.mean([metrics.adapted_rand_error(p, t)
                                    for p, t in zip(components, true_instances, strict=True)]))
    best = {key: value for key, value in table[0].items() if key != "mean_are"}
    for row in table[:10]:
        print(f"  {row}", flush=True)
    return {"slices": list(range(TUNE_SLICES.start, TUNE_SLICES.stop)), "components_mean_are": round(components_are, 4),
            "best": best, "grid": table}


def main(argv=None) -> int:
    args = parse_args(argv)
    images = io.read_image(args.data / "train-volume.tif")
    labels = io.read_labels(args.data / "train-labels.tif")
    train_images, train_labels = images[TRAIN_SLICES], labels[TRAIN_SLICES]
    val_images, val_labels = images[VAL_SLICES], labels[VAL_SLICES]

    if args.model is not None:
        from napari_unet.checkpoint import load_checkpoint

        model, training = load_checkpoint(args.model).model, {"loaded": str(args.model)}
    else:
        model, training = train(args, train_images, train_labels)

    record = {"benchmark": "ISBI 2012 instances: components vs watershed, slices 20-23",
              "command": "python benchmarks/instances_isbi.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "training": training, "tta": args.tta, "machine": machine_info(),
              "watershed_defaults": instances.WATERSHED_DEFAULTS}
    probabilities = np.asarray(inference.predict(model, val_images, tta=args.tta, device=args.device))
    record["slices"] = list(range(VAL_SLICES.start, VAL_SLICES.stop))
    record["adapted_rand_error"] = score_methods(probabilities, val_labels)
    if args.tune:
        tune_probabilities = np.asarray(inference.predict(model, images[TUNE_SLICES], tta=args.tta,
                                                          device=args.device))
        record["tuning"] = tune(tune_probabilities, labels[TUNE_SLICES], args.jobs)
        print(f"  best on slices 16-19: {record['tuning']['best']}", flush=True)
        # what the parameters chosen on 16-19 give on 20-23 (the library defaults may be older)
        record["adapted_rand_error"]["watershed_tuned"] = score_methods(
            probabilities, val_labels, **record["tuning"]["best"])["watershed"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    are = record["adapted_rand_error"]
    print(f"ISBI slices 20-23 adapted Rand error: components {are['components']['per_slice']} "
          f"(mean {are['components']['mean']:.4f}), watershed {are['watershed']['per_slice']} "
          f"(mean {are['watershed']['mean']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
