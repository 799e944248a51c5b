"""Blending tiles: no seams against a whole pass; the Gaussian window (blending.py)."""

from __future__ import annotations

import numpy as np
import pytest
from inference_toys import blobs, dice, whole_pass

from napari_unet import inference
from napari_unet.inference import predict, tiling


def _edge_jumps(error: np.ndarray, tile: int, overlap: float) -> tuple[float, float]:
    """Mean jump of ``error`` between neighbouring pixels across tile edges, and just beside them.

    A visible seam is a step in the prediction where one tile ends: there the error jumps from one
    pixel to the next more than between neighbours 4 and 8 pixels away, inside the tiles (a multiple
    of 2**depth away, so both sit at the same place of the model's pooling grid).
    """
    at_edges, beside = [], []
    for axis, extent in enumerate(error.shape):
        jumps = np.abs(np.diff(error, axis=axis))  # jumps[i] is between pixels i and i + 1
        for start in tiling._tile_starts(extent, tile, overlap, 4):
            for edge in (start, start + tile):
                if 9 <= edge < extent - 9:
                    at_edges.append(np.take(jumps, edge - 1, axis=axis).mean())
                    beside.extend(np.take(jumps, edge - 1 + offset, axis=axis).mean()
                                  for offset in (-8, -4, 4, 8))
    return float(np.mean(at_edges)), float(np.mean(beside))


@pytest.mark.parametrize("dims", [2, 3])
def test_tiled_prediction_matches_whole_pass_without_seams(dims, model_2d, model_3d):
    model, shape, tile = ((model_2d, (250, 262), 64) if dims == 2 else (model_3d, (30, 42, 46), 32))
    image, _ = blobs(shape, 100 if dims == 2 else 10, np.random.default_rng(5))
    whole = whole_pass(model, image)

    tiled = {}
    for blend in ("gaussian", "constant"):
        tiled[blend] = predict(model, image, tile=tile, overlap=0.25, blend=blend, device="cpu",
                               precision="fp32", normalization=False)
        assert tiled[blend].shape == (2, *shape) and tiled[blend].dtype == np.float32
        np.testing.assert_allclose(tiled[blend].sum(axis=0), 1.0, atol=1e-5)

    assert dice(tiled["gaussian"][1] >= 0.5, whole >= 0.5) >= 0.995
    # no visible seam: across tile edges the difference to the whole pass changes no more than
    # between neighbouring pixels inside tiles...
    # (1.5x: with a handful of edges the two means scatter by about +-35% around equal)
    edge, inside = _edge_jumps(tiled["gaussian"][1] - whole, tile, 0.25)
    assert edge <= 1.5 * inside
    # ...whereas a plain average does show its seams (the measure can fail)
    edge_constant, inside_constant = _edge_jumps(tiled["constant"][1] - whole, tile, 0.25)
    assert edge_constant > 2 * inside_constant and edge_constant > 5 * edge


def test_gaussian_window_has_monai_sigma_and_fades_out_at_the_edges():
    window = inference.gaussian_window(64)
    assert window.max() == pytest.approx(1.0) and window[0] == window[-1] < 0.01
    # a Gaussian with sigma = 64 / 8 (shifted to reach ~0 just past the edge)
    gaussian = np.exp(-0.5 * ((np.arange(64) - 31.5) / 8.0) ** 2)
    ratio = (window[16:48] + 1e-12) / (gaussian[16:48] - np.exp(-8.0))
    assert np.allclose(ratio, ratio[0], rtol=1e-4)
    np.testing.assert_array_equal(inference.gaussian_window(8, "constant"), np.ones(8))

