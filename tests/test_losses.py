"""Tests for napari_unet.losses: hand-computed values, ignore masks, stability, border weight map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_unet.losses import (
    BCELoss,
    BorderWeightedLoss,
    CEDiceLoss,
    DiceBCELoss,
    DiceLoss,
    FocalLoss,
    available_losses,
    border_weight_map,
    get_loss,
)

ALL_LOSS_NAMES = ["bce", "dice", "dice_bce", "focal", "ce_dice", "border_weighted"]

# A tiny binary example: 4 pixels of one image, shape (N=1, C=1, 2, 2).
BINARY_LOGITS = [2.0, -1.0, 0.5, 0.0]
BINARY_TARGET = [1, 0, 0, 1]
BINARY_WEIGHT = [1.0, 0.0, 2.0, 1.0]


def _binary_tensors(weighted: bool):
    logits = torch.tensor(BINARY_LOGITS).reshape(1, 1, 2, 2)
    target = torch.tensor(BINARY_TARGET).reshape(1, 2, 2)
    weight = torch.tensor(BINARY_WEIGHT).reshape(1, 2, 2) if weighted else None
    weights = BINARY_WEIGHT if weighted else [1.0] * 4
    return logits, target, weight, weights


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _bce(z: float, t: float) -> float:
    return -(t * math.log(_sigmoid(z)) + (1 - t) * math.log(1 - _sigmoid(z)))


def _dice(probs: list[float], targets: list[float], weights: list[float], smooth: float = 1.0) -> float:
    intersection = sum(w * p * t for p, t, w in zip(probs, targets, weights))
    sums = sum(w * p for p, w in zip(probs, weights)) + sum(w * t for t, w in zip(targets, weights))
    return (2 * intersection + smooth) / (sums + smooth)


def _weighted_average(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


# Multi-class example: 3 classes, 3 pixels, shape (1, 3, 1, 3).
MULTI_LOGITS = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0]]  # per pixel: logits of classes 0, 1, 2
MULTI_TARGET = [0, 1, 1]  # class 2 is absent from the target
MULTI_WEIGHT = [1.0, 3.0, 0.0]


def _multi_tensors(weighted: bool):
    logits = torch.tensor(MULTI_LOGITS).T.reshape(1, 3, 1, 3)
    target = torch.tensor(MULTI_TARGET).reshape(1, 1, 3)
    weight = torch.tensor(MULTI_WEIGHT).reshape(1, 1, 3) if weighted else None
    weights = MULTI_WEIGHT if weighted else [1.0] * 3
    return logits, target, weight, weights


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_binary_matches_formula(weighted):
    logits, target, weight, weights = _binary_tensors(weighted)
    expected = _weighted_average([_bce(z, t) for z, t in zip(BINARY_LOGITS, BINARY_TARGET)], weights)
    assert BCELoss()(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_multiclass_is_weighted_cross_entropy(weighted):
    logits, target, weight, weights = _multi_tensors(weighted)
    per_pixel = [-math.log(_softmax(row)[t]) for row, t in zip(MULTI_LOGITS, MULTI_TARGET)]
    expected = _weighted_average(per_pixel, weights)
    assert BCELoss()(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)


def test_target_and_weight_accept_a_channel_axis_and_float_binary_targets():
    logits, target, weight, _ = _binary_tensors(True)
    reference = DiceBCELoss()(logits, target, weight)
    with_channel = DiceBCELoss()(logits, target.unsqueeze(1).float(), weight.unsqueeze(1))
    assert with_channel.item() == pytest.approx(reference.item())


@pytest.mark.parametrize("weighted", [False, True])
def test_dice_binary_foreground_only(weighted):
    logits, target, weight, weights = _binary_tensors(weighted)
    probs = [_sigmoid(z) for z in BINARY_LOGITS]
    expected = 1 - _dice(probs, BINARY_TARGET, weights)
    assert DiceLoss()(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)


def test_dice_binary_with_background_averages_both_classes():
    logits, target, weight, weights = _binary_tensors(True)
    probs = [_sigmoid(z) for z in BINARY_LOGITS]
    foreground = _dice(probs, BINARY_TARGET, weights)
    background = _dice([1 - p for p in probs], [1 - t for t in BINARY_TARGET], weights)
    expected = 1 - (foreground + background) / 2
    loss = DiceLoss(binary_background=True)(logits, target, weight)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_dice_multiclass_averages_present_classes(weighted):
    logits, target, weight, weights = _multi_tensors(weighted)
    probs = [_softmax(row) for row in MULTI_LOGITS]
    dices = [
        _dice([p[k] for p in probs], [float(t == k) for t in MULTI_TARGET], weights) for k in (0, 1)
    ]  # class 2 is absent from the target and therefore not averaged
    expected = 1 - sum(dices) / 2
    assert DiceLoss()(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)


def test_dice_smooth_zero_all_ignored_is_zero():
    logits, target, _, _ = _binary_tensors(False)
    loss = DiceLoss(smooth=0.0)(logits, target, torch.zeros(1, 2, 2))
    assert loss.item() == 0.0


@pytest.mark.parametrize("weighted", [False, True])
def test_dice_bce_is_the_sum_of_both_terms(weighted):
    logits, target, weight, weights = _binary_tensors(weighted)
    bce = _weighted_average([_bce(z, t) for z, t in zip(BINARY_LOGITS, BINARY_TARGET)], weights)
    dice = 1 - _dice([_sigmoid(z) for z in BINARY_LOGITS], BINARY_TARGET, weights)
    assert DiceBCELoss()(logits, target, weight).item() == pytest.approx(bce + dice, rel=1e-5)
    weighted_sum = DiceBCELoss(bce_weight=0.5, dice_weight=2.0)(logits, target, weight).item()
    assert weighted_sum == pytest.approx(0.5 * bce + 2.0 * dice, rel=1e-5)


def test_ce_dice_binary_uses_both_classes_and_equals_dice_bce_for_multiclass():
    logits, target, weight, weights = _binary_tensors(True)
    probs = [_sigmoid(z) for z in BINARY_LOGITS]
    bce = _weighted_average([_bce(z, t) for z, t in zip(BINARY_LOGITS, BINARY_TARGET)], weights)
    background = _dice([1 - p for p in probs], [1 - t for t in BINARY_TARGET], weights)
    dice = (_dice(probs, BINARY_TARGET, weights) + background) / 2
    assert CEDiceLoss()(logits, target, weight).item() == pytest.approx(bce + 1 - dice, rel=1e-5)

    logits, target, weight, weights = _multi_tensors(True)
    ce = _weighted_average([-math.log(_softmax(r)[t]) for r, t in zip(MULTI_LOGITS, MULTI_TARGET)], weights)
    probs = [_softmax(row) for row in MULTI_LOGITS]
    dices = [_dice([p[k] for p in probs], [float(t == k) for t in MULTI_TARGET], weights) for k in (0, 1)]
    expected = ce + 1 - sum(dices) / 2
    assert CEDiceLoss()(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)
    assert DiceBCELoss()(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_binary_matches_formula(weighted):
    logits, target, weight, weights = _binary_tensors(weighted)
    per_pixel = []
    for z, t in zip(BINARY_LOGITS, BINARY_TARGET):
        p_t = _sigmoid(z) if t == 1 else 1 - _sigmoid(z)
        per_pixel.append((1 - p_t) ** 2 * -math.log(p_t))
    expected = _weighted_average(per_pixel, weights)
    assert FocalLoss()(logits, target, weight).item() == pytest.approx(expected, rel=1e-5)

    alpha_t = [0.25 if t == 1 else 0.75 for t in BINARY_TARGET]
    expected_alpha = _weighted_average([a * v for a, v in zip(alpha_t, per_pixel)], weights)
    assert FocalLoss(alpha=0.25)(logits, target, weight).item() == pytest.approx(expected_alpha, rel=1e-5)
    per_class_alpha = FocalLoss(alpha=[0.75, 0.25])(logits, target, weight).item()
    assert per_class_alpha == pytest.approx(expected_alpha, rel=1e-5)


def test_focal_multiclass_with_class_alphas_and_gamma_zero_is_cross_entropy():
    logits, target, weight, weights = _multi_tensors(True)
    alphas = [0.2, 0.5, 0.3]
    per_pixel = []
    for row, t in zip(MULTI_LOGITS, MULTI_TARGET):
        p_t = _softmax(row)[t]
        per_pixel.append(alphas[t] * (1 - p_t) ** 3 * -math.log(p_t))
    expected = _weighted_average(per_pixel, weights)
    focal = FocalLoss(gamma=3, alpha=alphas)(logits, target, weight).item()
    assert focal == pytest.approx(expected, rel=1e-5)
    assert FocalLoss(gamma=0)(logits, target, weight).item() == pytest.approx(
        BCELoss()(logits, target, weight).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=0.25)(logits, target, weight)
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=[0.5, 0.5])(logits, target, weight)


def test_border_weighted_multiplies_by_the_supplied_map_and_can_add_dice():
    logits, target, _, _ = _binary_tensors(False)
    border_weights = [1.0, 0.0, 10.0, 2.5]  # map times ignore mask, as the data pipeline supplies it
    weight = torch.tensor(border_weights).reshape(1, 2, 2)
    bce = _weighted_average([_bce(z, t) for z, t in zip(BINARY_LOGITS, BINARY_TARGET)], border_weights)
    assert BorderWeightedLoss()(logits, target, weight).item() == pytest.approx(bce, rel=1e-5)

    labelled = [1.0, 0.0, 1.0, 1.0]  # the Dice term only uses the ignore mask, not the border weights
    dice = 1 - _dice([_sigmoid(z) for z in BINARY_LOGITS], BINARY_TARGET, labelled)
    with_dice = BorderWeightedLoss(dice_weight=0.5)(logits, target, weight).item()
    assert with_dice == pytest.approx(bce + 0.5 * dice, rel=1e-5)


def _random_case(n_channels: int, spatial: tuple[int, ...], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, n_channels, *spatial, generator=generator) * 3
    n_classes = max(2, n_channels)
    target = torch.randint(0, n_classes, (2, *spatial), generator=generator)
    ignored = torch.rand(2, *spatial, generator=generator) < 0.4
    weight = torch.rand(2, *spatial, generator=generator) + 0.5
    weight[ignored] = 0
    return logits, target, weight, ignored


@pytest.mark.parametrize("name", ALL_LOSS_NAMES)
@pytest.mark.parametrize("n_channels", [1, 3])
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
def test_ignored_pixels_have_no_influence_on_value_or_gradient(name, n_channels, spatial):
    loss_fn = get_loss(name)
    logits, target, weight, ignored = _random_case(n_channels, spatial)
    logits.requires_grad_(True)
    loss = loss_fn(logits, target, weight)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    ignored_channels = ignored.unsqueeze(1).expand_as(logits)
    assert torch.all(logits.grad[ignored_channels] == 0)
    assert torch.any(logits.grad[~ignored_channels] != 0)

    changed_logits = logits.detach().clone()
    changed_logits[ignored_channels] = torch.randn(int(ignored_channels.sum())) * 50
    changed_target = target.clone()
    changed_target[ignored] = (target[ignored] + 1) % max(2, n_channels)
    changed = loss_fn(changed_logits, changed_target, weight)
    assert changed.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", ALL_LOSS_NAMES)
@pytest.mark.parametrize("n_channels", [1, 2])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(name, n_channels):
    logits, target, _, _ = _random_case(n_channels, (4, 4))
    logits.requires_grad_(True)
    loss = get_loss(name)(logits, target, torch.zeros(2, 4, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(torch.isfinite(logits.grad)) and torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", ALL_LOSS_NAMES)
@pytest.mark.parametrize("n_channels", [1, 3])
def test_losses_are_finite_for_extreme_logits(name, n_channels):
    logits, target, weight, _ = _random_case(n_channels, (4, 4))
    extreme = (torch.sign(logits) * 100).requires_grad_(True)
    loss = get_loss(name)(extreme, target, weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(extreme.grad))
    # Confidently wrong pixels must give a large (not saturated-to-zero) pixel-wise loss.
    wrong = torch.full_like(extreme, -100.0)
    wrong[:, 0] = 100.0 if n_channels > 1 else -100.0  # class 1 is the truth everywhere
    expected = 100.0 if n_channels == 1 else 200.0  # log(1 + e^100) and log-softmax gap of 200
    assert BCELoss()(wrong, torch.ones(2, 4, 4, dtype=torch.long)).item() == pytest.approx(expected, rel=1e-4)


def test_perfect_prediction_gives_near_zero_loss_and_half_precision_logits_work():
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = (target.float() * 2 - 1).unsqueeze(1) * 50
    for name in ALL_LOSS_NAMES:
        assert get_loss(name)(logits, target).item() == pytest.approx(0.0, abs=1e-3)
        half = get_loss(name)(logits.half(), target)
        assert half.dtype == torch.float32 and half.item() == pytest.approx(0.0, abs=1e-3)


def test_registry_lists_every_loss_and_rejects_unknown_names():
    assert available_losses() == ALL_LOSS_NAMES
    assert isinstance(get_loss("dice_bce"), DiceBCELoss)
    assert isinstance(get_loss("Border-Weighted", dice_weight=1.0), BorderWeightedLoss)
    assert get_loss("focal", gamma=1.5).gamma == 1.5
    with pytest.raises(ValueError, match="bce, dice, dice_bce, focal, ce_dice, border_weighted"):
        get_loss("lovasz")
    with pytest.raises(ValueError, match="option"):
        get_loss("dice", gamma=2)


def test_shape_mismatch_and_bad_values_raise_plain_errors():
    loss = DiceBCELoss()
    logits = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 5, 4\)"):
        loss(logits, torch.zeros(2, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 4\)"):
        loss(logits, torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="0..2"):
        loss(logits, torch.full((2, 4, 4), 3))
    with pytest.raises(ValueError, match="integer"):
        loss(logits, torch.full((2, 4, 4), 0.5))
    with pytest.raises(ValueError, match="between 0 and 1"):
        loss(torch.zeros(2, 1, 4, 4), torch.full((2, 4, 4), 2))
    with pytest.raises(ValueError, match="negative"):
        loss(logits, torch.zeros(2, 4, 4, dtype=torch.long), -torch.ones(2, 4, 4))


# ---------------------------------------------------------------------------
# Border weight map
# ---------------------------------------------------------------------------


def _two_cell_instances() -> np.ndarray:
    labels = np.zeros((7, 12), np.int32)
    labels[1:5, 1:4] = 1
    labels[2:6, 7:10] = 2
    return labels


def _brute_force_border_term(labels: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels, distances by brute force."""
    coordinates = {cell: np.argwhere(labels == cell) for cell in np.unique(labels) if cell > 0}
    term = np.zeros(labels.shape)
    for pixel in np.argwhere(labels == 0):
        d1, d2 = sorted(np.sqrt(((c - pixel) ** 2).sum(axis=1)).min() for c in coordinates.values())[:2]
        term[tuple(pixel)] = w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    return term


