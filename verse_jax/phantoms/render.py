"""Synthetic spine CT phantoms with VerSe masks and centroids: the embedded default data set.

A phantom is drawn from a seed: a spine (``anatomy``: curvature, sizes, occasionally L6
or T13) inside a body with fat, soft tissue, lungs, vessels and bowel gas, and an acquisition
(field of view, spacing, orientation including oblique directions, noise). The anatomy is built
from implicit shapes in physical LPS mm and evaluated at the physical position of every voxel of
the output grid, so any direction and spacing is exact; intensities get a partial-volume blend over
about one voxel. Masks hold VerSe ids of whole vertebrae (ribs, discs, sacrum unlabelled);
centroids are vertebral-body centres (C1: centre of its ring).
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from verse_jax.geometry import Geometry, Volume, codes_to_axes
from verse_jax.io.centroids import Centroids
from verse_jax.labels import T13
from verse_jax.phantoms import anatomy
from verse_jax.phantoms import shapes as shape_lib

FIELDS_OF_VIEW = ("cervical", "cervicothoracic", "thoracic", "thoracolumbar", "lumbar", "whole")
# Version 2: cervical fields of view more often (42 % of cases show C1-C7 instead of 30 %): with
# version 1's draw, 4 of the demo's 44 training phantoms held C1-C6, and the demo SCN learned no
# cervical heatmap at all (every cervical phantom of a fresh set was mislabelled).
_FOV_PROBABILITIES = (0.16, 0.14, 0.16, 0.16, 0.26, 0.12)
# Part of the default data set's cache folder: a new draw never reuses an older version's cases.
PHANTOM_VERSION = 2
# Candidate (top, bottom) vertebrae per field of view (VerSe ids; 24 = the last lumbar vertebra).
_FOV_RANGES = {
    "cervical": ((1,), (7, 8, 9)),
    "cervicothoracic": ((1, 2, 3, 4), (10, 11, 12, 13)),
    "thoracic": ((7, 8, 9, 10), (17, 18, 19, 20)),
    "thoracolumbar": ((13, 14, 15, 16), (21, 22, 23)),
    "lumbar": ((16, 17, 18, 19), (24,)),
    "whole": ((1,), (24,)),
}
_ORIENTATIONS = ("RAS", "LPS", "PIR", "LAS", "RPI", "oblique")
_ORIENTATION_PROBABILITIES = (0.3, 0.2, 0.2, 0.05, 0.05, 0.2)
DEFAULT_MAX_VOXELS = 16_000_000
DEFAULT_NUM_CASES = 32


@dataclass(frozen=True)
class Phantom:
    """One synthetic case.

    Attributes:
        image: int16 HU volume, (x, y, z) on the case's grid.
        mask: uint16 VerSe ids on the same grid (0 = background).
        centroids: vertebral-body centres (LPS mm) of exactly the labels present in ``mask``.
    """

    image: Volume
    mask: Volume
    centroids: Centroids


def direction_matrix(orientation: str, rng: np.random.Generator) -> np.ndarray:
    """(3, 3) direction matrix of an orientation code ('RAS', 'PIR', ...) or 'oblique'.

    'oblique' is a random one of RAS / LPS / PIR turned by 2-6 degrees about each world axis, so
    that no index axis is parallel to a world axis.
    """
    if orientation == "oblique":
        turn = direction_matrix(str(rng.choice(["RAS", "LPS", "PIR"])), rng)
        for axis in rng.permutation(3):  # 2-6 degrees about each world axis: no column stays put
            angle = np.deg2rad(rng.choice([-1, 1]) * rng.uniform(2.0, 6.0))
            c, s = np.cos(angle), np.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            step = np.eye(3)
            step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
            turn = step @ turn
        return turn
    world_axis, sign = codes_to_axes(tuple(orientation))
    matrix = np.zeros((3, 3))
    for column, (row, s) in enumerate(zip(world_axis, sign, strict=True)):
        matrix[row, column] = s
    return matrix


def _z_range(rng: np.random.Generator, spine: anatomy.Spine, fov: str) -> tuple[float, float]:
    """Superior and inferior z (mm) of the field of view."""
    verts = spine.vertebrae
    labels = [v.label for v in verts]
    tops, bottoms = _FOV_RANGES[fov]
    top = labels.index(int(rng.choice(tops)))
    bottom_label = int(rng.choice(bottoms))
    bottom = len(verts) - 1 if bottom_label == 24 else labels.index(bottom_label)
    z = np.array([v.center_mm[2] for v in verts])
    if top == 0:
        z_top = z[0] + rng.uniform(15, 70)
    else:
        z_top = z[top] + rng.uniform(-0.45, 1.0) * (z[top - 1] - z[top])
    if bottom == len(verts) - 1:
        z_bottom = z[bottom] - rng.uniform(25, 100)
    else:
        z_bottom = z[bottom] - rng.uniform(-0.45, 1.0) * (z[bottom] - z[bottom + 1])
    z_bottom = min(z_bottom, z_top - 100.0)
    return z_top, max(z_bottom, z_top - 720.0)


def _grid(rng, spine, fov, spacing_mm, orientation, max_voxels) -> Geometry:
    """Output grid: field of view around the spine, spacing, direction, voxel budget."""
    z_top, z_bottom = _z_range(rng, spine, fov)
    inside = [v.center_mm for v in spine.vertebrae if z_bottom <= v.center_mm[2] <= z_top]
    centre_xy = np.mean(inside or [spine.vertebrae[-1].center_mm], axis=0)[:2]
    centre = np.array(
        [*(centre_xy + (rng.uniform(-15, 15), -rng.uniform(0, 50))), 0.5 * (z_top + z_bottom)]
    )
    extent = np.array([rng.uniform(180, 260), rng.uniform(180, 260), z_top - z_bottom])
    in_plane, slices = rng.uniform(0.5, 1.5), rng.uniform(1.0, 3.0)  # drawn in any case
    if spacing_mm is None:
        spacing_mm = (in_plane, in_plane, slices)
    spacing = np.asarray(spacing_mm, np.float64).reshape(3)
    if np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    matrix = direction_matrix(orientation, rng)
    index_extent = np.abs(matrix).T @ extent
    size = np.maximum(np.ceil(index_extent / spacing), 4).astype(int)
    excess = np.prod(size.astype(np.float64)) / max_voxels
    if excess > 1:  # coarser in-plane first (up to 1.5 mm or the slice spacing), then all axes
        in_plane = min(spacing[0] * np.sqrt(excess), max(spacing[0], spacing[2], 1.5))
        spacing[:2] *= in_plane / spacing[0]
        size = np.maximum(np.ceil(index_extent / spacing), 4).astype(int)
        excess = np.prod(size.astype(np.float64)) / max_voxels
        if excess > 1:
            spacing *= excess ** (1 / 3) * 1.01
            size = np.maximum(np.ceil(index_extent / spacing), 4).astype(int)
    origin = centre - matrix @ ((size - 1) / 2 * spacing)
    return Geometry(tuple(size), tuple(spacing), tuple(origin), tuple(matrix.reshape(-1)))


def _box_coordinates(geometry: Geometry, shape: shape_lib.Shape, margin: float):
    """Index box (slices) of the grid around a shape, and its voxels' local (u, v, w) in mm."""
    index = geometry.physical_to_index(shape.corners_mm(margin))
    lo = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, geometry.size)
    if np.any(hi <= lo):
        return None, None
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return box, _coordinates(geometry, lo, hi, shape.origin_mm, shape.rotation)


