"""Tests of the sliding-window inference engine (napari_unet.inference)."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage as ndi

from napari_unet import devices, inference
from napari_unet.inference import (
    DeviceFallbackWarning,
    PredictionCancelled,
    labels_to_instances,
    predict,
    probabilities_to_labels,
)
from napari_unet.models import build_model

# ------------------------------------------------------------------------------------- toy models





def _blobs(shape: tuple[int, ...], count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blurred bright balls on a noisy background, and their masks."""
    centres = np.zeros(shape, dtype=bool)
    centres[tuple(rng.integers(0, side, count) for side in shape)] = True
    mask = ndi.distance_transform_edt(~centres) <= 4
    image = ndi.gaussian_filter(mask.astype(np.float32), 1.0)
    image += rng.normal(0, 0.1, shape).astype(np.float32)
    return image.astype(np.float32), mask


def _train_toy(name: str, batch_shape: tuple[int, ...], count: int, steps: int) -> torch.nn.Module:
    """A width-4, depth-2 model trained for a few steps to segment blobs (a few seconds)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(name, width=4, depth=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(steps):
        image, mask = _blobs(batch_shape, count, rng)  # a fresh batch: the model generalises
        loss = loss_fn(model(torch.from_numpy(image)[:, None]), torch.from_numpy(mask)[:, None].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_2d() -> torch.nn.Module:
    return _train_toy("unet", (8, 32, 32), count=6, steps=60)


@pytest.fixture(scope="module")
def model_3d() -> torch.nn.Module:
    return _train_toy("unet3d", (2, 16, 16, 16), count=2, steps=200)


def _whole(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Probability of class 1 from one forward pass over the whole (already normalised) input."""
    with torch.inference_mode():
        logits = model(torch.from_numpy(image)[None, None])
    return torch.sigmoid(logits)[0, 0].numpy()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def _edge_jumps(error: np.ndarray, tile: int, overlap: float) -> tuple[float, float]:
    """Mean jump of ``error`` between neighbouring pixels across tile edges, and just beside them.

    A visible seam is a step in the prediction where one tile ends: there the error jumps from one
    pixel to the next more than between neighbours 4 and 8 pixels away, inside the tiles (a multiple
    of 2**depth away, so both sit at the same place of the model's pooling grid).
    """
    at_edges, beside = [], []
    for axis, extent in enumerate(error.shape):
        jumps = np.abs(np.diff(error, axis=axis))  # jumps[i] is between pixels i and i + 1
        for start in inference._tile_starts(extent, tile, overlap, 4):
            for edge in (start, start + tile):
                if 9 <= edge < extent - 9:
                    at_edges.append(np.take(jumps, edge - 1, axis=axis).mean())
                    beside.extend(np.take(jumps, edge - 1 + offset, axis=axis).mean()
                                  for offset in (-8, -4, 4, 8))
    return float(np.mean(at_edges)), float(np.mean(beside))


# --------------------------------------------------------------------- agreement with a whole pass


@pytest.mark.parametrize("dims", [2, 3])
def test_tiled_prediction_matches_whole_pass_without_seams(dims, model_2d, model_3d):
    model, shape, tile = ((model_2d, (250, 262), 64) if dims == 2 else (model_3d, (30, 42, 46), 32))
    image, _ = _blobs(shape, 100 if dims == 2 else 10, np.random.default_rng(5))
    whole = _whole(model, image)

    tiled = {}
    for blend in ("gaussian", "constant"):
        tiled[blend] = predict(model, image, tile=tile, overlap=0.25, blend=blend, device="cpu",
                               precision="fp32", normalization=False)
        assert tiled[blend].shape == (2, *shape) and tiled[blend].dtype == np.float32
        np.testing.assert_allclose(tiled[blend].sum(axis=0), 1.0, atol=1e-5)

    assert _dice(tiled["gaussian"][1] >= 0.5, whole >= 0.5) >= 0.995
    # no visible seam: across tile edges the difference to the whole pass changes no more than
    # between neighbouring pixels inside tiles...
    # (1.5x: with a handful of edges the two means scatter by about +-35% around equal)
    edge, inside = _edge_jumps(tiled["gaussian"][1] - whole, tile, 0.25)
    assert edge <= 1.5 * inside
    # ...whereas a plain average does show its seams (the measure can fail)
    edge_constant, inside_constant = _edge_jumps(tiled["constant"][1] - whole, tile, 0.25)
    assert edge_constant > 2 * inside_constant and edge_constant > 5 * edge


