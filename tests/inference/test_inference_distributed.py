"""Prediction on a dask.distributed LocalCluster of worker processes (distributed.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from inference_toys import blobs

from napari_unet import cli
from napari_unet.checkpoint import save_checkpoint
from napari_unet.inference import predict

distributed_module = pytest.importorskip("distributed")

from napari_unet.inference import distributed  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with distributed.connect("local:2") as client:
        yield client


@pytest.fixture
def checkpoint_3d(model_3d, tmp_path):
    path = tmp_path / "model3d.pt"
    save_checkpoint(path, model_3d)
    return path


def test_cluster_prediction_equals_single_process_and_loads_the_model_once_per_worker(
        client, model_3d, checkpoint_3d, tmp_path):
    volume, _ = blobs((40, 44, 36), 6, np.random.default_rng(21))
    expected = predict(model_3d, volume, tile=16, device="cpu")
    stored = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=volume.shape, chunks=(16, 22, 18),
                             dtype="float32")
    stored[...] = volume
    probabilities = distributed.predict_on_cluster(client, checkpoint_3d, da.from_zarr(str(tmp_path / "in.zarr")),
                                                   tile=16, device="cpu")
    assert probabilities.numblocks[1:] == (2, 2, 2)  # 8 chunks over 2 workers
    target = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=probabilities.shape,
                             chunks=distributed.zarr_chunks(probabilities), dtype="float32")
    client.gather(client.compute(da.store(probabilities, target, lock=False, compute=False)))
    assert np.abs(target[...] - expected).max() <= 1e-4
    loads = client.run(distributed.worker_loads)
    assert len(loads) == 2
    assert all(count == 1 for counts in loads.values() for count in counts.values())
    assert sum(bool(counts) for counts in loads.values()) >= 1

    # a second prediction reuses the workers' models
    again = distributed.predict_on_cluster(client, checkpoint_3d, volume, tile=16, device="cpu").compute()
    np.testing.assert_allclose(again, target[...], atol=1e-6)
    assert all(count == 1 for counts in client.run(distributed.worker_loads).values() for count in counts.values())


def test_cli_predicts_on_a_local_cluster_into_zarr(model_3d, checkpoint_3d, tmp_path, capsys):
    volume, _ = blobs((36, 40, 40), 6, np.random.default_rng(22))
    images = zarr.open_array(str(tmp_path / "volume.zarr"), mode="w", shape=volume.shape, chunks=(18, 40, 20),
                             dtype="float32")
    images[...] = volume
    code = cli.main(["predict", "--model", str(checkpoint_3d), "--images", str(tmp_path / "volume.zarr"),
                     "--output", str(tmp_path / "labels.zarr"), "--probabilities", str(tmp_path / "probs.zarr"),
                     "--instances-output", str(tmp_path / "cells.tif"),
                     "--scheduler", "local:2", "--tile", "16", "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    expected = predict(model_3d, volume, tile=16, device="cpu")
    probabilities = zarr.open_array(str(tmp_path / "probs.zarr"), mode="r")
    labels = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")
    assert np.abs(probabilities[...] - expected).max() <= 1e-4
    np.testing.assert_array_equal(labels[...], (expected[1] >= 0.5).astype(np.uint8))
    cells = tifffile.imread(tmp_path / "cells.tif")
    assert cells.shape == volume.shape and cells.max() >= 1  # instances from the stored probabilities


def test_cli_cluster_errors_are_one_line(checkpoint_3d, tmp_path, capsys):
    np.save(tmp_path / "volume.npy", np.zeros((16, 16, 16), np.float32))
    base = ["predict", "--model", str(checkpoint_3d), "--images", str(tmp_path / "volume.npy"), "--quiet"]
    assert cli.main([*base, "--output", str(tmp_path / "labels.tif"), "--scheduler", "local:2"]) == 1
    assert "give a .zarr path" in capsys.readouterr().err
    assert cli.main([*base, "--output", str(tmp_path / "labels.zarr"), "--scheduler", "local:two"]) == 1
    assert "local:2" in capsys.readouterr().err
    assert cli.main([*base, "--output", str(tmp_path / "labels.zarr"), "--scheduler", "host:8786"]) == 1
    assert "tcp://host:8786" in capsys.readouterr().err


def test_an_unreachable_scheduler_is_reported():
    with pytest.raises(distributed.DistributedError, match="cannot reach the dask scheduler"):
        with distributed.connect("tcp://127.0.0.1:9", timeout=2):
            pass
