"""Zarr and dask inputs and outputs; slabs streamed to ``out`` (out_of_core.py)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr
from inference_toys import blobs

from napari_unet.inference import predict


def test_dask_and_zarr_inputs_and_outputs_match_numpy(model_2d, model_3d, tmp_path):
    stack, _ = blobs((4, 60, 70), 20, np.random.default_rng(8))
    expected = predict(model_2d, stack, tile=32, device="cpu")

    stored = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=stack.shape,
                             chunks=(1, 32, 32), dtype="float32")
    stored[...] = stack
    np.testing.assert_allclose(predict(model_2d, stored, tile=32, device="cpu"), expected, atol=1e-6)

    lazy = da.from_array(stack, chunks=(2, 40, 40))
    from_dask = predict(model_2d, lazy, tile=32, device="cpu")
    assert isinstance(from_dask, np.ndarray) and from_dask.shape == expected.shape
    # the same tiles on the whole image's grid, each computed once: only float rounding differs
    np.testing.assert_allclose(from_dask, expected, atol=1e-5)

    written = predict(model_2d, stack, tile=32, device="cpu", out=tmp_path / "out.zarr")
    np.testing.assert_allclose(np.asarray(written[...]), expected, atol=1e-6)
    reopened = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert reopened.shape == expected.shape

    into = zarr.open_array(str(tmp_path / "dask-out.zarr"), mode="w", shape=expected.shape,
                           chunks=(2, 1, 30, 35), dtype="float32")
    assert predict(model_2d, lazy, tile=32, device="cpu", out=into) is into
    np.testing.assert_allclose(into[...], from_dask, atol=1e-6)

    volume, _ = blobs((24, 40, 36), 6, np.random.default_rng(9))
    whole_3d = predict(model_3d, volume, tile=24, device="cpu")
    lazy_3d = predict(model_3d, da.from_array(volume, chunks=(12, 20, 18)), tile=24, device="cpu")
    np.testing.assert_allclose(lazy_3d, whole_3d, atol=1e-5)


def test_every_tile_of_a_dask_input_is_computed_once(model_3d, monkeypatch):
    from napari_unet.inference import runner

    volume, _ = blobs((40, 40, 36), 6, np.random.default_rng(3))
    tiles = []
    real_run = runner._run_batch
    monkeypatch.setattr(runner, "_run_batch", lambda model, inputs, *rest: tiles.append(len(inputs))
                        or real_run(model, inputs, *rest))
    whole = predict(model_3d, volume, tile=16, batch_size=1, device="cpu")
    in_memory = len(tiles)
    tiles.clear()
    chunked = predict(model_3d, da.from_array(volume, chunks=(16, 20, 18)), tile=16, batch_size=1, device="cpu")
    assert len(tiles) == in_memory  # no tile twice, though chunks share tiles at their seams
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


class _RecordingArray:
    """An output array that records which Z planes each write covers."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.data = np.full(shape, np.nan, dtype=np.float32)
        self.shape, self.dtype, self.writes = shape, self.data.dtype, []

    def __setitem__(self, index, value) -> None:
        plane = index[1]
        self.writes.append((plane.start, plane.stop))
        self.data[index] = value


def test_results_stream_out_slab_by_slab(model_3d):
    volume = np.random.default_rng(10).random((40, 16, 16), dtype=np.float32)
    target = _RecordingArray((2, 40, 16, 16))
    predict(model_3d, volume, tile=8, overlap=0.25, device="cpu", out=target)
    assert len(target.writes) > 3  # several slabs, not one write at the end
    assert [stop for _, stop in target.writes][-1] == 40
    assert all(a[1] == b[0] for a, b in zip(target.writes, target.writes[1:]))  # in order, no gaps
    assert max(stop - start for start, stop in target.writes) <= 8
    assert not np.isnan(target.data).any()

