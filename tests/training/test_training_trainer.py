"""The training loop (napari_unet.training.trainer): steps, events, stop, saving, devices."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from training_toys import config, step_losses, tiny_model, toy_stack

from napari_unet.checkpoint import load_checkpoint
from napari_unet.models import build_model
from napari_unet.training import Trainer, TrainEvent, TrainingOutOfMemory


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


def test_multiclass_model_and_explicit_validation_data():
    images, labels = toy_stack(n=4)
    labels = labels.astype(np.int64)
    labels[:, :, :8] = 2
    model = tiny_model(out_channels=3)
    trainer = Trainer(model, images[:3], labels[:3], val_images=images[3:], val_labels=labels[3:],
                      config=config(steps=2, val_every=1, loss="ce_dice"))
    validations = [e for e in trainer.run() if e.kind == "validation"]
    assert len(validations) == 2 and len(validations[0].dice) == 3


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
