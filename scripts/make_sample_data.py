"""Write the offline sample data into sample_data/ (deterministic: seed 0).

    python scripts/make_sample_data.py [--out sample_data] [--seed 0]

The data come from napari_unet._sample_data (make_em_membranes, make_organelles_3d); the tests
check that the committed files are exactly what these generators produce.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_unet._sample_data import SAMPLE_DIR, write_sample_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the committed data use 0)")
    args = parser.parse_args(argv)
    for path in write_sample_files(args.out, seed=args.seed):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
