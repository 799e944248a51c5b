"""Human-in-the-loop benchmark on ISBI 2012: does fine-tuning on a few corrections pay off?

A simulated user:

1. trains a start model for ``--seconds`` on slices 0-3 (the engine's default settings);
2. segments the stack with it and "corrects" two slices: 4 and 5, or with ``--guided`` the two of
   slices 4-19 that the Correct next ranking (:mod:`napari_unet.uncertainty`) puts first:
   * ``slices`` run: replaces them by the ground truth and marks them reviewed;
   * ``strokes`` run: paints only ``--stroke-share`` (2 %) of their pixels, taken where the start
     model was wrong (whole error regions, biggest first, as a user fixes the most visible
     mistakes; the rest of the slices stays unlabelled);
3. fine-tunes the start model for ``--seconds`` with the Fine-tune widget's default settings,
   through the session the widget drives (:class:`napari_unet.finetuning.FinetuneSession`),
   replaying the start model's training data (slices 0-3) as the dock does when the start model's
   checkpoint names them (``--no-replay``: the corrections alone).

Validation Dice on slices 20-23 is reported before and after, and against a reference model
trained from scratch on slices 0-19 for the same total time (2 x ``--seconds``). ``--control`` adds
the same fine-tuning on the replayed data alone (no correction): what the corrections add beyond
more training. Class 0 is the membrane, class 1 the cell interior. On a shared or slow machine the
seconds buy very different numbers of steps from run to run; ``--steps N`` budgets steps instead
(the reference gets 2N), and ``--start-cache`` trains the start model once for several ablations
(``benchmarks/hitl_sweep.sh``).

    python benchmarks/human_in_the_loop.py --guided --control --out benchmarks/results/hitl_guided.json
    python benchmarks/human_in_the_loop.py --steps 60 --out benchmarks/results/hitl_steps.json

Timings depend on the machine and its load: the JSON records the device, the thread count and the
steps each run managed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_unet import io  # noqa: E402
from napari_unet.corrections import CorrectionState, FinetuneSettings  # noqa: E402
from napari_unet.devices import resolve_device  # noqa: E402
from napari_unet.finetuning import FinetuneSession, SharedModel  # noqa: E402
from napari_unet.inference import predict, probabilities_to_labels  # noqa: E402
from napari_unet.metrics import dice_per_class  # noqa: E402
from napari_unet.models import build_model  # noqa: E402
from napari_unet.training import TrainConfig, Trainer  # noqa: E402

START_SLICES = slice(0, 4)
CORRECTED = (4, 5)
REFERENCE_SLICES = slice(0, 20)
TEST_SLICES = slice(20, 24)
CANDIDATE_SLICES = slice(4, 20)  # what a guided user may correct: not trained on, not tested on


def load_isbi(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(io.read_image(folder / "train-volume.tif"))
    labels = io.read_labels(folder / "train-labels.tif")  # 255 (cell interior) -> 1, membrane 0
    return image, labels


def segment(model, image: np.ndarray, device: str) -> np.ndarray:
    return probabilities_to_labels(predict(model, image, device=device))


def test_dice(model, image, truth, device) -> dict:
    pred = segment(model, image[TEST_SLICES], device)
    dice = dice_per_class(pred, truth[TEST_SLICES], 2)
    return {"membrane_dice": round(float(dice[0]), 4), "cell_dice": round(float(dice[1]), 4)}


def train_from_scratch(args, image, labels, share: int) -> tuple[torch.nn.Module, dict]:
    """Engine defaults; ``share`` budgets of --seconds (or --steps)."""
    torch.manual_seed(args.seed)
    model = build_model(args.model, in_channels=1, out_channels=1, width=args.width, depth=args.depth)
    budget = {"steps": share * args.steps} if args.steps else {"time_budget": share * args.seconds}
    trainer = Trainer(model, image, labels, config=TrainConfig(**budget, device=args.device, seed=args.seed))
    started = time.perf_counter()
    history = trainer.fit()
    return trainer.model, {"seconds": round(time.perf_counter() - started, 1), "steps": _steps(history)}


def _steps(history: dict) -> int | None:
    for key in ("step", "steps"):
        value = history.get(key)
        if isinstance(value, list) and value:
            return int(value[-1])
        if isinstance(value, (int, float)):
            return int(value)
    losses = history.get("loss") or history.get("train_loss")
    return len(losses) if isinstance(losses, list) else None


def cached_start_model(args, image, truth) -> tuple[torch.nn.Module, dict]:
    """The start model, trained once per --start-cache file (ablations reuse it; None: always trained)."""
    from napari_unet.checkpoint import load_checkpoint, save_checkpoint

    cache = args.start_cache
    if cache is not None and cache.exists():
        info = json.loads(cache.with_suffix(".json").read_text())
        return load_checkpoint(cache).model, info
    model, info = train_from_scratch(args, image[START_SLICES], truth[START_SLICES], 1)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(cache, model, normalization=model.normalization)
        cache.with_suffix(".json").write_text(json.dumps(info))
    return model, info


def finetune(args, start_model, image, user_labels, state) -> tuple[torch.nn.Module, dict]:
    """The widget's path: GUI default settings, with the run's time budget and device."""
    overrides = {"device": args.device, "seed": args.seed}
    overrides.update({"time_budget": None, "steps": args.steps} if args.steps else {"time_budget": args.seconds})
    # ablations only: the default run leaves every other setting at the widget's default
    for name in ("learning_rate", "margin", "balance_classes", "anchor_weight", "replay_share"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    settings = FinetuneSettings(**overrides)
    session = FinetuneSession(settings)
    session.set_image(image, name="ISBI 2012 train-volume", fingerprint="")  # no autosave: no fingerprint
    session.set_labels(user_labels, state, name="corrected labels")
    session.shared = SharedModel(start_model, source="the start model")  # fine-tuned as a copy
    # replay: the start model's training data, as the Fine-tune dock finds it in a checkpoint's provenance
    session.replay_data = (image[START_SLICES], args.truth[START_SLICES]) if args.replay else None
    with tempfile.TemporaryDirectory() as folder:
        session.checkpoint_out = str(Path(folder) / "finetuned.pt")  # the session saves; the run reloads it
        started = time.perf_counter()
        session.start()
        run = session.run_to_end()
    return run.model, {
        "seconds": round(time.perf_counter() - started, 1),
        "steps": _steps(run.history),
        "settings": settings.to_dict(),
        "confirmed_pixels": state.counts(settings.margin).confirmed,
        "reviewed_slices": sorted(state.reviewed_slices),
        "replay": bool(args.replay),
    }


def guided_slices(model, image: np.ndarray, device: str, count: int = 2,
                  candidates: slice = CANDIDATE_SLICES) -> tuple[list[int], list]:
    """The ``count`` slices the Correct next dock ranks worst, among those neither trained nor tested on."""
    from napari_unet.uncertainty import predict_with_uncertainty, rank_slices

    probabilities, uncertainty = predict_with_uncertainty(model, image[candidates], device=device)
    ranking = [(z + candidates.start, score)
               for z, score in rank_slices(uncertainty, probabilities=probabilities)]
    return sorted(z for z, _ in ranking[:count]), [(z, round(score, 5)) for z, score in ranking]


def sparse_strokes(start_pred: np.ndarray, truth: np.ndarray, share: float, seed: int,
                   slices: tuple[int, ...] = CORRECTED) -> np.ndarray:
    """Pixels (bool mask) a user fixes in ``slices``: whole error regions, biggest first."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(truth.shape, bool)
    budget = int(round(share * len(slices) * truth.shape[1] * truth.shape[2]))
    regions = []
    for z in slices:
        wrong = start_pred[z] != truth[z]
        components, count = ndimage.label(wrong)
        sizes = np.bincount(components.ravel())[1:]
        for index in range(count):
            regions.append((int(sizes[index]), rng.random(), z, index + 1, components))
    regions.sort(key=lambda item: (-item[0], item[1]))
    used = 0
    for size, _, z, index, components in regions:
        if used >= budget:
            break
        region = components == index
        if used + size > budget:  # the last region only partly: its pixels nearest to its first row
            coords = np.argwhere(region)[: budget - used]
            region = np.zeros_like(region)
            region[tuple(coords.T)] = True
        mask[z] |= region
        used += int(region.sum())
    return mask


