"""What changes over a run (napari_unet.training.schedule): learning rate, Dice fade, augmentation ramp."""

from __future__ import annotations

import pytest
import torch
from training_toys import config, tiny_model, toy_stack

from napari_unet.training import Trainer, schedule


class _DiceWeightRecorder(torch.nn.Module):
    """Wraps a loss and records its Dice weight at every call."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.seen = loss, []

    @property
    def dice_weight(self):
        return self.loss.dice_weight

    @dice_weight.setter
    def dice_weight(self, value):
        self.loss.dice_weight = value

    def forward(self, *args):
        self.seen.append(round(self.loss.dice_weight, 6))
        return self.loss(*args)


@pytest.mark.parametrize(("loss", "fade", "expected"), [
    ("ce_dice", 0.5, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]),
    ("dice_bce", 1.0, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]),
    ("ce_dice", None, [1.0] * 10),
])
def test_the_dice_term_fades_over_the_budget(monkeypatch, loss, fade, expected):
    from napari_unet import losses

    recorders = []
    real_get_loss = losses.get_loss

    def recording_get_loss(*args, **kwargs):
        recorders.append(_DiceWeightRecorder(real_get_loss(*args, **kwargs)))
        return recorders[-1]

    monkeypatch.setattr(losses, "get_loss", recording_get_loss)
    images, labels = toy_stack()
    Trainer(tiny_model(), images, labels, config=config(steps=10, loss=loss, dice_fade=fade)).fit()
    assert recorders[0].seen == expected


@pytest.mark.parametrize(("ramp", "expected"), [
    (0.5, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]),
    (None, [1.0] * 10),
])
def test_elastic_and_intensity_augmentation_ramp_up_over_the_budget(monkeypatch, ramp, expected):
    from napari_unet import data

    seen = []
    real_sample = data.PatchSampler.sample

    def recording_sample(self, *args, **kwargs):
        full = data.AugmentConfig()
        seen.append((self.augment.flips, self.augment.rotations, self.augment.elastic,
                     round(self.augment.elastic_probability / full.elastic_probability, 6),
                     round(self.augment.intensity_probability / full.intensity_probability, 6)))
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(data.PatchSampler, "sample", recording_sample)
    images, labels = toy_stack()
    Trainer(tiny_model(), images, labels, config=config(steps=10, augment_ramp=ramp)).fit()
    assert seen == [(True, True, True, fraction, fraction) for fraction in expected]


def test_a_dice_loss_alone_does_not_fade():
    from napari_unet import losses

    assert schedule.has_cross_entropy_term(losses.get_loss("ce_dice"))
    assert not schedule.has_cross_entropy_term(losses.get_loss("dice"))
    assert not schedule.has_cross_entropy_term(losses.get_loss("dice_bce", bce_weight=0.0))


def test_the_cosine_schedule_falls_to_its_floor():
    import math

    images, labels = toy_stack()
    trainer = Trainer(tiny_model(), images, labels,
                      config=config(steps=10, warmup_steps=0, learning_rate=1e-2, min_lr_fraction=0.5))
    trainer.fit()
    expected = [1e-2 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * k / 10))) for k in range(10)]
    assert trainer.history["lr"] == pytest.approx(expected)


def test_warm_up_rises_linearly_then_the_cosine_decays():
    import math

    from napari_unet.training import TrainConfig

    plan = schedule.Schedule(TrainConfig(steps=10, warmup_steps=3, learning_rate=1.0, min_lr_fraction=0.0))
    assert [plan.learning_rate(k, k / 10) for k in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert plan.learning_rate(3, 0.3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert plan.progress(3, seconds=1e6) == pytest.approx(0.3)  # no time budget: by steps
    timed = schedule.Schedule(TrainConfig(steps=10, time_budget=100.0))
    assert timed.progress(3, seconds=50.0) == pytest.approx(0.5)  # whichever is further
    assert timed.progress(30, seconds=50.0) == 1.0
    assert schedule.Schedule(TrainConfig()).progress(3, seconds=50.0) is None  # open-ended


def test_the_plateau_schedule_halves_the_rate_after_each_patience_of_stale_validations():
    from napari_unet.training import TrainConfig

    plan = schedule.Schedule(TrainConfig(schedule="plateau", plateau_patience=2, warmup_steps=0, learning_rate=1.0))
    rates = []
    for stale in range(1, 6):
        plan.after_stale_validation(stale)
        rates.append(plan.learning_rate(100, None))
    assert rates == [1.0, 0.5, 0.5, 0.25, 0.25]
    cosine = schedule.Schedule(TrainConfig(warmup_steps=0))
    cosine.after_stale_validation(3)
    assert cosine.lr_scale == 1.0


def test_apply_sets_the_rate_fades_the_dice_term_and_ramps_the_augmentation():
    from types import SimpleNamespace

    from napari_unet import losses
    from napari_unet.data import AugmentConfig
    from napari_unet.training import TrainConfig

    plan = schedule.Schedule(TrainConfig(steps=10, warmup_steps=0, learning_rate=1.0, min_lr_fraction=0.0,
                                         dice_fade=0.5, augment_ramp=0.5))
    loss_fn, sampler, full = losses.get_loss("ce_dice"), SimpleNamespace(augment=None), AugmentConfig()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    plan.start_run(loss_fn, sampler, full)
    lr = plan.apply(2, 0.0, optimizer)  # 20 % of the steps done
    assert optimizer.param_groups[0]["lr"] == lr == pytest.approx(plan.learning_rate(2, 0.2))
    assert loss_fn.dice_weight == pytest.approx(0.6)
    assert sampler.augment.elastic_probability == pytest.approx(0.4 * full.elastic_probability)
    assert sampler.augment.intensity_probability == pytest.approx(0.4 * full.intensity_probability)
    assert sampler.augment.flips and full == AugmentConfig()  # the full settings are not touched
