"""Running the model: out-of-memory retries, the prediction copy, devices, precision, TTA, and the
GPU checks (runner.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from inference_toys import blobs, dice

from napari_unet import devices
from napari_unet.inference import DeviceFallbackWarning, predict, runner
from napari_unet.models import build_model


def _fake_cuda(monkeypatch, failures: int | None, log: list) -> None:
    """Pretend a CUDA device exists whose forward passes run out of memory ``failures`` times."""
    real_run_batch = runner._run_batch
    count = {"failed": 0}

    def run_batch(model, inputs, device, dtype, tta):
        log.append((device.type, inputs.shape[0], inputs.shape[-2:]))
        if device.type == "cuda":
            if failures is None or count["failed"] < failures:
                count["failed"] += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            device = torch.device("cpu")  # the "GPU" computes on the CPU once it has room
        return real_run_batch(model, inputs, device, dtype, tta)

    monkeypatch.setattr(runner, "_run_batch", run_batch)
    monkeypatch.setattr(runner, "_prepare_model",
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
    lean = runner._lean_model(model_2d)
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

    monkeypatch.setattr(runner, "_run_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        predict(model_2d, np.zeros((32, 32), np.float32), tile=16, batch_size=4, device="cpu")
    assert len(calls) == 1


def test_device_and_precision_selection(model_2d, monkeypatch):
    seen = []
    real_run_batch = runner._run_batch

    def spy(model, inputs, device, dtype, tta):
        seen.append((device, dtype))
        return real_run_batch(model, inputs, device, dtype, tta)

    monkeypatch.setattr(runner, "_run_batch", spy)
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
    real_run_batch = runner._run_batch
    monkeypatch.setattr(runner, "_run_batch", lambda m, x, d, dtype, tta: seen.append(dtype)
                        or real_run_batch(m, x, d, dtype, tta))
    image = np.zeros((16, 16), np.float32)
    for supported, faster in ((False, True), (True, False), (True, True)):
        monkeypatch.setattr(devices, "cpu_supports_bf16", lambda supported=supported: supported)
        monkeypatch.setattr(runner, "_cpu_bf16_is_faster", lambda model, faster=faster: faster)
        predict(model_2d, image, device="cpu")
    assert seen == [None, None, torch.bfloat16]


def test_bf16_measurement_runs_once_per_architecture(monkeypatch):
    model = build_model("unet", width=4, depth=2).eval()
    monkeypatch.setattr(runner, "_BF16_MEASUREMENTS", {})
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    assert runner._cpu_bf16_is_faster(model) in (True, False)
    assert len(calls) == 8  # a warm-up and 3 timed runs, in fp32 and in bf16
    runner._cpu_bf16_is_faster(build_model("unet", width=4, depth=2))
    assert len(calls) == 8


def test_tta_is_flip_equivariant_and_close_to_plain(model_2d, model_3d):
    image, _ = blobs((40, 36), 6, np.random.default_rng(14))
    options = {"device": "cpu", "precision": "fp32", "normalization": False}
    plain = predict(model_2d, image, tile=64, **options)
    tta = predict(model_2d, image, tile=64, tta=True, **options)
    flipped = predict(model_2d, image[::-1, ::-1].copy(), tile=64, tta=True, **options)
    np.testing.assert_allclose(flipped[:, ::-1, ::-1], tta, atol=1e-5)
    transposed = predict(model_2d, image.T.copy(), tile=64, tta=True, **options)  # 2D: square symmetries
    np.testing.assert_allclose(np.swapaxes(transposed, 1, 2), tta, atol=1e-5)
    assert dice(tta[1] >= 0.5, plain[1] >= 0.5) > 0.9
    volume = np.random.default_rng(15).random((8, 12, 10), dtype=np.float32)
    tta_3d = predict(model_3d, volume, tile=16, tta=True, **options)
    flipped_3d = predict(model_3d, volume[::-1].copy(), tile=16, tta=True, **options)
    np.testing.assert_allclose(flipped_3d[:, ::-1], tta_3d, atol=1e-5)


def test_the_lean_prediction_copy_is_reused_until_the_weights_change():
    import torch

    from napari_unet.models import build_model

    model = build_model("unet", in_channels=1, out_channels=1, width=4, depth=2)
    first = runner._lean_model(model)
    assert first is not model and runner._lean_model(model) is first
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a training step
    assert runner._lean_model(model) is not first


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
    image, _ = blobs((2, 200, 180), 20, np.random.default_rng(18))
    on_cpu = predict(model_2d, image, tile=64, device="cpu")
    before = torch.cuda.memory_allocated()
    on_gpu = predict(model_2d, image, tile=64, device="cuda", precision="fp32")
    # no activations and no weights of the call stay on the GPU: the prediction copy went back to the CPU
    assert torch.cuda.memory_allocated() - before <= _cuda_block_bytes(runner._lean_model(model_2d))
    assert next(runner._lean_model(model_2d).parameters()).device.type == "cpu"
    assert torch.cuda.memory_reserved() <= torch.cuda.memory_allocated() + 2**21
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)
    mixed = predict(model_2d, image, tile=64, device="cuda")  # bf16/fp16 autocast
    assert dice(mixed[1] >= 0.5, on_cpu[1] >= 0.5) > 0.99


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
    assert torch.cuda.memory_allocated() - before <= _cuda_block_bytes(runner._lean_model(model))
    assert torch.cuda.memory_reserved() <= torch.cuda.memory_allocated() + 20 * 2**20


@pytest.mark.gpu
def test_cuda_3d_prediction_with_automatic_tiles_matches_cpu(model_3d, exact_cuda_fp32):
    image, _ = blobs((40, 72, 72), 12, np.random.default_rng(21))
    on_cpu = predict(model_3d, image, tile=32, device="cpu")
    on_gpu = predict(model_3d, image, tile=32, device="cuda", precision="fp32")
    # cuDNN's fp32 3D convolution algorithms round differently from oneDNN's (measured on an H100:
    # 0.8% of the probabilities differ by more than 1e-3, at most by 0.02, on this sharp toy model)
    difference = np.abs(on_gpu - on_cpu)
    assert difference.mean() < 2e-3 and difference.max() < 0.05
    assert dice(on_gpu[1] >= 0.5, on_cpu[1] >= 0.5) > 0.99
    automatic = predict(model_3d, image, device="cuda")  # tile, batch and bf16/fp16 chosen for the GPU
    assert dice(automatic[1] >= 0.5, on_cpu[1] >= 0.5) > 0.98

