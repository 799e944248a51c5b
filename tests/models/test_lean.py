"""The memory-lean prediction copy: the same outputs, batch norms folded, no decoder concatenation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_unet.models import available_models, build_model
from napari_unet.models.lean import _SplitUp, lean_inference_copy


def _trained_looking(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, as a trained model has."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize("bilinear", [True, False])
def test_lean_copy_predicts_what_the_model_predicts(name, bilinear):
    torch.manual_seed(0)
    model = _trained_looking(build_model(name, in_channels=2, out_channels=3, width=4, depth=2, bilinear=bilinear))
    shape = (1, 2, 12, 20, 20) if model.spatial_dims == 3 else (2, 2, 36, 28)
    x = torch.randn(shape)
    lean = lean_inference_copy(model)
    with torch.inference_mode():
        torch.testing.assert_close(lean(x), model(x), rtol=1e-4, atol=1e-4)
    assert model.training is False and any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d) for m in model.modules())


def test_batch_norms_are_folded_and_plain_unet_concatenations_split():
    model = _trained_looking(build_model("unet3d", in_channels=1, out_channels=1, width=4, depth=2))
    lean = lean_inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in lean.modules())
    assert all(isinstance(up, _SplitUp) for up in lean.ups)
    concatenated = []
    real_cat = torch.cat
    with torch.inference_mode():
        torch.cat = lambda tensors, *a, **k: (concatenated.append(len(tensors)), real_cat(tensors, *a, **k))[1]
        try:
            lean(torch.randn(1, 1, 8, 16, 16))
        finally:
            torch.cat = real_cat
    assert concatenated == []  # the biggest map of a UNet is never built


def test_instance_norm_models_are_copied_unchanged_in_meaning():
    model = build_model("unet", in_channels=1, out_channels=1, width=4, depth=2, norm="instance").eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(lean_inference_copy(model)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["unet", "attention_unet", "unet3d"])
def test_each_skip_map_is_freed_once_its_decoder_block_has_used_it(name):
    import weakref

    if name not in available_models():
        pytest.skip(f"no {name} in the registry")
    model = _trained_looking(build_model(name, in_channels=1, out_channels=2, width=8, depth=2))
    lean = lean_inference_copy(model)
    full_resolution_skip: dict = {}
    alive_in_last_block: list[bool] = []
    lean.inc.register_forward_hook(lambda module, args, out: full_resolution_skip.update(ref=weakref.ref(out)))
    lean.ups[-1].rest.register_forward_pre_hook(
        lambda module, args: alive_in_last_block.append(full_resolution_skip["ref"]() is not None))
    x = torch.randn((1, 1, 8, 16, 16) if model.spatial_dims == 3 else (1, 1, 32, 32))
    with torch.inference_mode():
        torch.testing.assert_close(lean(x), model(x), rtol=1e-4, atol=1e-4)
    assert alive_in_last_block == [False]
