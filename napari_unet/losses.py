"""Segmentation losses (on logits) and the UNet paper's border weight map.

Conventions (see ARCHITECTURE.md):

* ``logits`` has shape (N, C, *spatial) with 1, 2 or 3 spatial axes.
  ``C == 1`` is a binary model whose logit is for class 1 (sigmoid);
  ``C >= 2`` is a multi-class model (softmax over C).
* ``target`` is a class map of shape (N, *spatial) or (N, 1, *spatial).
  Binary: values in [0, 1] (int or float; fractional values act as soft targets).
  Multi-class: integer values 0..C-1.
* ``weight`` is an optional float map of the target's shape; 0 means "ignore"
  (unlabelled), larger values scale a pixel's loss. ``None`` means all ones.

Every pixel-wise term is reduced as a weighted mean,
``sum(w * l) / max(sum(w), eps)``, so an all-ignored batch gives exactly 0 with
zero (finite) gradients, and ignored pixels influence neither value nor gradient.
All losses are computed in float32 from logits (never ``log(sigmoid(x))``), so
they stay finite for logits of any magnitude, also under mixed precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = [
    "BCELoss",
    "BorderWeightedLoss",
    "CEDiceLoss",
    "DiceBCELoss",
    "DiceLoss",
    "FocalLoss",
    "available_losses",
    "border_weight_map",
    "get_loss",
]

EPS = 1e-8


# ---------------------------------------------------------------------------
# Input checks and shared helpers
# ---------------------------------------------------------------------------


def _squeeze_channel(array: torch.Tensor, logits: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``array`` as (N, *spatial), accepting (N, *spatial) or (N, 1, *spatial)."""
    expected = (logits.shape[0], *logits.shape[2:])
    with_channel = (expected[0], 1, *expected[1:])
    if tuple(array.shape) == expected:
        return array
    if tuple(array.shape) == with_channel:
        return array[:, 0]
    raise ValueError(
        f"The logits shape {tuple(logits.shape)} and the {what} shape {tuple(array.shape)} do not match; "
        f"the {what} must have shape {expected} or {with_channel}."
    )


