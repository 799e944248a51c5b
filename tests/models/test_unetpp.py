"""UNet++: the nested grid of nodes, deep supervision, both upsampling modes, 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from napari_unet.models import UNetPlusPlus, build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_one_node_per_grid_position_above_the_encoder(depth):
    model = build_model("unetpp", width=4, depth=depth)
    assert isinstance(model, UNetPlusPlus)
    expected = {f"{level}_{column}" for column in range(1, depth + 1) for level in range(depth - column + 1)}
    assert set(model.nodes) == expected and set(model.upsample) == expected
    assert len(model.encoder) == depth + 1


def test_a_node_sees_every_earlier_node_of_its_level():
    model = build_model("unetpp", width=4, depth=3)
    # X[0][3] concatenates X[0][0..2] (3 x 4 channels) with the upsampled X[1][2] (8 channels)
    first_conv = model.nodes["0_3"].double_conv[0]
    assert first_conv.in_channels == 3 * 4 + 8
    transposed = build_model("unetpp", width=4, depth=3, bilinear=False)
    assert transposed.nodes["0_3"].double_conv[0].in_channels == 3 * 4 + 4


def test_deep_supervision_averages_one_head_per_top_node():
    model = build_model("unetpp", out_channels=2, width=4, depth=3, deep_supervision=True).eval()
    assert len(model.heads) == 3
    x = torch.randn(1, 1, 32, 32)
    tops = []
    for column in (1, 2, 3):
        model.nodes[f"0_{column}"].register_forward_hook(lambda m, i, o: tops.append(o))
    logits = model(x)
    expected = torch.stack([head(node) for head, node in zip(model.heads, tops)]).mean(0)
    torch.testing.assert_close(logits, expected)


def test_deep_supervision_trains_every_head():
    model = build_model("unetpp", width=4, depth=2, deep_supervision=True)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(head.conv.weight.grad.abs().sum() > 0 for head in model.heads)


def test_without_deep_supervision_only_the_last_node_feeds_the_output():
    model = build_model("unetpp", width=4, depth=2)
    assert len(model.heads) == 1
    model(torch.randn(1, 1, 16, 16)).sum().backward()
    assert model.nodes["0_2"].double_conv[0].weight.grad.abs().sum() > 0


def test_3d_on_an_anisotropic_odd_volume():
    model = build_model("unetpp3d", in_channels=2, out_channels=3, width=2, depth=2)
    assert model(torch.randn(1, 2, 5, 19, 22)).shape == (1, 3, 5, 19, 22)


def test_deep_supervision_must_be_a_bool():
    with pytest.raises(ValueError, match="deep_supervision must be True or False"):
        build_model("unetpp", deep_supervision=1)
    with pytest.raises(ValueError, match="unknown option.*deep_supervision"):
        build_model("unet", deep_supervision=True)
