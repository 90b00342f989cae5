"""Per-stage preprocessing on the device: `preprocessing.to_stage_grid` as jitted JAX.

The CT goes to the device once (`put_ct`, in its own dtype: int16 halves the transfer), is clamped
at -1024 HU there, smoothed once per distinct sigma (`smooth`) and every stage grid or crop is
sampled from the smoothed array (`sample_grid`, `sample_crop`), all on the device. The result equals
the SimpleITK path (`preprocessing.to_stage_grid`) to float32 rounding:

- Smoothing: ITK's SmoothingRecursiveGaussian is a linear shift-invariant filter along each index
  axis whose border rule extends each line's edge value to infinity. Here it is a separable FIR
  filter on the edge-padded array whose taps are the impulse response of ITK's own filter
  (`recursive_gaussian_kernel`, measured once per sigma in voxels with SimpleITK on a line),
  truncated at ``KERNEL_RADIUS_SIGMAS`` sigma (the dropped tail is below 3e-5 of the mass).
- Resampling: trilinear through physical coordinates (any source direction, oblique included)
  as ITK's linear interpolator: a point whose continuous source index lies in [-0.5, size - 0.5)
  along every axis is inside (neighbours beyond the last voxel are clamped to it), any other
  point gets -1024 HU. The continuous index is computed to ~1e-13 voxel (`_index_tables`); points
  within ``BORDER_EPS_VOX`` of that border, where ITK's answer depends on its double rounding, are
  decided as exact arithmetic would (low side inside, high side outside).

Static shapes (one compilation per bucket, not per scan): the source array is edge-padded on the
device to a multiple of ``SOURCE_BUCKET`` voxels per axis (edge padding does not change the
smoothing of the true voxels, whose border rule is the same edge extension), the true size is a
traced argument, kernel radii are rounded up to a multiple of ``RADIUS_BUCKET`` (with more true
taps), and whole-grid outputs are computed on a size rounded up to ``GRID_BUCKET`` and cut back.
Crops have the stage's static crop size; their origin is a traced argument.
"""

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import SimpleITK as sitk

from verse_jax.geometry import Geometry, Volume, physical_bounding_grid
from verse_jax.preprocessing import CT_MIN_HU, CT_SCALE_HU

KERNEL_RADIUS_SIGMAS = 7.0
RADIUS_BUCKET = 4
SOURCE_BUCKET = 32
GRID_BUCKET = 16
BORDER_EPS_VOX = 1e-9
# Length of the line (beyond the kernel) on which the impulse response is measured.
_MEASURE_MARGIN_SIGMAS = 12.0


@dataclass(frozen=True)
class DeviceCT:
    """A CT (or its smoothed copy) on the device.

    Attributes:
        array: (X, Y, Z) float32 device array in HU, clamped at -1024, edge-padded from
            ``geometry.size`` up to multiples of ``SOURCE_BUCKET``.
        geometry: the CT's true grid (any direction).
        sigma_mm: Gaussian sigma already applied (0: clamped only).
    """

    array: jax.Array
    geometry: Geometry
    sigma_mm: float = 0.0


@functools.lru_cache(maxsize=64)
def recursive_gaussian_kernel(sigma_vox: float, radius: int) -> np.ndarray:
    """Impulse response of ITK's SmoothingRecursiveGaussian along one axis, taps -radius..radius.

    Measured with SimpleITK on a float64 image whose middle plane is 1: the other two axes smooth
    a constant (gain 1), the measured axis gives the response. The line extends
    ``_MEASURE_MARGIN_SIGMAS`` sigma beyond the kernel so that its borders do not reach it.

    Args:
        sigma_vox: sigma in voxels of that axis (> 0).
        radius: number of taps on each side of the centre.

    Returns:
        (2 * radius + 1,) float64 taps, centre at index ``radius`` (symmetric).
    """
    if not sigma_vox > 0:
        raise ValueError(f"sigma_vox must be > 0, got {sigma_vox}")
    half = int(radius + np.ceil(_MEASURE_MARGIN_SIGMAS * sigma_vox)) + 4
    line = np.zeros((4, 4, 2 * half + 1), np.float64)  # sitk's (z, y, x) order: x is the line
    line[:, :, half] = 1.0
    image = sitk.GetImageFromArray(line)
    response = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, float(sigma_vox)))
    return np.array(response[0, 0, half - radius : half + radius + 1], np.float64)


