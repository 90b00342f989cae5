"""Spatial and intensity augmentation: random draws on the host, application on the device.

The mapping from an output (network crop) voxel ``j`` to an input (context box) voxel ``q`` follows
reference §3.4, written in voxels of the stage grid (isotropic spacing ``s`` mm, shared by the crop
and the box)::

    q = center_vox + t / s + R S (j + d(j s) / s - c_out),   c_out = (crop_size - 1) / 2

``R = Rx(a0) Ry(a1) Rz(a2)``, ``S = diag(scale)`` (isotropic factor times per-axis factors),
``t`` the translation in mm and ``d`` a cubic B-spline displacement in mm over the output domain
``[0, crop_size * s]`` with ``control_points`` control points per axis. ``center_vox`` (the stage's
crop centre ``C + f`` of reference §3.4, in box voxels) is not random and is given by the caller.

``sample_params`` draws on the host with numpy; ``identity_params`` gives the identity. The
``apply_*`` functions act on one sample, are jit-able with static shapes, and are vmapped over the
batch by the caller (``verse_jax.data.samples``).
"""

import dataclasses
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from verse_jax.preprocessing import OUTSIDE_NORMALIZED as OUTSIDE_VALUE


@dataclasses.dataclass(frozen=True)
class AugmentRanges:
    """Half-widths of the uniform augmentation draws (docs/reference.md §3.3-3.4 defaults).

    Attributes:
        translation_mm: t ~ U(-a, a) mm per axis.
        rotation_rad: a_i ~ U(-a, a) rad per axis.
        scale_iso: isotropic factor 1 + U(-a, a).
        scale_axes: per-axis factors 1 + U(-a, a).
        displacement_mm: every B-spline control-point displacement ~ U(-a, a) mm.
        control_points: control points per axis of the B-spline grid (>= 4).
        intensity_shift: v += U(-a, a) after normalisation.
        intensity_scale: v *= 1 + U(-a, a) after the shift.
    """

    translation_mm: float = 30.0
    rotation_rad: float = 0.25
    scale_iso: float = 0.15
    scale_axes: float = 0.15
    displacement_mm: float = 25.0
    control_points: int = 6
    intensity_shift: float = 0.25
    intensity_scale: float = 0.25

    def __post_init__(self):
        if self.control_points < 4:
            raise ValueError(f"control_points must be >= 4, got {self.control_points}")
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0:
                raise ValueError(f"{field.name} must be >= 0, got {getattr(self, field.name)}")
        if self.scale_iso >= 1 or self.scale_axes >= 1 or self.intensity_scale >= 1:
            raise ValueError(f"scale ranges must be < 1, got {self}")

    @classmethod
    def none(cls, control_points: int = 6) -> "AugmentRanges":
        """Ranges that only allow the identity (evaluation)."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, control_points, 0.0, 0.0)


class AugmentParams(NamedTuple):
    """Parameters of one sample (leading batch axis when batched); float32.

    Attributes:
        translation_mm: (3,) t in mm, (x, y, z).
        rotation_rad: (3,) angles a0, a1, a2 of Rx, Ry, Rz.
        scale: (3,) combined isotropic and per-axis scale factors.
        displacement_mm: (c, c, c, 3) B-spline control-point displacements in mm.
        intensity_shift: () added to the normalised intensity.
        intensity_scale: () multiplies the shifted intensity.
    """

    translation_mm: np.ndarray
    rotation_rad: np.ndarray
    scale: np.ndarray
    displacement_mm: np.ndarray
    intensity_shift: np.ndarray
    intensity_scale: np.ndarray


def sample_params(rng: np.random.Generator, ranges: AugmentRanges) -> AugmentParams:
    """Draws one sample's parameters on the host (numpy float32)."""
    c = ranges.control_points
    u = lambda a, shape=(): rng.uniform(-a, a, size=shape).astype(np.float32)
    return AugmentParams(
        translation_mm=u(ranges.translation_mm, (3,)),
        rotation_rad=u(ranges.rotation_rad, (3,)),
        scale=((1 + u(ranges.scale_iso)) * (1 + u(ranges.scale_axes, (3,)))).astype(np.float32),
        displacement_mm=u(ranges.displacement_mm, (c, c, c, 3)),
        intensity_shift=u(ranges.intensity_shift),
        intensity_scale=np.float32(1) + u(ranges.intensity_scale),
    )


