"""A data-parallel training rank for test_training_distributed.py (spawned: importable, top level)."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch
from training_toys import config, tiny_model, toy_stack

from napari_unet.data import PatchSampler
from napari_unet.training import Trainer, distributed

STEPS = 8


def train_rank(rank: int, world_size: int, port: int, folder: str, device: str = "cpu") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group = distributed.ProcessGroup(rank, world_size, rank)
    rank_device = distributed.device_for(group, torch.device(device))
    record: dict = {"backend": distributed.start(group, rank_device)}
    record["batches"] = []
    sample = PatchSampler.sample

    def recorded_sample(self, batch_size, generator):
        batch = sample(self, batch_size, generator)
        record["batches"].append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest())
        return batch

    PatchSampler.sample = recorded_sample
    images, labels = toy_stack(n=6)
    model = tiny_model(seed=rank)  # different on each rank: DDP starts every rank from rank 0's

    def on_event(event) -> None:
        if event.kind == "step" and event.step == STEPS:  # the raw weights after the last update
            record["weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    trainer = Trainer(model, images, labels,
                      config=config(steps=STEPS, val_fraction=0.34, val_every=4, device=str(rank_device)),
                      callbacks=[on_event], process_group=group)
    trainer.fit()
    record["history"] = trainer.history
    record["final"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if group.is_main:
        trainer.save(Path(folder) / "model.pt")
    distributed.stop()
    (Path(folder) / f"rank{rank}.pkl").write_bytes(pickle.dumps(record))