def test_whole_image_in_one_tile_equals_a_forward_pass(model_2d):
    image, _ = _blobs((40, 52), 5, np.random.default_rng(1))
    probs = predict(model_2d, image, tile=512, device="cpu", precision="fp32", normalization=False)
    np.testing.assert_allclose(probs[1], _whole(model_2d, image), atol=1e-5)


# ------------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("shape", [(5, 7), (13, 30), (3, 9, 11)])
def test_images_smaller_than_one_tile_and_odd_sizes(model_2d, shape):
    image = np.random.default_rng(2).random(shape, dtype=np.float32)
    probs = predict(model_2d, image, tile=32, device="cpu")
    assert probs.shape == (2, *shape)
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1


def test_one_slice_stack_matches_the_2d_image(model_2d):
    image, _ = _blobs((37, 45), 4, np.random.default_rng(3))
    single = predict(model_2d, image, tile=24, device="cpu")
    stack = predict(model_2d, image[None], tile=24, device="cpu")
    assert single.shape == (2, 37, 45) and stack.shape == (2, 1, 37, 45)
    np.testing.assert_allclose(stack[:, 0], single, atol=1e-6)


def test_stack_is_predicted_slice_by_slice(model_2d):
    stack, _ = _blobs((5, 33, 41), 12, np.random.default_rng(4))
    stats = {"method": "percentile", "lo": float(stack.min()), "hi": float(stack.max())}
    probs = predict(model_2d, stack, tile=24, batch_size=3, device="cpu", normalization=stats)
    for z in (0, 4):
        alone = predict(model_2d, stack[z], tile=24, device="cpu", normalization=stats)
        np.testing.assert_allclose(probs[:, z], alone, atol=1e-5)


def _uneven_stack(rng: np.random.Generator) -> np.ndarray:
    """A uint16 stack whose slices are one image at different brightness and contrast, as the
    sections of an EM stack often are."""
    image, _ = _blobs((48, 56), 8, rng)
    raw = (image - image.min()) / (image.max() - image.min())
    gains, offsets = (1000, 3000, 2000), (100, 2000, 5000)
    return np.stack([np.round(raw * g + o) for g, o in zip(gains, offsets)]).astype(np.uint16)


def test_a_2d_models_stack_is_normalised_slice_by_slice_as_in_training(model_2d, tmp_path):
    # the trainer normalises each training slice on its own percentiles; so must prediction, or
    # a brighter slice is segmented as a different image
    stack = _uneven_stack(np.random.default_rng(21))
    probs = predict(model_2d, stack, tile=32, batch_size=2, device="cpu")
    for z in range(3):
        alone = predict(model_2d, stack[z], tile=32, device="cpu")
        np.testing.assert_allclose(probs[:, z], alone, atol=1e-5)
    # the slices differ only by an affine intensity change: percentiles cancel it (up to the
    # uint16 rounding), so every slice gets the same segmentation
    np.testing.assert_allclose(probs[:, 0], probs[:, 2], atol=0.01)
    whole_stack = inference.image_io.compute_normalization(stack)
    one_statistics = predict(model_2d, stack, tile=32, device="cpu", normalization=whole_stack)
    assert np.abs(one_statistics[:, 2] - probs[:, 2]).max() > 0.05

    stored = zarr.open_array(str(tmp_path / "stack.zarr"), mode="w", shape=stack.shape,
                             chunks=(1, 24, 24), dtype="uint16")
    stored[...] = stack
    np.testing.assert_allclose(predict(model_2d, stored, tile=32, device="cpu"), probs, atol=1e-6)
    # dask chunks cut the slices into pieces; each is still normalised as its whole slice
    lazy = predict(model_2d, da.from_array(stack, chunks=(2, 30, 30)), tile=32, device="cpu")
    assert _dice(lazy[1] >= 0.5, probs[1] >= 0.5) >= 0.995
    assert np.abs(lazy - probs).mean() < 5e-3


def test_a_3d_models_volume_is_normalised_as_a_whole(model_3d):
    volume = _uneven_stack(np.random.default_rng(22))[:, :32, :32]
    volume = np.concatenate([volume] * 6)  # 18 planes, brightness changing along z
    whole = inference.image_io.compute_normalization(volume)
    np.testing.assert_allclose(predict(model_3d, volume, tile=16, device="cpu"),
                               predict(model_3d, volume, tile=16, device="cpu", normalization=whole))