def test_border_weight_map_matches_directly_computed_distances():
    labels = _two_cell_instances()
    expected = 1.0 + _brute_force_border_term(labels, w0=10.0, sigma=3.0)
    weights = border_weight_map(labels, w0=10.0, sigma=3.0, class_balance=False)
    assert weights.dtype == np.float32 and weights.shape == labels.shape
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    # Row 3, column 5 lies 2 px from both cells: d1 + d2 = 4.
    assert weights[3, 5] == pytest.approx(1 + 10 * math.exp(-(4**2) / (2 * 3**2)), rel=1e-5)
    assert weights[3, 5] > weights[0, 0]


def test_border_weight_map_class_balance_and_class_map_input():
    labels = _two_cell_instances()
    n_cell = int((labels > 0).sum())
    n_background = labels.size - n_cell
    border = _brute_force_border_term(labels, w0=5.0, sigma=2.0)  # untruncated: compare with truncate=20
    expected = np.where(labels > 0, labels.size / (2 * n_cell), labels.size / (2 * n_background)) + border
    weights = border_weight_map(labels, w0=5.0, sigma=2.0, truncate=20.0)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    # The same cells given as an ISBI-like class map (1 = interior) give the same map.
    class_map = (labels > 0).astype(np.uint8)
    from_class_map = border_weight_map(class_map, w0=5.0, sigma=2.0, truncate=20.0)
    np.testing.assert_allclose(from_class_map, expected, rtol=1e-5)
    # A three-class map balances all three classes; cells are the components of foreground_class.
    three_class = class_map.copy()
    three_class[0, :] = 2
    weights = border_weight_map(three_class, w0=0.0, foreground_class=1, instances=False)
    counts = {k: int((three_class == k).sum()) for k in (0, 1, 2)}
    for k, count in counts.items():
        np.testing.assert_allclose(weights[three_class == k], labels.size / (3 * count), rtol=1e-5)