def identity_params(control_points: int = 6) -> AugmentParams:
    """Parameters of the identity transform (numpy float32)."""
    c = control_points
    return AugmentParams(
        translation_mm=np.zeros(3, np.float32),
        rotation_rad=np.zeros(3, np.float32),
        scale=np.ones(3, np.float32),
        displacement_mm=np.zeros((c, c, c, 3), np.float32),
        intensity_shift=np.zeros((), np.float32),
        intensity_scale=np.ones((), np.float32),
    )


def rotation_matrix(angles_rad, xp=jnp):
    """(3, 3) R = Rx(a0) Ry(a1) Rz(a2) from (3,) angles; ``xp`` is jnp or np."""
    c, s = xp.cos(angles_rad), xp.sin(angles_rad)
    one, zero = xp.ones_like(c[0]), xp.zeros_like(c[0])
    rx = xp.stack([one, zero, zero, zero, c[0], -s[0], zero, s[0], c[0]]).reshape(3, 3)
    ry = xp.stack([c[1], zero, s[1], zero, one, zero, -s[1], zero, c[1]]).reshape(3, 3)
    rz = xp.stack([c[2], -s[2], zero, s[2], c[2], zero, zero, zero, one]).reshape(3, 3)
    return rx @ ry @ rz


def context_half_extent_vox(crop_size, spacing_mm: float, ranges: AugmentRanges) -> np.ndarray:
    """(3,) worst-case |q - center_vox - t / s| per axis over everything ``ranges`` can draw.

    Uses |d| <= displacement_mm (cubic B-spline weights are non-negative and sum to one), the
    largest combined scale, and the largest sum_j |R_ij| h_j over a grid of rotations (1 % margin).
    """
    half_mm = (np.asarray(crop_size, np.float64) - 1) * spacing_mm / 2 + ranges.displacement_mm
    angles = np.linspace(-ranges.rotation_rad, ranges.rotation_rad, 13)
    worst = np.zeros(3)
    for a in itertools.product(angles, angles, angles):
        worst = np.maximum(
            worst, np.abs(rotation_matrix(np.asarray(a), xp=np) @ np.diag(half_mm)).sum(1)
        )
    max_scale = (1 + ranges.scale_iso) * (1 + ranges.scale_axes)
    return worst * 1.01 * max_scale / spacing_mm


def context_box_size(crop_size, spacing_mm: float, ranges: AugmentRanges) -> tuple[int, int, int]:
    """(x, y, z) size of a context box that holds every sampling position ranges allow (+1 voxel).

    The box starts at ``floor(center_vox + t / s) - ceil(H) - 1`` with ``H`` from
    ``context_half_extent_vox`` (see ``context_box_start``).
    """
    half = np.ceil(context_half_extent_vox(crop_size, spacing_mm, ranges) - 1e-9).astype(int)
    return tuple(int(v) for v in 2 * half + 3)


def context_box_start(center_vox, box_size) -> np.ndarray:
    """(3,) int64 start of the box around ``center_vox`` (the crop centre incl. translation)."""
    half = (np.asarray(box_size) - 3) // 2
    return np.floor(np.asarray(center_vox, np.float64)).astype(np.int64) - half - 1


def bspline_weights(positions_mm, length_mm, control_points: int):
    """(n, c) cubic B-spline weights of ``control_points`` control points at (n,) positions.

    The domain [0, length_mm] holds ``control_points - 3`` B-spline intervals; control point k sits
    at (k - 1) * length_mm / (control_points - 3) (ITK BSplineTransform layout).
    """
    u = positions_mm[:, None] * ((control_points - 3) / length_mm)
    t = jnp.abs(u - jnp.arange(control_points, dtype=jnp.float32)[None, :] + 1)
    inner = 2 / 3 - t**2 + t**3 / 2
    outer = jnp.clip(2 - t, 0, None) ** 3 / 6
    return jnp.where(t < 1, inner, outer)


def displacement_field_mm(displacement_mm, crop_size, spacing_mm: float):
    """(x, y, z, 3) B-spline displacement in mm at every output voxel of a crop."""
    c = displacement_mm.shape[0]
    w = [
        bspline_weights(jnp.arange(n, dtype=jnp.float32) * spacing_mm, n * spacing_mm, c)
        for n in crop_size
    ]
    return jnp.einsum("xa,yb,zc,abcd->xyzd", *w, displacement_mm)


