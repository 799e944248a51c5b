"""Uncertainty maps and the "correct next" ranking (napari_unet.uncertainty)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from napari_unet.inference import PredictionCancelled, predict
from napari_unet.models import build_model
from napari_unet.uncertainty import (
    METHODS,
    SCORES,
    ReviewQueue,
    box_centre,
    predict_with_uncertainty,
    rank_regions,
    rank_slices,
    slice_scores,
)


class RampModel(nn.Module):
    """Sure where the input is near 0 or 1, unsure at 0.5, where a left-to-right ramp decides.

    The ramp turns round when the image is flipped, so test-time views disagree exactly where
    the input is ambiguous (0.5), and agree where it is clear.
    """

    def __init__(self, spatial_dims: int = 2, out_channels: int = 1) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = 1
        self.out_channels = out_channels
        self.config = {"depth": 0, "width": 1}
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        ramp = torch.linspace(-2.0, 2.0, width, device=x.device, dtype=x.dtype)
        logit = self.scale * (x - 0.5) + ramp
        if self.out_channels == 1:
            return logit
        others = [torch.zeros_like(logit)] * (self.out_channels - 1)
        return torch.cat([*others, logit], dim=1)


def _stack(ambiguous: set[int], n: int = 6, shape: tuple[int, ...] = (16, 16), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slices = []
    for z in range(n):
        if z in ambiguous:
            plane = np.full(shape, 0.5, dtype=np.float32)
            plane[: shape[0] // 4] = 1.0  # a little clear content too
        else:
            plane = (rng.random(shape) > 0.5).astype(np.float32)
        slices.append(plane)
    return np.stack(slices)


@pytest.mark.parametrize("method", METHODS)
def test_ambiguous_slices_rank_first_2d_stack(method):
    stack = _stack({1, 4})
    probs, uncertainty = predict_with_uncertainty(RampModel(), stack, device="cpu", method=method,
                                                  normalization=False)
    assert probs.shape == (2, *stack.shape) and probs.dtype == np.float32
    assert uncertainty.shape == stack.shape and uncertainty.dtype == np.float32
    assert 0.0 <= uncertainty.min() and uncertainty.max() <= 1.0
    ranking = rank_slices(uncertainty, probabilities=probs)
    assert {z for z, _ in ranking[:2]} == {1, 4}
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    assert uncertainty[0].max() < 0.05  # clear slices are certain


def test_mean_probabilities_match_predict_with_tta():
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2).eval()
    image = np.random.default_rng(1).random((2, 24, 20)).astype(np.float32)
    probs, _ = predict_with_uncertainty(model, image, device="cpu", method="tta")
    reference = predict(model, image, device="cpu", tta=True)
    np.testing.assert_allclose(probs, reference, atol=1e-5)


def test_3d_volume_multiclass_and_regions():
    volume = np.zeros((8, 16, 16), dtype=np.float32)
    volume[:, :, :] = (np.random.default_rng(0).random((8, 16, 16)) > 0.5)
    volume[4:8, 8:16, 0:8] = 0.5  # one ambiguous corner box
    model = RampModel(spatial_dims=3, out_channels=3)
    probs, uncertainty = predict_with_uncertainty(model, volume, device="cpu", normalization=False)
    assert probs.shape == (3, 8, 16, 16)
    assert uncertainty.shape == volume.shape
    regions = rank_regions(uncertainty, box=(4, 8, 8), probabilities=probs)
    assert len(regions) == 2 * 2 * 2
    worst, score = regions[0]
    assert worst == (slice(4, 8), slice(8, 16), slice(0, 8))
    assert box_centre(worst) == (5, 11, 3)
    assert score > regions[1][1]


def test_single_2d_image_and_channels():
    model = RampModel()
    image = _stack({0}, n=1)[0]
    probs, uncertainty = predict_with_uncertainty(model, image, device="cpu", normalization=False)
    assert probs.shape == (2, 16, 16) and uncertainty.shape == (16, 16)
    assert rank_slices(uncertainty)[0][0] == 0


def test_progress_and_cancel():
    model = RampModel()
    stack = _stack({2})
    calls = []
    predict_with_uncertainty(model, stack, device="cpu", normalization=False, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    assert all(b == calls[0][1] for _, b in calls)  # one total over all views
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    checks = []

    def cancel() -> bool:
        checks.append(1)
        return len(checks) > 2

    with pytest.raises(PredictionCancelled):
        predict_with_uncertainty(model, stack, device="cpu", normalization=False, cancel=cancel)


def test_bad_input():
    model = RampModel()
    stack = _stack(set())
    with pytest.raises(ValueError, match="method"):
        predict_with_uncertainty(model, stack, method="guess")
    with pytest.raises(ValueError, match="views"):
        predict_with_uncertainty(model, stack, method="tta", views=1)
    with pytest.raises(ValueError, match="views"):
        predict_with_uncertainty(model, stack, views=9)
    with pytest.raises(ValueError):
        predict_with_uncertainty(model, np.zeros((2, 3, 4, 5, 6), np.float32))  # no such layout
    with pytest.raises(ValueError, match="score"):
        rank_slices(np.zeros((2, 4, 4)), score="nope")
    with pytest.raises(ValueError, match="probabilities"):
        rank_slices(np.zeros((2, 4, 4)), score="expected_dice")
    with pytest.raises(ValueError, match="probabilities"):
        rank_slices(np.zeros((2, 4, 4)), probabilities=np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="axis"):
        rank_slices(np.zeros((2, 4, 4)), axis=3)
    with pytest.raises(ValueError, match="box"):
        rank_regions(np.zeros((2, 4, 4)), box=(0, 2, 2))


@pytest.mark.parametrize("score", SCORES)
def test_every_score_ranks_ambiguous_slices_first(score):
    stack = _stack({3})
    probs, uncertainty = predict_with_uncertainty(RampModel(), stack, device="cpu", normalization=False)
    assert rank_slices(uncertainty, probabilities=probs, score=score)[0][0] == 3
    assert slice_scores(uncertainty, probabilities=probs, score=score).shape == (6,)


def test_rank_along_another_axis():
    uncertainty = np.zeros((4, 5, 6), np.float32)
    uncertainty[:, 2] = 1.0
    assert rank_slices(uncertainty, axis=1)[0] == (2, 1.0)


def test_review_queue_walks_worst_first_and_wraps():
    queue = ReviewQueue([(7, 0.9), (2, 0.5), (5, 0.1)])
    assert [queue.position(queue.next()) for _ in range(4)] == [(7,), (2,), (5,), (7,)]
    queue.select(2)
    assert queue.position() == (5,) and queue.position(queue.next()) == (7,)
    assert queue.label(0).startswith("slice 7")
    assert ReviewQueue().next() is None
    boxes = ReviewQueue.from_uncertainty(np.ones((4, 8, 8), np.float32), volume=True, box=(2, 4, 4))
    assert len(boxes) == 8 and boxes.position(boxes.next()) == (0, 1, 1)
    assert boxes.label(0).startswith("box z 0-1, y 0-3, x 0-3")


def test_default_score_needs_probabilities_else_mean():
    stack = _stack({2})
    probs, uncertainty = predict_with_uncertainty(RampModel(), stack, device="cpu", normalization=False)
    with_probs = slice_scores(uncertainty, probabilities=probs)
    np.testing.assert_allclose(with_probs, slice_scores(uncertainty, probabilities=probs, score="expected_dice"))
    np.testing.assert_allclose(slice_scores(uncertainty), slice_scores(uncertainty, score="mean"))


def test_default_entropy_is_one_pass_tta_is_eight():
    stack = _stack({2})
    totals = {}
    for method in ("entropy", "tta"):
        calls = []
        predict_with_uncertainty(RampModel(), stack, device="cpu", method=method, normalization=False,
                                 batch_size=1, progress=lambda d, t, calls=calls: calls.append(t))
        totals[method] = calls[-1]
    assert totals["tta"] == 8 * totals["entropy"]


def test_isbi_uncertainty_finds_errors_and_ranks_slices(shared_data):
    """Real data: the shipped sample model on ISBI crops; the map points at the wrong pixels and the
    ranking follows the slices' true membrane error (the full measurement: benchmarks/uncertainty_ranking.py)."""
    from scipy.stats import rankdata, spearmanr

    from napari_unet import io
    from napari_unet._sample_data import SAMPLE_MODEL
    from napari_unet.checkpoint import load_checkpoint
    from napari_unet.inference import probabilities_to_labels
    from napari_unet.metrics import dice_per_class

    folder = shared_data / "isbi2012"
    if not (folder / "train-volume.tif").is_file() or not SAMPLE_MODEL.is_file():
        pytest.skip("ISBI 2012 or the sample model is not here")
    image = np.asarray(io.read_image(folder / "train-volume.tif"))[:, :256, :256]
    truth = io.read_labels(folder / "train-labels.tif")[:, :256, :256]
    model = load_checkpoint(SAMPLE_MODEL).model
    probs, uncertainty = predict_with_uncertainty(model, image, device="cpu")
    predicted = probabilities_to_labels(probs)
    wrong = (predicted != truth).ravel()
    ranks = rankdata(uncertainty.ravel())
    positives = int(wrong.sum())
    auroc = (ranks[wrong].sum() - positives * (positives + 1) / 2) / (positives * (wrong.size - positives))
    assert auroc > 0.75  # measured 0.83
    error = [1.0 - dice_per_class(predicted[z], truth[z], 2)[0] for z in range(len(image))]
    scores = dict(rank_slices(uncertainty, probabilities=probs))
    rho = spearmanr([scores[z] for z in range(len(image))], error).statistic
    assert rho > 0.4  # measured 0.61
