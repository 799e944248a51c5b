"""Blocks of napari_unet.models, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from napari_unet.models.blocks import (
    NORMS,
    AttentionGate,
    DoubleConv,
    Down,
    OutConv,
    ResidualBlock,
    Up,
    init_weights,
    norm_layer,
)

DIMS = [2, 3]


def _image(spatial_dims: int, channels: int, side: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, *([side] * spatial_dims))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_double_conv_keeps_size_and_uses_mid_channels(spatial_dims):
    block = DoubleConv(3, 8, 5, spatial_dims=spatial_dims)
    first, second = (m for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    assert first.weight.shape == (5, 3, *([3] * spatial_dims))
    assert second.weight.shape == (8, 5, *([3] * spatial_dims))
    assert block(_image(spatial_dims, 3, 7)).shape == (2, 8, *([7] * spatial_dims))
    # without mid channels the middle has out_channels
    assert DoubleConv(3, 8, spatial_dims=spatial_dims).double_conv[0].out_channels == 8


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_down_halves_every_side(spatial_dims):
    down = Down(4, 6, spatial_dims=spatial_dims)
    assert down(_image(spatial_dims, 4, 9)).shape == (2, 6, *([4] * spatial_dims))


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("bilinear", [True, False])
def test_up_doubles_and_concatenates_the_skip(spatial_dims, bilinear):
    # milesial's scheme: in_channels counts the concatenation; with interpolation the coarse
    # input already has in // 2 channels, with a transposed conv it has in_channels
    coarse_channels = 8 if bilinear else 16
    up = Up(16, 4, bilinear, spatial_dims=spatial_dims)
    coarse = _image(spatial_dims, coarse_channels, 4)
    skip = _image(spatial_dims, 8, 8)
    assert up(coarse, skip).shape == (2, 4, *([8] * spatial_dims))
    kinds = {type(m) for m in up.modules()}
    if bilinear:
        assert up.up.mode == {2: "bilinear", 3: "trilinear"}[spatial_dims]
        assert up.conv.double_conv[0].out_channels == 8  # mid = in // 2
    else:
        assert {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims] in kinds
        assert up.up.out_channels == 8


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_up_pads_when_the_skip_side_is_odd(spatial_dims):
    up = Up(8, 2, True, spatial_dims=spatial_dims)
    out = up(_image(spatial_dims, 4, 4), _image(spatial_dims, 4, 9))
    assert out.shape == (2, 2, *([9] * spatial_dims))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_residual_block_identity_shortcut(spatial_dims):
    block = ResidualBlock(6, 6, spatial_dims=spatial_dims).eval()
    assert isinstance(block.shortcut, nn.Identity)
    x = _image(spatial_dims, 6, 5)
    expected = torch.relu(block.residual(x) + x)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_residual_block_projection_shortcut(spatial_dims):
    block = ResidualBlock(3, 6, spatial_dims=spatial_dims)
    projection = block.shortcut[0]
    assert projection.weight.shape == (6, 3, *([1] * spatial_dims))
    assert block(_image(spatial_dims, 3, 5)).shape == (2, 6, *([5] * spatial_dims))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_attention_gate_scales_the_skip_by_psi(spatial_dims):
    gate = AttentionGate(4, 6, 3, spatial_dims=spatial_dims, norm="none")
    g, x = _image(spatial_dims, 4, 5), _image(spatial_dims, 6, 5)
    out = gate(g, x)
    assert out.shape == x.shape
    # psi is a sigmoid in (0, 1) shared by all channels: out / x is one map in (0, 1)
    ratio = out / x
    assert torch.all((ratio > 0) & (ratio < 1))
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    # a zero psi conv gives psi = sigmoid(0) = 1/2 everywhere
    nn.init.zeros_(gate.psi[0].weight)
    nn.init.zeros_(gate.psi[0].bias)
    torch.testing.assert_close(gate(g, x), x / 2)


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_attention_gate_layers_are_1x1_convs_with_norm(spatial_dims):
    gate = AttentionGate(4, 6, 3, spatial_dims=spatial_dims, norm="batch")
    assert gate.W_g[0].weight.shape == (3, 4, *([1] * spatial_dims))
    assert gate.W_x[0].weight.shape == (3, 6, *([1] * spatial_dims))
    assert gate.psi[0].weight.shape == (1, 3, *([1] * spatial_dims))
    assert isinstance(gate.psi[-1], nn.Sigmoid)
    batch_norm = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    assert all(isinstance(part[1], batch_norm) for part in (gate.W_g, gate.W_x, gate.psi))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_out_conv_is_1x1(spatial_dims):
    out = OutConv(8, 3, spatial_dims=spatial_dims)
    assert out.conv.weight.shape == (3, 8, *([1] * spatial_dims))


@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("norm", NORMS)
def test_norm_layer_table(spatial_dims, norm):
    layer = norm_layer(spatial_dims, norm, 12)
    expected = {
        "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims],
        "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims],
        "group": nn.GroupNorm,
        "none": nn.Identity,
    }[norm]
    assert type(layer) is expected
    if norm == "group":
        assert layer.num_groups == 4  # largest divisor of 12 that is <= 8
    if norm == "instance":
        assert layer.affine


def test_norm_layer_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of batch, instance, group, none"):
        norm_layer(2, "layer", 4)


def test_blocks_reject_other_dims():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        DoubleConv(1, 2, spatial_dims=1)


def test_init_weights_kaiming_with_zero_bias():
    torch.manual_seed(0)
    block = DoubleConv(16, 64, spatial_dims=2)
    block.apply(init_weights)
    conv = block.double_conv[0]
    assert torch.all(conv.bias == 0)
    # kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * 3 * 3))
    expected_std = (2 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.1
    assert torch.all(block.double_conv[1].weight == 1)
