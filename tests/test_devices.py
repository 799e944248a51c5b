import pytest
import torch

from napari_unet import devices


def test_auto_picks_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")


def test_auto_prefers_mps_over_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")


def test_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_missing_cuda_is_a_clear_error(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(devices.DeviceError, match="no usable CUDA GPU"):
        devices.resolve_device(spec)


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(devices.DeviceError, match="only 1 CUDA device"):
        devices.resolve_device("cuda:3")


def test_missing_mps_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(devices.DeviceError, match="MPS"):
        devices.resolve_device("mps")


def test_unknown_spelling():
    with pytest.raises(devices.DeviceError, match="unknown device 'gpu0'"):
        devices.resolve_device("gpu0")


def test_available_devices_always_lists_auto_and_cpu():
    specs = [info.spec for info in devices.available_devices()]
    assert specs[0] == "auto" and specs[-1] == "cpu"


def test_autocast_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert devices.autocast_dtype(cpu, "auto") is None
    assert devices.autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert devices.autocast_dtype(cpu, "fp32") is None
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devices.autocast_dtype(cuda, "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.autocast_dtype(cuda, "auto") is torch.float16
    with pytest.raises(ValueError, match="unknown precision"):
        devices.autocast_dtype(cpu, "int8")


def test_out_of_memory_detection():
    assert devices.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert devices.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert devices.is_out_of_memory(MemoryError())
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not devices.is_out_of_memory(ValueError("out of memory"))


def test_release_memory_runs_on_cpu():
    devices.release_memory(torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_device_is_listed_with_free_memory():
    infos = [info for info in devices.available_devices() if info.spec.startswith("cuda")]
    assert infos and infos[0].free_bytes and infos[0].free_bytes > 0
    assert devices.resolve_device("cuda").type == "cuda"