def test_channel_axes_2d_and_3d():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("unet", in_channels=2, out_channels=3, width=4, depth=2).eval()
    stack = rng.random((3, 2, 20, 24), dtype=np.float32)  # (Z, C, Y, X)
    probs = predict(model, stack, tile=16, device="cpu", precision="fp32", normalization=False)
    assert probs.shape == (3, 3, 20, 24)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)  # softmax over 3 classes
    image = predict(model, stack[1], tile=16, device="cpu", precision="fp32",
                    normalization=False)  # (C, Y, X)
    np.testing.assert_allclose(image, probs[:, 1], atol=1e-5)

    model_3d = build_model("unet3d", in_channels=2, out_channels=1, width=4, depth=2).eval()
    volume = rng.random((2, 9, 12, 13), dtype=np.float32)  # (C, Z, Y, X)
    assert predict(model_3d, volume, tile=8, device="cpu", precision="fp32").shape == (2, 9, 12, 13)


def test_bad_input_raises_plain_value_errors(model_2d, model_3d):
    with pytest.raises(ValueError, match="input channel"):
        predict(model_2d, np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="3D model"):
        predict(model_3d, np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        predict(model_2d, np.zeros((8, 8), np.float32), overlap=1.0)
    with pytest.raises(ValueError, match="blend"):
        predict(model_2d, np.zeros((8, 8), np.float32), blend="median")
    with pytest.raises(ValueError, match="tile"):
        predict(model_2d, np.zeros((8, 8), np.float32), tile=(8, 8, 8))
    with pytest.raises(ValueError, match="out must have shape"):
        predict(model_2d, np.zeros((8, 8), np.float32), out=np.zeros((2, 4, 4), np.float32))


def test_3d_volume_smaller_than_a_tile_and_one_slice_deep(model_3d):
    volume = np.random.default_rng(6).random((1, 10, 7), dtype=np.float32)
    probs = predict(model_3d, volume, tile=16, device="cpu")
    assert probs.shape == (2, 1, 10, 7) and np.isfinite(probs).all()


# ----------------------------------------------------------------------------- progress and cancel


def test_progress_reaches_total_and_cancel_stops_within_one_batch(model_2d, monkeypatch):
    image = np.random.default_rng(7).random((3, 40, 40), dtype=np.float32)
    calls = []
    predict(model_2d, image, tile=16, overlap=0.25, batch_size=4, device="cpu",
            progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls[-1] == (total, total) and total == 3 * 9
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})  # increasing

    batches = []
    real_run_batch = inference._run_batch
    monkeypatch.setattr(inference, "_run_batch",
                        lambda *args, **kw: batches.append(1) or real_run_batch(*args, **kw))
    progress = []
    with pytest.raises(PredictionCancelled):
        predict(model_2d, image, tile=16, batch_size=4, device="cpu",
                progress=lambda done, total: progress.append(done),
                cancel=lambda: len(progress) >= 2)
    assert len(batches) == 2 and progress == [4, 8]


# ------------------------------------------------------------------------------ lazy inputs, out=


def test_dask_and_zarr_inputs_and_outputs_match_numpy(model_2d, model_3d, tmp_path):
    stack, _ = _blobs((4, 60, 70), 20, np.random.default_rng(8))
    expected = predict(model_2d, stack, tile=32, device="cpu")

    stored = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=stack.shape,
                             chunks=(1, 32, 32), dtype="float32")
    stored[...] = stack
    np.testing.assert_allclose(predict(model_2d, stored, tile=32, device="cpu"), expected, atol=1e-6)

    lazy = da.from_array(stack, chunks=(2, 40, 40))
    from_dask = predict(model_2d, lazy, tile=32, device="cpu")
    assert isinstance(from_dask, np.ndarray) and from_dask.shape == expected.shape
    # chunks are predicted with half a tile of context, so only tile blending differs
    assert _dice(from_dask[1] >= 0.5, expected[1] >= 0.5) >= 0.995
    assert np.abs(from_dask - expected).mean() < 5e-3

    written = predict(model_2d, stack, tile=32, device="cpu", out=tmp_path / "out.zarr")
    np.testing.assert_allclose(np.asarray(written[...]), expected, atol=1e-6)
    reopened = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert reopened.shape == expected.shape

    into = zarr.open_array(str(tmp_path / "dask-out.zarr"), mode="w", shape=expected.shape,
                           chunks=(2, 1, 30, 35), dtype="float32")
    assert predict(model_2d, lazy, tile=32, device="cpu", out=into) is into
    np.testing.assert_allclose(into[...], from_dask, atol=1e-6)

    volume, _ = _blobs((24, 40, 36), 6, np.random.default_rng(9))
    whole_3d = predict(model_3d, volume, tile=24, device="cpu")
    lazy_3d = predict(model_3d, da.from_array(volume, chunks=(12, 20, 18)), tile=24, device="cpu")
    assert _dice(lazy_3d[1] >= 0.5, whole_3d[1] >= 0.5) >= 0.98


