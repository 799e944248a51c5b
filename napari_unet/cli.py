"""The ``napari-unet`` command line: train, predict, evaluate, export, demo.

Every subcommand has ``--help``. Errors print one line, ``napari-unet: error: ...``, to stderr and
the command exits non-zero, without a traceback. napari is imported only by ``demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROG = "napari-unet"

# Defaults of `napari-unet train`; benchmarks/train_isbi.py uses these too (see the README).
DEFAULT_MODEL = "unet"
DEFAULT_WIDTH = 16
DEFAULT_DEPTH = 4


class CLIError(ValueError):
    """A problem with the command's inputs, said in one sentence."""


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by the benchmarks)


def default_train_config(**overrides: Any):
    """The TrainConfig that `napari-unet train` uses when no option changes it."""
    from .training import TrainConfig

    return TrainConfig(**overrides)


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, not after an hour of training, when `path` cannot be written."""
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir() and path.suffix.lower() != ".zarr":
        raise CLIError(f"cannot write {path}: it is a folder")
    if not parent.is_dir():
        raise CLIError(f"cannot write {path}: the folder {parent} does not exist")
    probe = parent / f".napari-unet-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CLIError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CLIError(f"{what} not found: {path}")
    return path


def split_channels(image: np.ndarray, labels: np.ndarray, spatial_dims: int) -> int:
    """Number of input channels of `image` given its labels; raises on a shape mismatch."""
    from .io import check_pair

    if image.ndim == labels.ndim:
        check_pair(image.shape, labels.shape, channel_axis=None)
        return 1
    # a channel axis: (Z, C, Y, X) stacks for 2D models, (C, Z, Y, X) volumes for 3D models
    axis = 1 if spatial_dims == 2 and image.ndim == 4 else 0
    check_pair(image.shape, labels.shape, channel_axis=axis)
    return int(image.shape[axis])


def build_or_load_model(name: str, *, width: int, depth: int, in_channels: int, n_classes: int, init=None,
                        seed: int | None = None):
    """A fresh model for `n_classes` classes, or the one in checkpoint `init` (a path or a loaded
    Checkpoint) to fine-tune. `seed` draws a fresh model's initial weights (the trainer seeds only
    the run), so that one seed repeats a whole training run; the global random state is left as it was."""
    import torch

    from .checkpoint import Checkpoint, load_checkpoint
    from .models import build_model

    if init is not None:
        ckpt = init if isinstance(init, Checkpoint) else load_checkpoint(_require_file(init, "checkpoint"))
        model = ckpt.model
        where = Path(ckpt.path).name if ckpt.path else "the checkpoint"
        if max(2, model.out_channels) < n_classes:
            raise CLIError(
                f"the labels have {n_classes} classes but the model in {where} predicts {max(2, model.out_channels)}"
            )
        if model.in_channels != in_channels:
            raise CLIError(f"the images have {in_channels} channel(s) but the model in {where} expects {model.in_channels}")
        model.train()
        return model
    out_channels = 1 if n_classes <= 2 else n_classes
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(name, in_channels=in_channels, out_channels=out_channels, width=width, depth=depth)


def train_model(
    model,
    images,
    labels,
    *,
    config,
    weights=None,
    val_images=None,
    val_labels=None,
    on_event: Callable | None = None,
    replay: tuple | None = None,
    process_group=None,
):
    """Train `model` with the engine's Trainer; returns the trainer (model holds the best weights).

    ``replay``: (images, labels) the model learnt before, mixed in at ``config.replay_share``.
    ``process_group``: this rank under torchrun (``training.distributed``), None in one process.
    """
    from .training import Trainer

    trainer = Trainer(
        model, images, labels, weights, val_images=val_images, val_labels=val_labels,
        config=config, callbacks=[on_event] if on_event else (),
        replay_images=None if replay is None else replay[0], replay_labels=None if replay is None else replay[1],
        process_group=process_group,
    )
    trainer.fit()
    return trainer


class _ProgressBar:
    """A tqdm bar over the step or time budget, showing loss and the latest validation Dice."""

    def __init__(self, config, enabled: bool = True):
        from tqdm import tqdm

        self.by_time = config.steps is None
        total = config.steps if config.steps is not None else config.time_budget
        unit = "step" if not self.by_time else "s"
        self.bar = tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True,
                        bar_format=None if not self.by_time else "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{postfix}]")
        self.position = 0.0
        self.postfix: dict[str, str] = {}

    def __call__(self, event) -> None:
        if event.kind == "step":
            now = event.step if not self.by_time else event.elapsed
            if self.bar.total is not None:
                now = min(now, self.bar.total)
            self.bar.update(now - self.position)
            self.position = now
            self.postfix["loss"] = f"{event.loss:.4f}"
            self.postfix["lr"] = f"{event.lr:.2g}"
            self.postfix["img/s"] = f"{event.samples_per_second:.1f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        elif event.kind == "validation":
            self.postfix["val dice"] = "/".join(f"{d:.3f}" for d in event.dice)
            self.bar.set_postfix(self.postfix)
        elif event.kind == "finished":
            self.bar.close()
            print(f"{PROG}: {event.message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Subcommands


def _cmd_train(args: argparse.Namespace) -> int:
    """`train`; under torchrun (WORLD_SIZE > 1) one data-parallel rank of it."""
    from . import devices
    from .training import distributed

    device = devices.resolve_device(args.device)  # a bad device fails before anything is read
    group = distributed.from_environment()
    if group is None:
        return _train(args, None, args.device)
    device = distributed.device_for(group, device)
    backend = distributed.start(group, device)
    finished = False
    try:
        if not group.is_main:
            args.quiet = True
        elif not args.quiet:
            print(f"{PROG}: data-parallel training on {group.world_size} processes ({backend})", file=sys.stderr)
        code = _train(args, group, str(device))
        finished = True
        return code
    finally:
        distributed.stop(finished)


def _train(args: argparse.Namespace, group, device: str) -> int:
    from . import io
    from .training import TrainConfig

    output = check_writable(args.output)
    image = np.asarray(io.read_image(_require_file(args.images, "images")))
    io.check_image(image, name=f"image {Path(args.images).name}")
    labels = io.read_labels(_require_file(args.labels, "labels"))
    init = None
    if args.init is not None:
        from .checkpoint import load_checkpoint

        init = load_checkpoint(_require_file(args.init, "checkpoint"))
        spatial_dims = init.model.spatial_dims
    else:
        spatial_dims = 3 if args.model.endswith("3d") else 2
    in_channels = split_channels(image, labels, spatial_dims)
    width, batch_size, patch_size = _device_recipe(args, device, spatial_dims, fine_tuning=init is not None)
    n_classes = max(2, int(labels.max()) + 1)
    if not args.replay and int(labels.min()) == int(labels.max()):
        raise CLIError(f"every pixel of {Path(args.labels).name} is class {int(labels.max())}; training needs at least "
                       "two classes (e.g. background 0 and foreground 1)")
    model = build_or_load_model(args.model, width=width, depth=args.depth, in_channels=in_channels,
                                n_classes=n_classes, init=init, seed=args.seed)
    val_images = val_labels = None
    if args.val_images or args.val_labels:
        if not (args.val_images and args.val_labels):
            raise CLIError("--val-images and --val-labels go together")
        val_images = io.read_image(_require_file(args.val_images, "validation images"))
        val_labels = io.read_labels(_require_file(args.val_labels, "validation labels"))
        split_channels(np.asarray(val_images), val_labels, model.spatial_dims)
    if args.steps is None and args.time_budget is None:
        raise CLIError("give a training budget: --time-budget SECONDS and/or --steps N")
    config = TrainConfig(
        patch_size=patch_size, batch_size=batch_size, learning_rate=args.lr,
        steps=args.steps, time_budget=args.time_budget, loss=args.loss, augment=not args.no_augment,
        schedule=args.schedule, val_fraction=args.val_fraction, amp=args.amp, device=device,
        seed=args.seed, fit_label_offset=not args.no_label_offset, dice_fade=args.dice_fade or None,
        augment_ramp=_augment_ramp(args), tta_candidates=args.tta_candidates,
        replay_share=args.replay or 0.0,
    )
    replay, replayed = _replay_data(args, init)
    progress = _ProgressBar(config, enabled=not args.quiet)
    trainer = train_model(model, image, labels, config=config, val_images=val_images, val_labels=val_labels,
                          on_event=progress, replay=replay, process_group=group)
    if group is not None and not group.is_main:
        return 0  # rank 0 saves and reports
    provenance = {
        "data_paths": [str(Path(args.images).resolve()), str(Path(args.labels).resolve())],
        "command": "train",
        **({"replayed": [str(p) for p in replayed]} if replayed else {}),
        **({"data_parallel_processes": group.world_size} if group is not None else {}),
    }
    trainer.save(output, provenance=provenance)
    best = trainer.history.get("best_val_dice")
    summary = {"output": str(output), "steps": trainer.step,
               "seconds": round(trainer.history["elapsed"][-1], 1) if trainer.history["elapsed"] else 0.0,
               "best_val_dice_per_class": best, "label_offset": list(trainer.history.get("label_offset") or [])}
    if group is not None:
        summary["processes"] = group.world_size
        summary["identical_weights_across_processes"] = trainer.history["replicas"]["identical_weights"]
    print(json.dumps(summary))
    return 0


def _device_recipe(args: argparse.Namespace, device: str, spatial_dims: int,
                   fine_tuning: bool = False) -> tuple[int, int, Any]:
    """Width, batch and patch: the ones given, else the device's recipe (training/recipe.py).
    A model to fine-tune keeps its own width."""
    from . import devices
    from .training.recipe import recipe_for

    recipe = recipe_for(devices.resolve_device(device), spatial_dims)
    chosen = (args.width or recipe.width, args.batch_size or recipe.batch_size, args.patch_size or recipe.patch_size)
    if not args.quiet and None in (args.width, args.batch_size, args.patch_size):
        patch = chosen[2] if isinstance(chosen[2], int) else "x".join(map(str, chosen[2]))
        width = "" if fine_tuning else f"width {chosen[0]}, "
        print(f"{PROG}: {recipe.why}: {width}batch {chosen[1]}, patch {patch} "
              "(--width, --batch-size and --patch-size change them)", file=sys.stderr)
    return chosen


def _replay_data(args: argparse.Namespace, init) -> tuple[tuple | None, tuple | None]:
    """--replay: the --init checkpoint's training data, as ((images, labels), paths), or (None, None)."""
    from .corrections import load_replay, replay_paths

    if not args.replay:
        return None, None
    if init is None:
        raise CLIError("--replay mixes in the training data of the --init checkpoint: give --init")
    paths = replay_paths(init.provenance)
    if paths is None:
        raise CLIError(f"the checkpoint {args.init} does not name the files it was trained on; train without --replay")
    return load_replay(paths, spatial_dims=init.model.spatial_dims), paths


