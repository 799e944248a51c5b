"""Offline sample data, made by the project's own code.

* **EM membranes (2D stack)**: serial sections through Voronoi cells whose boundaries are dark,
  blurred, noisy membranes, with small dark vesicles inside the cells as distractors. Ground truth
  like ISBI 2012: 1 = cell interior, 0 = membrane.
* **Organelles (3D volume)**: blobby organelles (bright lumen, dark rim) in textured cytoplasm,
  anisotropic voxels (z twice the in-plane spacing). Ground truth: 1 = organelle, 0 = background.

The generators are deterministic for a given seed. ``scripts/make_sample_data.py`` writes their
output to ``sample_data/`` (compressed TIFF, a few MB in all); the napari sample-data contributions
read those files and fall back to generating the data when the files are missing (for example in
an installed wheel). The functions here return napari layer-data tuples and never import Qt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"

EM_SHAPE = (8, 256, 256)
EM_SCALE = (50.0, 4.0, 4.0)  # nm per voxel (z, y, x), like ISBI 2012's serial-section TEM
ORGANELLES_SHAPE = (48, 128, 128)
ORGANELLES_SCALE = (20.0, 10.0, 10.0)  # nm per voxel (z, y, x)

EM_FILES = ("em_membranes_image.tif", "em_membranes_labels.tif")
ORGANELLES_FILES = ("organelles_3d_image.tif", "organelles_3d_labels.tif")
# a small UNet trained on the EM sample by scripts/make_sample_model.py; the demo loads it
SAMPLE_MODEL = SAMPLE_DIR / "em_membranes_unet.pt"

LayerData = tuple[np.ndarray, dict[str, Any], str]


# ----------------------------------------------------------------------------- generators


def make_em_membranes(
    shape: tuple[int, int, int] = EM_SHAPE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A serial-section EM-like stack of cells and its membrane ground truth.

    Returns ``(image, labels)``: ``image`` uint8 (Z, Y, X), membranes dark on a lighter, textured
    cytoplasm; ``labels`` uint8 (Z, Y, X) with 1 = cell interior and 0 = membrane (ISBI 2012).
    Cells are 3D Voronoi regions cut by each section, so neighbouring sections look alike.
    """
    rng = np.random.default_rng(seed)
    n_z = shape[0]
    z_step = 6.0  # section spacing in in-plane pixels: cells change gradually between sections

    cells = _voronoi_cells(shape, z_step=z_step, mean_diameter=42.0, rng=rng)

    # in-plane distance to the nearest cell boundary, per section (membranes are seen in-plane)
    boundary = np.zeros(shape, dtype=bool)
    boundary[:, :-1, :] |= cells[:, :-1, :] != cells[:, 1:, :]
    boundary[:, :, :-1] |= cells[:, :, :-1] != cells[:, :, 1:]
    distance = np.stack([ndimage.distance_transform_edt(~b) for b in boundary])

    # membrane half-width varies smoothly between about 1.5 and 3 pixels
    half_width = 2.2 + 0.8 * _smooth_noise(shape, sigma=(1.0, 12.0, 12.0), rng=rng)
    membrane = distance < half_width
    labels = (~membrane).astype(np.uint8)

    # cytoplasm: a grey level per cell plus fine texture
    cell_grey = rng.normal(0.0, 12.0, size=int(cells.max()) + 1)
    image = 175.0 + cell_grey[cells] + 14.0 * _smooth_noise(shape, sigma=(0.0, 1.5, 1.5), rng=rng)

    # dark, slightly blurred membranes
    profile = np.exp(-((distance / np.maximum(half_width, 0.5)) ** 2))
    image -= 115.0 * profile

    # small dark vesicles inside cells: distractors the model must not call membrane
    image -= 70.0 * _vesicles(shape, labels.astype(bool), count=14 * n_z, rng=rng)

    image = ndimage.gaussian_filter(image, sigma=(0.0, 1.0, 1.0))
    image += rng.normal(0.0, 13.0, size=shape)
    return _to_uint8(image), labels


