"""Samples, validation splits, patch sampling and augmentation (napari_unet.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.data import (
    AugmentConfig,
    DataError,
    PatchSampler,
    make_samples,
    split_validation,
)


def _stack(n=4, size=48, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, size, size)) > 0.5).astype(np.uint8)
    images = labels * 100 + rng.integers(0, 20, labels.shape)
    return images.astype(np.uint8), labels


def _samples_2d(n=4, size=48, weights=None):
    images, labels = _stack(n, size)
    return make_samples(images, labels, weights, spatial_dims=2, in_channels=1, n_classes=2)


# ---------------------------------------------------------------------------------------------
# make_samples


def test_a_stack_is_one_sample_per_slice_for_2d_models():
    samples = _samples_2d(n=5, size=32)
    assert len(samples) == 5
    assert samples[0].image.shape == (1, 32, 32)
    assert samples[0].labels.dtype == np.int64
    assert samples[0].weights.dtype == np.float32 and np.all(samples[0].weights == 1)


def test_a_volume_is_one_sample_for_3d_models():
    images, labels = _stack(n=8, size=16)
    samples = make_samples(images, labels, spatial_dims=3, in_channels=1, n_classes=2)
    assert len(samples) == 1 and samples[0].image.shape == (1, 8, 16, 16)


def test_normalize_callable_is_applied_per_sample():
    images, labels = _stack(n=2, size=16)
    samples = make_samples(images, labels, spatial_dims=2, in_channels=1, n_classes=2,
                           normalize=lambda image: image.astype(np.float32) / 255)
    assert samples[1].image.max() <= 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda im, lab, w: (im, lab[:, :-1], w), "shape"),
        (lambda im, lab, w: (im, lab + 3, w), "class"),
        (lambda im, lab, w: (im, lab, np.ones((2, 5, 5), np.float32)), "shape"),
        (lambda im, lab, w: (im, lab, -np.ones(lab.shape, np.float32)), "negative"),
        (lambda im, lab, w: (im, lab, np.zeros(lab.shape, np.float32)), "no labelled"),
        (lambda im, lab, w: (im[:1], lab, w), "counts"),
    ],
)
def test_bad_inputs_raise_a_plain_data_error(change, message):
    images, labels = _stack(n=2, size=16)
    images, labels, weights = change(images, labels, None)
    with pytest.raises(DataError, match=message):
        make_samples(images, labels, weights, spatial_dims=2, in_channels=1, n_classes=2)


def test_unlabelled_pixels_may_hold_any_label_value():
    images, labels = _stack(n=1, size=16)
    labels = labels.astype(np.int64)
    weights = np.ones(labels.shape, np.float32)
    labels[0, :4] = 99  # garbage where nothing is labelled
    weights[0, :4] = 0
    (sample,) = make_samples(images, labels, weights, spatial_dims=2, in_channels=1, n_classes=2)
    assert sample.labels.max() <= 1


# ---------------------------------------------------------------------------------------------
# Validation split


def test_split_by_slice_holds_out_the_last_labelled_slices():
    samples = _samples_2d(n=10, size=16)
    train, val = split_validation(samples, 0.2)
    assert len(train) == 8 and len(val) == 2
    assert val[0] is samples[8] and val[1] is samples[9]
    assert split_validation(samples, 0.0) == (samples, [])


def test_split_by_region_when_there_is_one_sample():
    images, labels = _stack(n=40, size=24)
    (volume,) = make_samples(images, labels, spatial_dims=3, in_channels=1, n_classes=2)
    train, val = split_validation([volume], 0.25, min_val_size=4)
    assert len(train) == 1 and len(val) == 1
    # the two blocks partition the volume along z, with no overlap
    assert train[0].spatial_shape[0] + val[0].spatial_shape[0] == 40
    np.testing.assert_array_equal(np.concatenate([train[0].image, val[0].image], axis=1), volume.image)
    assert 0.15 <= val[0].spatial_shape[0] / 40 <= 0.35


def test_region_split_follows_sparse_labels():
    images, labels = _stack(n=1, size=64)
    weights = np.zeros(labels.shape, np.float32)
    weights[0, 10:40, 10:20] = 1  # only rows 10..39 are labelled
    (sample,) = make_samples(images, labels, weights, spatial_dims=2, in_channels=1, n_classes=2)
    train, val = split_validation([sample], 0.2, min_val_size=4)
    assert val[0].labelled_pixels > 0 and train[0].labelled_pixels > 0
    assert val[0].labelled_pixels < train[0].labelled_pixels


def test_too_small_data_cannot_be_split():
    images, labels = _stack(n=1, size=16)
    samples = make_samples(images, labels, spatial_dims=2, in_channels=1, n_classes=2)
    with pytest.raises(DataError, match="validation"):
        split_validation(samples, 0.2)


# ---------------------------------------------------------------------------------------------
# Patch sampling and augmentation


def _consistency_samples(spatial_dims=2, size=40):
    """Samples whose image equals the (blobby) labels and whose weights are labels + 1."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    shape = (size,) * spatial_dims
    labels = [(gaussian_filter(rng.random(shape), 2.0) > 0.5).astype(np.int64) for _ in range(2)]
    images = [lab.astype(np.float32) for lab in labels]
    weights = [lab.astype(np.float32) + 1 for lab in labels]
    return make_samples(images, labels, weights, spatial_dims=spatial_dims, in_channels=1, n_classes=2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_labels_and_weights_stay_aligned_under_all_augmentations(spatial_dims):
    samples = _consistency_samples(spatial_dims, size=40 if spatial_dims == 2 else 24)
    cfg = AugmentConfig(elastic_probability=1.0, intensity=False, elastic_sigma=4.0)
    patch = (32, 32) if spatial_dims == 2 else (16, 16, 16)
    sampler = PatchSampler(samples, patch, augment=cfg)
    images, labels, weights = sampler.sample(4, torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, *patch) and labels.shape == (4, *patch) and weights.shape == (4, *patch)
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) <= {0, 1}
    # the weight map travels with the labels pixel for pixel
    assert torch.equal(weights, labels.float() + 1)
    # the (bilinearly warped) image still matches its (nearest-neighbour warped) labels
    assert (images[:, 0].round() == labels.float()).float().mean() > 0.9


