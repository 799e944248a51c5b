"""The training engine (napari_unet.training) on tiny synthetic data."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from napari_unet.checkpoint import load_checkpoint
from napari_unet.data import DataError
from napari_unet.models import build_model
from napari_unet.training import TrainConfig, Trainer, TrainEvent, TrainingError, TrainingOutOfMemory


def toy_stack(n=6, size=32, seed=0):
    """Bright blobs (class 1) on a dark noisy background: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.integers(4, size - 4, 2)
            labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(9, 30)] = 1
    images = (labels * 120 + 60 + rng.normal(0, 15, labels.shape)).clip(0, 255).astype(np.uint8)
    return images, labels


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = {"width": 4, "depth": 2, **kwargs}
    return build_model("unet", **options)


def config(**overrides):
    base = dict(steps=5, patch_size=32, batch_size=2, device="cpu", val_fraction=0.0, warmup_steps=2)
    base.update(overrides)
    return TrainConfig(**base)


def step_losses(events):
    return [e.loss for e in events if e.kind == "step"]


def test_loss_decreases_on_a_learnable_toy_set():
    images, labels = toy_stack()
    trainer = Trainer(tiny_model(width=8), images, labels,
                      config=config(steps=25, learning_rate=1e-2, augment=False, batch_size=4))
    losses = step_losses(list(trainer.run()))
    assert len(losses) == 25
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])


def test_events_history_and_finished_message():
    images, labels = toy_stack()
    received = []
    trainer = Trainer(tiny_model(), images, labels, config=config(steps=4, val_fraction=0.34, val_every=2),
                      callbacks=[received.append])
    history = trainer.fit()
    kinds = [e.kind for e in received]
    assert kinds.count("step") == 4 and kinds.count("validation") == 2 and kinds[-1] == "finished"
    step = next(e for e in received if e.kind == "step")
    assert step.loss > 0 and step.lr > 0 and step.samples_per_second > 0 and step.elapsed >= 0
    validation = next(e for e in received if e.kind == "validation")
    assert len(validation.dice) == 2 and len(validation.iou) == 2
    assert "4 steps" in received[-1].message
    assert history["step"] == [1, 2, 3, 4] and len(history["val_dice"]) == 2
    assert len(trainer.val_samples) == 2 and len(trainer.train_samples) == 4


def test_seeded_runs_repeat_exactly_on_cpu():
    images, labels = toy_stack()
    runs = [step_losses(Trainer(tiny_model(seed=1), images, labels, config=config(steps=4, seed=3)).run())
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = step_losses(Trainer(tiny_model(seed=1), images, labels, config=config(steps=4, seed=4)).run())
    assert other != runs[0]


def test_stop_ends_the_run_before_the_next_step():
    images, labels = toy_stack()
    trainer = Trainer(tiny_model(), images, labels, config=config(steps=1000))

    def stop_at_three(event: TrainEvent) -> None:
        if event.kind == "step" and event.step == 3:
            trainer.stop()

    trainer.callbacks.append(stop_at_three)
    events = list(trainer.run())
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3]
    assert events[-1].kind == "finished" and "stopped by user" in events[-1].message


def test_stop_from_another_thread():
    images, labels = toy_stack()
    trainer = Trainer(tiny_model(), images, labels, config=config(steps=100000))
    first_step = threading.Event()
    steps_after_stop = []

    def consume():
        for event in trainer.run():
            if event.kind == "step":
                first_step.set()
                if trainer.stop_requested:
                    steps_after_stop.append(event.step)

    worker = threading.Thread(target=consume)
    worker.start()
    assert first_step.wait(60)
    trainer.stop()
    worker.join(60)
    assert not worker.is_alive()
    assert len(steps_after_stop) <= 1  # at most the step that was running when stop() came


def test_ignored_pixels_have_no_influence():
    """Changing labels where the weight is 0 leaves every loss and weight exactly the same."""
    images, labels = toy_stack(n=4)
    weights = np.ones(labels.shape, np.float32)
    weights[:, :, :12] = 0
    scrambled = labels.copy()
    scrambled[:, :, :12] = 1 - scrambled[:, :, :12]
    for loss in ("dice_bce", "border_weighted"):
        results = []
        for target in (labels, scrambled):
            model = tiny_model(seed=2)
            trainer = Trainer(model, images, target, weights, config=config(steps=3, loss=loss))
            results.append((step_losses(trainer.run()), [p.detach().clone() for p in model.parameters()]))
        assert results[0][0] == results[1][0]
        for a, b in zip(results[0][1], results[1][1]):
            assert torch.equal(a, b)


def test_fully_ignored_patches_give_zero_gradients():
    images, labels = toy_stack(n=2)
    weights = np.zeros(labels.shape, np.float32)
    weights[0, :4, :4] = 1  # a few labelled pixels, patches mostly ignored
    model = tiny_model()
    trainer = Trainer(model, images, labels, weights, config=config(steps=2, label_focus=0.0))
    assert all(np.isfinite(step_losses(trainer.run())))


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


