"""What every registered model shares: input checks, padding to the pooling multiple, ``config``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_AXES = {2: "(N, C, Y, X)", 3: "(N, C, Z, Y, X)"}


class SegmentationModel(nn.Module):
    """Base of the variants: subclasses set ``name``, ``spatial_dims``, ``in_channels``,
    ``out_channels``, ``depth`` and ``config`` (``build_model(**config)`` rebuilds them).

    ``forward`` of a subclass calls ``_check_input``, pads with ``_pad_to_multiple`` (every side a
    multiple of ``2**depth``) and crops its logits back with ``_crop``: any input size works.
    """

    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    depth: int
    config: dict[str, str | int | float | bool]

    def _record(self, *, name: str, spatial_dims: int, in_channels: int, out_channels: int, width: int,
                depth: int, norm: str, dropout: float, bilinear: bool, **own: bool | int) -> None:
        """Set the attributes every variant has and ``config`` (the shared options, then ``own``)."""
        self.name = name
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.width = width
        self.depth = depth
        self.config = {
            "name": name, "in_channels": in_channels, "out_channels": out_channels,
            "width": width, "depth": depth, "norm": norm, "dropout": float(dropout),
            "bilinear": bool(bilinear), **own,
        }

    def _check_input(self, x: torch.Tensor) -> None:
        expected_ndim = self.spatial_dims + 2
        if x.dim() != expected_ndim:
            raise ValueError(
                f"model {self.name!r} is {self.spatial_dims}D and expects "
                f"{_AXES[self.spatial_dims]}; got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            plural = "" if self.in_channels == 1 else "s"
            raise ValueError(
                f"model {self.name!r} expects {self.in_channels} input channel{plural}, "
                f"got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        multiple = 2**self.depth
        if min(x.shape[2:]) < multiple:
            raise ValueError(
                f"model {self.name!r} has depth {self.depth}, so every spatial side must be at "
                f"least 2**{self.depth} = {multiple}; got spatial shape {tuple(x.shape[2:])}. "
                f"Use a smaller depth or a bigger tile."
            )

    def _pad_to_multiple(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Pad every spatial side up to a multiple of ``2**depth``, split evenly before/after.

        Reflect padding mirrors real image content instead of inventing a flat border, and it is
        always allowed here: each pad is < 2**depth <= the side (checked in ``_check_input``).
        """
        multiple = 2**self.depth
        padding: list[int] = []
        for side in reversed(x.shape[2:]):  # F.pad lists the last axis first
            total = (multiple - side % multiple) % multiple
            padding += [total // 2, total - total // 2]
        if any(padding):
            x = F.pad(x, padding, mode="reflect")
        return x, padding

    @staticmethod
    def _crop(x: torch.Tensor, padding: list[int], spatial_shape: torch.Size) -> torch.Tensor:
        """Undo ``_pad_to_multiple`` (a contiguous copy, so callers may ``.view`` the logits)."""
        if not any(padding):
            return x
        befores = padding[0::2][::-1]  # back to axis order
        for axis, (before, size) in enumerate(zip(befores, spatial_shape), start=2):
            x = x.narrow(axis, before, size)
        return x.contiguous()

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items())
