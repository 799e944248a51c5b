"""Forward behaviour of every variant: shapes, gradients, options, bad input, memory formats."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from napari_unet.models import available_models, build_model, count_parameters

VARIANTS_2D = ["unet", "resunet", "attention_unet", "unetpp", "transunet"]
VARIANTS_3D = ["unet3d", "resunet3d", "attention_unet3d", "unetpp3d", "transunet3d"]
ODD_SHAPE = {2: (37, 51), 3: (9, 19, 21)}  # no side a multiple of 2**2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small(name: str, in_channels: int = 1, out_channels: int = 1, **options) -> nn.Module:
    return build_model(name, in_channels, out_channels, width=4, depth=2, **options)


def _odd_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, model.in_channels, *ODD_SHAPE[model.spatial_dims])


def test_every_variant_is_tested():
    assert sorted(available_models()) == sorted(VARIANTS_2D + VARIANTS_3D)


@pytest.mark.parametrize("name", VARIANTS_2D + VARIANTS_3D)
@pytest.mark.parametrize("channels", [(1, 1), (3, 2), (2, 4)], ids=lambda c: f"{c[0]}to{c[1]}")
def test_output_shape_on_odd_sizes(name, channels):
    model = _small(name, *channels)
    x = _odd_input(model)
    assert model(x).shape == (1, channels[1], *ODD_SHAPE[model.spatial_dims])


def test_large_odd_2d_input_keeps_its_shape():
    model = build_model("unet", 1, 2, width=2, depth=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 500, 333)).shape == (1, 2, 500, 333)


@pytest.mark.parametrize("name", ["unet", "unet3d"])
def test_padding_is_undone_exactly(name):
    model = _small(name)
    x = _odd_input(model)
    padded, padding = model._pad_to_multiple(x)
    assert all(side % 4 == 0 for side in padded.shape[2:])
    assert all(pad < 4 for pad in padding)
    torch.testing.assert_close(model._crop(padded, padding, x.shape[2:]), x)


@pytest.mark.parametrize("name", VARIANTS_2D + VARIANTS_3D)
@pytest.mark.parametrize("bilinear", [True, False])
def test_gradients_reach_every_parameter(name, bilinear):
    # eval mode: in train mode a conv bias right before a batch norm has zero gradient by
    # construction (the norm subtracts the batch mean), which would hide nothing but fail
    model = build_model(name, 2, 3, width=8, depth=2, bilinear=bilinear).eval()
    model(_odd_input(model)).sum().backward()
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None, key
        assert parameter.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", ["resunet", "attention_unet3d"])
def test_gradients_reach_every_parameter_in_train_mode_without_norm(name):
    model = build_model(name, 1, 2, width=8, depth=2, norm="none").train()
    model(_odd_input(model, batch=2)).sum().backward()
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", ["attention_unet", "unet3d"])
def test_bilinear_versus_transposed_upsampling(name):
    spatial_dims = 3 if name.endswith("3d") else 2
    interpolating = _small(name, bilinear=True)
    transposed = _small(name, bilinear=False)
    transposed_type = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
    upsamplers = [m for m in interpolating.modules() if isinstance(m, nn.Upsample)]
    assert len(upsamplers) == 2
    assert {m.mode for m in upsamplers} == {"bilinear" if spatial_dims == 2 else "trilinear"}
    assert not any(isinstance(m, transposed_type) for m in interpolating.modules())
    assert sum(isinstance(m, transposed_type) for m in transposed.modules()) == 2
    assert not any(isinstance(m, nn.Upsample) for m in transposed.modules())
    # interpolation halves the bottleneck instead: fewer parameters
    assert count_parameters(interpolating) < count_parameters(transposed)
    x = _odd_input(interpolating)
    assert interpolating(x).shape == transposed(x).shape


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_each_norm_option(spatial_dims, norm):
    model = _small("resunet" if spatial_dims == 2 else "attention_unet3d", 1, 2, norm=norm)
    expected = {
        "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims],
        "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims],
        "group": nn.GroupNorm,
    }
    norm_types = set(expected.values()) | {
        nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d
    }
    used = {type(m) for m in model.modules() if type(m) in norm_types}
    assert used == ({expected[norm]} if norm != "none" else set())
    out = model.train()(_odd_input(model, batch=2))
    assert out.shape == (2, 2, *ODD_SHAPE[spatial_dims])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["unet", "resunet3d"])
def test_dropout_only_at_the_bottleneck_when_positive(name):
    without = _small(name)
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())
    model = _small(name, dropout=0.5)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [model.bottleneck_dropout]
    assert model.bottleneck_dropout.p == 0.5
    x = _odd_input(model)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("unet", (1, 1, 4, 16, 16),
         r"model 'unet' is 2D and expects \(N, C, Y, X\); got a 5-D tensor"),
        ("unet", (16, 16), r"model 'unet' is 2D and expects \(N, C, Y, X\); got a 2-D tensor"),
        ("unet3d", (1, 1, 16, 16),
         r"model 'unet3d' is 3D and expects \(N, C, Z, Y, X\); got a 4-D tensor"),
        ("unet", (1, 3, 16, 16), "expects 1 input channel, got 3"),
        ("unet3d", (1, 2, 8, 8, 8), "expects 1 input channel, got 2"),
        ("unet", (1, 1, 3, 16), r"at least 2\*\*2 = 4.*smaller depth or a bigger tile"),
        ("unet3d", (1, 1, 8, 3, 8), r"at least 2\*\*2 = 4.*smaller depth or a bigger tile"),
    ],
)
def test_bad_input_raises_value_error(name, shape, message):
    model = _small(name)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_wrong_channel_count_message_uses_plural():
    model = _small("unet", in_channels=2)
    with pytest.raises(ValueError, match="expects 2 input channels, got 1"):
        model(torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("name", ["attention_unet", "resunet3d"])
def test_channels_last_matches_contiguous(name):
    model = _small(name, 2, 3).eval()
    x = torch.randn(2, 2, *ODD_SHAPE[model.spatial_dims])
    with torch.no_grad():
        expected = model(x)
        memory_format = torch.channels_last if model.spatial_dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=memory_format)
        actual = model(x.to(memory_format=memory_format))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "attention_unet3d"])
def test_bfloat16_autocast(name):
    model = _small(name, 1, 2).eval()
    x = _odd_input(model)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(x)
    assert actual.shape == expected.shape
    assert actual.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; a few percent of the logit range is plenty
    assert (actual.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_torch_compile_traces_without_graph_breaks():
    model = _small("attention_unet", 1, 2).eval()
    # fullgraph=True fails on any graph break; the eager backend skips slow code generation
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = _odd_input(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
