"""UNet variants (2D and 3D) behind one registry.

>>> model = build_model("unet", in_channels=1, out_channels=2, width=32, depth=4)
>>> rebuilt = build_model(**model.config)
"""

from .blocks import (
    NORMS,
    AttentionGate,
    DoubleConv,
    Down,
    OutConv,
    ResidualBlock,
    Up,
)
from .registry import (
    available_models,
    build_model,
    count_parameters,
    format_parameter_table,
    parameter_table,
    register_model,
    variant_options,
)
from .transunet import TransUNet
from .unet import UNet
from .unetpp import UNetPlusPlus

__all__ = [
    "NORMS",
    "AttentionGate",
    "DoubleConv",
    "Down",
    "OutConv",
    "ResidualBlock",
    "TransUNet",
    "UNet",
    "UNetPlusPlus",
    "Up",
    "available_models",
    "build_model",
    "count_parameters",
    "format_parameter_table",
    "parameter_table",
    "register_model",
    "variant_options",
]
