"""Saving a Trainer's resume state and continuing from it (napari_unet.training.resume)."""

from __future__ import annotations

import pytest
import torch
from training_toys import config, tiny_model, toy_stack

from napari_unet.training import Trainer, TrainingError


def test_resume_continues_from_a_checkpoint(tmp_path):
    images, labels = toy_stack()
    first = Trainer(tiny_model(), images, labels, config=config(steps=3))
    first.fit()
    path = first.save(tmp_path / "first.pt")
    second = Trainer(tiny_model(seed=9), images, labels, config=config(steps=2), resume_from=path)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert second.optimizer.state  # Adam moments came back
    events = list(second.run())
    assert [e.step for e in events if e.kind == "step"] == [4, 5]
    assert second.history["step"] == [1, 2, 3, 4, 5]


def test_resume_refuses_another_architecture(tmp_path):
    images, labels = toy_stack()
    first = Trainer(tiny_model(), images, labels, config=config(steps=1))
    first.fit()
    path = first.save(tmp_path / "first.pt")
    with pytest.raises(TrainingError, match="architecture"):
        Trainer(tiny_model(width=8), images, labels, config=config(), resume_from=path)


def test_load_resume_state_restores_the_weights_and_optimizer_and_returns_the_counters(tmp_path):
    from napari_unet.training import TrainConfig
    from napari_unet.training.resume import load_resume_state

    images, labels = toy_stack()
    first = Trainer(tiny_model(), images, labels, config=config(steps=3, seed=5))
    first.fit()
    path = first.save(tmp_path / "first.pt")
    model = tiny_model(seed=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    state = load_resume_state(path, model, optimizer, TrainConfig(learning_rate=0.5, weight_decay=0.25),
                              torch.device("cpu"))
    assert state.step == 3 and state.elapsed == first._elapsed_before
    assert torch.equal(state.generator_state, first._generator.get_state())
    assert state.history["step"] == [1, 2, 3] and state.history["stop_reason"] == "reached 3 steps"
    for a, b in zip(first.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert optimizer.state and optimizer.param_groups[0]["lr"] == 0.5  # this run's settings win
    assert optimizer.param_groups[0]["weight_decay"] == 0.25