def _affine(params: AugmentParams):
    """(3, 3) R S."""
    return rotation_matrix(params.rotation_rad) * params.scale[None, :]


def map_points_vox(params: AugmentParams, center_vox, points_vox, crop_size, spacing_mm: float):
    """Maps (n, 3) continuous output voxels to (n, 3) input (box) voxels."""
    c = params.displacement_mm.shape[0]
    w = [
        bspline_weights(points_vox[:, i] * spacing_mm, n * spacing_mm, c)
        for i, n in enumerate(crop_size)
    ]
    d_mm = jnp.einsum("na,nb,nc,abcd->nd", *w, params.displacement_mm)
    c_out = (jnp.asarray(crop_size, jnp.float32) - 1) / 2
    v = points_vox + d_mm / spacing_mm - c_out[None, :]
    shift = center_vox + params.translation_mm / spacing_mm
    return shift[None, :] + v @ _affine(params).T


def sampling_grid_vox(params: AugmentParams, center_vox, crop_size, spacing_mm: float):
    """(x, y, z, 3) input (box) voxel position of every output voxel of the crop."""
    grids = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in crop_size], indexing="ij")
    c_out = (jnp.asarray(crop_size, jnp.float32) - 1) / 2
    d_vox = displacement_field_mm(params.displacement_mm, crop_size, spacing_mm) / spacing_mm
    v = jnp.stack(grids, -1) - c_out[None, None, None, :] + d_vox
    shift = center_vox + params.translation_mm / spacing_mm
    return shift[None, None, None, :] + jnp.einsum("xyzj,ij->xyzi", v, _affine(params))


def apply_linear(box, grid_vox, cval: float = OUTSIDE_VALUE):
    """(x, y, z) float32 linear interpolation of a (bx, by, bz) box at (x, y, z, 3) positions."""
    coords = [grid_vox[..., i] for i in range(3)]
    return ndimage.map_coordinates(box.astype(jnp.float32), coords, order=1, cval=cval)


KEYS_A = -0.5  # the cubic convolution kernel of Keys (1981): interpolating, exact on quadratics


def keys_weights(t):
    """(..., 4) Keys cubic-convolution weights of the taps at offsets -1, 0, 1, 2 (t in [0, 1))."""
    a = KEYS_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return jnp.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=-1)


def apply_cubic(box, grid_vox, cval: float = OUTSIDE_VALUE):
    """(x, y, z) float32 cubic-convolution (Keys) interpolation of a box at (x, y, z, 3) positions.

    The image channel of every network crop is sampled with it, in training and at prediction
    (``samples.network_input``): the stage volume is itself a resampling of the smoothed scan, and
    a crop at sub-voxel positions (augmented training crops; the SCN column at the spine point's
    x-y, segmentation crops at the centroid) resamples it a second time, which linearly would blur
    it by a random amount that one resampling of the scan (the original) does not. Keys' kernel is
    interpolating (whole-voxel positions return the voxel itself) and passes the smoothed stage
    volume's band almost unchanged (``benchmarks/training_input_sharpness.py``). Taps outside the
    box read ``cval``.
    """
    pad = 4  # a 4-tap window clamped into the padded box lies wholly in the padding when outside
    padded = jnp.pad(box.astype(jnp.float32), pad, constant_values=cval)
    points = grid_vox.reshape(-1, 3)
    floor = jnp.floor(points)
    # Clamped here: a batched dynamic_slice reads negative starts from the end, as numpy does.
    limit = jnp.asarray(padded.shape, jnp.int32) - 4
    starts = jnp.clip(floor.astype(jnp.int32) - 1 + pad, 0, limit[None, :])
    patches = jax.vmap(lambda s: jax.lax.dynamic_slice(padded, s, (4, 4, 4)))(starts)
    w = keys_weights(points - floor)  # (N, 3, 4)
    values = jnp.einsum("nijk,ni,nj,nk->n", patches, w[:, 0], w[:, 1], w[:, 2])
    return values.reshape(grid_vox.shape[:-1])


