"""Train the small UNet that the demo loads, on the EM membrane sample (deterministic: seed 0).

    python scripts/make_sample_model.py [--steps 400] [--out sample_data/em_membranes_unet.pt]

A width-8, depth-3 UNet (about 120 k parameters, under 1 MB on disk) trained with the engine's
default recipe on the generated EM sample, so that `napari-unet demo` segments something
sensible on the first click of Run. Seeded CPU training is reproducible.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from napari_unet._sample_data import SAMPLE_MODEL, load_sample
from napari_unet.models import build_model
from napari_unet.training import TrainConfig, Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimisation steps (default 400)")
    parser.add_argument("--out", type=Path, default=SAMPLE_MODEL, help="checkpoint to write")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    image, labels = load_sample("em_membranes")
    model = build_model("unet", in_channels=1, out_channels=2, width=8, depth=3)
    # slices 0-5 train, 6-7 validate (the last slices of the stack)
    config = TrainConfig(steps=args.steps, patch_size=128, batch_size=4, seed=0, device="cpu")
    trainer = Trainer(
        model, list(image[:6]), list(labels[:6]),
        val_images=list(image[6:]), val_labels=list(labels[6:]), config=config,
    )
    started = time.monotonic()
    history = trainer.fit()
    path = trainer.save(args.out, provenance={
        "data_paths": ["napari-unet sample: EM membranes (generated, seed 0)"],
        "script": "scripts/make_sample_model.py",
    }, class_names=["membrane", "cell interior"])
    best = max((sum(d) / len(d) for d in history.get("val_dice", []) if d), default=float("nan"))
    print(f"{path}  {path.stat().st_size / 1e3:.0f} kB, {args.steps} steps in "
          f"{time.monotonic() - started:.0f} s, best validation mean Dice {best:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
