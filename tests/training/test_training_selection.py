"""Which weights a run keeps (napari_unet.training.selection): the best, chosen again with TTA."""

from __future__ import annotations

import numpy as np
import torch
from training_toys import config, tiny_model, toy_stack

from napari_unet.training import TrainConfig, Trainer
from napari_unet.training.selection import KeptWeights


def _tta_dice(model, images, labels):
    """Dice per class of predict(tta=True) on a stack, as the trainer's final choice scores it."""
    from napari_unet import metrics
    from napari_unet.inference import predict, probabilities_to_labels

    prediction = probabilities_to_labels(predict(model, images, tta=True, device="cpu"))
    return metrics.dice_per_class(prediction, labels.astype(np.int64), 2)


def test_the_kept_weights_are_the_best_with_tta_of_the_best_validations():
    images, labels = toy_stack(n=6)
    settings = config(steps=12, val_every=2, learning_rate=0.02, tta_candidates=3, fit_label_offset=False)
    trainer = Trainer(tiny_model(), images[:4], labels[:4], val_images=images[4:], val_labels=labels[4:],
                      config=settings)
    events = list(trainer.run())
    history = trainer.history
    choice = history["tta_choice"]
    single_view = dict(zip(history["val_step"], (float(np.mean(d)) for d in history["val_dice"])))
    # the three best single-view validations, compared with 8 views each
    assert sorted(c["step"] for c in choice) == sorted(sorted(single_view, key=single_view.get)[-3:])
    kept = max(choice, key=lambda c: np.mean(c["tta_dice"]))
    assert history["best_step"] == kept["step"] and history["best_val_dice"] == kept["dice"]
    np.testing.assert_allclose(_tta_dice(trainer.model, images[4:], labels[4:]), kept["tta_dice"], atol=1e-6)
    assert f"kept step {kept['step']}" in events[-1].message


def test_one_candidate_or_stop_keeps_the_best_single_view_weights():
    images, labels = toy_stack(n=6)
    data = {"val_images": images[4:], "val_labels": labels[4:]}
    single = Trainer(tiny_model(), images[:4], labels[:4], config=config(steps=8, val_every=2, tta_candidates=1),
                     **data)
    single.fit()
    best = max(zip(single.history["val_dice"], single.history["val_step"]), key=lambda d: np.mean(d[0]))
    assert "tta_choice" not in single.history and single.history["best_step"] == best[1]

    stopped = Trainer(tiny_model(), images[:4], labels[:4], config=config(steps=1000, val_every=2), **data)
    stopped.callbacks.append(lambda event: stopped.stop() if event.kind == "step" and event.step == 6 else None)
    stopped.fit()
    assert "tta_choice" not in stopped.history and stopped.history["val_step"] == [2, 4]
    # a later run that chooses nothing (here: stopped) does not keep an earlier run's record
    single.config.tta_candidates = 4
    single.fit()
    assert len(single.history["tta_choice"]) == 4
    single.callbacks.append(lambda event: single.stop() if event.kind == "step" else None)
    single.fit()
    assert "tta_choice" not in single.history


def _weights(value: float) -> torch.nn.Module:
    """A one-weight model whose weight says which validation it came from."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_kept_weights_follow_the_best_validation_and_the_best_candidates():
    kept = KeptWeights(TrainConfig(tta_candidates=2), offset=(0.0, 0.0))
    assert kept.record(1, [0.5, 0.5], _weights(1.0), (0.5, 0.0))
    assert not kept.record(2, [0.4, 0.4], _weights(2.0), (0.0, 0.0))
    assert not kept.record(3, [0.4, 0.5], _weights(3.0), (0.0, 0.0))
    assert kept.best_score == 0.5 and kept.best_offset == (0.5, 0.0) and kept.stale_validations == 2
    assert float(kept.best_state["weight"]) == 1.0
    assert [c.step for c in kept.candidates] == [1, 3]  # the two best, best first
    assert kept.candidates[0].state is kept.best_state  # no second copy of the best weights
    assert float(kept.candidates[1].state["weight"]) == 3.0
    assert kept.record(4, [0.9, 0.9], _weights(4.0), (0.0, 0.0)) and kept.stale_validations == 0


def test_choose_with_tta_keeps_the_candidate_that_scores_best_with_tta():
    kept = KeptWeights(TrainConfig(tta_candidates=3), offset=(0.0,))
    for step, (value, dice) in enumerate([(1.0, 0.9), (2.0, 0.8), (3.0, 0.7)], start=1):
        kept.record(step, [dice], _weights(value), (value / 10,))
    model = _weights(0.0)
    assert kept.choose_with_tta(model, lambda model, offset: None) is None  # Stop came first
    assert float(kept.best_state["weight"]) == 1.0

    chosen, scored = kept.choose_with_tta(model, lambda scratch, offset: [float(scratch.weight) / 10])
    assert chosen.step == 3 and float(kept.best_state["weight"]) == 3.0 and kept.best_offset == (0.3,)
    assert [(c.step, dice) for c, dice in scored] == [(1, [0.1]), (2, [0.2]), (3, [0.3])]
    assert float(model.weight) == 0.0  # a copy loaded the candidates


def test_one_candidate_leaves_nothing_to_choose():
    kept = KeptWeights(TrainConfig(tta_candidates=1), offset=(0.0,))
    kept.record(1, [0.5], _weights(1.0), (0.0,))
    kept.record(2, [0.6], _weights(2.0), (0.0,))
    assert kept.candidates == [] and kept.choose_with_tta(_weights(0.0), lambda *_: [1.0]) is None
    assert float(kept.best_state["weight"]) == 2.0