def apply_nearest(box, grid_vox, cval: float = 0.0):
    """(x, y, z) float32 nearest-neighbour sampling (labels, masks) of a box, 0 outside."""
    coords = [grid_vox[..., i] for i in range(3)]
    return ndimage.map_coordinates(box.astype(jnp.float32), coords, order=0, cval=cval)


def apply_intensity(image, params: AugmentParams):
    """(v + shift) * scale, clipped to [-1, 1] (docs/reference.md §3.3 step 4)."""
    return jnp.clip((image + params.intensity_shift) * params.intensity_scale, -1.0, 1.0)


def _nearest_grid_points(grid_vox, points_vox, stride: int):
    """(K, 3) output voxel on every ``stride``-th grid point whose mapped position is closest to
    each of the (K, 3) input points."""
    coarse = grid_vox[::stride, ::stride, ::stride]
    flat = coarse.reshape(-1, 3)

    def closest(q):
        return jnp.argmin(jnp.sum((flat - q[None, :]) ** 2, axis=1))

    index = jax.vmap(closest)(points_vox)
    return jnp.stack(jnp.unravel_index(index, coarse.shape[:3]), -1).astype(jnp.float32) * stride


def _solve3(matrix, rhs):
    """Solves a 3x3 system by the adjugate (cheaper to compile than an LU decomposition)."""
    cofactor = jnp.cross(jnp.roll(matrix, -1, axis=0), jnp.roll(matrix, -2, axis=0))
    det = jnp.dot(matrix[0], cofactor[0])
    return (cofactor.T @ rhs) / det


def apply_landmarks(
    params: AugmentParams, center_vox, grid_vox, points_vox, valid, spacing_mm: float, steps=4
):
    """Carries landmarks from input (box) voxels into the crop: the inverse of the mapping.

    The mapping has no closed-form inverse (B-spline displacement). Newton iterations on
    ``map_points_vox(p) = q`` run from two starts: the inverse of the affine part alone, and the
    closest mapped point of every 4th output voxel (the reference searches every voxel, §3.4);
    the result with the smaller residual is kept.

    Args:
        params: one sample's parameters.
        center_vox: (3,) crop centre in box voxels (without the translation).
        grid_vox: (x, y, z, 3) from ``sampling_grid_vox`` (its shape gives the crop size).
        points_vox: (K, 3) landmarks, continuous box voxel index (x, y, z).
        valid: (K,) bool.
        spacing_mm: isotropic stage spacing.
        steps: Newton iterations per start.

    Returns:
        ((K, 3) float32 continuous crop voxel index, (K,) bool): invalid if the input was, if the
        residual |map(p) - q| exceeds 2 voxels (2 x spacing) or if p is outside [0, size).
    """
    crop_size = grid_vox.shape[:3]
    forward = lambda p: map_points_vox(params, center_vox, p[None, :], crop_size, spacing_mm)[0]
    shift = center_vox + params.translation_mm / spacing_mm
    inverse = rotation_matrix(params.rotation_rad).T / params.scale[:, None]  # (R S)^-1
    c_out = (jnp.asarray(crop_size, jnp.float32) - 1) / 2
    affine_start = (points_vox - shift[None, :]) @ inverse.T + c_out[None, :]
    starts = jnp.stack([affine_start, _nearest_grid_points(grid_vox, points_vox, 4)])

    def refine(p, q):
        def newton(_, p):
            step = _solve3(jax.jacfwd(forward)(p), forward(p) - q)
            return jnp.where(jnp.all(jnp.isfinite(step)), p - step, p)

        p = jax.lax.fori_loop(0, steps, newton, p)
        residual = jnp.linalg.norm(forward(p) - q)
        return p, jnp.where(jnp.isfinite(residual), residual, jnp.inf)

    refined, residual = jax.vmap(jax.vmap(refine), in_axes=(0, None))(starts, points_vox)
    best = jnp.argmin(residual, axis=0)  # (K,)
    points_out = jnp.take_along_axis(refined, best[None, :, None], axis=0)[0]
    residual = jnp.min(residual, axis=0)
    size = jnp.asarray(crop_size, jnp.float32)
    inside = jnp.all((points_out >= 0) & (points_out < size[None, :]), axis=-1)
    return points_out, valid & inside & (residual <= 2.0)