def _coordinates(geometry: Geometry, lo, hi, origin_mm, rotation) -> list[np.ndarray]:
    """Coordinates (mm along ``rotation``'s columns from ``origin_mm``) of voxels lo <= i < hi.

    Returns:
        3 float32 arrays shaped (hi - lo) (x, y, z index order).
    """
    steps = rotation.T @ (geometry.matrix * np.array(geometry.spacing_mm)[None, :])
    start = rotation.T @ (np.array(geometry.origin_mm) - origin_mm)
    ranges = [np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)]
    out = []
    for c in range(3):
        out.append(
            np.float32(start[c])
            + (ranges[0] * np.float32(steps[c, 0]))[:, None, None]
            + (ranges[1] * np.float32(steps[c, 1]))[None, :, None]
            + (ranges[2] * np.float32(steps[c, 2]))[None, None, :]
        )
    return out


def _ramp(sdf, width: float):
    """Partial-volume fraction inside (0..1) of a voxel at signed distance ``sdf`` (mm)."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


def _body(image, geometry, spine, hu, rng, width) -> None:
    """Air, body outline with a fat layer and textured soft tissue, slab by slab (in place)."""
    z_asc = spine.curve_mm[::-1, 2]
    lut_z = np.arange(z_asc[0], z_asc[-1], 1.0)
    level = np.interp(lut_z, z_asc, spine.curve_level[::-1])
    half_x, half_y, offset = (t * hu["body_scale"] for t in anatomy.body_outline(level))
    trunk_x = ndimage.uniform_filter1d(spine.curve_mm[::-1, 0], 601, mode="nearest")  # 300 mm
    centre_x = np.interp(lut_z, z_asc, trunk_x)
    centre_y = np.interp(lut_z, z_asc, spine.curve_mm[::-1, 1]) + offset
    tables = [t.astype(np.float32) for t in (centre_x, centre_y, half_x, half_y)]
    size, spacing = geometry.size, np.array(geometry.spacing_mm)
    # Texture: a sum of separable products of slow waves along the index axes (HU).
    waves = []
    for _ in range(3):
        factors = [
            np.sin(np.arange(n) * s * 2 * np.pi / rng.uniform(12, 60) + rng.uniform(0, 7))
            for n, s in zip(size, spacing, strict=True)
        ]
        waves.append(
            [
                f.astype(np.float32) * (rng.uniform(4, 12) if i == 0 else 1.0)
                for i, f in enumerate(factors)
            ]
        )
    for k0 in range(0, size[2], 16):
        k1 = min(k0 + 16, size[2])
        x, y, z = _coordinates(geometry, (0, 0, k0), (size[0], size[1], k1), np.zeros(3), np.eye(3))
        row = np.clip(np.rint(z - lut_z[0]), 0, len(lut_z) - 1).astype(np.int32)
        cx, cy, bx, by = (t[row] for t in tables)
        dx, dy = x - cx, y - cy
        scaled = np.sqrt((dx / bx) ** 2 + (dy / by) ** 2)
        sdf = np.sqrt(dx**2 + dy**2) * (scaled - 1.0) / np.maximum(scaled, 1e-3)
        texture = sum(
            a[:, None, None] * b[None, :, None] * c[None, None, k0:k1] for a, b, c in waves
        )
        inner = _ramp(sdf + hu["fat_mm"], width)
        tissue = hu["fat"] + inner * (hu["soft"] - hu["fat"] + texture)
        image[..., k0:k1] = hu["air"] + _ramp(sdf, width) * (tissue - hu["air"])


def _render(shapes, spine, geometry, hu, rng) -> tuple[np.ndarray, np.ndarray]:
    """(x, y, z) float32 HU image (before noise) and uint16 label map of the shapes."""
    width = float(np.prod(geometry.spacing_mm) ** (1 / 3))
    image = np.empty(geometry.size, np.float32)
    _body(image, geometry, spine, hu, rng, width)
    bone = np.full(geometry.size, 1e3, np.float32)
    vertebra = np.full(geometry.size, 1e3, np.float32)
    labels = np.zeros(geometry.size, np.uint16)
    for shape in shapes:
        box, local = _box_coordinates(geometry, shape, width + 1.0)
        if box is None:
            continue
        sdf = shape_lib.signed_distance(shape, *local)
        if shape.tissue != "bone":
            image[box] += _ramp(sdf, width) * (shape.hu - image[box])
            continue
        np.minimum(bone[box], sdf, out=bone[box])
        if shape.label:
            closer = sdf < vertebra[box]
            vertebra[box][closer] = sdf[closer]
            labels[box][closer] = shape.label
    near = bone < width
    depth = bone[near]
    inner = _ramp(depth + hu["cortex_mm"], width)
    offsets = np.zeros(T13 + 1, np.float32)  # per-vertebra bone density offset (HU)
    for vert in spine.vertebrae:
        offsets[vert.label] = vert.dims["hu_offset"]
    cancellous = hu["cancellous"] + offsets[labels[near]]
    value = hu["cortical"] + inner * (cancellous - hu["cortical"])
    image[near] += _ramp(depth, width) * (value - image[near])
    labels[vertebra >= 0] = 0
    # Thick slices: blur across neighbouring slices (the ramp above covers ``width`` only).
    side = float(np.clip((geometry.spacing_mm[2] - width) / (2 * geometry.spacing_mm[2]), 0, 0.25))
    if side > 0.01 and geometry.size[2] > 2:
        kernel = np.array([side, 1 - 2 * side, side], np.float32)
        image = ndimage.convolve1d(image, kernel, axis=2, mode="nearest")
    return image, labels


def _noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian noise (HU) with standard deviation ``sigma``, correlated over ~2 voxels in-plane."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    for axis in (0, 1):
        noise = ndimage.convolve1d(noise, np.array([0.25, 0.5, 0.25], np.float32), axis=axis)
    return noise * np.float32(sigma / 0.375)  # each pass keeps sqrt(0.375) of the deviation


def _sample_intensities(rng: np.random.Generator) -> dict:
    contrast = rng.random() < 0.5
    return {
        "air": -1000.0,
        "fat": rng.uniform(-120, -80),
        "soft": rng.uniform(30, 55),
        "fat_mm": rng.uniform(4, 25),
        "body_scale": rng.uniform(0.9, 1.2),
        "lung": rng.uniform(-880, -800),
        "gas": rng.uniform(-980, -900),
        "disc": rng.uniform(70, 100),
        "csf": rng.uniform(5, 25),
        "cortical": rng.uniform(700, 1000),
        "cancellous": rng.uniform(150, 300),
        "cortex_mm": rng.uniform(1.0, 2.0),
        "aorta": rng.uniform(150, 350) if contrast else rng.uniform(35, 50),
        "ivc": rng.uniform(80, 180) if contrast else rng.uniform(35, 50),
        "liver": rng.uniform(90, 130) if contrast else rng.uniform(50, 65),
        "spleen": rng.uniform(90, 130) if contrast else rng.uniform(40, 55),
        "kidney": rng.uniform(120, 200) if contrast else rng.uniform(25, 35),
    }


def _centroids(spine, geometry: Geometry, labels: np.ndarray) -> Centroids:
    """Centroids of vertebrae whose centre lies in the grid and that appear in ``labels``.

    Vertebrae cut by the field of view so that their centre is outside are removed from
    ``labels`` (in place), so that mask and centroids name the same vertebrae.
    """
    present = set(np.unique(labels).tolist()) - {0}
    kept, points = [], []
    for vert in spine.vertebrae:
        if vert.label not in present:
            continue
        point = vert.centroid_mm
        index = geometry.physical_to_index(point)
        voxel = tuple(np.clip(np.rint(index).astype(int), 0, np.array(geometry.size) - 1))
        inside = np.all(index >= -0.5) and np.all(index <= np.array(geometry.size) - 0.5)
        if inside and (vert.label == 1 or labels[voxel] == vert.label):
            kept.append(vert.label)
            points.append(point)
    dropped = sorted(present - set(kept))
    if dropped:
        labels[np.isin(labels, dropped)] = 0
    return Centroids(np.array(kept, np.int64), np.array(points, np.float64).reshape(-1, 3))


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for anatomy, grid, intensities and noise of one seed."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)]


def draw_spine(seed: int, extra_vertebra: str | None = None) -> anatomy.Spine:
    """The spine of ``generate_phantom(seed, extra_vertebra=...)`` alone (cheap).

    ``extra_vertebra`` None draws 'L6' (8 %), 'T13' (8 %) or 'none'.
    """
    rng = _streams(seed)[0]
    draw = rng.random()
    if extra_vertebra is None:
        extra_vertebra = "L6" if draw < 0.08 else "T13" if draw < 0.16 else "none"
    return anatomy.sample_spine(rng, extra_vertebra)


def generate_phantom(
    seed: int,
    *,
    fov: str | None = None,
    spacing_mm=None,
    orientation: str | None = None,
    extra_vertebra: str | None = None,
    noise_hu: float | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Phantom:
    """Draw one synthetic spine CT, its VerSe mask and centroids; deterministic per seed.

    Anatomy, acquisition, intensities and noise come from separate streams of the seed, so fixing
    one variation keyword leaves the other draws unchanged.

    Args:
        seed: non-negative integer.
        fov: one of ``FIELDS_OF_VIEW``; None draws one.
        spacing_mm: (x, y, z) index-axis spacing in mm (axis 2 is the slice axis); None draws
            0.5-1.5 mm in-plane and 1-3 mm slices.
        orientation: axis codes in to-naming such as 'RAS', 'LPS', 'PIR', or 'oblique' (a small
            random rotation of RAS/LPS/PIR); None draws one.
        extra_vertebra: 'none', 'L6' or 'T13'; None draws one (L6 and T13 about 8 % each).
        noise_hu: standard deviation of the Gaussian noise in HU; None draws 5-35 HU.
        max_voxels: voxel budget; coarser spacing is used where the grid would exceed it.

    A vertebra cut by the field of view keeps its label while its body centre lies in the grid;
    otherwise it stays in the image but is left out of mask and centroids, so that the two always
    name the same vertebrae.

    Returns:
        The phantom: int16 HU image, uint16 mask and centroids on one grid.
    """
    if fov is not None and fov not in FIELDS_OF_VIEW:
        raise ValueError(f"fov must be one of {FIELDS_OF_VIEW}, got {fov!r}")
    spine = draw_spine(seed, extra_vertebra)
    grid_rng, hu_rng, noise_rng = _streams(seed)[1:]
    fov_draw = str(grid_rng.choice(FIELDS_OF_VIEW, p=_FOV_PROBABILITIES))
    orientation_draw = str(grid_rng.choice(_ORIENTATIONS, p=_ORIENTATION_PROBABILITIES))
    geometry = _grid(
        grid_rng, spine, fov or fov_draw, spacing_mm, orientation or orientation_draw, max_voxels
    )
    hu = _sample_intensities(hu_rng)
    shapes = shape_lib.abdominal_organ_shapes(spine, hu) + shape_lib.soft_organ_shapes(
        spine, hu_rng, hu
    )
    shapes += shape_lib.disc_shapes(spine, hu["disc"])
    shapes += [shape_lib.skull_shape(spine), *shape_lib.pelvis_shapes(spine)]
    for vert in spine.vertebrae:
        shapes += shape_lib.vertebra_shapes(vert)
        if vert.has_ribs:
            shapes += shape_lib.rib_shapes(vert)
    image, labels = _render(shapes, spine, geometry, hu, noise_rng)
    sigma = noise_rng.uniform(5, 35) if noise_hu is None else float(noise_hu)
    image += _noise(noise_rng, image.shape, sigma)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    centroids = _centroids(spine, geometry, labels)
    return Phantom(Volume(image, geometry), Volume(labels, geometry), centroids)


# ---------------------------------------------------------------------------------------------
# Data sets
