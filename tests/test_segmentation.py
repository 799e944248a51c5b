"""The Segment job without Qt (napari_unet.segmentation): requests, runs, windows, instances, cancel."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import inference, io, segmentation
from napari_unet.inference import PredictionCancelled
from napari_unet.models import build_model
from napari_unet.segmentation import (
    NeedsGrayscale,
    make_request,
    outputs_from_probabilities,
    run_segmentation,
)


@pytest.fixture(scope="module")
def model_2d():
    return build_model("unet", width=4, depth=2).eval()


@pytest.fixture(scope="module")
def model_3d():
    return build_model("unet3d", width=4, depth=2).eval()


def stack(shape=(3, 32, 40), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def two_cells() -> np.ndarray:
    """(2, Y, X) probabilities of two square cells whose membrane has a gap the model was unsure about."""
    interior = np.full((40, 81), 0.95, np.float32)
    interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = 0.05, 0.05, 0.05, 0.05
    interior[:, 39:42] = 0.05
    interior[18:22, 39:42] = 0.6
    return np.stack([1.0 - interior, interior])


# ---------------------------------------------------------------------------------- whole images


def test_a_2d_models_stack_gives_labels_and_the_foreground_probability(model_2d):
    image = stack()
    request = make_request(model_2d, "stack", image, device="cpu")
    assert request.channel_axis is None and request.slice_window is None and request.output_shape == image.shape
    result = run_segmentation(model_2d, request)
    probabilities = inference.predict(model_2d, image, device="cpu")
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.probability.dtype == np.float32
    np.testing.assert_allclose(result.probability, probabilities[1], atol=1e-6)
    np.testing.assert_array_equal(result.labels, (result.probability >= 0.5).astype(np.uint8))
    assert result.instances is None


def test_a_3d_model_segments_a_volume_whole(model_3d):
    volume = stack((16, 24, 24), seed=1)
    result = run_segmentation(model_3d, make_request(model_3d, "volume", volume, threshold=0.3, device="cpu"))
    assert result.labels.shape == volume.shape == result.probability.shape
    np.testing.assert_array_equal(result.labels, (result.probability >= 0.3).astype(np.uint8))


def test_multichannel_stack_and_rgb_keep_the_spatial_axes(model_2d):
    two_channel = build_model("unet", in_channels=2, width=4, depth=2).eval()
    data = stack((3, 2, 32, 40), seed=5)  # (Z, C, Y, X)
    request = make_request(two_channel, "two channels", data, device="cpu")
    assert request.channel_axis == 1 and request.output_shape == (3, 32, 40)
    assert request.output_axes((50.0, 1.0, 4.0, 4.0), 3) == (50.0, 4.0, 4.0)  # the channel's scale is dropped
    assert run_segmentation(two_channel, request).labels.shape == (3, 32, 40)

    colour = np.random.default_rng(6).integers(0, 255, (2, 36, 44, 3), dtype=np.uint8)
    rgb_model = build_model("unet", in_channels=3, width=4, depth=2).eval()
    request = make_request(rgb_model, "colour stack", colour, rgb=True, device="cpu")
    assert request.channel_axis == -1 and request.output_shape == (2, 36, 44)
    assert run_segmentation(rgb_model, request).labels.shape == (2, 36, 44)


# ---------------------------------------------------------------------------------- current slice


def test_a_2d_models_current_slice_is_that_slice_of_the_whole_prediction(model_2d):
    image = stack((4, 32, 40), seed=2)
    request = make_request(model_2d, "stack", image, point=(2.4, 10.0, 3.0), device="cpu")
    assert (request.slice_window, request.keep_slice) == ((2, 3), 0)
    result = run_segmentation(model_2d, request)
    whole = run_segmentation(model_2d, make_request(model_2d, "stack", image, device="cpu"))
    assert result.labels.shape == (1, 32, 40)
    np.testing.assert_allclose(result.probability[0], whole.probability[2], atol=1e-6)
    # a point outside the stack is clipped to its last slice; a single 2D image ignores the point
    assert make_request(model_2d, "stack", image, point=(9.0, 0, 0)).slice_window == (3, 4)
    assert make_request(model_2d, "flat", image[0], point=(1.0, 1.0)).slice_window is None


def test_a_3d_models_window_has_context_and_the_whole_volumes_normalisation(model_3d):
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 10, (40, 24, 24)).astype(np.float32)
    volume += np.linspace(0, 2000, 40, dtype=np.float32)[:, None, None]  # brightens with depth
    request = make_request(model_3d, "vol", volume, point=(5.0, 0.0, 0.0), device="cpu")
    assert (request.slice_window, request.keep_slice) == ((0, 14), 5)  # 8 slices of context below it
    assert make_request(model_3d, "vol", volume, point=(20.0, 0, 0)).slice_window == (12, 29)
    result = run_segmentation(model_3d, request)
    assert result.probability.shape == (1, 24, 24)
    whole = io.compute_normalization(volume, getattr(model_3d, "normalization", None) or io.DEFAULT_NORMALIZATION)
    expected = inference.predict(model_3d, volume[:14], normalization=whole, device="cpu")[1, 5]
    np.testing.assert_allclose(result.probability[0], expected, atol=1e-5)


# ---------------------------------------------------------------------------------- instances


def test_instances_components_merge_where_watershed_splits():
    probabilities = two_cells()
    counts = {}
    for method in ("components", "watershed"):
        ids = outputs_from_probabilities(probabilities, spatial_dims=2, instances=method).instances
        assert ids.shape == probabilities.shape[1:] and ids.dtype == np.int32
        counts[method] = len(set(np.unique(ids)) - {0})
    assert counts == {"components": 1, "watershed": 2}
    assert outputs_from_probabilities(probabilities, spatial_dims=2).instances is None


def test_a_2d_models_stack_gets_instances_slice_by_slice_and_a_3d_volume_whole():
    probabilities = np.stack([two_cells()] * 3, axis=1)  # (2, Z, Y, X): the same cells on 3 slices
    per_slice = outputs_from_probabilities(probabilities, spatial_dims=2, instances="watershed").instances
    ids = [set(np.unique(plane)) - {0} for plane in per_slice]
    assert all(len(plane) == 2 for plane in ids) and not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    whole = outputs_from_probabilities(probabilities, spatial_dims=3, instances="components").instances
    assert len(set(np.unique(whole)) - {0}) == 1  # one cell through z (and across the gap)
    # the kept slice: a 2D model labels only it; a 3D model labels the slab, then crops
    kept = outputs_from_probabilities(probabilities, spatial_dims=2, instances="watershed", keep=slice(1, 2))
    assert kept.instances.shape == kept.labels.shape == kept.probability.shape == (1, 40, 81)
    np.testing.assert_array_equal(kept.instances[0] > 0, per_slice[1] > 0)
    kept_3d = outputs_from_probabilities(probabilities, spatial_dims=3, instances="components", keep=slice(1, 2))
    np.testing.assert_array_equal(kept_3d.instances, whole[1:2])


def test_run_segmentation_makes_the_chosen_instances(model_2d, monkeypatch):
    probabilities = two_cells()
    monkeypatch.setattr(inference, "predict", lambda *args, **kwargs: probabilities.copy())
    request = make_request(model_2d, "cells", np.zeros(probabilities.shape[1:], np.float32), instances="watershed")
    assert len(set(np.unique(run_segmentation(model_2d, request).instances)) - {0}) == 2


def test_outputs_for_the_cli_and_multi_class_models():
    probabilities = two_cells()
    result = outputs_from_probabilities(probabilities, spatial_dims=2, foreground_probability=False)
    assert result.probability is None
    np.testing.assert_array_equal(result.labels, inference.probabilities_to_labels(probabilities))
    three = np.stack([probabilities[0] * 0.5, probabilities[0] * 0.5, probabilities[1]])
    result = outputs_from_probabilities(three, spatial_dims=2)
    np.testing.assert_allclose(result.probability, 1.0 - three[0])
    np.testing.assert_array_equal(result.labels, np.argmax(three, axis=0))


# ---------------------------------------------------------------------------------- progress, cancel


def test_progress_reports_tiles_and_steps_are_named(model_2d):
    reports, steps = [], []
    request = make_request(model_2d, "stack", stack((2, 64, 64)), tile=32, instances="components", device="cpu")
    run_segmentation(model_2d, request, progress=lambda done, total: reports.append((done, total)),
                     step=steps.append)
    assert reports and reports[-1][0] == reports[-1][1] > 1
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert steps == ["checking the image", "making labels and instances (components)"]


def test_cancel_stops_before_and_during_the_prediction(model_2d):
    request = make_request(model_2d, "stack", stack((2, 64, 64)), tile=32, device="cpu")
    with pytest.raises(PredictionCancelled):
        run_segmentation(model_2d, request, cancel=lambda: True)
    reports = []
    with pytest.raises(PredictionCancelled):
        run_segmentation(model_2d, request, progress=lambda done, total: reports.append(done),
                         cancel=lambda: len(reports) >= 1)
    assert len(reports) == 1  # stopped at the first batch after the cancel


# ---------------------------------------------------------------------------------- bad input


def test_rgb_into_a_one_channel_model_needs_consent(model_2d):
    rgb = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    with pytest.raises(NeedsGrayscale, match="convert it to grayscale"):
        make_request(model_2d, "colour", rgb, rgb=True)
    request = make_request(model_2d, "colour", rgb, rgb=True, convert_rgb=True, device="cpu")
    assert request.to_grayscale and request.output_shape == (48, 40)
    assert run_segmentation(model_2d, request).labels.shape == (48, 40)
    with pytest.raises(ValueError, match="takes 2 channels"):
        make_request(build_model("unet", in_channels=2, width=4, depth=2), "colour", rgb, rgb=True)


@pytest.mark.parametrize(("shape", "model_name", "message"), [
    ((40, 40), "unet3d", "single 2D image but the model is 3D"),
    ((2, 2, 3, 16, 16), "unet", "take one time point or channel first"),
])
def test_images_that_do_not_fit_the_model_are_refused_plainly(shape, model_name, message):
    model = build_model(model_name, width=4, depth=2)
    with pytest.raises(ValueError, match=message):
        make_request(model, "image", np.zeros(shape, np.float32))


def test_bad_pixels_and_options_give_a_message(model_2d):
    holes = np.ones((2, 32, 32), np.float32)
    holes[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        run_segmentation(model_2d, make_request(model_2d, "holes", holes, device="cpu"))
    with pytest.raises(ValueError, match="Unknown instance method"):
        make_request(model_2d, "holes", holes, instances="blobs")
    assert segmentation.current_slice_window(model_2d, 5, 4) == ((4, 5), 0)
