"""Tile plans: one tile over a whole image; automatic tiles that fit the image and memory (tiling.py)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from inference_toys import blobs, whole_pass

from napari_unet import inference
from napari_unet.inference import predict


def test_whole_image_in_one_tile_equals_a_forward_pass(model_2d):
    image, _ = blobs((40, 52), 5, np.random.default_rng(1))
    probs = predict(model_2d, image, tile=512, device="cpu", precision="fp32", normalization=False)
    np.testing.assert_allclose(probs[1], whole_pass(model_2d, image), atol=1e-5)


def test_automatic_tiling_fits_the_image_and_memory(model_2d, model_3d):
    plan = inference.choose_tiling(model_2d, (30, 700, 90), torch.device("cpu"))
    assert plan.tile == (1, 512, 92) and 1 <= plan.batch_size <= 4
    plan_3d = inference.choose_tiling(model_3d, (20, 300, 300), torch.device("cpu"))
    assert plan_3d.tile == (20, 128, 128) and plan_3d.batch_size == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predict(model_2d, np.zeros((30, 20), np.float32), device="cpu").shape == (2, 30, 20)