def _augment_ramp(args: argparse.Namespace) -> float | None:
    """The ramp asked for; by default the engine's for a new model and none for one to fine-tune,
    which knows the plain images already and needs the regularisation from the first step."""
    from .training import TrainConfig

    if args.augment_ramp is None:
        return None if args.init is not None else TrainConfig().augment_ramp
    return args.augment_ramp or None


def _cmd_predict(args: argparse.Namespace) -> int:
    from . import devices, inference, io, segmentation
    from .checkpoint import load_checkpoint

    devices.resolve_device(args.device)
    ckpt = load_checkpoint(_require_file(args.model, "checkpoint"))
    output = check_writable(args.output)
    if Path(output).suffix.lower() not in io.WRITE_SUFFIXES:
        raise CLIError(f"cannot write {output.name}: use a .tif, .tiff, .zarr or .npy file name")
    probabilities_path = check_writable(args.probabilities) if args.probabilities else None
    instances_path, method = _instances_request(args)
    image = io.read_image(_require_file(args.images, "images"), lazy=True)
    io.check_image(image, name=f"image {Path(args.images).name}")
    if io.looks_like_rgb(image) and int(ckpt.model.in_channels) == 1:
        raise CLIError(f"{Path(args.images).name} is an RGB image ({_shape(image.shape)}) but the model takes 1 channel; "
                       "convert it to grayscale first")
    options = dict(tile=args.tile, overlap=args.overlap, tta=args.tta, device=args.device)
    progress = _tile_progress(enabled=not args.quiet)
    spatial_dims = int(ckpt.model.spatial_dims)
    if args.scheduler is not None:
        _predict_on_cluster(args, image, output, probabilities_path, instances_path, method, spatial_dims)
    elif output.suffix.lower() == ".zarr":
        make_instances = None
        if instances_path is not None:
            def make_instances(probabilities) -> None:
                io.write_labels(instances_path, segmentation.instances_from(
                    probabilities, method, spatial_dims=spatial_dims, threshold=args.threshold))
        _predict_to_zarr(ckpt.model, image, output, probabilities_path, options, progress, args.threshold,
                         make_instances)
    else:
        probabilities = np.asarray(inference.predict(ckpt.model, image, progress=progress, **options))
        progress.close()
        # the same outputs as the Segment widget's (its foreground map aside: all classes are written)
        result = segmentation.outputs_from_probabilities(
            probabilities, spatial_dims=spatial_dims, threshold=args.threshold, instances=method,
            foreground_probability=False,
        )
        io.write_labels(output, result.labels)
        if probabilities_path is not None:
            io.write_image(probabilities_path, np.asarray(probabilities, np.float32))
        if result.instances is not None:
            io.write_labels(instances_path, result.instances)
    print(json.dumps({"output": str(output), "probabilities": str(probabilities_path) if probabilities_path else None,
                      "instances": str(instances_path) if instances_path else None,
                      "instances_method": method if instances_path else None}))
    return 0