def test_flips_and_rotations_keep_image_and_labels_identical():
    samples = _consistency_samples(2)
    cfg = AugmentConfig(elastic=False, intensity=False)
    sampler = PatchSampler(samples, (32, 32), augment=cfg)
    images, labels, _ = sampler.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(images[:, 0], labels.float())


def test_elastic_deformation_changes_the_patch():
    samples = _consistency_samples(2)
    plain = PatchSampler(samples, (32, 32), augment=AugmentConfig(elastic=True, elastic_probability=0.0, flips=False,
                                                                rotations=False, intensity=False))
    warped = PatchSampler(samples, (32, 32), augment=AugmentConfig(elastic_probability=1.0, flips=False,
                                                                 rotations=False, intensity=False))
    _, a, _ = plain.sample(2, torch.Generator().manual_seed(5))
    _, b, _ = warped.sample(2, torch.Generator().manual_seed(5))
    assert not torch.equal(a, b)


def test_intensity_augmentation_changes_images_only():
    samples = _consistency_samples(2)
    cfg = AugmentConfig(elastic=False, flips=False, rotations=False, intensity=True, intensity_probability=1.0)
    sampler = PatchSampler(samples, (32, 32), augment=cfg)
    images, labels, weights = sampler.sample(4, torch.Generator().manual_seed(0))
    assert not torch.equal(images[:, 0], labels.float())
    assert torch.equal(weights, labels.float() + 1)
    assert torch.isfinite(images).all()


def test_same_seed_gives_the_same_batch():
    samples = _samples_2d()
    sampler = PatchSampler(samples, (32, 32), augment=AugmentConfig())
    first = sampler.sample(3, torch.Generator().manual_seed(7))
    second = sampler.sample(3, torch.Generator().manual_seed(7))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_patches_favour_labelled_regions():
    images, labels = _stack(n=1, size=128)
    weights = np.zeros(labels.shape, np.float32)
    weights[0, 100:110, 100:110] = 1
    samples = make_samples(images, labels, weights, spatial_dims=2, in_channels=1, n_classes=2)
    sampler = PatchSampler(samples, (32, 32), augment=None, label_focus=1.0)
    _, _, patch_weights = sampler.sample(16, torch.Generator().manual_seed(0))
    assert (patch_weights.flatten(1).sum(1) > 0).all()


def test_patch_is_clipped_to_small_samples():
    samples = _samples_2d(n=2, size=20)
    sampler = PatchSampler(samples, (64, 64), augment=AugmentConfig())
    images, labels, weights = sampler.sample(2, torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 20, 20)