class _RecordingArray:
    """An output array that records which Z planes each write covers."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.data = np.full(shape, np.nan, dtype=np.float32)
        self.shape, self.dtype, self.writes = shape, self.data.dtype, []

    def __setitem__(self, index, value) -> None:
        plane = index[1]
        self.writes.append((plane.start, plane.stop))
        self.data[index] = value


def test_results_stream_out_slab_by_slab(model_3d):
    volume = np.random.default_rng(10).random((40, 16, 16), dtype=np.float32)
    target = _RecordingArray((2, 40, 16, 16))
    predict(model_3d, volume, tile=8, overlap=0.25, device="cpu", out=target)
    assert len(target.writes) > 3  # several slabs, not one write at the end
    assert [stop for _, stop in target.writes][-1] == 40
    assert all(a[1] == b[0] for a, b in zip(target.writes, target.writes[1:]))  # in order, no gaps
    assert max(stop - start for start, stop in target.writes) <= 8
    assert not np.isnan(target.data).any()


# --------------------------------------------------------------------------- out-of-memory retries


def _fake_cuda(monkeypatch, failures: int | None, log: list) -> None:
    """Pretend a CUDA device exists whose forward passes run out of memory ``failures`` times."""
    real_run_batch = inference._run_batch
    count = {"failed": 0}

    def run_batch(model, inputs, device, dtype, tta):
        log.append((device.type, inputs.shape[0], inputs.shape[-2:]))
        if device.type == "cuda":
            if failures is None or count["failed"] < failures:
                count["failed"] += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            device = torch.device("cpu")  # the "GPU" computes on the CPU once it has room
        return real_run_batch(model, inputs, device, dtype, tta)

    monkeypatch.setattr(inference, "_run_batch", run_batch)
    monkeypatch.setattr(inference, "_prepare_model",
                        lambda model, device: model.to("cpu") if device.type == "cpu" else model)
    monkeypatch.setattr(devices, "resolve_device", lambda spec: torch.device("cuda"))
    monkeypatch.setattr(devices, "free_memory", lambda device: 8 * 2**30)


def test_out_of_memory_halves_the_batch_then_the_tile(model_2d, monkeypatch):
    image = np.random.default_rng(11).random((2, 64, 64), dtype=np.float32)
    expected_small_tile = predict(model_2d, image, tile=16, batch_size=1, device="cpu",
                                  precision="fp32")
    log: list = []
    _fake_cuda(monkeypatch, failures=2, log=log)
    probs = predict(model_2d, image, tile=32, batch_size=2, device="cuda", precision="fp32")
    attempts = [(batch, tuple(tile)) for _, batch, tile in log[:4]]
    assert attempts == [(2, (32, 32)), (1, (32, 32)), (1, (16, 16)), (1, (16, 16))]
    assert all(kind == "cuda" for kind, _, _ in log)
    np.testing.assert_allclose(probs, expected_small_tile, atol=1e-6)


def test_out_of_memory_falls_back_to_the_cpu_with_a_warning(model_2d, monkeypatch):
    image = np.random.default_rng(12).random((48, 48), dtype=np.float32)
    expected = predict(model_2d, image, tile=32, batch_size=2, device="cpu", precision="fp32")
    log: list = []
    _fake_cuda(monkeypatch, failures=None, log=log)
    with pytest.warns(DeviceFallbackWarning, match="CPU"):
        probs = predict(model_2d, image, tile=32, batch_size=2, device="cuda", precision="fp32")
    tried = [(kind, batch, tuple(tile)) for kind, batch, tile in log if kind == "cuda"]
    assert tried == [("cuda", 2, (32, 32)), ("cuda", 1, (32, 32)), ("cuda", 1, (16, 16)),
                     ("cuda", 1, (8, 8)), ("cuda", 1, (4, 4))]
    assert log[-1][0] == "cpu"
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_the_prediction_copy_leaves_the_accelerator_when_predict_returns(model_2d, monkeypatch):
    _fake_cuda(monkeypatch, failures=0, log=[])
    moves, released = [], []
    lean = inference._lean_model(model_2d)
    real_to = lean.to
    monkeypatch.setattr(lean, "to", lambda *a, **k: (moves.append(a), real_to(*a, **k))[1])
    monkeypatch.setattr(devices, "release_memory", lambda device=None: released.append(device))
    predict(model_2d, np.zeros((40, 40), np.float32), tile=32, device="cuda")
    assert moves[-1] == ("cpu",) and released and released[-1].type == "cuda"


def test_errors_other_than_out_of_memory_are_not_retried(model_2d, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(inference, "_run_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        predict(model_2d, np.zeros((32, 32), np.float32), tile=16, batch_size=4, device="cpu")
    assert len(calls) == 1


# ------------------------------------------------------------------------ devices, precision, TTA


def test_device_and_precision_selection(model_2d, monkeypatch):
    seen = []
    real_run_batch = inference._run_batch

    def spy(model, inputs, device, dtype, tta):
        seen.append((device, dtype))
        return real_run_batch(model, inputs, device, dtype, tta)

    monkeypatch.setattr(inference, "_run_batch", spy)
    image = np.random.default_rng(13).random((32, 32), dtype=np.float32)
    fp32 = predict(model_2d, image, device="cpu", precision="fp32")
    bf16 = predict(model_2d, image, device="cpu", precision="bf16")
    assert seen[0] == (torch.device("cpu"), None) and seen[-1] == (torch.device("cpu"), torch.bfloat16)
    assert np.abs(fp32 - bf16).max() < 0.1
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            predict(model_2d, image, device="cuda")


def test_auto_precision_on_cpu_uses_bf16_only_where_measured_faster(model_2d, monkeypatch):
    seen = []
    real_run_batch = inference._run_batch
    monkeypatch.setattr(inference, "_run_batch", lambda m, x, d, dtype, tta: seen.append(dtype)
                        or real_run_batch(m, x, d, dtype, tta))
    image = np.zeros((16, 16), np.float32)
    for supported, faster in ((False, True), (True, False), (True, True)):
        monkeypatch.setattr(devices, "cpu_supports_bf16", lambda supported=supported: supported)
        monkeypatch.setattr(inference, "_cpu_bf16_is_faster", lambda model, faster=faster: faster)
        predict(model_2d, image, device="cpu")
    assert seen == [None, None, torch.bfloat16]


def test_bf16_measurement_runs_once_per_architecture(monkeypatch):
    model = build_model("unet", width=4, depth=2).eval()
    monkeypatch.setattr(inference, "_BF16_MEASUREMENTS", {})
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    assert inference._cpu_bf16_is_faster(model) in (True, False)
    assert len(calls) == 8  # a warm-up and 3 timed runs, in fp32 and in bf16
    inference._cpu_bf16_is_faster(build_model("unet", width=4, depth=2))
    assert len(calls) == 8


def test_model_stays_on_device_and_keeps_its_mode(model_2d):
    model_2d.train()
    try:
        predict(model_2d, np.zeros((16, 16), np.float32), device="cpu")
        assert model_2d.training
        assert next(model_2d.parameters()).device.type == "cpu"
    finally:
        model_2d.eval()


def test_tta_is_flip_equivariant_and_close_to_plain(model_2d, model_3d):
    image, _ = _blobs((40, 36), 6, np.random.default_rng(14))
    options = {"device": "cpu", "precision": "fp32", "normalization": False}
    plain = predict(model_2d, image, tile=64, **options)
    tta = predict(model_2d, image, tile=64, tta=True, **options)
    flipped = predict(model_2d, image[::-1, ::-1].copy(), tile=64, tta=True, **options)
    np.testing.assert_allclose(flipped[:, ::-1, ::-1], tta, atol=1e-5)
    transposed = predict(model_2d, image.T.copy(), tile=64, tta=True, **options)  # 2D: square symmetries
    np.testing.assert_allclose(np.swapaxes(transposed, 1, 2), tta, atol=1e-5)
    assert _dice(tta[1] >= 0.5, plain[1] >= 0.5) > 0.9
    volume = np.random.default_rng(15).random((8, 12, 10), dtype=np.float32)
    tta_3d = predict(model_3d, volume, tile=16, tta=True, **options)
    flipped_3d = predict(model_3d, volume[::-1].copy(), tile=16, tta=True, **options)
    np.testing.assert_allclose(flipped_3d[:, ::-1], tta_3d, atol=1e-5)


def test_normalization_options_agree(model_2d):
    raw = (np.random.default_rng(16).random((30, 30)) * 1000).astype(np.uint16)
    stats = inference.image_io.compute_normalization(raw)
    default = predict(model_2d, raw, device="cpu")
    np.testing.assert_allclose(predict(model_2d, raw, device="cpu", normalization=stats), default)
    normalised = inference.image_io.apply_normalization(raw, stats)
    np.testing.assert_allclose(predict(model_2d, normalised, device="cpu", normalization=False),
                               default, atol=1e-6)
    minmax = predict(model_2d, raw, device="cpu", normalization={"method": "minmax"})
    assert not np.allclose(minmax, default)


def test_automatic_tiling_fits_the_image_and_memory(model_2d, model_3d):
    plan = inference.choose_tiling(model_2d, (30, 700, 90), torch.device("cpu"))
    assert plan.tile == (1, 512, 92) and 1 <= plan.batch_size <= 4
    plan_3d = inference.choose_tiling(model_3d, (20, 300, 300), torch.device("cpu"))
    assert plan_3d.tile == (20, 128, 128) and plan_3d.batch_size == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predict(model_2d, np.zeros((30, 20), np.float32), device="cpu").shape == (2, 30, 20)


# ---------------------------------------------------------------------------- labels and instances


def test_probabilities_to_labels_and_instances():
    binary = np.zeros((2, 4, 5), np.float32)
    binary[1, 1:3, 1:4] = 0.7
    binary[0] = 1 - binary[1]
    labels = probabilities_to_labels(binary, threshold=0.6)
    assert labels.dtype == np.uint8 and labels.sum() == 6
    assert probabilities_to_labels(binary, threshold=0.8).sum() == 0

    multi = np.random.default_rng(17).random((3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(probabilities_to_labels(multi), multi.argmax(axis=0))

    # ISBI-like: interior (class 1) cells separated by one-pixel membranes (class 0)
    cells = np.ones((7, 7), np.uint8)
    cells[3, :] = 0
    cells[:, 3] = 0
    instances = labels_to_instances(cells)
    assert instances.max() == 4 and (instances[cells == 0] == 0).all()
    with pytest.raises(ValueError):
        probabilities_to_labels(np.zeros((1, 4, 4)))


def test_gaussian_window_has_monai_sigma_and_fades_out_at_the_edges():
    window = inference.gaussian_window(64)
    assert window.max() == pytest.approx(1.0) and window[0] == window[-1] < 0.01
    # a Gaussian with sigma = 64 / 8 (shifted to reach ~0 just past the edge)
    gaussian = np.exp(-0.5 * ((np.arange(64) - 31.5) / 8.0) ** 2)
    ratio = (window[16:48] + 1e-12) / (gaussian[16:48] - np.exp(-8.0))
    assert np.allclose(ratio, ratio[0], rtol=1e-4)
    np.testing.assert_array_equal(inference.gaussian_window(8, "constant"), np.ones(8))


# ------------------------------------------------------------------------------------------ GPU


def _cuda_block_bytes(module: torch.nn.Module) -> int:
    """What ``module``'s tensors take in PyTorch's CUDA allocator (blocks of 512 bytes)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)


