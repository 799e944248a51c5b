"""The one place that names every model variant, plus ``build_model`` and parameter counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .blocks import NORMS, DoubleConv, ResidualBlock
from .transunet import TransUNet
from .unet import UNet
from .unetpp import UNetPlusPlus

MAX_DEPTH = 8
MAX_TRANSFORMER_LAYERS = 24

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}
# the options a variant takes beyond the shared ones, with their defaults
_VARIANT_OPTIONS: dict[str, dict[str, bool | int]] = {}


def register_model(
    name: str, options: dict[str, bool | int] | None = None
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(name=..., in_channels=..., ...)`` under ``name``.

    ``options``: the variant's own options and their defaults (a bool option takes True/False, an
    int option a positive integer); ``build_model`` passes them on and they enter ``.config``.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = factory
        _VARIANT_OPTIONS[name] = dict(options or {})
        return factory

    return decorator


@register_model("unet")
def _unet(**kwargs: Any) -> nn.Module:
    """Ronneberger et al. 2015, 2D."""
    return UNet(spatial_dims=2, block=DoubleConv, **kwargs)


@register_model("resunet")
def _resunet(**kwargs: Any) -> nn.Module:
    """UNet with residual blocks (Zhang et al. 2018), 2D."""
    return UNet(spatial_dims=2, block=ResidualBlock, **kwargs)


@register_model("attention_unet")
def _attention_unet(**kwargs: Any) -> nn.Module:
    """UNet with attention-gated skips (Oktay et al. 2018), 2D."""
    return UNet(spatial_dims=2, block=DoubleConv, attention=True, **kwargs)


@register_model("unetpp", options={"deep_supervision": False})
def _unetpp(**kwargs: Any) -> nn.Module:
    """UNet++: nested dense skip pathways (Zhou et al. 2018), 2D."""
    return UNetPlusPlus(spatial_dims=2, **kwargs)


_TRANSFORMER_OPTIONS = {"transformer_layers": 2, "heads": 4}


@register_model("transunet", options=_TRANSFORMER_OPTIONS)
def _transunet(**kwargs: Any) -> nn.Module:
    """UNet with a transformer bottleneck (after TransUNet, Chen et al. 2021), 2D."""
    return TransUNet(spatial_dims=2, **kwargs)


@register_model("unet3d")
def _unet3d(**kwargs: Any) -> nn.Module:
    """3D U-Net (Cicek et al. 2016)."""
    return UNet(spatial_dims=3, block=DoubleConv, **kwargs)


@register_model("resunet3d")
def _resunet3d(**kwargs: Any) -> nn.Module:
    """Residual UNet, 3D."""
    return UNet(spatial_dims=3, block=ResidualBlock, **kwargs)


@register_model("attention_unet3d")
def _attention_unet3d(**kwargs: Any) -> nn.Module:
    """Attention U-Net, 3D."""
    return UNet(spatial_dims=3, block=DoubleConv, attention=True, **kwargs)


@register_model("unetpp3d", options={"deep_supervision": False})
def _unetpp3d(**kwargs: Any) -> nn.Module:
    """UNet++, 3D."""
    return UNetPlusPlus(spatial_dims=3, **kwargs)


@register_model("transunet3d", options=_TRANSFORMER_OPTIONS)
def _transunet3d(**kwargs: Any) -> nn.Module:
    """UNet with a transformer bottleneck, 3D."""
    return TransUNet(spatial_dims=3, **kwargs)


def available_models() -> list[str]:
    """Names accepted by ``build_model``, in registration order."""
    return list(_REGISTRY)


def variant_options(name: str) -> dict[str, bool | int]:
    """The options ``name`` takes beyond the shared ones, with their defaults."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    return dict(_VARIANT_OPTIONS[name])


def _check_positive_int(option: str, value: object, maximum: int | None = None) -> None:
    # bool is an int subclass; True as a width is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{option} must be at most {maximum}, got {value!r}")


def build_model(
    name: str, in_channels: int = 1, out_channels: int = 1, width: int = 32, depth: int = 4,
    **options: Any,
) -> nn.Module:
    """Build the registered variant ``name``.

    Options: ``norm`` ("batch", "instance", "group" or "none"; default "batch"), ``dropout``
    (probability at the bottleneck, default 0), ``bilinear`` (default True; False uses transposed
    convolutions), plus the variant's own (``variant_options(name)``: ``deep_supervision`` for
    UNet++, ``transformer_layers`` and ``heads`` for TransUNet).
    ``build_model(**model.config)`` rebuilds the same architecture.
    Raises ``ValueError`` for an unknown name or option, or an invalid value.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(available_models())}"
        )
    own_options = _VARIANT_OPTIONS[name]
    known_options = {"norm", "dropout", "bilinear"} | set(own_options)
    unknown = sorted(set(options) - known_options)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for build_model; "
            f"known options: {', '.join(sorted(known_options))}"
        )
    norm = options.get("norm", "batch")
    dropout = options.get("dropout", 0.0)
    bilinear = options.get("bilinear", True)

    _check_positive_int("in_channels", in_channels)
    _check_positive_int("out_channels", out_channels)
    _check_positive_int("width", width)
    _check_positive_int("depth", depth, maximum=MAX_DEPTH)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(bilinear, bool):
        raise ValueError(f"bilinear must be True or False, got {bilinear!r}")

    chosen = {option: options.get(option, default) for option, default in own_options.items()}
    for option, value in chosen.items():
        if isinstance(own_options[option], bool):
            if not isinstance(value, bool):
                raise ValueError(f"{option} must be True or False, got {value!r}")
        else:
            maximum = MAX_TRANSFORMER_LAYERS if option == "transformer_layers" else None
            _check_positive_int(option, value, maximum=maximum)

    return _REGISTRY[name](
        name=name, in_channels=in_channels, out_channels=out_channels, width=width, depth=depth,
        norm=norm, dropout=float(dropout), bilinear=bilinear, **chosen,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_table(
    widths: tuple[int, ...] = (16, 32), depth: int = 4, **options: Any
) -> list[dict[str, Any]]:
    """One row per (variant, width): ``{"variant", "dims", "width", "depth", "params"}``.

    Models are built on the meta device: no memory is allocated and no weights initialised.
    """
    rows = []
    for width in widths:
        for name in available_models():
            with torch.device("meta"):
                model = build_model(name, width=width, depth=depth, **options)
            rows.append({
                "variant": name, "dims": model.spatial_dims, "width": width, "depth": depth,
                "params": count_parameters(model),
            })
    return rows


def format_parameter_table(rows: list[dict[str, Any]]) -> str:
    """``parameter_table()`` rows as a Markdown table (for the README)."""
    lines = ["| variant | dims | width | depth | params |", "|---|---|---|---|---:|"]
    lines += [
        f"| {row['variant']} | {row['dims']}D | {row['width']} | {row['depth']} | {row['params']:,} |"
        for row in rows
    ]
    return "\n".join(lines)
