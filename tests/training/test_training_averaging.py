"""The weight average that validation and previews use (napari_unet.training.averaging)."""

from __future__ import annotations

import torch
from training_toys import tiny_model

from napari_unet.training.averaging import WeightAverage, state_copy


def test_weight_average_averages_batch_norm_statistics_too():
    model = tiny_model()
    average = WeightAverage(model, decay=0.5)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    averaged_norm = next(m for m in average.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = averaged_norm.running_mean.clone()
    with torch.no_grad():
        norm.running_mean.add_(4.0)
        norm.num_batches_tracked.fill_(7)
    average.update(model)  # first update: decay min(0.5, 2 / 11)
    weight = 1 - 2 / 11
    torch.testing.assert_close(averaged_norm.running_mean, before + 4.0 * weight)
    assert int(averaged_norm.num_batches_tracked) == 7  # counters are copied, not averaged


def test_without_a_decay_the_average_is_the_model_itself():
    model = tiny_model()
    average = WeightAverage(model, decay=None)
    average.update(model)
    assert average.model is model and average.updates == 0  # validation sees the trained weights


def test_the_average_is_a_copy_that_moves_by_the_ramped_decay():
    model = tiny_model()
    average = WeightAverage(model, decay=0.9)
    assert average.model is not model
    assert not any(p.requires_grad for p in average.model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)  # decay min(0.9, 2 / 11): the average moves 9 / 11 of the way
    average.update(model)  # decay min(0.9, 3 / 12): then 3 / 4 of what is left
    expected_gap = (1 - 9 / 11) * (1 - 3 / 4)
    for mine, first in zip(average.model.parameters(), start):
        torch.testing.assert_close(mine, first + 1.0 - expected_gap)
    assert average.updates == 2


def test_a_state_copy_does_not_follow_later_steps():
    model = tiny_model()
    copied = state_copy(model)
    name, value = next(iter(model.state_dict().items()))
    before = value.clone()
    with torch.no_grad():
        value.add_(1.0)
    assert torch.equal(copied[name], before)