def _predict_on_cluster(args: argparse.Namespace, image, output: Path, probabilities_path: Path | None,
                        instances_path: Path | None, method: str, spatial_dims: int) -> None:
    """--scheduler: predict on a dask.distributed cluster; the workers write the zarr outputs' chunks."""
    import dask.array as da

    from . import io, segmentation
    from .inference import distributed

    for path, option in ((output, "--output"), (probabilities_path, "--probabilities")):
        if path is not None and path.suffix.lower() != ".zarr":
            raise CLIError(f"with --scheduler every worker writes its own chunks of {option}: give a .zarr path, "
                           f"not {path.name}")
    from .io.readers import _is_zarr_path

    if not _is_zarr_path(Path(args.images)):
        # workers read zarr themselves; other files are read here and sent to them with the graph
        image = da.from_array(np.asarray(image))
    store = probabilities_path
    if store is None and instances_path is not None:  # the watershed reads them afterwards
        store = output.with_name(f".{output.name}.probabilities-{uuid.uuid4().hex[:6]}.zarr")
    try:
        with distributed.connect(args.scheduler) as client:
            workers = len(client.scheduler_info().get("workers", {}))
            if not args.quiet:
                print(f"{PROG}: predicting on {workers} dask worker(s) at {client.scheduler.address}", file=sys.stderr)
            probabilities = distributed.predict_on_cluster(
                client, args.model, image, tile=args.tile, overlap=args.overlap, tta=args.tta, device=args.device)
            labels = distributed.labels_from(probabilities, args.threshold)
            sources = [labels]
            targets = [io.open_zarr_output(output, labels.shape, np.uint8, chunks=distributed.zarr_chunks(labels))]
            if store is not None:
                sources.append(probabilities)
                targets.append(io.open_zarr_output(store, probabilities.shape, np.float32,
                                                   chunks=distributed.zarr_chunks(probabilities)))
            futures = client.compute(da.store(sources, targets, lock=False, compute=False))
            if not args.quiet:
                from distributed import progress

                progress(futures)
                print(file=sys.stderr)
            client.gather(futures)  # raises a worker's error here
        if instances_path is not None:
            io.write_labels(instances_path, segmentation.instances_from(
                targets[1], method, spatial_dims=spatial_dims, threshold=args.threshold))
    finally:
        if store is not None and store != probabilities_path and Path(store).exists():
            shutil.rmtree(store, ignore_errors=True)