def _prepare(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the inputs and return float32 logits, a (N, *spatial) target and a (N, *spatial) weight."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("The logits and the target must be torch tensors.")
    if logits.ndim < 3:
        raise ValueError(
            f"The logits must have shape (N, C, *spatial) but have shape {tuple(logits.shape)}."
        )
    logits = logits.float()  # losses are always computed in float32 for stability
    n_channels = logits.shape[1]
    target = _squeeze_channel(target, logits, "target")
    if n_channels == 1:
        target = target.float()
        if target.numel() and (target.min() < 0 or target.max() > 1):
            raise ValueError("A binary model (1 output channel) needs target values between 0 and 1.")
    else:
        if target.is_floating_point():
            if not torch.equal(target, target.round()):
                raise ValueError("A multi-class target must hold integer class indices.")
        target = target.long()
        if target.numel() and (target.min() < 0 or target.max() >= n_channels):
            raise ValueError(
                f"The target holds class values outside 0..{n_channels - 1} for a model with "
                f"{n_channels} output channels."
            )
    if weight is None:
        weight = torch.ones(target.shape, dtype=torch.float32, device=logits.device)
    else:
        if not isinstance(weight, torch.Tensor):
            weight = torch.as_tensor(weight, device=logits.device)
        weight = _squeeze_channel(weight, logits, "weight").float()
        if weight.numel() and weight.min() < 0:
            raise ValueError("The weight map must not contain negative values.")
    return logits, target, weight


def _weighted_mean(per_pixel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(w * l) / max(sum(w), eps)``: exactly 0 (with zero gradients) when all weights are 0."""
    return (per_pixel * weight).sum() / weight.sum().clamp(min=EPS)


def _pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel (N, *spatial) BCE (binary) or cross-entropy (multi-class), computed from logits."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
    return F.cross_entropy(logits, target, reduction="none")


def _probabilities_and_onehot(
    logits: torch.Tensor, target: torch.Tensor, binary_background: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and one-hot targets, both (N, K, *spatial)."""
    if logits.shape[1] == 1:
        foreground = torch.sigmoid(logits)
        onehot = target.unsqueeze(1)
        if not binary_background:
            return foreground, onehot
        return torch.cat([1 - foreground, foreground], dim=1), torch.cat([1 - onehot, onehot], dim=1)
    probabilities = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    return probabilities, onehot


def _soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    smooth: float,
    binary_background: bool,
) -> torch.Tensor:
    """``1 - mean_k dice_k`` over the scored classes, on already prepared inputs."""
    probabilities, onehot = _probabilities_and_onehot(logits, target, binary_background)
    pixel_weight = weight.unsqueeze(1)
    reduce_dims = [0, *range(2, probabilities.ndim)]  # one Dice per class over the whole batch
    intersection = (pixel_weight * probabilities * onehot).sum(dim=reduce_dims)
    target_sum = (pixel_weight * onehot).sum(dim=reduce_dims)
    denominator = (pixel_weight * probabilities).sum(dim=reduce_dims) + target_sum
    # With smooth = 0 an empty class (nothing labelled, nothing predicted) counts as a perfect match.
    scored = denominator + smooth > 0
    dice = torch.where(scored, (2 * intersection + smooth) / (denominator + smooth).clamp(min=EPS), 1.0)
    if logits.shape[1] == 1:
        # Binary: every scored class counts (an empty foreground still penalises false positives).
        return 1 - dice.mean()
    present = target_sum > 0
    # Multi-class: mean over classes present in the (labelled part of the) batch; none -> 0 loss.
    return ((1 - dice) * present).sum() / present.sum().clamp(min=1)


# ---------------------------------------------------------------------------
# Loss modules
# ---------------------------------------------------------------------------


class BCELoss(nn.Module):
    """Pixel-wise cross-entropy: weighted BCE-with-logits for C == 1, weighted cross-entropy for C >= 2."""

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits, target, weight = _prepare(logits, target, weight)
        return _weighted_mean(_pixel_cross_entropy(logits, target), weight)


class DiceLoss(nn.Module):
    """Soft Dice loss ``1 - dice`` on sigmoid / softmax probabilities.

    One Dice per class is computed over the whole batch,
    ``dice_k = (2 * sum(w p_k t_k) + smooth) / (sum(w p_k) + sum(w t_k) + smooth)``,
    with the weight map applied to the intersection and to both sums.

    * Binary (C == 1): by default only the foreground class is scored (the common
      choice); ``binary_background=True`` averages foreground and background Dice.
    * Multi-class (C >= 2): the mean over the classes present in the labelled
      (weight > 0) part of the target; a batch with no labelled pixel gives 0.
    """

    def __init__(self, smooth: float = 1.0, binary_background: bool = False) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError("The Dice smoothing term must not be negative.")
        self.smooth = float(smooth)
        self.binary_background = bool(binary_background)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits, target, weight = _prepare(logits, target, weight)
        return _soft_dice_loss(logits, target, weight, self.smooth, self.binary_background)


class DiceBCELoss(nn.Module):
    """``bce_weight * BCELoss + dice_weight * DiceLoss`` (foreground Dice for binary models).

    The BCE part is computed from logits (``binary_cross_entropy_with_logits`` /
    ``cross_entropy``), never from ``log(sigmoid(x))``, so it is stable for large logits.
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        binary_background: bool = False,
    ) -> None:
        super().__init__()
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.dice = DiceLoss(smooth=smooth, binary_background=binary_background)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits, target, weight = _prepare(logits, target, weight)
        bce = _weighted_mean(_pixel_cross_entropy(logits, target), weight)
        dice = _soft_dice_loss(logits, target, weight, self.dice.smooth, self.dice.binary_background)
        return self.bce_weight * bce + self.dice_weight * dice


class CEDiceLoss(DiceBCELoss):
    """Cross-entropy + Dice over every class.

    Identical to :class:`DiceBCELoss` for multi-class models. For a binary model the
    logit is treated as the two-class softmax ``[0, z]`` (whose cross-entropy equals
    BCE) and the Dice is averaged over background and foreground.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__(bce_weight=ce_weight, dice_weight=dice_weight, smooth=smooth, binary_background=True)


class FocalLoss(nn.Module):
    """Focal loss ``alpha_t * (1 - p_t)^gamma * CE`` (Lin et al. 2017), weighted mean over pixels.

    ``alpha``: ``None`` (no class weighting); a float in (0, 1) for binary models
    (foreground gets ``alpha``, background ``1 - alpha``); or a sequence with one
    weight per class (length 2 for binary models: background, foreground).
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError("The focal loss gamma must not be negative.")
        self.gamma = float(gamma)
        if alpha is None or isinstance(alpha, (int, float)):
            if alpha is not None and not 0 < alpha < 1:
                raise ValueError("A scalar focal loss alpha must lie strictly between 0 and 1.")
            self.alpha = alpha
        else:
            self.alpha = [float(a) for a in alpha]

    def _alpha_per_pixel(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        n_channels = logits.shape[1]
        if self.alpha is None:
            return None
        if isinstance(self.alpha, float | int):
            if n_channels != 1:
                raise ValueError(
                    "A scalar focal loss alpha only applies to binary models; give one per class."
                )
            return target * self.alpha + (1 - target) * (1 - self.alpha)
        n_classes = max(2, n_channels)
        if len(self.alpha) != n_classes:
            raise ValueError(f"The focal loss needs {n_classes} alpha values but got {len(self.alpha)}.")
        alpha = torch.tensor(self.alpha, dtype=torch.float32, device=logits.device)
        if n_channels == 1:
            return target * alpha[1] + (1 - target) * alpha[0]
        return alpha[target]

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits, target, weight = _prepare(logits, target, weight)
        cross_entropy = _pixel_cross_entropy(logits, target)
        # 1 - p_t = -expm1(-CE): accurate when p_t is close to 1; the clamp keeps gamma < 1 differentiable.
        modulating = (-torch.expm1(-cross_entropy)).clamp(min=EPS) ** self.gamma
        per_pixel = modulating * cross_entropy
        alpha = self._alpha_per_pixel(logits, target)
        if alpha is not None:
            per_pixel = alpha * per_pixel
        return _weighted_mean(per_pixel, weight)


class BorderWeightedLoss(nn.Module):
    """The UNet paper's pixel-wise loss: cross-entropy weighted by a border weight map.

    The module only multiplies each pixel's BCE / cross-entropy by the supplied
    ``weight``; the data pipeline supplies ``border_weight_map(labels) * ignore_mask``
    (without a weight it is plain cross-entropy). With ``dice_weight > 0`` a Dice
    term is added, computed with the ignore mask ``weight > 0`` only, so the large
    border weights do not distort the overlap measure.
    """

    def __init__(self, dice_weight: float = 0.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0:
            raise ValueError("The Dice weight must not be negative.")
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits, target, weight = _prepare(logits, target, weight)
        loss = _weighted_mean(_pixel_cross_entropy(logits, target), weight)
        if self.dice_weight > 0:
            labelled = (weight > 0).float()
            loss = loss + self.dice_weight * _soft_dice_loss(logits, target, labelled, self.smooth, False)
        return loss


_LOSSES: dict[str, type[nn.Module]] = {
    "bce": BCELoss,
    "dice": DiceLoss,
    "dice_bce": DiceBCELoss,
    "focal": FocalLoss,
    "ce_dice": CEDiceLoss,
    "border_weighted": BorderWeightedLoss,
}


def available_losses() -> list[str]:
    """Names accepted by :func:`get_loss`."""
    return list(_LOSSES)


def get_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss called ``name`` (see :func:`available_losses`) with the given options."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in _LOSSES:
        raise ValueError(f"Unknown loss {name!r}; known losses are: {', '.join(_LOSSES)}.")
    try:
        return _LOSSES[key](**kwargs)
    except TypeError as exc:
        raise ValueError(f"Invalid options {sorted(kwargs)} for the {key!r} loss.") from exc


# ---------------------------------------------------------------------------
# Border weight map (Ronneberger et al. 2015, eq. 2)
# ---------------------------------------------------------------------------


def _is_instance_map(labels: np.ndarray, instances: bool | None, foreground_class: int) -> bool:
    """Resolve ``instances=None``: a map holding only 0 and the foreground class is a class map."""
    if instances is not None:
        return bool(instances)
    return not np.isin(labels, (0, foreground_class)).all()


def _cells_of_class(labels: np.ndarray, foreground_class: int) -> np.ndarray:
    """Cell ids = face-connected components of ``foreground_class`` (keeps thin membranes closed)."""
    cells, _ = ndimage.label(labels == foreground_class)
    return cells


def _class_balance_weights(classes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """w_c(x) = n_valid / (n_present_classes * count(class(x))), so w_c averages 1 over labelled pixels."""
    values, inverse = np.unique(classes, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=valid.ravel().astype(np.float64), minlength=values.size)
    present = counts > 0
    per_class = np.zeros(values.size)
    per_class[present] = counts.sum() / (present.sum() * counts[present])
    return per_class[inverse].reshape(classes.shape).astype(np.float32)


def _two_nearest_cell_distances(
    cells: np.ndarray, reach: float, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest cell, exact wherever they are <= ``reach``.

    Each cell's distance transform is computed only in its bounding box grown by
    ``reach`` (pixels farther away cannot matter), and the two smallest values are kept.
    """
    nearest = np.full(cells.shape, np.inf, dtype=np.float32)
    second = np.full(cells.shape, np.inf, dtype=np.float32)
    steps = np.ones(cells.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    margin = np.ceil(reach / steps).astype(int)
    for cell_id, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        grown = tuple(
            slice(max(s.start - m, 0), min(s.stop + m, size))
            for s, m, size in zip(box, margin, cells.shape, strict=True)
        )
        distance = ndimage.distance_transform_edt(cells[grown] != cell_id, sampling=spacing)
        near_view, second_view = nearest[grown], second[grown]
        np.minimum(second_view, np.maximum(near_view, distance), out=second_view)
        np.minimum(near_view, distance, out=near_view)
    return nearest, second


def border_weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_balance: bool = True,
    foreground_class: int = 1,
    *,
    instances: bool | None = None,
    valid_mask: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    truncate: float = 4.0,
) -> np.ndarray:
    """The UNet paper's weight map ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``.

    ``d1`` / ``d2`` are the distances to the nearest and second-nearest cell; the
    exponential term is added on background (non-cell) pixels only, as in the paper,
    so gaps between touching cells get large weights.

    Args:
        labels: 2D or 3D integer map: either instance ids (0 = background/boundary,
            >0 = cells) or a class map whose cells are the face-connected components
            of ``foreground_class`` (ISBI: class 1 = interior, separated by membrane 0).
        w0, sigma: amplitude and width (in pixels, or in ``spacing`` units) of the border term.
        class_balance: add ``w_c`` balancing class frequencies (mean 1 over labelled
            pixels; classes are the class-map values, or cell vs background for
            instance maps); otherwise ``w_c = 1``.
        foreground_class: the cell class of a class map.
        instances: ``True`` = ``labels`` are instance ids, ``False`` = class map,
            ``None`` = class map if it holds only 0 and ``foreground_class``, else instances.
        valid_mask: optional labelled-pixel mask; pixels outside it get weight 0 and
            are left out of the class frequencies.
        spacing: optional pixel size per axis (anisotropic 3D volumes).
        truncate: the border term is dropped where ``d1 + d2 > truncate * sigma``
            (its value there is below ``w0 * exp(-truncate^2 / 2)``); this keeps the
            per-cell distance transforms local and the map fast.

    Returns:
        float32 array of ``labels``' shape. For a stack of 2D slices call it per slice.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"The labels must be a 2D or 3D array but have shape {labels.shape}.")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"The labels must be an integer array but have dtype {labels.dtype}.")
    if labels.size and labels.min() < 0:
        raise ValueError("The labels must not contain negative values.")
    if sigma <= 0 or w0 < 0 or truncate <= 0:
        raise ValueError("The border weight map needs sigma > 0, w0 >= 0 and truncate > 0.")
    if spacing is not None and len(spacing) != labels.ndim:
        raise ValueError(f"The spacing needs one value per axis of the labels shape {labels.shape}.")
    valid = np.ones(labels.shape, bool) if valid_mask is None else np.asarray(valid_mask, bool)
    if valid.shape != labels.shape:
        raise ValueError(
            f"The valid mask shape {valid.shape} does not match the labels shape {labels.shape}."
        )

    labels = labels.astype(np.int64, copy=False)
    is_instance_map = _is_instance_map(labels, instances, foreground_class)
    cells = labels if is_instance_map else _cells_of_class(labels, foreground_class)
    if class_balance:
        classes = (cells > 0).astype(np.int64) if is_instance_map else labels
        weights = _class_balance_weights(classes, valid)
    else:
        weights = np.ones(labels.shape, np.float32)

    reach = truncate * sigma
    nearest, second = _two_nearest_cell_distances(cells, reach, spacing)
    border = (cells == 0) & (nearest + second <= reach)
    gap = nearest[border] + second[border]
    weights[border] += w0 * np.exp(-(gap.astype(np.float64) ** 2) / (2 * sigma**2)).astype(np.float32)
    weights[~valid] = 0
    return weights
