"""Validation during training (napari_unet.training.validation): scores, tiled samples, label offset."""

from __future__ import annotations

import numpy as np
import torch
from training_toys import config, tiny_model, toy_stack

from napari_unet.data import Sample
from napari_unet.training import TrainConfig, Trainer
from napari_unet.training.validation import Validator, spread_subset


def test_measuring_the_label_offset_changes_no_weights_or_statistics():
    # it runs on the weight average in training mode during a run: batch norm must use, and keep,
    # its running statistics, or the validation that follows would see others
    images, labels = toy_stack(n=4)
    trainer = Trainer(tiny_model(), images, labels, config=config(steps=2))
    model = trainer.model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer.validator.measure_label_offset(model, 2**19)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_time_budget_leaves_room_for_the_final_choice():
    images, labels = toy_stack(n=6)
    trainer = Trainer(tiny_model(), images[:4], labels[:4], val_images=images[4:], val_labels=labels[4:],
                      config=config(steps=None, time_budget=3.0, val_every=2))
    trainer.fit()
    assert 0 < trainer.validator.finish_reserve <= 0.1 * 3.0  # a tenth of the budget at most
    # however slow the machine, the run validated often enough to compare its best weights
    assert len(trainer.history["val_step"]) >= 2
    assert len(trainer.history["tta_choice"]) == min(4, len(trainer.history["val_step"]))


def test_large_validation_samples_go_through_tiled_inference(monkeypatch):
    from napari_unet.training import validation

    images, labels = toy_stack()
    whole = [e.dice for e in Trainer(tiny_model(), images, labels, config=config(steps=1, val_fraction=0.34,
                                                                                  val_every=1)).run()
             if e.kind == "validation"]
    monkeypatch.setattr(validation, "_WHOLE_SAMPLE_PIXELS", {2: 100, 3: 100})
    tiled = [e.dice for e in Trainer(tiny_model(), images, labels, config=config(steps=1, val_fraction=0.34,
                                                                                  val_every=1)).run()
             if e.kind == "validation"]
    assert len(tiled) == 1 and len(tiled[0]) == 2
    np.testing.assert_allclose(tiled[0], whole[0], atol=0.05)


class _SharpThreshold(torch.nn.Module):
    """Predicts ``image > 0.5`` sharply; trained with a negligible learning rate it stays so."""

    spatial_dims, in_channels, out_channels = 2, 1, 1

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return self.gain * (x - 0.5)


def _labels_one_pixel_below(n=6, size=64):
    """Smooth images in [0, 1] and labels of ``image > 0.5`` drawn one pixel lower (+1 in y)."""
    from scipy import ndimage as ndi

    field = ndi.gaussian_filter(np.random.default_rng(4).random((n, size, size)), (0, 3, 3))
    images = ((field - field.min()) / np.ptp(field)).astype(np.float32)
    labels = (ndi.shift(images, (0, 1, 0), order=1, mode="nearest") > 0.5).astype(np.uint8)
    return images, labels


def test_the_trainer_finds_the_label_offset_and_predict_applies_it(tmp_path):
    from napari_unet.inference import predict

    images, labels = _labels_one_pixel_below()
    settings = {"steps": 1, "learning_rate": 1e-12, "augment": False, "val_fraction": 0.34, "val_every": 1, "ema_decay": None}
    runs = {}
    for fit in (False, True):
        trainer = Trainer(_SharpThreshold(), images, labels, normalization={"method": "none"},
                          config=config(fit_label_offset=fit, **settings))
        trainer.fit()
        runs[fit] = trainer
    assert runs[False].model.label_offset == (0.0, 0.0)
    assert runs[True].model.label_offset == (1.0, 0.0)
    assert runs[True].history["label_offset"] == [1.0, 0.0]
    # validation scores the prediction where the labels sit
    assert min(runs[True].history["val_dice"][-1]) > min(runs[False].history["val_dice"][-1]) + 0.02

    model = runs[True].model
    moved = predict(model, images[0], device="cpu")
    plain = predict(model, images[0], device="cpu", label_offset=(0.0, 0.0))
    np.testing.assert_allclose(moved[1, 1:], plain[1, :-1], atol=1e-4)
    assert ((moved[1] >= 0.5) != labels[0]).mean() < 0.5 * ((plain[1] >= 0.5) != labels[0]).mean()


def test_a_few_corrections_keep_the_offset_the_model_came_with():
    images, labels = _labels_one_pixel_below()
    weights = np.zeros(labels.shape, np.float32)
    weights[:, 30:34, 30:34] = 1  # 16 pixels per slice: too few to say where boundaries sit
    model = _SharpThreshold()
    model.label_offset = (-0.5, 0.25)
    trainer = Trainer(model, images, labels, weights, normalization={"method": "none"},
                      config=config(steps=1, learning_rate=1e-12, augment=False, ema_decay=None))
    trainer.fit()
    assert trainer.model.label_offset == (-0.5, 0.25)