def kernel_radius(sigma_vox: float) -> int:
    """Taps on each side for ``sigma_vox``: ``KERNEL_RADIUS_SIGMAS`` sigma, bucketed up."""
    radius = max(int(np.ceil(KERNEL_RADIUS_SIGMAS * sigma_vox)), 1)
    return int(-(-radius // RADIUS_BUCKET) * RADIUS_BUCKET)


def _bucket(n: int, multiple: int) -> int:
    return int(-(-int(n) // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("shape",))
def _put(array, shape):
    clamped = jnp.maximum(array.astype(jnp.float32), jnp.float32(CT_MIN_HU))
    pad = [(0, b - n) for n, b in zip(array.shape, shape, strict=True)]
    return jnp.pad(clamped, pad, mode="edge")


def put_ct(volume: Volume) -> DeviceCT:
    """Transfer a CT to the device once (its own dtype), clamp at -1024 HU, pad to the bucket.

    Args:
        volume: CT in HU, array (x, y, z) of any numeric dtype (int16 is transferred as int16),
            any grid.

    Returns:
        The clamped float32 CT on the device (`DeviceCT`, sigma 0).
    """
    array = np.asarray(volume.array)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"put_ct: need a numeric CT, got dtype {array.dtype}")
    if array.dtype not in (np.int16, np.float32):
        array = array.astype(np.float32)
    shape = tuple(_bucket(n, SOURCE_BUCKET) for n in array.shape)
    return DeviceCT(_put(jax.device_put(array), shape), volume.geometry, 0.0)


@jax.jit
def _smooth_axes(array, kernels):
    """Separable FIR along axes 0, 1, 2 with edge padding; ``kernels`` 3 (2R+1,) arrays."""
    for axis, kernel in enumerate(kernels):
        radius = (kernel.shape[0] - 1) // 2
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = jnp.pad(array, pad, mode="edge")
        n = array.shape[axis]
        acc = kernel[radius] * array
        for k in range(radius):  # symmetric taps: one multiply per pair
            left = jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
            right = jax.lax.slice_in_dim(padded, 2 * radius - k, 2 * radius - k + n, axis=axis)
            acc = acc + kernel[k] * (left + right)
        array = acc
    return array


def smooth(ct: DeviceCT, sigma_mm: float) -> DeviceCT:
    """Gaussian smoothing in mm on the device, equal to `preprocessing.smooth_mm` (ITK's filter).

    Args:
        ct: the clamped CT (`put_ct`, sigma 0).
        sigma_mm: standard deviation in mm; per axis ``sigma_mm / spacing``. 0 returns ``ct``.

    Returns:
        `DeviceCT` with the smoothed array (same bucket shape) and ``sigma_mm`` recorded.
    """
    sigma_mm = float(sigma_mm)
    if not sigma_mm >= 0:
        raise ValueError(f"sigma_mm must be >= 0, got {sigma_mm}")
    if ct.sigma_mm != 0:
        raise ValueError(f"smooth: input is already smoothed (sigma {ct.sigma_mm} mm)")
    if sigma_mm == 0:
        return ct
    kernels = []
    for spacing in ct.geometry.spacing_mm:
        sigma_vox = sigma_mm / spacing
        taps = recursive_gaussian_kernel(sigma_vox, kernel_radius(sigma_vox))
        kernels.append(jnp.asarray(taps, jnp.float32))
    return DeviceCT(_smooth_axes(ct.array, tuple(kernels)), ct.geometry, sigma_mm)


def _index_tables(source: Geometry, grid: Geometry, start_vox, shape):
    """Continuous source index of stage index ``start_vox + j`` as per-axis tables, float64-exact.

    The continuous index along source axis i is ``sum_k u[i][k][j_k]``; each ``u[i][k]`` is
    computed in float64 on the host and split into an integer and a fractional part held as two
    float32 (high + low), so that the device adds exact integers and three fractions in [0, 1)
    with error-free sums (`_two_sum`): ~1e-13 voxel, as ITK's double arithmetic, where a float32
    product of the full coordinates errs by ~1e-5 voxel and misjudges points at the hull border.

    Returns:
        (whole, frac): whole[i][k] (shape[k],) int32 and frac[i][k] (2, shape[k]) float32.
    """
    to_index = np.linalg.inv(source.matrix * np.asarray(source.spacing_mm)[None, :])
    offset = to_index @ (np.asarray(grid.origin_mm) - np.asarray(source.origin_mm))
    whole, frac = [], []
    for i in range(3):
        whole_i, frac_i = [], []
        for k in range(3):
            stage_k = float(start_vox[k]) + np.arange(shape[k], dtype=np.float64)
            u = to_index[i, k] * grid.spacing_mm[k] * stage_k + (offset[i] if k == 0 else 0.0)
            floor = np.floor(u)
            rest = u - floor
            high = rest.astype(np.float32)
            whole_i.append(floor.astype(np.int32))
            frac_i.append(np.stack([high, (rest - high).astype(np.float32)]))  # double-float
        whole.append(tuple(whole_i))
        frac.append(tuple(frac_i))
    return tuple(whole), tuple(frac)


def _along(table, k):
    """A (n,) table as a rank-3 array varying along axis k."""
    return table.reshape([table.shape[0] if i == k else 1 for i in range(3)])


def _two_sum(a, b):
    """(s, e) with s + e == a + b exactly (Knuth's TwoSum; XLA does not reassociate floats)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


@jax.jit
def _sample(array, true_size, whole, frac, stage_inside):
    """Normalised trilinear samples (see the module docstring); shapes from the tables."""
    shape = tuple(t.shape[0] for t in whole[0])
    inside = _along(stage_inside[0], 0) & _along(stage_inside[1], 1) & _along(stage_inside[2], 2)
    base, weight_hi = [], []
    for i in range(3):
        n = sum(_along(whole[i][k], k) for k in range(3))
        high = [_along(frac[i][k][0], k) for k in range(3)]
        f, err01 = _two_sum(high[0], high[1])
        f, err2 = _two_sum(f, high[2])
        err = err01 + err2 + sum(_along(frac[i][k][1], k) for k in range(3))
        f_floor = jnp.floor(f)
        n = n + f_floor.astype(jnp.int32)
        f = f - f_floor  # cidx = n + f + err, 0 <= f <= 1, |err| < 1e-6 (exact subtractions)
        low = -0.5 - n.astype(jnp.float32)  # inside: cidx >= -0.5 and cidx < size - 0.5
        top = (true_size[i] - n).astype(jnp.float32) - 0.5
        inside = inside & ((f - low) + err >= -BORDER_EPS_VOX) & ((f - top) + err < -BORDER_EPS_VOX)
        base.append(n)
        weight_hi.append(f)
    value = jnp.zeros(shape, jnp.float32)
    for corner in np.ndindex(2, 2, 2):
        index, weight = [], jnp.ones(shape, jnp.float32)
        for i, d in enumerate(corner):
            index.append(jnp.clip(base[i] + d, 0, true_size[i] - 1))
            weight = weight * (weight_hi[i] if d else 1.0 - weight_hi[i])
        value = value + weight * array[index[0], index[1], index[2]]
    value = jnp.where(inside, value, jnp.float32(CT_MIN_HU))
    return jnp.clip(jnp.maximum(value, CT_MIN_HU) / CT_SCALE_HU, -1.0, 1.0)


def _sample_on(ct: DeviceCT, grid: Geometry, start_vox, shape) -> jax.Array:
    if not np.allclose(grid.matrix, np.eye(3)):
        raise ValueError(f"stage grid must have the identity direction, got {grid.direction}")
    start_vox = np.asarray(start_vox, np.float64).reshape(3)
    whole, frac = _index_tables(ct.geometry, grid, start_vox, shape)
    stage_inside = []  # crops reaching past the stage grid get the outside value there
    for k in range(3):
        stage_k = start_vox[k] + np.arange(shape[k], dtype=np.float64)
        stage_inside.append((stage_k > -0.5) & (stage_k < grid.size[k] - 0.5))
    true_size = jnp.asarray(ct.geometry.size, jnp.int32)
    return _sample(ct.array, true_size, whole, frac, tuple(stage_inside))


def sample_grid(ct: DeviceCT, grid: Geometry) -> jax.Array:
    """A whole identity-direction stage grid sampled from a (smoothed) device CT, normalised.

    Args:
        ct: the device CT after `smooth` with the stage's sigma.
        grid: identity-direction target grid (``physical_bounding_grid`` of the CT).

    Returns:
        (x, y, z) = ``grid.size`` float32 device array in [-1, 1] (HU / 2048; -0.5 outside).
    """
    shape = tuple(_bucket(n, GRID_BUCKET) for n in grid.size)
    out = _sample_on(ct, grid, np.zeros(3), shape)
    x, y, z = grid.size
    return out[:x, :y, :z]


def sample_crop(ct: DeviceCT, grid: Geometry, origin_vox, size) -> jax.Array:
    """A crop of a stage grid sampled from the device CT without sampling the whole grid.

    Crop voxel ``j`` is stage-grid continuous index ``origin_vox + j``: for integer origins the
    crop equals the sub-block of `sample_grid` (``cut_box`` of it, -0.5 beyond the stage grid).

    Args:
        ct: the device CT after `smooth` with the stage's sigma.
        grid: the identity-direction stage grid.
        origin_vox: (3,) stage index of the crop's voxel 0 (may be negative or fractional; a
            traced argument, so crops at new places do not recompile).
        size: (3,) crop size in voxels (static).

    Returns:
        (size) float32 device array in [-1, 1].
    """
    shape = tuple(int(v) for v in size)
    return _sample_on(ct, grid, origin_vox, shape)


def to_stage_grid(volume: Volume, *, spacing_mm: float, smoothing_mm: float) -> Volume:
    """`preprocessing.to_stage_grid` on the device (equal within float32 rounding).

    Returns:
        float32 host Volume in [-1, 1] on ``physical_bounding_grid(volume.geometry, spacing_mm)``.
    """
    ct = smooth(put_ct(volume), smoothing_mm)
    target = physical_bounding_grid(volume.geometry, spacing_mm)
    return Volume(np.asarray(sample_grid(ct, target)), target)
