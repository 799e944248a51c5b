"""One optimisation step (napari_unet.training.steps): sample, forward, update, average."""

from __future__ import annotations

import numpy as np
import torch
from training_toys import tiny_model, toy_stack

from napari_unet import losses
from napari_unet.data import PatchSampler, make_samples
from napari_unet.training.averaging import WeightAverage
from napari_unet.training.steps import OptimisationStep


def _step(seed: int = 0) -> OptimisationStep:
    images, labels = toy_stack(n=2)
    samples = make_samples(images, labels, None, spatial_dims=2, in_channels=1, n_classes=2,
                           normalize=lambda image: image.astype(np.float32) / 255)
    model = tiny_model(seed=seed)
    return OptimisationStep(model, torch.optim.SGD(model.parameters(), lr=0.1), PatchSampler(samples, (16, 16)),
                            losses.get_loss("ce_dice"), lambda: torch.autocast("cpu", enabled=False), None,
                            torch.channels_last, WeightAverage(model, decay=0.5))


def test_a_step_updates_the_model_and_its_average_and_repeats_with_the_same_stream():
    step = _step()
    before = [p.detach().clone() for p in step.model.parameters()]
    loss = step(2, torch.Generator().manual_seed(0))
    assert np.isfinite(loss) and loss > 0
    after = list(step.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    weight = 1 - 2 / 11  # the average's first update
    for averaged, old, new in zip(step.averaged.model.parameters(), before, after):
        torch.testing.assert_close(averaged, old + weight * (new.detach() - old))
    assert _step()(2, torch.Generator().manual_seed(0)) == loss
