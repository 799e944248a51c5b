"""``predict``'s options, progress and cancel, result dtypes; probabilities to labels (prediction.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from inference_toys import blobs

from napari_unet.inference import (
    PredictionCancelled,
    labels_to_instances,
    predict,
    probabilities_to_labels,
    runner,
)


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


def test_progress_reaches_total_and_cancel_stops_within_one_batch(model_2d, monkeypatch):
    image = np.random.default_rng(7).random((3, 40, 40), dtype=np.float32)
    calls = []
    predict(model_2d, image, tile=16, overlap=0.25, batch_size=4, device="cpu",
            progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls[-1] == (total, total) and total == 3 * 9
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})  # increasing

    batches = []
    real_run_batch = runner._run_batch
    monkeypatch.setattr(runner, "_run_batch",
                        lambda *args, **kw: batches.append(1) or real_run_batch(*args, **kw))
    progress = []
    with pytest.raises(PredictionCancelled):
        predict(model_2d, image, tile=16, batch_size=4, device="cpu",
                progress=lambda done, total: progress.append(done),
                cancel=lambda: len(progress) >= 2)
    assert len(batches) == 2 and progress == [4, 8]


def test_model_stays_on_device_and_keeps_its_mode(model_2d):
    model_2d.train()
    try:
        predict(model_2d, np.zeros((16, 16), np.float32), device="cpu")
        assert model_2d.training
        assert next(model_2d.parameters()).device.type == "cpu"
    finally:
        model_2d.eval()


def test_float16_probabilities_match_float32_for_numpy_and_dask(model_2d, model_3d):
    image, _ = blobs((3, 70, 90), 12, np.random.default_rng(23))
    full = predict(model_2d, image, tile=32)
    half = predict(model_2d, image, tile=32, dtype="float16")
    assert full.dtype == np.float32 and half.dtype == np.float16 and half.shape == full.shape
    np.testing.assert_allclose(half, full, atol=1e-3)
    from_dask = predict(model_2d, da.from_array(image, chunks=(1, 70, 90)), tile=32, dtype=np.float16)
    assert from_dask.dtype == np.float16
    np.testing.assert_allclose(from_dask, full, atol=1e-3)
    volume, _ = blobs((20, 40, 40), 4, np.random.default_rng(24))
    np.testing.assert_allclose(predict(model_3d, volume, tile=16, dtype="float16"),
                               predict(model_3d, volume, tile=16), atol=1e-3)
    with pytest.raises(ValueError, match="float32 or float16"):
        predict(model_2d, image, dtype="int8")


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

