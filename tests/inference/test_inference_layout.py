"""Input layouts: 2D images, stacks, channels, 3D volumes, images smaller than a tile (layout.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_toys import blobs

from napari_unet.inference import predict
from napari_unet.models import build_model


@pytest.mark.parametrize("shape", [(5, 7), (13, 30), (3, 9, 11)])
def test_images_smaller_than_one_tile_and_odd_sizes(model_2d, shape):
    image = np.random.default_rng(2).random(shape, dtype=np.float32)
    probs = predict(model_2d, image, tile=32, device="cpu")
    assert probs.shape == (2, *shape)
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1


def test_one_slice_stack_matches_the_2d_image(model_2d):
    image, _ = blobs((37, 45), 4, np.random.default_rng(3))
    single = predict(model_2d, image, tile=24, device="cpu")
    stack = predict(model_2d, image[None], tile=24, device="cpu")
    assert single.shape == (2, 37, 45) and stack.shape == (2, 1, 37, 45)
    np.testing.assert_allclose(stack[:, 0], single, atol=1e-6)


def test_stack_is_predicted_slice_by_slice(model_2d):
    stack, _ = blobs((5, 33, 41), 12, np.random.default_rng(4))
    stats = {"method": "percentile", "lo": float(stack.min()), "hi": float(stack.max())}
    probs = predict(model_2d, stack, tile=24, batch_size=3, device="cpu", normalization=stats)
    for z in (0, 4):
        alone = predict(model_2d, stack[z], tile=24, device="cpu", normalization=stats)
        np.testing.assert_allclose(probs[:, z], alone, atol=1e-5)


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


def test_3d_volume_smaller_than_a_tile_and_one_slice_deep(model_3d):
    volume = np.random.default_rng(6).random((1, 10, 7), dtype=np.float32)
    probs = predict(model_3d, volume, tile=16, device="cpu")
    assert probs.shape == (2, 1, 10, 7) and np.isfinite(probs).all()