def _instances_request(args: argparse.Namespace) -> tuple[Path | None, str]:
    """Where to write instance labels and by which method; checked before any prediction."""
    from . import io

    if args.instances is not None and args.instances_output is None:
        raise CLIError(f"--instances {args.instances} needs --instances-output PATH: where to write the instance labels")
    if args.instances_output is None:
        return None, "none"
    path = check_writable(args.instances_output)
    if path.suffix.lower() not in io.WRITE_SUFFIXES:
        raise CLIError(f"cannot write {path.name}: use a .tif, .tiff, .zarr or .npy file name for --instances-output")
    for other, option in ((args.output, "--output"), (args.probabilities, "--probabilities")):
        if other is not None and Path(other).expanduser().resolve() == path.resolve():
            raise CLIError(f"--instances-output and {option} are the same file: {path}")
    return path, args.instances or "watershed"


def _predict_to_zarr(model, image, output: Path, probabilities_path, options, progress, threshold,
                     make_instances: Callable | None = None) -> None:
    """Stream probabilities into zarr (the requested file or a temporary one), then labels slab by slab
    (and instances, by ``make_instances(probabilities)``, before a temporary store is removed)."""
    from . import inference, io

    keep = probabilities_path is not None and probabilities_path.suffix.lower() == ".zarr"
    store = probabilities_path if keep else output.with_name(f".{output.name}.probabilities-{uuid.uuid4().hex[:6]}.zarr")
    try:
        probabilities = inference.predict(model, image, out=str(store), progress=progress, **options)
        progress.close()
        labels = io.open_zarr_output(output, probabilities.shape[1:], np.uint8)
        slab = max(1, int(labels.chunks[0]))
        for start in range(0, probabilities.shape[1], slab):
            block = np.asarray(probabilities[:, start:start + slab])
            labels[start:start + slab] = inference.probabilities_to_labels(block, threshold=threshold)
        if probabilities_path is not None and not keep:
            io.write_image(probabilities_path, np.asarray(probabilities[...], np.float32))
        if make_instances is not None:
            make_instances(probabilities)
    finally:
        if not keep and Path(store).exists():
            shutil.rmtree(store, ignore_errors=True)