def make_organelles_3d(
    shape: tuple[int, int, int] = ORGANELLES_SHAPE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A 3D volume of blobby organelles and its ground truth.

    Returns ``(image, labels)``: ``image`` uint8 (Z, Y, X), organelles with a bright lumen and a
    dark rim on grey textured cytoplasm; ``labels`` uint8 (Z, Y, X), 1 = organelle. Voxels are
    twice as long in z as in y/x, so blobs are flatter in voxels than in space.
    """
    rng = np.random.default_rng(seed)
    n_z, n_y, n_x = shape
    z_squash = 2.0
    grid = np.indices(shape, dtype=np.float32)

    # sum of overlapping ellipsoid "bumps", roughened by smooth noise, thresholded at 0
    field = np.full(shape, -1.0, dtype=np.float32)
    n_blobs = max(1, int(round(40 * (n_z * n_y * n_x) / (48 * 128 * 128))))
    for _ in range(n_blobs):
        radius_xy = rng.uniform(7.0, 15.0)
        radii = np.array([radius_xy / z_squash * rng.uniform(0.8, 1.3), radius_xy,
                          radius_xy * rng.uniform(0.6, 1.6)])
        centre = rng.uniform([0, 0, 0], shape)
        angle = rng.uniform(0, np.pi)
        dz = (grid[0] - centre[0]) / radii[0]
        dy = grid[1] - centre[1]
        dx = grid[2] - centre[2]
        # rotate in-plane so elongated organelles point in all directions
        u = (np.cos(angle) * dy + np.sin(angle) * dx) / radii[1]
        v = (-np.sin(angle) * dy + np.cos(angle) * dx) / radii[2]
        field = np.maximum(field, 1.0 - (dz**2 + u**2 + v**2))
    field += 0.25 * _smooth_noise(shape, sigma=(1.5, 3.0, 3.0), rng=rng)
    organelle = field > 0.0
    organelle = ndimage.binary_opening(organelle, iterations=1)
    labels = organelle.astype(np.uint8)

    # inside distance (in voxels) for a dark rim and a bright lumen
    inside = ndimage.distance_transform_edt(organelle, sampling=(z_squash, 1.0, 1.0))
    outside = ndimage.distance_transform_edt(~organelle, sampling=(z_squash, 1.0, 1.0))
    rim = np.exp(-(((inside - 1.0) / 1.3) ** 2)) * organelle + np.exp(-((outside / 1.0) ** 2)) * ~organelle

    image = 105.0 + 12.0 * _smooth_noise(shape, sigma=(0.7, 1.5, 1.5), rng=rng)
    image += 65.0 * organelle * np.clip(inside / 3.0, 0.0, 1.0)
    image -= 70.0 * rim
    image = ndimage.gaussian_filter(image, sigma=(0.5, 1.0, 1.0))
    image += rng.normal(0.0, 10.0, size=shape)
    return _to_uint8(image), labels


def _voronoi_cells(
    shape: tuple[int, int, int], *, z_step: float, mean_diameter: float, rng: np.random.Generator
) -> np.ndarray:
    """Voronoi labels (int32, 0..n-1) of random seeds in a box, sections ``z_step`` apart."""
    n_z, n_y, n_x = shape
    margin = mean_diameter
    extent = np.array([n_z * z_step + 2 * margin, n_y + 2 * margin, n_x + 2 * margin])
    n_seeds = int(round(np.prod(extent) / (0.52 * mean_diameter**3)))
    seeds = rng.uniform(0.0, 1.0, size=(n_seeds, 3)) * extent - margin
    coords = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    coords[:, 0] *= z_step
    _, nearest = cKDTree(seeds).query(coords, workers=1)
    return nearest.reshape(shape).astype(np.int32)


def _smooth_noise(
    shape: tuple[int, ...], *, sigma: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return noise / max(float(noise.std()), 1e-8)


def _vesicles(
    shape: tuple[int, int, int], interior: np.ndarray, *, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Soft dark discs (0..1) of radius 2-5 px placed inside cells, one section each."""
    darkness = np.zeros(shape, dtype=np.float64)
    n_z, n_y, n_x = shape
    yy, xx = np.ogrid[:n_y, :n_x]
    for _ in range(count):
        z = int(rng.integers(0, n_z))
        y, x = rng.uniform(0, n_y), rng.uniform(0, n_x)
        radius = rng.uniform(2.0, 5.0)
        disc = np.exp(-(((yy - y) ** 2 + (xx - x) ** 2) / radius**2) ** 2)
        darkness[z] = np.maximum(darkness[z], disc)
    # keep vesicles off the membranes so the ground truth stays honest
    eroded = np.stack([ndimage.binary_erosion(s, iterations=3) for s in interior])
    return darkness * eroded


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- files


def write_sample_files(directory: Path | str = SAMPLE_DIR, seed: int = 0) -> list[Path]:
    """Generate both samples and write them as compressed TIFFs (with their voxel size) into ``directory``."""
    from napari_unet.io import write_image, write_labels

    directory = Path(directory)
    written = []
    for (image, labels), (image_name, labels_name), scale in (
        (make_em_membranes(seed=seed), EM_FILES, EM_SCALE),
        (make_organelles_3d(seed=seed), ORGANELLES_FILES, ORGANELLES_SCALE),
    ):
        written.append(write_image(directory / image_name, image, scale=scale, unit="nm"))
        written.append(write_labels(directory / labels_name, labels, scale=scale, unit="nm"))
    return written


def load_sample(kind: str, directory: Path | str = SAMPLE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)`` of ``kind`` ("em_membranes" or "organelles_3d") from ``directory``,
    generated on the fly (seed 0) when the files are not there."""
    generators = {"em_membranes": (EM_FILES, make_em_membranes),
                  "organelles_3d": (ORGANELLES_FILES, make_organelles_3d)}
    if kind not in generators:
        raise ValueError(f"unknown sample {kind!r}; known: {', '.join(generators)}")
    names, generate = generators[kind]
    paths = [Path(directory) / name for name in names]
    if all(path.is_file() for path in paths):
        import tifffile

        return tifffile.imread(paths[0]), tifffile.imread(paths[1])
    return generate()


# ----------------------------------------------------------------------------- npe2 contributions


def em_membranes() -> list[LayerData]:
    """napari sample: the EM membrane stack and its ground truth."""
    image, labels = load_sample("em_membranes")
    return [
        (image, {"name": "EM membranes", "scale": EM_SCALE, "units": "nm"}, "image"),
        (labels, {"name": "EM membranes ground truth", "scale": EM_SCALE, "units": "nm",
                  "opacity": 0.4, "visible": False}, "labels"),
    ]


def organelles_3d() -> list[LayerData]:
    """napari sample: the 3D organelle volume and its ground truth."""
    image, labels = load_sample("organelles_3d")
    return [
        (image, {"name": "Organelles", "scale": ORGANELLES_SCALE, "units": "nm"}, "image"),
        (labels, {"name": "Organelles ground truth", "scale": ORGANELLES_SCALE, "units": "nm",
                  "opacity": 0.4, "visible": False}, "labels"),
    ]
