"""Training settings (napari_unet.training.config): plain errors for settings that cannot work."""

from __future__ import annotations

import pytest
from training_toys import config, tiny_model, toy_stack

from napari_unet.training import TrainConfig, Trainer, TrainingError


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"batch_size": 0}, TrainingError),
        ({"schedule": "sometimes"}, TrainingError),
        ({"loss": "nonsense"}, TrainingError),
        ({"patch_size": (16, 16, 16)}, TrainingError),
        ({"val_fraction": 1.5}, TrainingError),
        ({"dice_fade": 0.0}, TrainingError),
        ({"min_lr_fraction": 1.5}, TrainingError),
        ({"tta_candidates": 0}, TrainingError),
        ({"augment_ramp": 0.0}, TrainingError),
        ({"augment_ramp": 1.5}, TrainingError),
    ],
)
def test_bad_settings_raise_plain_errors(overrides, error):
    images, labels = toy_stack()
    with pytest.raises(error):
        Trainer(tiny_model(), images, labels, config=config(**overrides))


def test_patch_sizes_and_the_plain_configuration():
    from napari_unet.training.config import (
        default_patch_size,
        patch_size_for,
        plain_config,
    )

    assert patch_size_for(TrainConfig(), 2) == default_patch_size(2) == (192, 192)
    assert patch_size_for(TrainConfig(), 3) == (32, 96, 96)
    assert patch_size_for(TrainConfig(patch_size=64), 3) == (64, 64, 64)
    assert patch_size_for(TrainConfig(patch_size=[16, 32]), 2) == (16, 32)
    plain = plain_config(TrainConfig(patch_size=(16, 32), steps=5))
    assert plain["patch_size"] == [16, 32] and plain["steps"] == 5 and plain["loss"] == "ce_dice"


def test_the_package_keeps_the_names_of_the_single_training_module():
    from napari_unet import training
    from napari_unet.data import AugmentConfig, PatchSampler
    from napari_unet.training import averaging, schedule, validation

    assert training._WeightAverage is averaging.WeightAverage
    assert training._has_cross_entropy_term is schedule.has_cross_entropy_term
    assert training._WHOLE_SAMPLE_PIXELS is validation._WHOLE_SAMPLE_PIXELS
    assert training.PatchSampler is PatchSampler and training.AugmentConfig is AugmentConfig
    for name in training.__all__:
        assert getattr(training, name).__module__.startswith("napari_unet.training.")
