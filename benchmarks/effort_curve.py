"""Membrane Dice against the user's effort: correcting where the uncertainty points vs annotating
random slices from scratch (ISBI 2012, the simulated user of ``human_in_the_loop.py``).

Both strategies fine-tune the same start model (60 s on slices 0-3) with the Fine-tune dock's
defaults and the same budget; only what the user does differs:

- ``guided``: the Correct next dock ranks slices 4-19 by the start model's uncertainty; the user
  corrects its 2 worst slices, with strokes over the biggest error regions (0.5 %, 1 %, 2 %, 5 %
  of the slices' pixels), or corrects every error of the 1, 2 or 4 worst slices and marks them
  reviewed. Effort: the pixels changed.
- ``random``: the user annotates 1, 2 or 4 random slices of 4-19 from scratch. Effort: the
  membrane pixels painted (the minority class over a blank canvas: a conservative count, a user
  also checks the rest).

Test: membrane Dice on slices 20-23.

    python benchmarks/effort_curve.py --start-cache benchmarks/results/tmp/hitl_start_seed0.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import human_in_the_loop as hitl  # noqa: E402

from napari_unet.corrections import CorrectionState  # noqa: E402
from napari_unet.devices import resolve_device  # noqa: E402

MEMBRANE = 0
STROKE_SHARES = (0.005, 0.01, 0.02, 0.05)
REVIEWED_COUNTS = (1, 2, 4)
RANDOM_COUNTS = (1, 2, 4)


def _point(args, start_model, image, truth, device, user, state, **info) -> dict:
    model, run = hitl.finetune(args, start_model, image, user, state)
    return {**info, "steps": run["steps"], "seconds": run["seconds"], **hitl.test_dice(model, image, truth, device)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=hitl.ROOT.parent / "shared" / "data" / "isbi2012")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=hitl.ROOT / "benchmarks" / "results" / "effort_curve.json")
    args = parser.parse_args(argv)
    # what hitl.finetune reads: the dock's defaults (replay of the start model's data on)
    args.model, args.width, args.depth = "unet", 16, 3
    args.learning_rate = args.margin = args.balance_classes = args.anchor_weight = args.replay_share = None
    args.replay = True

    image, truth = hitl.load_isbi(args.data)
    args.truth = truth
    device = str(resolve_device(args.device))
    start_model, start_info = hitl.cached_start_model(args, image, truth)
    start = {**start_info, **hitl.test_dice(start_model, image, truth, device)}
    print("start", start, flush=True)
    start_pred = hitl.segment(start_model, image, device)
    _, ranking = hitl.guided_slices(start_model, image, device, count=1)
    ranked = [z for z, _ in ranking]
    points: list[dict] = []

    for share in STROKE_SHARES:
        slices = tuple(sorted(ranked[:2]))
        strokes = hitl.sparse_strokes(start_pred, truth, share, args.seed, slices)
        user = start_pred.copy()
        user[strokes] = truth[strokes]
        state = CorrectionState(user.shape)
        state.record_paint(np.nonzero(strokes))
        points.append(_point(args, start_model, image, truth, device, user, state, strategy="guided",
                             kind="strokes", slices=list(slices), effort=int(strokes.sum())))
        print(points[-1], flush=True)
    for count in REVIEWED_COUNTS:
        slices = sorted(ranked[:count])
        user, state = start_pred.copy(), CorrectionState(start_pred.shape)
        for z in slices:
            user[z] = truth[z]
            state.mark_reviewed(z)
        effort = int(sum((start_pred[z] != truth[z]).sum() for z in slices))
        points.append(_point(args, start_model, image, truth, device, user, state, strategy="guided",
                             kind="reviewed", slices=slices, effort=effort))
        print(points[-1], flush=True)
    rng = np.random.default_rng(args.seed)
    for count in RANDOM_COUNTS:
        slices = sorted(int(z) for z in rng.choice(np.arange(hitl.CANDIDATE_SLICES.start, hitl.CANDIDATE_SLICES.stop),
                                                   count, replace=False))
        user, state = start_pred.copy(), CorrectionState(start_pred.shape)
        for z in slices:
            user[z] = truth[z]
            state.mark_reviewed(z)
        effort = int(sum((truth[z] == MEMBRANE).sum() for z in slices))
        points.append(_point(args, start_model, image, truth, device, user, state, strategy="random",
                             kind="annotated", slices=slices, effort=effort))
        print(points[-1], flush=True)

    report = {"command": " ".join(["python benchmarks/effort_curve.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": device, "budget": f"{args.steps} steps" if args.steps else f"{args.seconds:g} s",
              "start": start, "ranking": ranking, "points": points}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"written {args.out}", flush=True)
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {("guided", "strokes"): ("o-", "guided strokes (2 worst slices)"),
              ("guided", "reviewed"): ("s-", "guided: worst slices corrected, reviewed"),
              ("random", "annotated"): ("^--", "random slices annotated from scratch")}
    for (strategy, kind), (style, label) in styles.items():
        chosen = sorted((p for p in report["points"] if p["strategy"] == strategy and p["kind"] == kind),
                        key=lambda p: p["effort"])
        if chosen:
            ax.plot([p["effort"] for p in chosen], [p["membrane_dice"] for p in chosen], style, label=label)
    ax.axhline(report["start"]["membrane_dice"], color="grey", lw=1, ls=":", label="start model")
    ax.set_xscale("log")
    ax.set_xlabel("pixels the user painted or changed")
    ax.set_ylabel("membrane Dice, ISBI slices 20-23")
    ax.set_title(f"Effort vs gain ({report['budget']} of fine-tuning each)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