def _slice_range(text: str) -> slice:
    first, last = (int(part) for part in text.split("-"))
    return slice(first, last + 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "isbi2012")
    parser.add_argument("--seconds", type=float, default=60.0, help="start training and each fine-tuning (s)")
    parser.add_argument(
        "--steps", type=int, default=0,
        help="budget in optimisation steps instead of seconds (load-independent; reference gets twice as many)",
    )
    parser.add_argument("--mode", choices=("slices", "strokes", "both", "none"), default="both")
    parser.add_argument("--guided", action="store_true",
                        help="correct the 2 slices of --candidates the uncertainty ranks worst (default: slices 4-5)")
    parser.add_argument("--candidates", type=_slice_range, default=CANDIDATE_SLICES, metavar="A-B",
                        help="the slices a guided user may correct (default 4-19; 4-17 keeps away from the "
                             "test slices' neighbours)")
    parser.add_argument("--stroke-share", type=float, default=0.02)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--width", type=int, default=16, help="the Fine-tune widget's fresh-model default")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=None, help="ablation: fine-tune learning rate")
    parser.add_argument("--margin", type=int, default=None, help="ablation: stroke margin in pixels")
    parser.add_argument("--anchor-weight", type=float, default=None, help="ablation: weight of the start model's own labels")
    parser.add_argument("--replay-share", type=float, default=None, help="ablation: share of replayed patches")
    parser.add_argument("--no-replay", dest="replay", action="store_false",
                        help="fine-tune on the corrections alone (the start model's training data not replayed)")
    parser.add_argument("--start-cache", type=Path, default=None,
                        help="save the start model here, or load it if the file exists (ablations)")
    parser.add_argument("--control", action="store_true",
                        help="also fine-tune on the replayed data alone: what the corrections add beyond it")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference run (ablations)")
    parser.add_argument("--balance-classes", action="store_true", default=None, help="ablation: balanced class weights")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads (0: torch's default); 1 is far faster on a busy shared CPU",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hitl.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    image, truth = load_isbi(args.data)
    args.truth = truth
    device = str(resolve_device(args.device))
    report: dict = {
        "command": " ".join(["python benchmarks/human_in_the_loop.py", *(argv if argv is not None else sys.argv[1:])]),
        "data": str(args.data),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "model": {"name": args.model, "width": args.width, "depth": args.depth},
        "budget_per_training": f"{args.steps} steps" if args.steps else f"{args.seconds:g} s",
        "test_slices": "20-23",
        "runs": {},
    }

    unit = f"{args.steps} steps" if args.steps else f"{args.seconds:g} s"
    print(f"start model: {unit} on slices 0-3 ({device})", flush=True)
    start_model, start_info = cached_start_model(args, image, truth)
    report["start"] = {**start_info, **test_dice(start_model, image, truth, device)}
    print("  ", report["start"], flush=True)
    start_pred = segment(start_model, image, device)  # what the Segment widget would show
    corrected = CORRECTED
    if args.guided:  # the slices the Correct next dock ranks worst by the start model's uncertainty
        corrected, ranking = guided_slices(start_model, image, device, candidates=args.candidates)
        report["guided"] = {"corrected_slices": list(corrected), "ranking": ranking}
        print(f"guided: correct slices {corrected}", flush=True)
    report["corrected_slices"] = list(corrected)

    if args.mode in ("slices", "both"):
        user = start_pred.copy()
        state = CorrectionState(user.shape)
        for z in corrected:
            user[z] = truth[z]
            state.mark_reviewed(z)
        print(f"fine-tune on reviewed slices {corrected}: {unit}", flush=True)
        model, info = finetune(args, start_model, image, user, state)
        report["runs"]["reviewed_slices"] = {**info, **test_dice(model, image, truth, device)}
        print("  ", {k: v for k, v in report["runs"]["reviewed_slices"].items() if k != "settings"}, flush=True)

    if args.mode in ("strokes", "both"):
        strokes = sparse_strokes(start_pred, truth, args.stroke_share, args.seed, tuple(corrected))
        user = start_pred.copy()
        user[strokes] = truth[strokes]
        state = CorrectionState(user.shape)
        state.record_paint(np.nonzero(strokes))
        print(f"fine-tune on sparse strokes ({strokes.sum()} px): {unit}", flush=True)
        model, info = finetune(args, start_model, image, user, state)
        info["stroke_pixels"] = int(strokes.sum())
        info["stroke_share_of_corrected_slices"] = round(
            float(strokes.sum()) / (len(corrected) * truth.shape[1] * truth.shape[2]), 4)
        report["runs"]["sparse_strokes"] = {**info, **test_dice(model, image, truth, device)}
        print("  ", {k: v for k, v in report["runs"]["sparse_strokes"].items() if k != "settings"}, flush=True)

    if args.control:
        # the control: the same fine-tuning on the replayed data alone, no correction at all
        print(f"control: fine-tune on the start model's training data alone: {unit}", flush=True)
        model = copy.deepcopy(start_model)
        settings = FinetuneSettings(device=args.device, seed=args.seed,
                                    **({"time_budget": None, "steps": args.steps} if args.steps
                                       else {"time_budget": args.seconds}))
        trainer = Trainer(model, image[START_SLICES], truth[START_SLICES], config=settings.train_config(2))
        started = time.perf_counter()
        history = trainer.fit()
        report["runs"]["replay_only"] = {"seconds": round(time.perf_counter() - started, 1), "steps": _steps(history),
                                         **test_dice(trainer.model, image, truth, device)}
        print("  ", report["runs"]["replay_only"], flush=True)

    if not args.no_reference:
        print(f"reference: 2 x {unit} from scratch on slices 0-19", flush=True)
        reference, ref_info = train_from_scratch(args, image[REFERENCE_SLICES], truth[REFERENCE_SLICES], 2)
        report["reference"] = {**ref_info, **test_dice(reference, image, truth, device)}
        print("  ", report["reference"], flush=True)
        for run in report["runs"].values():
            run["membrane_dice_gap_to_reference"] = round(run["membrane_dice"] - report["reference"]["membrane_dice"], 4)
    for run in report["runs"].values():
        run["membrane_dice_gain_over_start"] = round(run["membrane_dice"] - report["start"]["membrane_dice"], 4)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}", flush=True)
    return report


if __name__ == "__main__":
    main()
