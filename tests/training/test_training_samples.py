"""The samples a Trainer learns from (napari_unet.training.samples): normalisation, replay, anchoring."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from training_toys import config, tiny_model, toy_stack

from napari_unet.checkpoint import load_checkpoint
from napari_unet.data import DataError
from napari_unet.training import Trainer, TrainingError
from napari_unet.training.samples import TrainingData


def test_each_sample_is_normalised_on_its_own_statistics_unless_statistics_are_given(tmp_path):
    images, labels = toy_stack(n=2)
    images = images.astype(np.float32)
    images[1], labels[1] = images[0] * 5 + 300, labels[0]  # slice 0 brighter, with more contrast
    own = Trainer(tiny_model(), images, labels, config=config(steps=1, val_fraction=0.0))
    np.testing.assert_allclose(own.train_samples[0].image, own.train_samples[1].image, atol=1e-5)
    given = {"method": "percentile", "lo": 0.0, "hi": 10.0}
    fixed = Trainer(tiny_model(), images, labels, config=config(steps=1, val_fraction=0.0), normalization=given)
    np.testing.assert_allclose(fixed.train_samples[1].image[0], images[1] / 10.0, rtol=1e-6)
    fixed.fit()
    ckpt = load_checkpoint(fixed.save(tmp_path / "model.pt"))
    assert ckpt.normalization == {"method": "percentile"}  # prediction measures each image itself


def test_labels_outside_the_models_classes_are_refused():
    images, labels = toy_stack()
    with pytest.raises(DataError, match="class"):
        Trainer(tiny_model(), images, labels * 3, config=config())


def _predict_classes(model, images):
    from napari_unet.inference import predict, probabilities_to_labels

    return probabilities_to_labels(predict(model, images, device="cpu"))


def test_anchor_labels_unlabelled_pixels_with_the_models_own_prediction_and_keeps_the_focus(monkeypatch):
    images, labels = toy_stack(n=2)
    weights = np.zeros(labels.shape, np.float32)
    weights[:, 10:14, 10:14] = 1
    seen = {}
    import napari_unet.training.trainer as trainer_module

    real_sampler = trainer_module.PatchSampler

    def spy(samples, *args, **kwargs):
        seen["samples"], seen["focus"] = samples, kwargs.get("focus")
        return real_sampler(samples, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "PatchSampler", spy)
    model = tiny_model(width=8)
    trainer = Trainer(model, images, labels, weights, config=config(steps=1, anchor_weight=0.25))
    own = [trainer.validator.predict_logits(s, trainer.model).argmax(0).numpy() for s in trainer.train_samples]
    trainer.fit()
    for sample, anchored, mine, focus in zip(trainer.train_samples, seen["samples"], own, seen["focus"]):
        unlabelled = sample.weights == 0
        assert np.array_equal(anchored.labels[unlabelled], mine[unlabelled])  # the model's own classes
        assert np.array_equal(anchored.labels[~unlabelled], sample.labels[~unlabelled])  # the user's
        assert np.all(anchored.weights[unlabelled] == np.float32(0.25)) and np.all(anchored.weights[~unlabelled] == 1)
        assert np.array_equal(focus, ~unlabelled)  # patches still centre on the corrections


def test_anchor_keeps_a_trained_model_from_learning_one_class_everywhere():
    """Strokes that are all foreground: ignored elsewhere they teach 'foreground everywhere'."""
    images, labels = toy_stack(n=6, seed=1)
    start = tiny_model(width=8)
    Trainer(start, images, labels, config=config(steps=60, learning_rate=1e-2, batch_size=4)).fit()
    before = _predict_classes(start, images)
    strokes = np.zeros(labels.shape, np.float32)
    strokes[labels == 1] = 1  # every stroke is class 1
    results = {}
    for anchor in (0.0, 0.3):
        model = copy.deepcopy(start)
        Trainer(model, images, labels, strokes,
                config=config(steps=100, learning_rate=3e-2, batch_size=4, anchor_weight=anchor, ema_decay=None,
                              warmup_steps=0, schedule="constant", dice_fade=None)).fit()
        background = labels == 0
        results[anchor] = float((_predict_classes(model, images)[background] == 1).mean())
    start_error = float((before[labels == 0] == 1).mean())
    assert results[0.0] > 0.5  # unanchored: most background turned foreground
    assert results[0.3] < start_error + 0.05  # anchored: background stays background


def test_replay_samples_get_their_share_of_the_draws_whatever_their_size(monkeypatch):
    images, labels = toy_stack(n=4)
    weights = np.zeros(labels.shape, np.float32)
    weights[0, :4, :4] = 1  # 16 new pixels against 3 x 1024 replayed ones
    seen = {}
    original = TrainingData.sample_probability

    def spy(self, replay_share):
        seen["p"] = original(self, replay_share)
        return seen["p"]

    monkeypatch.setattr(TrainingData, "sample_probability", spy)
    trainer = Trainer(tiny_model(), images[:1], labels[:1], weights[:1], replay_images=images[1:],
                      replay_labels=labels[1:], config=config(steps=1, replay_share=0.3))
    trainer.fit()
    assert len(trainer.train_samples) == 4 and trainer.data.new_samples == 1
    assert seen["p"][0] == pytest.approx(0.7)
    assert seen["p"][1:] == pytest.approx([0.1, 0.1, 0.1])
    # drawn at those rates: a 0.7 share for the 16 pixels, not 16 / 3088
    from napari_unet.data import PatchSampler

    sampler = PatchSampler(trainer.train_samples, (16, 16), sample_probability=seen["p"])
    chosen = torch.multinomial(sampler._sample_probability, 4000, replacement=True,
                               generator=torch.Generator().manual_seed(0))
    assert (chosen == 0).float().mean().item() == pytest.approx(0.7, abs=0.03)


def test_replay_data_hold_out_their_own_validation_and_are_normalised_on_their_own():
    images, labels = toy_stack(n=6)
    bright = np.clip(images[3:].astype(np.int32) + 80, 0, 255).astype(np.uint8)
    statistics = {"method": "percentile", "low": 1.0, "high": 99.8, "lo": 0.0, "hi": 1000.0}
    trainer = Trainer(tiny_model(), images[:3], labels[:3], normalization=statistics, replay_images=bright,
                      replay_labels=labels[3:], config=config(steps=1, val_fraction=0.34))
    assert len(trainer.train_samples) == 2 + 2 and len(trainer.val_samples) == 1 + 1
    replayed = trainer.train_samples[-1].image
    new = trainer.train_samples[0].image
    assert new.max() < 0.3  # the fixed statistics (0..1000) of the new image
    assert replayed.max() > 0.9  # the replayed image's own percentiles


def test_replay_needs_both_images_and_labels_and_a_share_below_one():
    images, labels = toy_stack(n=2)
    with pytest.raises(DataError, match="Replay needs both"):
        Trainer(tiny_model(), images, labels, replay_images=images, config=config())
    with pytest.raises(TrainingError, match="replay share"):
        Trainer(tiny_model(), images, labels, config=config(replay_share=1.0))


def test_training_data_counts_new_and_replay_samples_and_mixes_their_draws():
    images, labels = toy_stack(n=4)
    mixed = TrainingData(tiny_model(), 2, images[:1], labels[:1], replay_images=images[1:], replay_labels=labels[1:],
                         val_fraction=0.0)
    assert mixed.new_samples == 1 and mixed.replay_samples == 3 and mixed.val_samples == []
    assert mixed.sample_probability(0.25) == pytest.approx([0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3])
    alone = TrainingData(tiny_model(), 2, images, labels, val_fraction=0.0)
    assert alone.replay_samples == 0 and alone.sample_probability(0.25) is None  # by labelled pixels
    assert alone.normalization == {"method": "percentile", "low": 1.0, "high": 99.8}


def test_border_weight_maps_only_for_the_border_loss_or_when_asked():
    from napari_unet.training import TrainConfig

    images, labels = toy_stack(n=2)
    data = TrainingData(tiny_model(), 2, images, labels, val_fraction=0.0)
    assert data.border_weight_maps(TrainConfig()) is None
    maps = data.border_weight_maps(TrainConfig(loss="border-weighted"))
    assert [m.shape for m in maps] == [(32, 32), (32, 32)] and all(m.min() > 0 for m in maps)
    assert data.border_weight_maps(TrainConfig(border_weights=True)) is not None


def test_images_thinner_than_the_model_can_pool_are_refused_in_plain_words():
    images, labels = toy_stack(n=2)
    with pytest.raises(DataError, match="too thin for this model"):
        TrainingData(tiny_model(depth=4), 2, images[:, :8], labels[:, :8])


def test_anchored_samples_label_the_unlabelled_pixels_with_the_models_classes():
    from napari_unet.data import Sample
    from napari_unet.training.samples import anchored_samples

    weights = np.zeros((4, 4), np.float32)
    weights[0] = 2.0
    sample = Sample(np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.int64), weights)
    full = Sample(sample.image, sample.labels, np.ones((4, 4), np.float32))
    (anchored, kept) = anchored_samples([sample, full], 0.5, lambda s: np.ones((4, 4), np.int64), lambda: False)
    assert kept is full  # nothing unlabelled
    assert (anchored.labels[0] == 0).all() and (anchored.labels[1:] == 1).all()
    assert (anchored.weights[0] == 2.0).all() and (anchored.weights[1:] == 0.5).all()
    samples = [sample, full]
    assert anchored_samples(samples, 0.0, lambda s: 1 / 0, lambda: False) is samples  # anchoring off
    assert anchored_samples(samples, 0.5, lambda s: 1 / 0, lambda: True) is samples  # Stop came first