@pytest.fixture
def exact_cuda_fp32(monkeypatch):
    """cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa); compare with CPU in true fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.gpu
def test_cuda_prediction_matches_cpu_and_releases_memory(model_2d, exact_cuda_fp32):
    image, _ = _blobs((2, 200, 180), 20, np.random.default_rng(18))
    on_cpu = predict(model_2d, image, tile=64, device="cpu")
    before = torch.cuda.memory_allocated()
    on_gpu = predict(model_2d, image, tile=64, device="cuda", precision="fp32")
    # no activations and no weights of the call stay on the GPU: the prediction copy went back to the CPU
    assert torch.cuda.memory_allocated() - before <= _cuda_block_bytes(inference._lean_model(model_2d))
    assert next(inference._lean_model(model_2d).parameters()).device.type == "cpu"
    assert torch.cuda.memory_reserved() <= torch.cuda.memory_allocated() + 2**21
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)
    mixed = predict(model_2d, image, tile=64, device="cuda")  # bf16/fp16 autocast
    assert _dice(mixed[1] >= 0.5, on_cpu[1] >= 0.5) > 0.99


def test_the_lean_prediction_copy_is_reused_until_the_weights_change():
    import torch

    from napari_unet.models import build_model

    model = build_model("unet", in_channels=1, out_channels=1, width=4, depth=2)
    first = inference._lean_model(model)
    assert first is not model and inference._lean_model(model) is first
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a training step
    assert inference._lean_model(model) is not first


@pytest.mark.gpu
def test_real_cuda_out_of_memory_halves_the_batch_and_stays_on_the_gpu(caplog):
    """A 1.5 GiB cap on PyTorch's allocator makes a batch of 32 512^2 tiles of a width-32 UNet fail."""
    import logging

    torch.manual_seed(0)
    model = build_model("unet", width=32, depth=4).eval()
    image = np.random.default_rng(19).random((32, 512, 512), dtype=np.float32)
    before = torch.cuda.memory_allocated()
    reference = predict(model, image, tile=512, batch_size=2, device="cuda", precision="fp32")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.5 * 2**30 / total)
    try:
        with caplog.at_level(logging.INFO, logger="napari_unet.inference"), warnings.catch_warnings():
            warnings.simplefilter("error", DeviceFallbackWarning)  # it must not give up on the GPU
            probs = predict(model, image, tile=512, batch_size=32, device="cuda", precision="fp32")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    retries = [r.getMessage() for r in caplog.records if "out of memory with" in r.getMessage()]
    assert retries and "batch_size=32" in retries[0]
    np.testing.assert_allclose(probs, reference, atol=5e-3)  # TF32 convolutions, other batch sizes
    # at most the prediction copy's weights stay allocated (it now goes back to the CPU), and at most
    # one 20 MiB large-block segment of slack stays reserved
    assert torch.cuda.memory_allocated() - before <= _cuda_block_bytes(inference._lean_model(model))
    assert torch.cuda.memory_reserved() <= torch.cuda.memory_allocated() + 20 * 2**20