def test_the_offset_is_measured_again_at_most_every_30_seconds(monkeypatch):
    from napari_unet import label_offset

    calls = []
    real_estimate = label_offset.estimate_offset
    monkeypatch.setattr(label_offset, "estimate_offset", lambda *a, **k: calls.append(1) or real_estimate(*a, **k))
    images, labels = _labels_one_pixel_below()
    trainer = Trainer(_SharpThreshold(), images, labels, normalization={"method": "none"},
                      config=config(steps=4, learning_rate=1e-12, augment=False, val_fraction=0.34, val_every=1,
                                    ema_decay=None))
    trainer.fit()
    assert len(trainer.history["val_step"]) == 4
    assert len(calls) == 2  # the first validation, then the kept weights at the end
    assert trainer.model.label_offset == (1.0, 0.0)


def _samples(count: int, shape=(16, 16)) -> list[Sample]:
    return [Sample(np.zeros((1, *shape), np.float32), np.zeros(shape, np.int64), np.ones(shape, np.float32))
            for _ in range(count)]


def test_a_spread_subset_takes_samples_across_the_set_and_cuts_a_big_one_around_its_middle():
    samples = _samples(10)  # 256 pixels each
    subset = spread_subset(samples, 1024)
    assert [[i for i, sample in enumerate(samples) if sample is s] for s in subset] == [[0], [3], [6], [9]]
    assert spread_subset([], 1024) == []
    big = Sample(np.arange(64 * 16, dtype=np.float32).reshape(1, 64, 16), np.zeros((64, 16), np.int64),
                 np.ones((64, 16), np.float32))
    (cut,) = spread_subset([big], 256)
    assert cut.spatial_shape == (16, 16) and cut.image[0, 0, 0] == 24 * 16  # rows 24..39



def test_a_big_3d_sample_is_cut_to_a_central_box_no_thinner_than_a_deep_model_pools():
    shape = (72, 384, 384)
    volume = Sample(np.zeros((1, *shape), np.float32), np.zeros(shape, np.int64), np.ones(shape, np.float32))
    (cut,) = spread_subset([volume], 200_000)
    assert all(side >= 32 for side in cut.spatial_shape)  # not 3 slices of the whole plane
    assert np.prod(cut.spatial_shape) <= 2 * 200_000
    assert np.shares_memory(cut.image, volume.image)  # a view
    thin = Sample(np.zeros((1, 8, 64, 64), np.float32), np.zeros((8, 64, 64), np.int64),
                  np.ones((8, 64, 64), np.float32))
    (same,) = spread_subset([thin], 8 * 64 * 64)
    assert same.spatial_shape == (8, 64, 64)


def test_a_3d_sample_thinner_than_the_models_pooling_is_validated_through_the_tiled_engine():
    from napari_unet.models import build_model

    torch.manual_seed(0)
    model = build_model("unet3d", in_channels=1, out_channels=1, width=4, depth=4).eval()  # pools 16
    sample = Sample(np.random.default_rng(0).normal(size=(1, 3, 40, 40)).astype(np.float32),
                    np.zeros((3, 40, 40), np.int64), np.ones((3, 40, 40), np.float32))
    validator = Validator(TrainConfig(device="cpu"), train_samples=[sample], val_samples=[sample], n_classes=2,
                          spatial_dims=3, device=torch.device("cpu"), offset=(0.0, 0.0, 0.0),
                          stop_requested=lambda: False)
    logits = validator.predict_logits(sample, model)
    assert tuple(logits.shape[-3:]) == (3, 40, 40) and torch.isfinite(torch.as_tensor(logits)).all()

def _validator(images, labels, config_overrides=None, stop=lambda: False):
    from napari_unet.data import make_samples

    samples = make_samples(images, labels, None, spatial_dims=2, in_channels=1, n_classes=2,
                           normalize=lambda image: image)
    settings = TrainConfig(device="cpu", **(config_overrides or {}))
    return Validator(settings, train_samples=samples, val_samples=samples, n_classes=2, spatial_dims=2,
                     device=torch.device("cpu"), offset=(0.0, 0.0), stop_requested=stop)


def test_the_validator_scores_a_model_and_stops_when_asked():
    images, _ = _labels_one_pixel_below()
    exact = (images > 0.5).astype(np.uint8)
    validator = _validator(images, exact, {"fit_label_offset": False})
    model = _SharpThreshold()
    dice, iou = validator.scores(model, (0.0, 0.0))
    assert min(dice) > 0.99 and min(iou) > 0.98
    assert model.training  # back in training mode after the eval-mode predictions
    stopped = _validator(images, exact, stop=lambda: True)
    assert stopped.scores(model, (0.0, 0.0)) is None and stopped.validate(model) is None
    assert stopped.scores(model, (0.0, 0.0), ignore_stop=True) is not None


def test_validation_measures_the_offset_and_leaves_room_in_a_time_budget():
    images, labels = _labels_one_pixel_below()
    validator = _validator(images, labels, {"time_budget": 1000.0, "tta_candidates": 4})
    model = _SharpThreshold()
    result = validator.validate(model)
    assert result.offset == (1.0, 0.0) == validator.label_offset == model.label_offset
    assert 0 < validator.finish_reserve <= 100.0
    validator.start_run()
    assert validator.finish_reserve == 0.0
    plain = _validator(images, labels, {"time_budget": 1000.0, "tta_candidates": 1, "fit_label_offset": False})
    assert plain.validate(model).offset == (0.0, 0.0) and plain.finish_reserve == 0.0