def _tile_progress(enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=None, unit="tile", disable=not enabled, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    update.close = bar.close  # type: ignore[attr-defined]
    return update


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import io, metrics

    prediction = io.read_labels(_require_file(args.prediction, "prediction"))
    target = io.read_labels(_require_file(args.labels, "labels"))
    if prediction.shape != target.shape:
        raise CLIError(f"the prediction is {_shape(prediction.shape)} but the labels are {_shape(target.shape)}")
    n_classes = max(2, int(max(prediction.max(initial=0), target.max(initial=0))) + 1)
    per_slice = target.ndim == 3 and not args.volume
    results = metrics.evaluate_segmentation(prediction, target, n_classes=n_classes, per_slice=per_slice)
    results = {"dice": results["dice"], "iou": results["iou"], "pixel_error": results["pixel_error"],
               "adapted_rand_error": results["adapted_rand_error"], **results}
    print(json.dumps(results))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from . import export, io

    suffix = {"torchscript": ".pt", "onnx": ".onnx", "bioimageio": ".zip"}[args.format]
    output = Path(args.output)
    if output.suffix.lower() != suffix:
        raise CLIError(f"a {args.format} export is a {suffix} file; got --output {output}")
    test_image = io.read_image(_require_file(args.test_image, "test image")) if args.test_image else None
    fields = {key: value for key, value in (("name", args.name), ("authors", args.author),
                                            ("license", args.license)) if value}
    written = export.export_model(_require_file(args.model, "checkpoint"), output, args.format, opset=args.opset,
                                  test_image=test_image, **fields)
    print(f"wrote {written}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from . import _demo
    except ImportError as error:
        raise CLIError(f"the demo needs napari with a Qt backend ({error})") from error
    result = _demo.main()
    return int(result) if isinstance(result, int) else 0


def _shape(shape: Sequence[int]) -> str:
    return " x ".join(str(s) for s in shape)


# ---------------------------------------------------------------------------------------------
# Argument parsing


def _checked_number(text: str, convert: Callable[[str], Any], noun: str, valid: Callable[[Any], bool], rule: str):
    """``convert(text)`` for argparse, or a one-line error: not ``noun``, or not ``rule``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{text} {rule}")
    return value


def _positive_int(text: str) -> int:
    return _checked_number(text, int, "a whole number", lambda v: v >= 1, "must be at least 1")


def _positive_float(text: str) -> float:
    return _checked_number(text, float, "a number", lambda v: v > 0, "must be positive")


def _fraction(text: str) -> float:
    return _checked_number(text, float, "a number", lambda v: 0 <= v < 1, "must be in [0, 1)")


def _fade(text: str) -> float:
    return _checked_number(text, float, "a number", lambda v: 0 <= v <= 1, "must be in [0, 1]")


def _below_one(text: str) -> float:
    return _checked_number(text, float, "a number", lambda v: 0 <= v < 1, "must be in [0, 1)")


def _sides(text: str) -> int | tuple[int, ...]:
    """'256' or '32,96,96'."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256 or 32,96,96") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return values[0] if len(values) == 1 else values


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors on one line in our format (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .losses import available_losses
    from .models import available_models
    from .training import TrainConfig

    defaults = TrainConfig()
    parser = _Parser(prog=PROG, description="Segment EM stacks and volumes with UNet variants.")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,evaluate,export,demo}", parser_class=_Parser)
    sub.required = True

    train = sub.add_parser("train", help="train or fine-tune a model", description=(
        "Train a model on an image stack/volume and its labels (classes 0..K-1, or a 0/255 mask) and save "
        "a checkpoint. The defaults are the ones benchmarked on ISBI 2012."))
    train.add_argument("--images", required=True, help="image file or folder (tif stack, folder of slices, .npy, .zarr)")
    train.add_argument("--labels", required=True, help="label file of the same size")
    train.add_argument("--model", default=DEFAULT_MODEL, help=f"model variant (default {DEFAULT_MODEL}): "
                       f"{', '.join(available_models())}")
    train.add_argument("--width", type=_positive_int, default=None,
                       help=f"features at full resolution (default: the device's recipe; {DEFAULT_WIDTH} on a CPU "
                            "in 2D, 8 in 3D; 32 in 2D and 16 in 3D on a GPU)")
    train.add_argument("--depth", type=_positive_int, default=DEFAULT_DEPTH, help=f"number of poolings (default {DEFAULT_DEPTH})")
    train.add_argument("--init", metavar="CKPT",
                       help="start from this checkpoint (fine-tuning); --model/--width/--depth are then ignored")
    train.add_argument("--replay", type=_below_one, default=0.0, metavar="F",
                       help="with --init: draw this fraction of the patches from the data the checkpoint was "
                            "trained on (the files it names), so that it keeps what it knew (default 0: off)")
    train.add_argument("--time-budget", type=_positive_float, metavar="SECONDS", help="stop after this many seconds")
    train.add_argument("--steps", type=_positive_int, metavar="N", help="stop after N optimisation steps")
    train.add_argument("--val-fraction", type=_fraction, default=defaults.val_fraction, metavar="F",
                       help="hold out this fraction of the slices (or a region) for validation "
                            f"(default {defaults.val_fraction})")
    train.add_argument("--val-images", help="separate validation images (instead of --val-fraction)")
    train.add_argument("--val-labels", help="labels of --val-images")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    train.add_argument("--output", required=True, metavar="CKPT", help="where to save the trained checkpoint (.pt)")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help=f"patches per step (default: the device's recipe; {defaults.batch_size} on a CPU in 2D, "
                            "2 in 3D; 16 and 4 on a GPU with 12 GiB free, half that on smaller ones)")
    train.add_argument("--patch-size", type=_sides, default=None,
                       help="patch side(s), e.g. 256 or 32,96,96 (default: the device's recipe; 192 in 2D and "
                            "32,96,96 in 3D on a CPU, 256 and 64,128,128 on a GPU with 12 GiB free)")
    train.add_argument("--lr", type=_positive_float, default=defaults.learning_rate,
                       help=f"peak learning rate (default {defaults.learning_rate})")
    train.add_argument("--loss", default=defaults.loss, help=f"loss (default {defaults.loss}): {', '.join(available_losses())}")
    train.add_argument("--dice-fade", type=_fade, default=defaults.dice_fade, metavar="F",
                       help=f"the loss's Dice term fades to 0 over this fraction of the budget, leaving cross-entropy "
                            f"(default {defaults.dice_fade}; 0 = keep it)")
    train.add_argument("--augment-ramp", type=_fade, default=None, metavar="F",
                       help="elastic and intensity augmentation rise from none to full over this fraction of the "
                            f"budget (default {defaults.augment_ramp} for a new model, 0 with --init; "
                            "0 = full from the start)")
    train.add_argument("--tta-candidates", type=_positive_int, default=defaults.tta_candidates, metavar="K",
                       help="keep the weights of the K best validations and, at the end, the best of them with "
                            f"8-view test-time augmentation (default {defaults.tta_candidates}; 1 = the best single view)")
    train.add_argument("--schedule", choices=("cosine", "plateau", "constant"), default=defaults.schedule,
                       help=f"learning-rate schedule (default {defaults.schedule})")
    train.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=defaults.amp,
                       help="mixed precision (default auto: on for CUDA)")
    train.add_argument("--no-augment", action="store_true", help="train without augmentation")
    train.add_argument("--no-label-offset", action="store_true",
                       help="do not measure the sub-pixel offset of the labels from the image (see README)")
    train.add_argument("--seed", type=int, default=defaults.seed, help=f"random seed (default {defaults.seed})")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    predict = sub.add_parser("predict", help="segment images with a trained model", description=(
        "Predict a class map (and optionally probabilities) with the tiled inference engine. "
        "A .zarr output is streamed tile by tile, so volumes larger than memory work."))
    predict.add_argument("--model", required=True, metavar="CKPT", help="trained checkpoint (.pt)")
    predict.add_argument("--images", required=True, help="image file or folder")
    predict.add_argument("--output", required=True, metavar="PATH", help="class map to write (.tif or .zarr)")
    predict.add_argument("--probabilities", metavar="PATH", help="also write the class probabilities (.tif or .zarr)")
    predict.add_argument("--tile", type=_sides, default=None, help="tile side(s) (default: fit the device memory)")
    predict.add_argument("--overlap", type=_fraction, default=0.25, help="tile overlap fraction (default 0.25)")
    predict.add_argument("--tta", action="store_true",
                         help="test-time augmentation: average over flips (in 2D also transposes: 8 views)")
    predict.add_argument("--threshold", type=float, default=0.5,
                         help="foreground threshold for binary models, also the watershed's seed threshold (default 0.5)")
    predict.add_argument("--instances", choices=("components", "watershed"), default=None,
                         help="also label one id per cell: components = connected regions of class 1 (a gap in a "
                              "membrane merges two cells); watershed = seeded watershed on the membrane probability "
                              "(splits them; the default with --instances-output). A 2D model's stack is labelled "
                              "slice by slice")
    predict.add_argument("--instances-output", metavar="PATH",
                         help="where to write the instance labels (.tif, .zarr or .npy)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    predict.add_argument("--scheduler", metavar="ADDRESS", default=None,
                         help="predict on a dask.distributed cluster: local:N starts N worker processes here, "
                              "tcp://host:8786 uses a running scheduler (workers must see the same paths). "
                              "Outputs must be .zarr: each worker writes its own chunks. "
                              "Needs pip install 'napari-unet[distributed]'")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a prediction against labels", description=(
        "Print one JSON line with dice, iou, pixel_error, adapted_rand_error and per-class Dice. "
        "A (Z, Y, X) stack is scored per slice for the instance metrics unless --volume is given."))
    evaluate.add_argument("--prediction", required=True, help="predicted class map (or 0/255 mask)")
    evaluate.add_argument("--labels", required=True, help="ground-truth class map (or 0/255 mask)")
    evaluate.add_argument("--volume", action="store_true", help="score 3D instances instead of per-slice ones")
    evaluate.set_defaults(func=_cmd_evaluate)

    export = sub.add_parser("export", help="write a model for other tools (TorchScript, ONNX, bioimage.io)", description=(
        "Export a checkpoint: a TorchScript (.pt) or ONNX (.onnx) graph from a normalised image to class "
        "probabilities, every spatial side a multiple of 2**depth; or a bioimage.io model package (.zip) "
        "that bioimage.io tools and napari-unet itself open. ONNX and bioimage.io need "
        "pip install 'napari-unet[export]'."))
    export.add_argument("--model", required=True, metavar="CKPT", help="trained checkpoint (.pt)")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx", "bioimageio"))
    export.add_argument("--output", required=True, metavar="PATH", help="file to write (.pt, .onnx or .zip)")
    export.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset (default 18, the oldest written)")
    export.add_argument("--test-image", metavar="PATH", help="bioimage.io: the image its test tensors are cut from "
                        "(default: the checkpoint's training data, else the sample)")
    export.add_argument("--name", help="bioimage.io: the model's name")
    export.add_argument("--author", action="append", help="bioimage.io: an author (repeat for several; "
                        "default: the checkpoint's, else your login name)")
    export.add_argument("--license", help="bioimage.io: SPDX license id (default CC-BY-4.0)")
    export.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="open napari with sample data and the widgets",
                          description="Open napari with sample data and the napari-unet widgets.")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `napari-unet` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except SystemExit as exit_request:  # --help and usage errors
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one readable line instead of a traceback
        print(f"{PROG}: error: {_describe(error)}", file=sys.stderr)
        return 1


def _describe(error: BaseException) -> str:
    """One line for the user: the engine's plain sentence, or the OS error and its file."""
    from .devices import is_out_of_memory
    from .training import TrainingOutOfMemory

    if isinstance(error, (ValueError, TrainingOutOfMemory)):
        text = str(error)
    elif isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        text = f"{error.strerror or error}{where}"
    elif isinstance(error, MemoryError) or is_out_of_memory(error):
        text = "out of memory; use a smaller tile, batch or patch size"
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
