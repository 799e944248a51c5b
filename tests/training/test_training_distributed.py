"""Data-parallel training over processes: DDP on gloo, started as torchrun would (distributed.py)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from ddp_ranks import STEPS, train_rank

from napari_unet.checkpoint import load_checkpoint
from napari_unet.inference import predict
from napari_unet.training import distributed


def train_rank_model_parameters(state: dict):
    """The entries of a toy model's state dict that are parameters (not buffers)."""
    from training_toys import tiny_model

    names = {name for name, _ in tiny_model().named_parameters()}
    return [(name, tensor) for name, tensor in state.items() if name in names]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_keep_identical_weights_draw_different_patches_and_rank_0_validates(tmp_path):
    torch.multiprocessing.start_processes(train_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    after_steps = ranks[0]["weights"]
    parameters = dict(train_rank_model_parameters(after_steps))
    assert parameters
    for name in parameters:  # DDP: the same update on both ranks
        assert torch.equal(after_steps[name], ranks[1]["weights"][name]), name
    # rank 1 ends with rank 0's weights and batch-norm statistics (rank 0 then keeps its best)
    assert ranks[1]["final"].keys() == after_steps.keys()
    for name, tensor in after_steps.items():
        assert torch.equal(tensor, ranks[1]["final"][name]), name
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == STEPS
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])  # each rank its own patches
    first, second = (r["history"] for r in ranks)
    assert first["replicas"]["identical_weights"] and first["replicas"]["world_size"] == 2
    assert first["val_step"] == [4, 8] and first["best_step"] is not None
    assert second["val_step"] == []  # only rank 0 validates
    assert first["step"] == second["step"] == list(range(1, STEPS + 1))
    assert first["lr"] == second["lr"]  # one schedule: rank 0's clock
    assert first["loss"] == second["loss"]  # the mean over the ranks
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert not (tmp_path / "model1.pt").exists()
    assert predict(checkpoint.model, np.zeros((32, 32), np.float32), device="cpu").shape == (2, 32, 32)


def test_torchrun_trains_through_the_cli_and_rank_0_saves(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 40, 40), np.uint8)
    labels[:, 8:30, 10:25] = 255
    tifffile.imwrite(tmp_path / "images.tif", (labels // 3 + rng.integers(0, 60, labels.shape)).astype(np.uint8))
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "napari_unet.cli", "train", "--images", str(tmp_path / "images.tif"),
               "--labels", str(tmp_path / "labels.tif"), "--steps", "4", "--output", str(tmp_path / "ddp.pt"),
               "--device", "cpu", "--width", "4", "--depth", "2", "--patch-size", "32", "--batch-size", "2",
               "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    assert summaries[0]["processes"] == 2 and summaries[0]["identical_weights_across_processes"] is True
    checkpoint = load_checkpoint(tmp_path / "ddp.pt")
    assert checkpoint.provenance["data_parallel_processes"] == 2
    assert checkpoint.history["replicas"]["identical_weights"]
    assert predict(checkpoint.model, np.zeros((40, 40), np.float32), device="cpu").shape == (2, 40, 40)


def test_the_environment_describes_the_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    group = distributed.from_environment()
    assert group == distributed.ProcessGroup(3, 4, 1) and not group.is_main
    assert distributed.device_for(group, torch.device("cpu")) == torch.device("cpu")


@pytest.mark.gpu
def test_ranks_on_cuda_train_with_nccl_on_their_own_gpus(tmp_path):
    # one rank per GPU (NCCL refuses two ranks on one GPU): 2 where there are 2, else a group of 1
    ranks = min(2, torch.cuda.device_count())
    torch.multiprocessing.start_processes(train_rank, args=(ranks, _free_port(), str(tmp_path), "cuda"),
                                          nprocs=ranks, start_method="spawn")
    records = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(ranks)]
    assert all(r["backend"] == "nccl" for r in records)
    history = records[0]["history"]
    assert history["replicas"]["identical_weights"] and history["replicas"]["world_size"] == ranks
    assert history["val_step"] == [4, 8]
    assert load_checkpoint(tmp_path / "model.pt").model.spatial_dims == 2
