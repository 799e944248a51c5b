"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

# The project's checkout sits beside ../shared in development and in CI.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite's models are tiny: one intra-op thread is fastest, and on a busy machine OpenMP
    threads spinning against other processes made forward passes 10-20x slower (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """The folder of real public data sets (../shared/data); skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
