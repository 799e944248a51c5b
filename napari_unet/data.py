"""Training data: samples, validation splits, patch sampling and augmentation.

Everything here runs in torch on the training device, so a batch is cropped, deformed and
augmented without leaving the GPU (or without Python loops over pixels on the CPU).

A *sample* is one image the model sees as a whole: a slice of a 2D stack for a 2D model, a
volume for a 3D model. Each sample carries its image (C, *spatial), its class map (*spatial) and
a float weight map (*spatial), 0 = ignore. The weight map travels with every patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig",
    "DataError",
    "PatchSampler",
    "Sample",
    "augment_batch",
    "make_samples",
    "split_validation",
]


class DataError(ValueError):
    """Training images, labels or weights that cannot be used together."""


@dataclass
class Sample:
    """One training image with its labels and weights (NumPy, spatial axes last)."""

    image: np.ndarray  # (C, *spatial) float32, already normalised
    labels: np.ndarray  # (*spatial) int64 class map
    weights: np.ndarray  # (*spatial) float32, 0 = ignore

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    @property
    def labelled_pixels(self) -> int:
        return int(np.count_nonzero(self.weights > 0))

    def along_first_axis(self, part: slice) -> Sample:
        """The part of this sample at ``part`` of its first spatial axis (views, no copies)."""
        return Sample(self.image[:, part], self.labels[part], self.weights[part])

    def crop(self, box: tuple[slice, ...]) -> Sample:
        """The part of this sample inside ``box`` (one slice per spatial axis; views, no copies)."""
        return Sample(self.image[(slice(None), *box)], self.labels[box], self.weights[box])


@dataclass
class AugmentConfig:
    """Which augmentations to apply and how strongly (the UNet paper's settings by default)."""

    flips: bool = True
    rotations: bool = True  # 90-degree rotations in the last two (Y, X) axes
    elastic: bool = True
    elastic_probability: float = 0.5
    elastic_grid: int = 3  # coarse control-point grid per axis
    elastic_sigma: float = 10.0  # displacement std in pixels
    intensity: bool = True
    intensity_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    brightness_range: tuple[float, float] = (-0.1, 0.1)
    noise_std_max: float = 0.05

    @property
    def margin(self) -> int:
        """Context to crop around a patch so that the deformation does not pull in padding."""
        return int(math.ceil(3 * self.elastic_sigma)) if self.elastic else 0


# ---------------------------------------------------------------------------------------------
# Building samples from user arrays


def _as_numpy(array) -> np.ndarray:
    """Materialise dask/zarr/torch arrays as NumPy."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _split_into_samples(array, spatial_dims: int, what: str, channel_axis_allowed: bool) -> list[np.ndarray]:
    """Turn the user's images/labels/weights argument into a list of per-sample arrays.

    A list/tuple is one sample per element. A single array is one sample, except that a 2D model
    treats a (Z, Y, X) stack (or (Z, C, Y, X) for images) as Z samples.
    """
    if isinstance(array, (list, tuple)):
        return [_as_numpy(a) for a in array]
    array = _as_numpy(array)
    if spatial_dims == 2:
        if array.ndim == 2:
            return [array]
        if array.ndim == 3:
            return [array[i] for i in range(array.shape[0])]
        if array.ndim == 4 and channel_axis_allowed:
            return [array[i] for i in range(array.shape[0])]
        raise DataError(f"A 2D model needs {what} shaped (Y, X) or (Z, Y, X), not {array.shape}.")
    if array.ndim == 3 or (array.ndim == 4 and channel_axis_allowed):
        return [array]
    raise DataError(f"A 3D model needs {what} shaped (Z, Y, X), not {array.shape}.")


def _image_with_channels(image: np.ndarray, spatial_dims: int, in_channels: int, index: int) -> np.ndarray:
    if image.ndim == spatial_dims:
        image = image[None]
    if image.ndim != spatial_dims + 1:
        raise DataError(f"Image {index} has shape {image.shape}, which does not fit a {spatial_dims}D model.")
    if image.shape[0] != in_channels:
        raise DataError(f"Image {index} has {image.shape[0]} channel(s) but the model expects {in_channels}.")
    return image


def make_samples(
    images,
    labels,
    weights=None,
    *,
    spatial_dims: int,
    in_channels: int,
    n_classes: int,
    normalize=None,
) -> list[Sample]:
    """Check and convert the user's images, labels and optional weights into samples.

    normalize: callable(raw image) -> float32 normalised image; None keeps the values as float32.
    Raises DataError with one plain sentence when shapes or label values do not fit.
    """
    image_list = _split_into_samples(images, spatial_dims, "images", channel_axis_allowed=True)
    label_list = _split_into_samples(labels, spatial_dims, "labels", channel_axis_allowed=False)
    if weights is None:
        weight_list = [None] * len(label_list)
    else:
        weight_list = _split_into_samples(weights, spatial_dims, "weights", channel_axis_allowed=False)
    if not image_list:
        raise DataError("No training images were given.")
    if not (len(image_list) == len(label_list) == len(weight_list)):
        raise DataError(
            f"Got {len(image_list)} image(s), {len(label_list)} label map(s) and {len(weight_list)} weight map(s); "
            "the counts must match."
        )
    samples = []
    for index, (image, label, weight) in enumerate(zip(image_list, label_list, weight_list)):
        image = _image_with_channels(image, spatial_dims, in_channels, index)
        if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
            raise DataError(f"Image {index} contains NaN or infinite pixels; replace them (e.g. with 0) before training.")
        if label.shape != image.shape[1:]:
            raise DataError(f"Labels {index} have shape {label.shape} but image {index} has spatial shape {image.shape[1:]}.")
        if not np.issubdtype(label.dtype, np.integer) and not np.issubdtype(label.dtype, np.bool_):
            if not np.all(np.mod(label, 1) == 0):
                raise DataError(f"Labels {index} are not integer class numbers.")
        label = label.astype(np.int64, copy=False)
        if weight is None:
            weight = np.ones(label.shape, np.float32)
        else:
            weight = np.asarray(weight, np.float32)
            if weight.shape != label.shape:
                raise DataError(f"Weights {index} have shape {weight.shape} but labels {index} have shape {label.shape}.")
            if not np.all(np.isfinite(weight)) or weight.min(initial=0) < 0:
                raise DataError(f"Weights {index} must be finite and not negative.")
        labelled = weight > 0
        if labelled.any():
            low, high = int(label[labelled].min()), int(label[labelled].max())
            if low < 0 or high >= n_classes:
                raise DataError(
                    f"Labels {index} contain class {high if high >= n_classes else low}, "
                    f"but the model predicts classes 0..{n_classes - 1}."
                )
        # unlabelled pixels may hold any value: clamp them into range so indexing stays valid
        label = np.where(labelled, label, 0).astype(np.int64)
        image = normalize(image) if normalize is not None else image.astype(np.float32)
        samples.append(Sample(np.ascontiguousarray(image, np.float32), label, weight))
    if not any(s.labelled_pixels for s in samples):
        raise DataError("There are no labelled pixels to train on.")
    return samples


# ---------------------------------------------------------------------------------------------
# Validation split


def split_validation(samples: Sequence[Sample], fraction: float, *, min_val_size: int = 16) -> tuple[list[Sample], list[Sample]]:
    """Hold out about `fraction` of the labelled data for validation.

    By slice when there are enough labelled samples (the last ones, so that neighbouring slices of
    a stack mostly stay on one side); otherwise by region: a block at the end of the first spatial
    axis of one sample, placed so that it holds about `fraction` of that sample's labelled pixels.
    The two parts never overlap. fraction 0 returns (samples, []).
    """
    if not 0 <= fraction < 1:
        raise DataError(f"The validation fraction must be in [0, 1), not {fraction}.")
    samples = list(samples)
    if fraction == 0:
        return samples, []
    labelled = [i for i, s in enumerate(samples) if s.labelled_pixels > 0]
    n_val = int(round(len(labelled) * fraction))
    if n_val >= 1 and len(labelled) - n_val >= 1:
        val_ids = set(labelled[-n_val:])
        return [s for i, s in enumerate(samples) if i not in val_ids], [samples[i] for i in sorted(val_ids)]
    return _split_by_region(samples, labelled, fraction, min_val_size)


def _split_by_region(samples: list[Sample], labelled: list[int], fraction: float, min_val_size: int):
    # split the sample with the most labelled pixels; the others stay for training
    index = max(labelled, key=lambda i: samples[i].labelled_pixels)
    sample = samples[index]
    axis_length = sample.spatial_shape[0]
    if axis_length < 2 * min_val_size:
        raise DataError(
            "The labelled data are too small to hold out a validation part; "
            "label more, give validation data, or set the validation fraction to 0."
        )
    per_row = (sample.weights > 0).reshape(axis_length, -1).sum(axis=1)
    from_end = np.cumsum(per_row[::-1]) / per_row.sum()
    rows = int(np.searchsorted(from_end, fraction) + 1)
    rows = int(np.clip(rows, min_val_size, axis_length - min_val_size))
    cut = axis_length - rows
    train_part = sample.along_first_axis(slice(None, cut))
    val_part = sample.along_first_axis(slice(cut, None))
    if val_part.labelled_pixels == 0 or train_part.labelled_pixels == 0:
        raise DataError(
            "The labels are too concentrated to split off a validation region; "
            "label more, give validation data, or set the validation fraction to 0."
        )
    train = [s for i, s in enumerate(samples) if i != index] + [train_part]
    return train, [val_part]


# ---------------------------------------------------------------------------------------------
# Patch sampling


def _pad_mode_ok(shape: tuple[int, ...], pad: int) -> bool:
    return all(size > pad for size in shape)


def _pad_sample(tensor: torch.Tensor, pad: tuple[int, ...], mode: str) -> torch.Tensor:
    """Pad the spatial axes of a (C, *spatial) tensor (F.pad wants a batch axis for reflect)."""
    if not any(pad):
        return tensor
    spec = []
    for p in reversed(pad):
        spec += [p, p]
    return F.pad(tensor[None], spec, mode=mode)[0]


class PatchSampler:
    """Draws random (augmented) training patches from samples kept on the training device.

    Crops favour labelled regions: a patch is centred on a random labelled pixel with probability
    `label_focus`, otherwise anywhere (``focus``: boolean masks of the pixels to centre on instead,
    e.g. the user's corrections when the other pixels carry low-weight labels). Samples are drawn
    in proportion to those pixels, unless ``sample_probability`` says how often to draw each.
    All randomness comes from `generator` (a CPU torch.Generator), so seeded runs repeat exactly.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        patch_size: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        augment: AugmentConfig | None = None,
        label_focus: float = 0.8,
        extra_weights: Sequence[np.ndarray] | None = None,
        focus: Sequence[np.ndarray] | None = None,
        sample_probability: Sequence[float] | None = None,
    ):
        if not samples:
            raise DataError("There are no training samples.")
        self.device = torch.device(device)
        self.augment = augment
        self.label_focus = label_focus
        self.spatial_dims = len(samples[0].spatial_shape)
        smallest = np.min([s.spatial_shape for s in samples], axis=0)
        self.patch_size = tuple(int(min(p, m)) for p, m in zip(patch_size, smallest))
        margin = augment.margin if augment is not None else 0
        self.margin = margin
        self._images, self._labels, self._weights, self._labelled_index = [], [], [], []
        counts = []
        for i, sample in enumerate(samples):
            weights = sample.weights if extra_weights is None else sample.weights * extra_weights[i]
            image = torch.from_numpy(sample.image)
            labels = torch.from_numpy(sample.labels)[None].float()
            weight = torch.from_numpy(np.ascontiguousarray(weights, np.float32))[None]
            pad = tuple(margin for _ in sample.spatial_shape)
            mode = "reflect" if _pad_mode_ok(sample.spatial_shape, margin) else "replicate"
            self._images.append(_pad_sample(image, pad, mode).to(self.device))
            self._labels.append(_pad_sample(labels, pad, mode)[0].to(self.device))
            self._weights.append(_pad_sample(weight, pad, mode)[0].to(self.device))
            # flat indices (in the unpadded sample) of labelled pixels, to centre patches on
            wanted = sample.weights > 0 if focus is None else focus[i]
            labelled = torch.from_numpy(np.flatnonzero(wanted))
            self._labelled_index.append(labelled)
            counts.append(len(labelled))
        self._shapes = [s.spatial_shape for s in samples]
        if sample_probability is not None:
            if len(sample_probability) != len(samples) or min(sample_probability) < 0 or not sum(sample_probability):
                raise DataError("Give one non-negative draw probability per sample.")
            counts = [float(p) for p in sample_probability]
        self._sample_probability = torch.tensor(counts, dtype=torch.float64) / sum(counts)

    @property
    def n_samples(self) -> int:
        return len(self._images)

    def _random_corner(self, index: int, generator: torch.Generator) -> list[int]:
        """Top-left corner (in unpadded coordinates) of a patch inside sample `index`."""
        shape = self._shapes[index]
        labelled = self._labelled_index[index]
        if len(labelled) and torch.rand((), generator=generator).item() < self.label_focus:
            flat = labelled[torch.randint(len(labelled), (), generator=generator)].item()
            centre = np.unravel_index(flat, shape)
            corner = [c - p // 2 for c, p in zip(centre, self.patch_size)]
        else:
            corner = [torch.randint(s - p + 1, (), generator=generator).item() for s, p in zip(shape, self.patch_size)]
        return [int(np.clip(c, 0, s - p)) for c, s, p in zip(corner, shape, self.patch_size)]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch: images (B, C, *patch) float32, labels (B, *patch) int64, weights (B, *patch) float32."""
        chosen = torch.multinomial(self._sample_probability, batch_size, replacement=True, generator=generator)
        images, labels, weights = [], [], []
        span = [p + 2 * self.margin for p in self.patch_size]
        for index in chosen.tolist():
            corner = self._random_corner(index, generator)
            region = tuple(slice(c, c + s) for c, s in zip(corner, span))  # padded coords: corner shifts by margin
            images.append(self._images[index][(slice(None),) + region])
            labels.append(self._labels[index][region])
            weights.append(self._weights[index][region])
        images = torch.stack(images)
        labels = torch.stack(labels)
        weights = torch.stack(weights)
        return augment_batch(images, labels, weights, self.augment, self.margin, generator)


# ---------------------------------------------------------------------------------------------
# Augmentation


def _uniform(generator: torch.Generator, low: float, high: float, n: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _elastic_grid(
    batch: int, span: Sequence[int], margin: int, cfg: AugmentConfig, generator: torch.Generator, device
) -> torch.Tensor:
    """Sampling grid (B, *patch, D) that crops the centre of a span-sized crop and deforms it.

    The displacement field is Gaussian noise on a coarse grid (UNet paper: 3x3, sigma 10 px),
    interpolated smoothly (bicubic in 2D, trilinear in 3D) to the patch size.
    """
    dims = len(span)
    patch = [s - 2 * margin for s in span]
    coarse = torch.randn((batch, dims) + (cfg.elastic_grid,) * dims, generator=generator) * cfg.elastic_sigma
    mode = "bicubic" if dims == 2 else "trilinear"
    displacement = F.interpolate(coarse.to(device), size=patch, mode=mode, align_corners=True)
    # pixel coordinates of the patch inside the crop, plus displacement, then to [-1, 1]
    axes = [torch.arange(p, device=device, dtype=torch.float32) + margin for p in patch]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *patch), axis order z, y, x
    coords = mesh[None] + displacement
    sizes = torch.tensor(span, device=device, dtype=torch.float32).view(1, dims, *([1] * dims))
    coords = 2 * coords / (sizes - 1) - 1
    # grid_sample wants the last axis in (x, y[, z]) order
    return coords.flip(1).permute(0, *range(2, dims + 2), 1).contiguous()


def _centre_crop(tensor: torch.Tensor, margin: int, dims: int) -> torch.Tensor:
    if margin == 0:
        return tensor
    index = (Ellipsis,) + tuple(slice(margin, -margin) for _ in range(dims))
    return tensor[index]


def _apply_elastic(images, labels, weights, margin, cfg, generator):
    """Deform the chosen patches, crop the rest; returns patch-sized tensors."""
    dims = labels.ndim - 1
    batch = images.shape[0]
    crop_images = _centre_crop(images, margin, dims)
    crop_labels = _centre_crop(labels, margin, dims)
    crop_weights = _centre_crop(weights, margin, dims)
    if margin == 0 or not cfg.elastic:
        return crop_images, crop_labels, crop_weights
    chosen = torch.rand(batch, generator=generator) < cfg.elastic_probability
    # draw the field for every patch so the random stream does not depend on the coin flips
    grid = _elastic_grid(batch, list(labels.shape[1:]), margin, cfg, generator, images.device)
    if not chosen.any():
        return crop_images, crop_labels, crop_weights
    idx = torch.nonzero(chosen).flatten().to(images.device)
    grid = grid[idx]
    warped_images = F.grid_sample(images[idx], grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    stacked = torch.stack([labels[idx], weights[idx]], dim=1)
    warped = F.grid_sample(stacked, grid, mode="nearest", padding_mode="reflection", align_corners=True)
    crop_images = crop_images.clone()
    crop_labels = crop_labels.clone()
    crop_weights = crop_weights.clone()
    crop_images[idx] = warped_images
    crop_labels[idx] = warped[:, 0]
    crop_weights[idx] = warped[:, 1]
    return crop_images, crop_labels, crop_weights


def _apply_flips_and_rotations(images, labels, weights, cfg, generator):
    """Random flips of every spatial axis and 90-degree rotations in (Y, X), per patch."""
    dims = labels.ndim - 1
    batch = images.shape[0]
    flips = torch.rand(batch, dims, generator=generator) < 0.5
    turns = torch.randint(4, (batch,), generator=generator)
    square = labels.shape[-1] == labels.shape[-2]
    out_images, out_labels, out_weights = [], [], []
    for b in range(batch):
        image, label, weight = images[b], labels[b], weights[b]
        if cfg.flips:
            axes = [d for d in range(dims) if flips[b, d]]
            if axes:
                image = image.flip([a + 1 for a in axes])
                label = label.flip(axes)
                weight = weight.flip(axes)
        if cfg.rotations and square and turns[b]:
            k = int(turns[b])
            image = torch.rot90(image, k, dims=(-2, -1))
            label = torch.rot90(label, k, dims=(-2, -1))
            weight = torch.rot90(weight, k, dims=(-2, -1))
        out_images.append(image)
        out_labels.append(label)
        out_weights.append(weight)
    return torch.stack(out_images), torch.stack(out_labels), torch.stack(out_weights)


def _apply_intensity(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Gamma, contrast/brightness and Gaussian noise, each on a random subset of patches."""
    batch = images.shape[0]
    device = images.device
    view = (batch,) + (1,) * (images.ndim - 1)
    p = cfg.intensity_probability
    use_gamma = (torch.rand(batch, generator=generator) < p).view(view).to(device)
    use_contrast = (torch.rand(batch, generator=generator) < p).view(view).to(device)
    use_noise = (torch.rand(batch, generator=generator) < p).view(view).to(device)
    # gamma in log space so that darkening and brightening are equally likely
    log_low, log_high = math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1])
    gamma = torch.exp(_uniform(generator, log_low, log_high, batch)).view(view).to(device)
    contrast = _uniform(generator, *cfg.contrast_range, batch).view(view).to(device)
    brightness = _uniform(generator, *cfg.brightness_range, batch).view(view).to(device)
    noise_std = _uniform(generator, 0.0, cfg.noise_std_max, batch).view(view).to(device)
    noise = torch.randn(images.shape, generator=generator).to(device)

    # gamma acts on [0, 1]: rescale each patch to its own range and back
    dims = tuple(range(1, images.ndim))
    low = images.amin(dim=dims, keepdim=True)
    high = images.amax(dim=dims, keepdim=True)
    scale = (high - low).clamp_min(1e-6)
    gamma_applied = ((images - low) / scale).clamp(0, 1).pow(gamma) * scale + low
    images = torch.where(use_gamma, gamma_applied, images)
    mean = images.mean(dim=dims, keepdim=True)
    images = torch.where(use_contrast, (images - mean) * contrast + mean + brightness, images)
    images = torch.where(use_noise, images + noise * noise_std, images)
    return images


def augment_batch(images, labels, weights, cfg: AugmentConfig | None, margin: int, generator: torch.Generator):
    """Augment a batch of crops that carry `margin` extra pixels on every side.

    Returns patch-sized images (B, C, *patch), labels (B, *patch) int64, weights (B, *patch).
    """
    dims = labels.ndim - 1
    if cfg is None:
        images, labels, weights = (_centre_crop(t, margin, dims) for t in (images, labels, weights))
        return images.contiguous(), labels.round().long(), weights.contiguous()
    images, labels, weights = _apply_elastic(images, labels, weights, margin, cfg, generator)
    images, labels, weights = _apply_flips_and_rotations(images, labels, weights, cfg, generator)
    if cfg.intensity:
        images = _apply_intensity(images, cfg, generator)
    return images.contiguous(), labels.round().long(), weights.contiguous()