def test_best_weights_are_kept_and_saved_checkpoint_predicts_identically(tmp_path):
    images, labels = toy_stack()
    trainer = Trainer(tiny_model(), images, labels, config=config(steps=6, val_fraction=0.34, val_every=2))
    trainer.fit()
    best = trainer.history["best_step"]
    assert best in (2, 4, 6)
    path = trainer.save(tmp_path / "model.pt", provenance={"data_paths": ["toy"]})
    ckpt = load_checkpoint(path)
    assert ckpt.normalization["method"] == "percentile"
    assert ckpt.provenance["steps"] == 6 and ckpt.provenance["data_paths"] == ["toy"]
    assert ckpt.history["best_step"] == best
    x = torch.randn(2, 1, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(x), ckpt.model(x))


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


def test_time_budget_and_early_stopping():
    images, labels = toy_stack()
    events = list(Trainer(tiny_model(), images, labels, config=config(steps=None, time_budget=0.5)).run())
    assert "time budget" in events[-1].message
    trainer = Trainer(tiny_model(), images, labels,
                      config=config(steps=50, learning_rate=1e-12, val_fraction=0.34, val_every=1,
                                    early_stopping_patience=2, warmup_steps=0))
    events = list(trainer.run())
    assert "early stop" in events[-1].message
    assert trainer.step == 3  # first validation sets the best; two more without improvement


def test_preview_events_carry_the_callbacks_result():
    images, labels = toy_stack()
    calls = []

    def preview(model):
        calls.append(model.training)
        return "preview!"

    trainer = Trainer(tiny_model(), images, labels, config=config(steps=3), preview_fn=preview, preview_interval=0.0)
    previews = [e for e in trainer.run() if e.kind == "preview"]
    assert len(previews) == 3 and previews[0].payload == "preview!"
    assert calls == [False, False, False]  # called in eval mode


def test_3d_model_trains_with_region_validation():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 20, 20)) > 0.6).astype(np.uint8)
    images = (labels * 100 + rng.normal(0, 10, labels.shape)).astype(np.float32)
    torch.manual_seed(0)
    model = build_model("unet3d", width=4, depth=1)
    trainer = Trainer(model, images, labels, config=config(steps=2, patch_size=(8, 16, 16), val_fraction=0.25, val_every=1))
    events = list(trainer.run())
    assert sum(e.kind == "validation" for e in events) == 2
    assert trainer.val_samples[0].spatial_shape[0] + trainer.train_samples[0].spatial_shape[0] == 40


