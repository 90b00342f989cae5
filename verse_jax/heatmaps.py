"""Landmark heatmaps: Gaussian targets (learnable sigma), the spine centreline target, peak finding.

All functions are jnp and jit-able. Volumes are ``(x, y, z)`` voxel grids; landmarks are continuous
voxel indices ``points_vox`` (K, 3) in (x, y, z) order with a ``valid`` (K,) bool mask; voxel
``(i, j, k)`` sits at continuous index ``(i, j, k)``.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The reference's numpy Gaussian generator (spine target, segmentation centroid channel) fills only
# the voxels i with int(mu - 2.5 sigma) <= i < int(mu + 2.5 sigma) per axis (int truncates toward
# zero): about -2.7 to +2 sigma for sigma = 3 (docs/reference.md §3.5).
NUMPY_WINDOW_SIGMAS = 2.5


def _axis_gaussians(points_vox, sigma_vox, shape, window=None):
    """Per-axis 1-D Gaussians exp(-(i - mu)^2 / (2 sigma^2)): three arrays (shape[a], K).

    ``window``: None (every voxel) or w: 0 outside ``[trunc(mu - w sigma), trunc(mu + w sigma))``.
    """
    out = []
    for axis, size in enumerate(shape):
        coords = jnp.arange(size, dtype=jnp.float32)[:, None]
        mu = points_vox[None, :, axis]
        d = coords - mu
        g = jnp.exp(-(d * d) / (2.0 * sigma_vox[None, :] ** 2))
        if window is not None:
            reach = window * sigma_vox[None, :]
            inside = (coords >= jnp.trunc(mu - reach)) & (coords < jnp.trunc(mu + reach))
            g = jnp.where(inside, g, 0.0)
        out.append(g)
    return out


def _check_points(points_vox, valid, shape):
    if len(shape) != 3:
        raise ValueError(f"shape must be (x, y, z), got {shape}")
    if points_vox.ndim != 2 or points_vox.shape[1] != 3 or valid.shape != points_vox.shape[:1]:
        raise ValueError(
            f"need points_vox (K, 3) and valid (K,), got {points_vox.shape} and {valid.shape}"
        )


def gaussian_heatmaps(
    points_vox: jax.Array,
    valid: jax.Array,
    sigma_vox: jax.Array | float,
    shape: tuple[int, int, int],
    *,
    scale: float = 1000.0,
    normalize: bool = True,
    window: float | None = None,
) -> jax.Array:
    """One Gaussian heatmap per landmark (the SCN target, differentiable w.r.t. sigma).

    ``normalize=True``: ``scale / (sqrt(2 pi) sigma)^3 * exp(-|x - mu|^2 / (2 sigma^2))`` (the
    reference's TF generator, gamma = 1000); ``normalize=False``: peak value ``scale``. Computed
    exactly as a product of per-axis 1-D Gaussians, on the full grid (``window`` None, the TF
    generator) or in the numpy generator's truncated window (``window=NUMPY_WINDOW_SIGMAS``).

    Args:
        points_vox: (K, 3) landmark positions, continuous voxel index (x, y, z).
        valid: (K,) bool; invalid landmarks give all-zero channels.
        sigma_vox: (K,) or scalar Gaussian sigma in voxels.
        shape: (x, y, z) grid size in voxels.
        scale: gamma (normalised) or peak value (unnormalised).
        normalize: whether to divide by (sqrt(2 pi) sigma)^3.
        window: None, or the half-width w in sigmas of the window (see ``_axis_gaussians``).

    Returns:
        (x, y, z, K) float32 heatmaps.
    """
    points_vox = jnp.asarray(points_vox, jnp.float32)
    valid = jnp.asarray(valid)
    _check_points(points_vox, valid, shape)
    k = points_vox.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma_vox, jnp.float32), (k,))
    gx, gy, gz = _axis_gaussians(points_vox, sigma, shape, window)
    factor = jnp.where(valid, jnp.float32(scale), 0.0)
    if normalize:
        factor = factor / (math.sqrt(2.0 * math.pi) * sigma) ** 3
    gx = gx * factor[None, :]
    return gx[:, None, None, :] * gy[None, :, None, :] * gz[None, None, :, :]


def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(size, size) matrix M with (M @ v) = 1-D Gaussian filter of v, 'nearest' edge mode.

    Same kernel as scipy.ndimage / skimage: radius int(truncate * sigma + 0.5), weights
    exp(-d^2 / (2 sigma^2)) normalised to sum 1.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    matrix = np.zeros((size, size))
    rows = np.arange(size)
    for offset, weight in zip(offsets, weights, strict=True):
        np.add.at(matrix, (rows, np.clip(rows + offset, 0, size - 1)), weight)
    return matrix.astype(np.float32)


def spine_heatmap(
    points_vox: jax.Array,
    valid: jax.Array,
    shape: tuple[int, int, int],
    *,
    sigma_vox: float = 3.0,
    blur_sigma_vox: float = 3.0,
) -> jax.Array:
    """Spine centreline target of stage 1: summed peak-1 Gaussians, then a Gaussian blur.

    As the reference: one Gaussian (peak 1, sigma ``sigma_vox``) per valid landmark, filled only
    in the numpy generator's window (``NUMPY_WINDOW_SIGMAS``, about -2.7 to +2 sigma), summed,
    then smoothed like ``skimage.filters.gaussian(sigma=blur_sigma_vox)`` (truncate 4, 'nearest'
    edges).

    Args:
        points_vox: (K, 3) continuous voxel index (x, y, z).
        valid: (K,) bool.
        shape: (x, y, z) grid size in voxels.
        sigma_vox: per-landmark Gaussian sigma, voxels (static).
        blur_sigma_vox: blur sigma, voxels (static Python float; 0 disables the blur).

    Returns:
        (x, y, z) float32, values may exceed 1 where Gaussians overlap.
    """
    points_vox = jnp.asarray(points_vox, jnp.float32)
    valid = jnp.asarray(valid)
    _check_points(points_vox, valid, shape)
    sigma = jnp.full((points_vox.shape[0],), sigma_vox, jnp.float32)
    gx, gy, gz = _axis_gaussians(points_vox, sigma, shape, NUMPY_WINDOW_SIGMAS)
    gx = gx * valid.astype(jnp.float32)[None, :]
    if blur_sigma_vox > 0:
        # The blur is linear and separable: blur each per-axis factor before the outer product.
        gx, gy, gz = (
            jnp.asarray(blur_matrix(size, blur_sigma_vox)) @ g
            for size, g in zip(shape, (gx, gy, gz), strict=True)
        )
    return jnp.einsum("ik,jk,lk->ijl", gx, gy, gz, precision=lax.Precision.HIGHEST)


class Candidates(NamedTuple):
    """Landmark candidates of one heatmap, strongest first; fixed size M = max_candidates.

    Attributes:
        values: (M,) heatmap value at each candidate's voxel (0 where invalid).
        points_vox: (M, 3) sub-voxel position, continuous voxel index (x, y, z) (0 where invalid).
        valid: (M,) bool; the first candidate (global maximum) is always valid.
    """

    values: jax.Array
    points_vox: jax.Array
    valid: jax.Array


def _argmax_3d(image: jax.Array) -> jax.Array:
    """(3,) int32 index of the first maximum in C order, as ``unravel_index(argmax(image))``.

    Two stages (max over z, then argmax over the (x, y) plane and the z row): XLA:CPU's variadic
    argmax reduction is ~50x slower than a plain max over a 96 x 96 x 256 volume.
    """
    plane = jnp.max(image, axis=2)
    ix, iy = jnp.unravel_index(jnp.argmax(plane), plane.shape)
    iz = jnp.argmax(image[ix, iy])
    return jnp.stack([ix, iy, iz]).astype(jnp.int32)


def _refined_maximum(image: jax.Array, extent: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Global maximum value and its position refined per axis by a quadratic fit.

    Per axis ``delta = 0.5 (p- - p+) / (p- - 2 p0 + p+)``, skipped at the border of ``extent``
    ((3,) int32, the heatmap's true size inside a padded ``image``) and on a flat neighbourhood
    (where the reference would divide by zero).
    """
    index = _argmax_3d(image)
    value = image[tuple(index)]
    point = index.astype(jnp.float32)
    for axis in range(3):
        step = jnp.zeros(3, jnp.int32).at[axis].set(1)
        lo = image[tuple(jnp.maximum(index - step, 0))]
        hi = image[tuple(jnp.minimum(index + step, extent - 1))]
        denom = lo - 2.0 * value + hi
        inside = (index[axis] >= 1) & (index[axis] + 1 < extent[axis]) & (denom < 0)
        delta = 0.5 * (lo - hi) / jnp.where(inside, denom, -1.0)
        point = point.at[axis].add(jnp.where(inside, delta, 0.0))
    return value, point


def _zero_ball(image: jax.Array, point: jax.Array, radius: float, extent: jax.Array) -> jax.Array:
    """Sets the voxels within ``radius`` of the continuous index ``point`` (3,) to zero.

    Touches only a box of 2 (ceil(radius) + 1) + 1 voxels per axis (clamped into the image)
    instead of the whole volume, and only voxels inside ``extent`` (padding keeps its -inf).
    """
    reach = math.ceil(radius) + 1
    box = tuple(min(2 * reach + 1, n) for n in image.shape)
    start = [
        jnp.clip(jnp.floor(point[axis]).astype(jnp.int32) - reach, 0, n - b)
        for axis, (n, b) in enumerate(zip(image.shape, box, strict=True))
    ]
    patch = lax.dynamic_slice(image, start, box)
    d2 = sum(
        (jnp.arange(b, dtype=jnp.float32) + start[axis] - point[axis]).reshape(
            [b if a == axis else 1 for a in range(3)]
        )
        ** 2
        for axis, b in enumerate(box)
    )
    inside = functools.reduce(
        jnp.logical_and,
        [
            (jnp.arange(b) + start[axis] < extent[axis]).reshape(
                [b if a == axis else 1 for a in range(3)]
            )
            for axis, b in enumerate(box)
        ],
    )
    patch = jnp.where((d2 <= radius**2) & inside, 0.0, patch)
    return lax.dynamic_update_slice(image, patch, start)


def find_candidates(
    heatmap: jax.Array,
    *,
    max_candidates: int = 8,
    min_distance_vox: float,
    min_max_value: float,
    relative_threshold: float,
    extent=None,
) -> Candidates:
    """Candidate positions of one landmark: the global maximum and further, separated maxima.

    As the reference's HeatmapTest with multiple maxima: the global maximum (sub-voxel refined);
    if its value >= ``min_max_value``, repeatedly zero the ball of radius ``min_distance_vox``
    around the last maximum and take the next (refined) maximum while its value exceeds
    ``relative_threshold`` times the global maximum. Vmap over channels for (x, y, z, K) inputs.

    Args:
        heatmap: (x, y, z) predicted heatmap of one landmark.
        max_candidates: M, the fixed output size (static).
        min_distance_vox: exclusion radius in voxels.
        min_max_value: below this global maximum only the global maximum is returned.
        relative_threshold: further maxima need value > relative_threshold * global maximum.
        extent: None, or the (3,) true size (may be traced) of a heatmap padded at the high end
            of its axes, so that one compilation serves many sizes; voxels beyond it are never
            candidates and the result equals that of ``heatmap[:ex, :ey, :ez]`` exactly.

    Returns:
        Candidates with (M,) values, (M, 3) points_vox (x, y, z) and (M,) valid.
    """
    if heatmap.ndim != 3:
        raise ValueError(f"heatmap must be (x, y, z), got shape {heatmap.shape}")
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    if min_distance_vox < 0:
        raise ValueError(f"min_distance_vox must be >= 0, got {min_distance_vox}")
    heatmap = jnp.asarray(heatmap, jnp.float32)
    if extent is None:
        extent = jnp.asarray(heatmap.shape, jnp.int32)
    else:
        extent = jnp.asarray(extent, jnp.int32)
        grid = jnp.meshgrid(*(jnp.arange(n) for n in heatmap.shape), indexing="ij", sparse=True)
        padding = functools.reduce(
            jnp.logical_or, [g >= extent[axis] for axis, g in enumerate(grid)]
        )
        heatmap = jnp.where(padding, -jnp.inf, heatmap)
    top_value, top_point = _refined_maximum(heatmap, extent)

    def step(carry, _):
        image, point, active = carry
        image = _zero_ball(image, point, min_distance_vox, extent)
        value, point = _refined_maximum(image, extent)
        active = active & (value > relative_threshold * top_value)
        return (image, point, active), (value, point, active)

    carry = (heatmap, top_point, top_value >= min_max_value)
    _, (values, points, valid) = lax.scan(step, carry, None, length=max_candidates - 1)
    values = jnp.concatenate([top_value[None], jnp.where(valid, values, 0.0)])
    points = jnp.concatenate([top_point[None, :], jnp.where(valid[:, None], points, 0.0)])
    valid = jnp.concatenate([jnp.ones((1,), bool), valid])
    return Candidates(values=values, points_vox=points, valid=valid)
