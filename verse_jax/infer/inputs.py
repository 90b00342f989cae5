"""The networks' inputs of a CT: a check that it is one, and its normalised volume per stage.

No JAX here: ``verse-jax predict`` prepares the next case in a thread while the networks run.
"""

import numpy as np

from verse_jax import preprocessing
from verse_jax.geometry import Volume, physical_bounding_grid
from verse_jax.stages import StageGrid

_MIN_CT_RANGE_HU = 100.0


def check_ct(volume: Volume, name: str = "image") -> None:
    """Raise ValueError unless ``volume`` looks like a 3-D CT in HU (numeric, >= 100 HU range)."""
    array = np.asarray(volume.array)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name}: not a CT (voxel type {array.dtype})")
    low, high = float(array.min()), float(array.max())
    if not np.isfinite([low, high]).all() or high - low < _MIN_CT_RANGE_HU:
        raise ValueError(
            f"{name}: does not look like a CT in HU (intensities {low:g}..{high:g}; "
            f"a CT spans air to bone)"
        )


def stage_volumes(image: Volume, grids: dict[str, StageGrid]) -> dict[str, Volume]:
    """Normalised volumes on each stage's bounding grid (``preprocessing.to_stage_grid`` steps).

    The clamp at -1024 HU is done once and each smoothing once for all stages that share it.

    Args:
        image: CT in HU, (x, y, z), any grid.
        grids: stage name -> grid (spacing_mm, smoothing_mm).

    Returns:
        stage name -> float32 Volume in [-1, 1] on ``physical_bounding_grid(image, spacing_mm)``.
    """
    clamped = np.array(image.array, np.float32)  # one float32 copy, clamped in place
    np.maximum(clamped, np.float32(preprocessing.CT_MIN_HU), out=clamped)
    clamped = Volume(clamped, image.geometry)
    out = {}
    for smoothing in sorted({grid.smoothing_mm for grid in grids.values()}):
        smoothed = preprocessing.smooth_mm(clamped, smoothing)
        for name, grid in grids.items():
            if grid.smoothing_mm == smoothing:
                target = physical_bounding_grid(image.geometry, grid.spacing_mm)
                resampled = preprocessing.resample(
                    smoothed, target, default_value=preprocessing.CT_MIN_HU
                )
                out[name] = Volume(preprocessing.normalize_ct(resampled.array), target)
        del smoothed
    return out


def prepare_case(image: Volume, networks) -> dict[str, Volume]:
    """Check ``image`` (`check_ct`) and compute its volume of every stage (`stage_volumes`).

    Args:
        image: CT in HU, (x, y, z), any grid.
        networks: the three stage networks (``predict.Networks`` or a loaded bundle): their grids.


    Returns:
        The ``volumes`` argument of `predict_case_details`.
    """
    check_ct(image)
    grids = {"spine": networks.spine.grid, "scn": networks.scn.grid, "seg": networks.seg.grid}
    return stage_volumes(image, grids)
