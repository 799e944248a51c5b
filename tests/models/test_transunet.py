"""TransUNet: sinusoidal positions at any grid size, the transformer bottleneck, global context."""

from __future__ import annotations

import pytest
import torch

from napari_unet.models import TransUNet, build_model
from napari_unet.models.transunet import TransformerBottleneck, sinusoidal_positions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("grid", [(5, 7), (3, 4, 6), (1, 9)])
def test_positions_are_distinct_and_bounded_at_any_grid(grid):
    codes = sinusoidal_positions(torch.zeros(1, 24, *grid))
    count = int(torch.tensor(grid).prod())
    assert codes.shape == (count, 24)
    assert codes.abs().max() <= 1
    assert torch.unique(codes, dim=0).shape[0] == count  # every position gets its own code


def test_positions_do_not_depend_on_the_grid_they_sit_in():
    small = sinusoidal_positions(torch.zeros(1, 16, 4, 4))
    big = sinusoidal_positions(torch.zeros(2, 16, 8, 8))
    # position (y, x) has one code wherever the tile ends: tiles of a big image agree
    torch.testing.assert_close(small.reshape(4, 4, 16), big.reshape(8, 8, 16)[:4, :4])


def test_bottleneck_keeps_the_shape_and_heads_divide_the_channels():
    model = build_model("transunet", width=6, depth=2, heads=4)
    assert isinstance(model, TransUNet) and isinstance(model.bottleneck, TransformerBottleneck)
    # bottleneck channels 6 * 4 // 2 = 12: 4 heads of 3
    assert model.bottleneck.layers[0].attention.heads == 4
    odd = build_model("transunet", width=5, depth=1, heads=4)  # 5 channels: 1 head
    assert odd.bottleneck.layers[0].attention.heads == 1
    assert odd(torch.randn(1, 1, 11, 13)).shape == (1, 1, 11, 13)
    assert model.config["transformer_layers"] == 2 and model.config["heads"] == 4


def test_with_a_silent_transformer_it_is_the_plain_unet():
    unet = build_model("unet", width=4, depth=2).eval()
    trans = build_model("transunet", width=4, depth=2).eval()
    missing, unexpected = trans.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("bottleneck.") for key in missing)
    torch.nn.init.zeros_(trans.bottleneck.norm.weight)  # the residual adds nothing
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(trans(x), unet(x))


def test_attention_reaches_beyond_the_convolutions_receptive_field():
    x = torch.randn(1, 1, 128, 128)
    far = x.clone()
    far[..., :8, :8] += 5.0  # change one corner
    for name, reaches in (("unet", False), ("transunet", True)):
        model = build_model(name, width=4, depth=2).eval()
        with torch.no_grad():
            change = (model(far) - model(x))[..., -8:, -8:].abs().max()
        assert (change > 1e-4) == reaches, (name, float(change))


def test_3d_and_options_are_checked():
    model = build_model("transunet3d", in_channels=2, out_channels=2, width=4, depth=2, transformer_layers=1)
    assert model(torch.randn(1, 2, 6, 17, 20)).shape == (1, 2, 6, 17, 20)
    with pytest.raises(ValueError, match="transformer_layers must be a positive integer"):
        build_model("transunet", transformer_layers=0)
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        build_model("transunet", heads=2.5)
