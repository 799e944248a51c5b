"""Registry, build_model validation, config round trip and parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from napari_unet import models
from napari_unet.models import (
    available_models,
    build_model,
    count_parameters,
    format_parameter_table,
    parameter_table,
    register_model,
    registry,
)

VARIANTS = [
    "unet", "resunet", "attention_unet", "unetpp", "transunet",
    "unet3d", "resunet3d", "attention_unet3d", "unetpp3d", "transunet3d",
]

# milesial/Pytorch-UNet UNet(n_channels=1, n_classes=1, bilinear=False)
MILESIAL_UNET_PARAMS = 31_042_369


def _meta_model(name: str, **kwargs) -> nn.Module:
    """Build without allocating or initialising weights (parameter counts only)."""
    with torch.device("meta"):
        return build_model(name, **kwargs)


def test_available_models_names_every_variant():
    assert available_models() == VARIANTS


@pytest.mark.parametrize("name", VARIANTS)
def test_model_attributes(name):
    model = build_model(name, 2, 3, width=4, depth=2)
    assert model.spatial_dims == (3 if name.endswith("3d") else 2)
    assert (model.in_channels, model.out_channels, model.depth) == (2, 3, 2)
    assert model.config == {
        "name": name, "in_channels": 2, "out_channels": 3, "width": 4, "depth": 2,
        "norm": "batch", "dropout": 0.0, "bilinear": True, **registry.variant_options(name),
    }


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown model 'vnet'.*unet, resunet, attention_unet"):
        build_model("vnet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "width must be a positive integer, got 0"),
        ({"width": 8.5}, "width must be a positive integer"),
        ({"width": True}, "width must be a positive integer"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"depth": 9}, "depth must be at most 8"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"out_channels": -1}, "out_channels must be a positive integer"),
        ({"norm": "layer"}, "norm must be one of batch, instance, group, none; got 'layer'"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"dropout": -0.1}, "dropout must be a number"),
        ({"bilinear": "yes"}, "bilinear must be True or False"),
        ({"nrom": "batch"}, "unknown option.*nrom"),
    ],
)
def test_invalid_build_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model("unet", **kwargs)


def test_register_model_adds_a_variant(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tiny_unet")
    def tiny(**kwargs):
        return models.UNet(spatial_dims=2, **kwargs)

    assert available_models()[-1] == "tiny_unet"
    model = build_model("tiny_unet", width=2, depth=1)
    assert model.config["name"] == "tiny_unet"
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_unet")(tiny)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize(
    "options",
    [{}, {"norm": "group", "dropout": 0.3, "bilinear": False}, {"norm": "instance"}],
    ids=["defaults", "group-dropout-transposed", "instance"],
)
def test_config_rebuilds_identical_state_dict(name, options):
    model = build_model(name, 2, 3, width=4, depth=2, **options)
    for value in model.config.values():
        assert type(value) in (str, int, float, bool)
    rebuilt = build_model(**model.config)
    assert rebuilt.config == model.config
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 2, *([8] * model.spatial_dims))
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


def test_unet_matches_milesial_parameter_count():
    model = _meta_model("unet", in_channels=1, out_channels=1, width=64, depth=4, bilinear=False)
    assert count_parameters(model) == MILESIAL_UNET_PARAMS


def test_width_scales_parameters_about_fourfold():
    for name in VARIANTS:
        small = count_parameters(_meta_model(name, width=32, depth=4))
        large = count_parameters(_meta_model(name, width=64, depth=4))
        assert 3.9 < large / small < 4.1, name
    assert count_parameters(_meta_model("unet", width=32, bilinear=False)) == pytest.approx(
        7.8e6, rel=0.01
    )


def test_3d_variants_have_about_three_times_the_parameters():
    # 3x3x3 kernels have 27 weights where 3x3 ones have 9
    for name in ("unet", "resunet", "attention_unet"):
        ratio = count_parameters(_meta_model(name + "3d")) / count_parameters(_meta_model(name))
        assert 2.9 < ratio < 3.0, name


def test_count_parameters_trainable_only():
    model = build_model("unet", width=2, depth=1)
    total = count_parameters(model)
    model.inc.requires_grad_(False)
    frozen = sum(p.numel() for p in model.inc.parameters())
    assert count_parameters(model, trainable_only=True) == total - frozen


def test_parameter_table_rows():
    rows = parameter_table(widths=(16, 32), depth=4)
    assert [(row["variant"], row["width"]) for row in rows] == [
        (name, width) for width in (16, 32) for name in VARIANTS
    ]
    for row in rows:
        assert row["dims"] == (3 if row["variant"].endswith("3d") else 2)
        assert row["depth"] == 4
        assert row["params"] == count_parameters(
            _meta_model(row["variant"], width=row["width"], depth=4)
        )
    table = format_parameter_table(rows)
    assert table.splitlines()[0] == "| variant | dims | width | depth | params |"
    assert f"| unet | 2D | 32 | 4 | {rows[len(VARIANTS)]['params']:,} |" in table