def test_border_weight_map_single_cell_valid_mask_truncation_and_3d():
    single = np.zeros((6, 6), np.int32)
    single[2:4, 2:4] = 1
    np.testing.assert_allclose(border_weight_map(single, class_balance=False), 1.0)  # needs two cells

    labels = _two_cell_instances()
    valid = np.ones(labels.shape, bool)
    valid[:, -2:] = False
    weights = border_weight_map(labels, sigma=3.0, valid_mask=valid)
    assert np.all(weights[:, -2:] == 0) and np.all(weights[valid] > 0)

    # Terms with d1 + d2 beyond truncate * sigma are dropped, the rest are kept exactly.
    full = border_weight_map(labels, sigma=3.0, class_balance=False)
    truncated = border_weight_map(labels, sigma=3.0, class_balance=False, truncate=2.0)
    cutoff = 10 * math.exp(-(2.0**2) / 2)  # border term at d1 + d2 = truncate * sigma
    kept, dropped = (full - 1) > cutoff * 1.001, (full - 1) < cutoff * 0.999
    assert kept.any() and (dropped & (full > 1)).any()
    np.testing.assert_allclose(truncated[kept], full[kept], rtol=1e-6)
    assert np.all(truncated[dropped] == 1.0)

    volume = np.zeros((5, 7, 12), np.int32)
    volume[1:4] = labels
    volume_weights = border_weight_map(volume, w0=10.0, sigma=3.0, class_balance=False)
    expected = 1.0 + _brute_force_border_term(volume, w0=10.0, sigma=3.0)
    np.testing.assert_allclose(volume_weights, expected, rtol=1e-5)


def test_border_weight_map_rejects_bad_input():
    with pytest.raises(ValueError, match="2D or 3D"):
        border_weight_map(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="integer"):
        border_weight_map(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="sigma"):
        border_weight_map(np.zeros((4, 4), np.int32), sigma=0)
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(4, 4\)"):
        border_weight_map(np.zeros((4, 4), np.int32), valid_mask=np.ones((3, 3)))
