"""Mixed precision for training and validation (napari_unet.training.precision)."""

from __future__ import annotations

import pytest
import torch

from napari_unet.training.precision import mixed_precision


@pytest.mark.parametrize(("amp", "dtype"), [("off", torch.float32), ("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_the_autocast_context_computes_in_the_chosen_precision_on_cpu(amp, dtype):
    autocast, scaler = mixed_precision(torch.device("cpu"), amp)
    with autocast():
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == dtype and scaler is None  # only fp16 on CUDA scales its loss


@pytest.mark.gpu
def test_fp16_on_cuda_gets_a_gradient_scaler():
    _, scaler = mixed_precision(torch.device("cuda"), "fp16")
    assert isinstance(scaler, torch.amp.GradScaler)
