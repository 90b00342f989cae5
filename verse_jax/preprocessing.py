"""Per-stage image preprocessing: resampling, Gaussian smoothing (mm), CT intensity normalisation.

SimpleITK in memory only (through ``io.volume_to_sitk`` / ``io.volume_from_sitk``). Arrays are
(x, y, z); grids are ``Geometry`` in the LPS world. Resampling goes through physical coordinates, so
oblique inputs are handled exactly.
"""

import numpy as np
import SimpleITK as sitk

from verse_jax.geometry import Geometry, Volume, physical_bounding_grid
from verse_jax.io import volume_from_sitk, volume_to_sitk

CT_MIN_HU = -1024.0
CT_SCALE_HU = 2048.0
# The normalised value of -1024 HU: everything outside the scan (crop padding, resampling).
OUTSIDE_NORMALIZED = CT_MIN_HU / CT_SCALE_HU

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
# ITK's recursive Gaussian needs at least this many voxels along every axis.
_MIN_SMOOTH_SIZE = 4


def resample(
    volume: Volume, target: Geometry, *, interpolation: str = "linear", default_value: float = 0.0
) -> Volume:
    """Resample a volume onto ``target`` through physical coordinates (identity transform).

    Args:
        volume: input, array (x, y, z) on any grid (oblique too).
        target: output grid; the result's geometry is exactly ``target``.
        interpolation: "linear" or "nearest" (use "nearest" for label maps).
        default_value: value of output voxels whose centre maps outside the input.

    Returns:
        Volume with array (x, y, z) of ``target.size`` in the input's dtype (bool -> uint8; cast
        integers to float first if fractional linear values are wanted).
    """
    if interpolation not in _INTERPOLATORS:
        raise ValueError(
            f"interpolation must be one of {sorted(_INTERPOLATORS)}, got {interpolation!r}"
        )
    image = volume_to_sitk(volume)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in target.size])
    resampler.SetOutputSpacing(target.spacing_mm)
    resampler.SetOutputOrigin(target.origin_mm)
    resampler.SetOutputDirection(target.direction)
    resampler.SetInterpolator(_INTERPOLATORS[interpolation])
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetOutputPixelType(image.GetPixelID())
    result = volume_from_sitk(resampler.Execute(image))
    return Volume(result.array, target)


def smooth_mm(volume: Volume, sigma_mm: float) -> Volume:
    """Gaussian smoothing with a physical sigma (SimpleITK SmoothingRecursiveGaussian), float32.

    Args:
        volume: array (x, y, z), any numeric dtype; the voxel spacing sets sigma in voxels per axis.
        sigma_mm: standard deviation in mm (0 returns the float32 input unchanged).

    Returns:
        float32 Volume on the same grid. Axes shorter than 4 voxels are edge-padded for the filter
        and cropped back.
    """
    sigma_mm = float(sigma_mm)
    if not sigma_mm >= 0:
        raise ValueError(f"sigma_mm must be >= 0, got {sigma_mm}")
    array = np.asarray(volume.array, np.float32)
    if sigma_mm == 0:
        return Volume(array, volume.geometry)
    pad = [(0, max(_MIN_SMOOTH_SIZE - s, 0)) for s in array.shape]
    padded = np.pad(array, pad, mode="edge")
    grid = volume.geometry
    padded_geometry = Geometry(padded.shape, grid.spacing_mm, grid.origin_mm, grid.direction)
    image = volume_to_sitk(Volume(padded, padded_geometry))
    smoothed = volume_from_sitk(sitk.SmoothingRecursiveGaussian(image, sigma_mm)).array
    x, y, z = volume.geometry.size
    return Volume(np.asarray(smoothed[:x, :y, :z], np.float32), volume.geometry)


def normalize_ct(array) -> np.ndarray:
    """CT intensities in HU -> float32 network input: clamp >= -1024, / 2048, clip to [-1, 1].

    -1024 HU -> -0.5, 0 HU -> 0, >= 2048 HU -> 1.
    """
    array = np.maximum(np.asarray(array, np.float32), np.float32(CT_MIN_HU))
    return np.clip(array / np.float32(CT_SCALE_HU), -1.0, 1.0).astype(np.float32)


def to_stage_grid(volume: Volume, *, spacing_mm: float, smoothing_mm: float) -> Volume:
    """CT volume -> normalised float32 volume on the identity-direction grid of a stage.

    Steps (reference §3.3): clamp at -1024 HU, Gaussian smoothing with ``smoothing_mm``,
    linear resampling (default -1024 HU) onto ``physical_bounding_grid(geometry, spacing_mm)``,
    /2048 and clip to [-1, 1].

    Args:
        volume: CT in HU, array (x, y, z), any grid (oblique too).
        spacing_mm: isotropic spacing of the stage grid (8, 2 or 1 mm in the paper).
        smoothing_mm: Gaussian sigma in mm (3.0 spine, 0.75 vertebrae stages).

    Returns:
        float32 Volume in [-1, 1] on an identity-direction grid covering the whole input.
    """
    clamped = np.maximum(np.asarray(volume.array, np.float32), np.float32(CT_MIN_HU))
    smoothed = smooth_mm(Volume(clamped, volume.geometry), smoothing_mm)
    target = physical_bounding_grid(volume.geometry, spacing_mm)
    resampled = resample(smoothed, target, interpolation="linear", default_value=CT_MIN_HU)
    return Volume(normalize_ct(resampled.array), target)