@pytest.mark.gpu
def test_cuda_3d_prediction_with_automatic_tiles_matches_cpu(model_3d, exact_cuda_fp32):
    image, _ = _blobs((40, 72, 72), 12, np.random.default_rng(21))
    on_cpu = predict(model_3d, image, tile=32, device="cpu")
    on_gpu = predict(model_3d, image, tile=32, device="cuda", precision="fp32")
    # cuDNN's fp32 3D convolution algorithms round differently from oneDNN's (measured on an H100:
    # 0.8% of the probabilities differ by more than 1e-3, at most by 0.02, on this sharp toy model)
    difference = np.abs(on_gpu - on_cpu)
    assert difference.mean() < 2e-3 and difference.max() < 0.05
    assert _dice(on_gpu[1] >= 0.5, on_cpu[1] >= 0.5) > 0.99
    automatic = predict(model_3d, image, device="cuda")  # tile, batch and bf16/fp16 chosen for the GPU
    assert _dice(automatic[1] >= 0.5, on_cpu[1] >= 0.5) > 0.98


def test_float16_probabilities_match_float32_for_numpy_and_dask(model_2d, model_3d):
    image, _ = _blobs((3, 70, 90), 12, np.random.default_rng(23))
    full = predict(model_2d, image, tile=32)
    half = predict(model_2d, image, tile=32, dtype="float16")
    assert full.dtype == np.float32 and half.dtype == np.float16 and half.shape == full.shape
    np.testing.assert_allclose(half, full, atol=1e-3)
    from_dask = predict(model_2d, da.from_array(image, chunks=(1, 70, 90)), tile=32, dtype=np.float16)
    assert from_dask.dtype == np.float16
    np.testing.assert_allclose(from_dask, full, atol=1e-3)
    volume, _ = _blobs((20, 40, 40), 4, np.random.default_rng(24))
    np.testing.assert_allclose(predict(model_3d, volume, tile=16, dtype="float16"),
                               predict(model_3d, volume, tile=16), atol=1e-3)
    with pytest.raises(ValueError, match="float32 or float16"):
        predict(model_2d, image, dtype="int8")
