"""The first seconds of the ISBI benchmark run: how soon does the membrane Dice reach 0.80?

    python benchmarks/probe_first_seconds.py NAME [--seconds 91] [--seed S] [--set '{"augment_ramp": null}']
        [--augment '{"elastic": false, "intensity": false}'] [--adam-betas 0.9 0.99]

Trains what benchmarks/train_isbi.py trains (the CLI's defaults and a 900-s budget, so the learning
rate, the Dice fade and the augmentation ramp follow the full run's schedule), stops after
``--seconds`` and appends one JSON line to benchmarks/results/first_seconds_probes.jsonl: the
validations (elapsed s, step, membrane Dice, cell Dice, label offset), the first time the membrane
Dice reached 0.80 and the mean loss of each 20 steps. ``--set`` overrides TrainConfig fields;
``--augment`` and ``--adam-betas`` change what is not a TrainConfig option (experiments only).
A probe is one sample of a noisy start: compare several seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_isbi as isbi  # noqa: E402  (the benchmark's split and class indices)

from napari_unet import cli, io, training  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "first_seconds_probes.jsonl"
MEMBRANE, CELL = isbi.MEMBRANE, isbi.CELL


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--seconds", type=float, default=91.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", type=json.loads, default={}, help="TrainConfig overrides, JSON")
    parser.add_argument("--augment", type=json.loads, default={}, help="AugmentConfig overrides, JSON")
    parser.add_argument("--adam-betas", type=float, nargs=2, default=None)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "isbi2012")
    args = parser.parse_args(argv)

    if args.augment:
        training.trainer.AugmentConfig = functools.partial(training.trainer.AugmentConfig, **args.augment)
    if args.adam_betas:
        adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda *a, **k: adamw(*a, betas=tuple(args.adam_betas), **k)
    images = io.read_image(args.data / "train-volume.tif")
    labels = io.read_labels(args.data / "train-labels.tif")
    config = cli.default_train_config(time_budget=900.0, device="cpu", seed=args.seed, **args.set)
    model = cli.build_or_load_model(cli.DEFAULT_MODEL, width=cli.DEFAULT_WIDTH, depth=cli.DEFAULT_DEPTH,
                                    in_channels=1, n_classes=2, seed=config.seed)
    validations, losses = [], []

    def record(event) -> None:
        if event.kind == "step":
            losses.append(event.loss)
            if event.elapsed > args.seconds:
                trainer.stop()
        elif event.kind == "validation":
            validations.append([round(event.elapsed, 1), event.step, round(event.dice[MEMBRANE], 4),
                                round(event.dice[CELL], 4), list(trainer.validator.label_offset)])

    trainer = training.Trainer(model, images[isbi.TRAIN_SLICES], labels[isbi.TRAIN_SLICES],
                               val_images=images[isbi.VAL_SLICES], val_labels=labels[isbi.VAL_SLICES],
                               config=config, callbacks=[record])
    trainer.fit()
    losses = np.asarray(losses)
    result = {
        "name": args.name, "seed": args.seed, "set": args.set, "augment": args.augment, "adam_betas": args.adam_betas,
        "time_to_membrane_dice_0.80_s": isbi.first_time_reaching(trainer.history, MEMBRANE, 0.80),
        "validations": validations,
        "loss_per_20_steps": [round(float(losses[i:i + 20].mean()), 3) for i in range(0, min(len(losses), 120), 20)],
    }
    print(json.dumps(result), flush=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
