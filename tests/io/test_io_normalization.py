"""Normalisation: percentile/min-max/none stats, torch and lazy inputs, histogram percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import io
from napari_unet.io import ImageIOError, normalization


def test_percentile_normalization_values():
    image = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    stats = io.compute_normalization(image, {"method": "percentile", "low": 1.0, "high": 99.0})
    assert stats["method"] == "percentile" and stats["low"] == 1.0
    assert stats["lo"] == pytest.approx(np.percentile(image, 1.0))
    assert stats["hi"] == pytest.approx(np.percentile(image, 99.0))
    normalised = io.apply_normalization(image, stats)
    assert normalised.dtype == np.float32
    assert normalised.flat[500] == pytest.approx((500 - stats["lo"]) / (stats["hi"] - stats["lo"]), rel=1e-5)


def test_minmax_none_and_default_spec():
    image = np.array([[2.0, 4.0], [6.0, 10.0]], np.float32)
    minmax = io.compute_normalization(image, {"method": "minmax"})
    np.testing.assert_allclose(io.apply_normalization(image, minmax), [[0, 0.25], [0.5, 1]])
    identity = io.compute_normalization(image, {"method": "none"})
    np.testing.assert_array_equal(io.apply_normalization(image, identity), image)
    assert io.compute_normalization(image)["high"] == io.DEFAULT_NORMALIZATION["high"]
    with pytest.raises(ImageIOError, match="unknown normalisation method 'zscore'"):
        io.compute_normalization(image, {"method": "zscore"})


def test_constant_image_does_not_divide_by_zero():
    image = np.full((4, 4), 7, np.uint8)
    stats = io.compute_normalization(image)
    normalised = io.apply_normalization(image, stats)
    assert stats["lo"] == stats["hi"] == 7.0
    assert np.isfinite(normalised).all() and (normalised == 0).all()


def test_normalization_of_torch_tensor_matches_numpy(make_stack):
    import torch

    image = make_stack(shape=(2, 8, 8))
    stats = io.compute_normalization(image)
    from_tensor = io.apply_normalization(torch.from_numpy(image), stats)
    assert isinstance(from_tensor, torch.Tensor) and from_tensor.dtype == torch.float32
    np.testing.assert_allclose(from_tensor.numpy(), io.apply_normalization(image, stats), rtol=1e-6)


def test_big_lazy_image_is_normalised_on_a_subsample(monkeypatch):
    import dask.array as da

    monkeypatch.setattr(normalization, "MAX_NORMALIZATION_SAMPLES", 20_000)
    rng = np.random.default_rng(1)
    image = rng.normal(100.0, 20.0, size=(40, 64, 64)).astype(np.float32)  # 163,840 values
    full = np.percentile(image, [1.0, 99.8])
    sample = normalization._strided_sample(image, max_values=20_000)
    assert sample.size <= 20_000 * 1.2
    from_numpy = io.compute_normalization(image)
    from_dask = io.compute_normalization(da.from_array(image, chunks=(1, 64, 64)))
    assert from_dask["lo"] == pytest.approx(from_numpy["lo"])
    assert from_dask["hi"] == pytest.approx(from_numpy["hi"])
    assert from_numpy["lo"] == pytest.approx(full[0], rel=0.05)
    assert from_numpy["hi"] == pytest.approx(full[1], rel=0.05)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int8])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 70)])
def test_integer_percentiles_from_a_histogram_match_numpy(dtype, shape):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(shape[-1])
    image = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    spec = {"method": "percentile", "low": 1.0, "high": 99.8}
    stats = io.compute_normalization(image, spec)
    expected = np.percentile(image.astype(np.float64), [1.0, 99.8])
    np.testing.assert_allclose([stats["lo"], stats["hi"]], expected, rtol=1e-12, atol=1e-9)
    constant = np.full(shape, 7, dtype)
    assert io.compute_normalization(constant, spec)["lo"] == io.compute_normalization(constant, spec)["hi"] == 7.0