def test_out_of_memory_becomes_a_plain_error():
    images, labels = toy_stack()
    model = tiny_model()

    def explode(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.forward = explode
    trainer = Trainer(model, images, labels, config=config())
    with pytest.raises(TrainingOutOfMemory, match="smaller batch"):
        trainer.fit()


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
    data = dict(val_images=images[4:], val_labels=labels[4:])
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


def test_measuring_the_label_offset_changes_no_weights_or_statistics():
    # it runs on the weight average in training mode during a run: batch norm must use, and keep,
    # its running statistics, or the validation that follows would see others
    images, labels = toy_stack(n=4)
    trainer = Trainer(tiny_model(), images, labels, config=config(steps=2))
    model = trainer.model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer._measure_label_offset(model, 2**19)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_time_budget_leaves_room_for_the_final_choice():
    images, labels = toy_stack(n=6)
    trainer = Trainer(tiny_model(), images[:4], labels[:4], val_images=images[4:], val_labels=labels[4:],
                      config=config(steps=None, time_budget=3.0, val_every=2))
    trainer.fit()
    assert 0 < trainer._finish_reserve <= 0.1 * 3.0  # a tenth of the budget at most
    # however slow the machine, the run validated often enough to compare its best weights
    assert len(trainer.history["val_step"]) >= 2
    assert len(trainer.history["tta_choice"]) == min(4, len(trainer.history["val_step"]))


def test_labels_outside_the_models_classes_are_refused():
    images, labels = toy_stack()
    with pytest.raises(DataError, match="class"):
        Trainer(tiny_model(), images, labels * 3, config=config())


def test_multiclass_model_and_explicit_validation_data():
    images, labels = toy_stack(n=4)
    labels = labels.astype(np.int64)
    labels[:, :, :8] = 2
    model = tiny_model(out_channels=3)
    trainer = Trainer(model, images[:3], labels[:3], val_images=images[3:], val_labels=labels[3:],
                      config=config(steps=2, val_every=1, loss="ce_dice"))
    validations = [e for e in trainer.run() if e.kind == "validation"]
    assert len(validations) == 2 and len(validations[0].dice) == 3


def test_large_validation_samples_go_through_tiled_inference(monkeypatch):
    from napari_unet import training

    images, labels = toy_stack()
    whole = [e.dice for e in Trainer(tiny_model(), images, labels, config=config(steps=1, val_fraction=0.34,
                                                                                  val_every=1)).run()
             if e.kind == "validation"]
    monkeypatch.setattr(training, "_WHOLE_SAMPLE_PIXELS", {2: 100, 3: 100})
    tiled = [e.dice for e in Trainer(tiny_model(), images, labels, config=config(steps=1, val_fraction=0.34,
                                                                                  val_every=1)).run()
             if e.kind == "validation"]
    assert len(tiled) == 1 and len(tiled[0]) == 2
    np.testing.assert_allclose(tiled[0], whole[0], atol=0.05)


# ---------------------------------------------------------------------------------- anchoring


def _predict_classes(model, images):
    from napari_unet.inference import predict, probabilities_to_labels

    return probabilities_to_labels(predict(model, images, device="cpu"))


def test_anchor_labels_unlabelled_pixels_with_the_models_own_prediction_and_keeps_the_focus(monkeypatch):
    images, labels = toy_stack(n=2)
    weights = np.zeros(labels.shape, np.float32)
    weights[:, 10:14, 10:14] = 1
    seen = {}
    import napari_unet.training as training_module

    real_sampler = training_module.PatchSampler

    def spy(samples, *args, **kwargs):
        seen["samples"], seen["focus"] = samples, kwargs.get("focus")
        return real_sampler(samples, *args, **kwargs)

    monkeypatch.setattr(training_module, "PatchSampler", spy)
    model = tiny_model(width=8)
    trainer = Trainer(model, images, labels, weights, config=config(steps=1, anchor_weight=0.25))
    own = [trainer._predict_sample_logits(s).argmax(0).numpy() for s in trainer.train_samples]
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


def test_weight_average_averages_batch_norm_statistics_too():
    from napari_unet.training import _WeightAverage

    model = tiny_model()
    average = _WeightAverage(model, decay=0.5)
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


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_training_with_mixed_precision_learns_and_saves_a_cpu_loadable_checkpoint(tmp_path):
    images, labels = toy_stack(n=8, size=64)
    trainer = Trainer(tiny_model(width=8), images, labels,
                      config=config(steps=40, patch_size=64, batch_size=4, learning_rate=1e-2, augment=True,
                                    device="cuda", amp="auto", val_fraction=0.25, val_every=20))
    events = list(trainer.run())
    losses = step_losses(events)
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert trainer.history["val_dice"] and min(trainer.history["val_dice"][-1]) > 0.5
    ckpt = load_checkpoint(trainer.save(tmp_path / "gpu.pt"), map_location="cpu")
    x = torch.randn(2, 1, 64, 64)
    trainer.model.eval()
    with torch.no_grad():
        on_gpu = trainer.model(x.cuda()).float().cpu()
        assert torch.allclose(ckpt.model(x), on_gpu, atol=1e-3)


@pytest.mark.gpu
def test_cuda_3d_training_runs_with_mixed_precision():
    rng = np.random.default_rng(3)
    volume = rng.normal(0, 1, (24, 32, 32)).astype(np.float32)
    labels = (volume > 0.5).astype(np.uint8)
    trainer = Trainer(build_model("unet3d", width=4, depth=2), volume, labels,
                      config=config(steps=6, patch_size=16, batch_size=2, device="cuda", amp="auto"))
    assert all(np.isfinite(step_losses(trainer.run())))
    assert next(trainer.model.parameters()).device.type == "cuda"


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
    settings = dict(steps=1, learning_rate=1e-12, augment=False, val_fraction=0.34, val_every=1, ema_decay=None)
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
    from napari_unet import losses, training

    assert training._has_cross_entropy_term(losses.get_loss("ce_dice"))
    assert not training._has_cross_entropy_term(losses.get_loss("dice"))
    assert not training._has_cross_entropy_term(losses.get_loss("dice_bce", bce_weight=0.0))



def test_the_cosine_schedule_falls_to_its_floor():
    import math

    images, labels = toy_stack()
    trainer = Trainer(tiny_model(), images, labels,
                      config=config(steps=10, warmup_steps=0, learning_rate=1e-2, min_lr_fraction=0.5))
    trainer.fit()
    expected = [1e-2 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * k / 10))) for k in range(10)]
    assert trainer.history["lr"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------- replay


def test_replay_samples_get_their_share_of_the_draws_whatever_their_size(monkeypatch):
    images, labels = toy_stack(n=4)
    weights = np.zeros(labels.shape, np.float32)
    weights[0, :4, :4] = 1  # 16 new pixels against 3 x 1024 replayed ones
    seen = {}
    original = Trainer._sample_probability

    def spy(self):
        seen["p"] = original(self)
        return seen["p"]

    monkeypatch.setattr(Trainer, "_sample_probability", spy)
    trainer = Trainer(tiny_model(), images[:1], labels[:1], weights[:1], replay_images=images[1:],
                      replay_labels=labels[1:], config=config(steps=1, replay_share=0.3))
    trainer.fit()
    assert len(trainer.train_samples) == 4 and trainer._new_samples == 1
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
