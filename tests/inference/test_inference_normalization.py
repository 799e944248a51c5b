"""Normalisation as in training: a 2D model's stack slice by slice, a 3D volume whole
(normalization.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr
from inference_toys import blobs, dice

from napari_unet import io as image_io
from napari_unet.inference import predict


def _uneven_stack(rng: np.random.Generator) -> np.ndarray:
    """A uint16 stack whose slices are one image at different brightness and contrast, as the
    sections of an EM stack often are."""
    image, _ = blobs((48, 56), 8, rng)
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
    whole_stack = image_io.compute_normalization(stack)
    one_statistics = predict(model_2d, stack, tile=32, device="cpu", normalization=whole_stack)
    assert np.abs(one_statistics[:, 2] - probs[:, 2]).max() > 0.05

    stored = zarr.open_array(str(tmp_path / "stack.zarr"), mode="w", shape=stack.shape,
                             chunks=(1, 24, 24), dtype="uint16")
    stored[...] = stack
    np.testing.assert_allclose(predict(model_2d, stored, tile=32, device="cpu"), probs, atol=1e-6)
    # dask chunks cut the slices into pieces; each is still normalised as its whole slice
    lazy = predict(model_2d, da.from_array(stack, chunks=(2, 30, 30)), tile=32, device="cpu")
    assert dice(lazy[1] >= 0.5, probs[1] >= 0.5) >= 0.995
    assert np.abs(lazy - probs).mean() < 5e-3


def test_a_3d_models_volume_is_normalised_as_a_whole(model_3d):
    volume = _uneven_stack(np.random.default_rng(22))[:, :32, :32]
    volume = np.concatenate([volume] * 6)  # 18 planes, brightness changing along z
    whole = image_io.compute_normalization(volume)
    np.testing.assert_allclose(predict(model_3d, volume, tile=16, device="cpu"),
                               predict(model_3d, volume, tile=16, device="cpu", normalization=whole))


def test_normalization_options_agree(model_2d):
    raw = (np.random.default_rng(16).random((30, 30)) * 1000).astype(np.uint16)
    stats = image_io.compute_normalization(raw)
    default = predict(model_2d, raw, device="cpu")
    np.testing.assert_allclose(predict(model_2d, raw, device="cpu", normalization=stats), default)
    normalised = image_io.apply_normalization(raw, stats)
    np.testing.assert_allclose(predict(model_2d, normalised, device="cpu", normalization=False),
                               default, atol=1e-6)
    minmax = predict(model_2d, raw, device="cpu", normalization={"method": "minmax"})
    assert not np.allclose(minmax, default)

