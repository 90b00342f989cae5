"""Landmark candidates of stage 2: per-landmark heatmap peaks in the SCN column, in LPS mm.

Candidate arrays: `values (K, M)`, `points_mm (K, M, 3)` (LPS mm, +z superior), `valid (K, M)`
bool. Slot 0 of each landmark holds its global maximum; slots are in the candidate finder's order
(decreasing value).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from verse_jax import stages
from verse_jax.heatmaps import find_candidates

_RULE = stages.SCN_PAPER.candidates  # defaults: the paper's rule at the paper's 2 mm


class LandmarkCandidates(NamedTuple):
    """Per-landmark candidate peaks: values (K, M), points_mm (K, M, 3) LPS mm, valid (K, M)."""

    values: np.ndarray
    points_mm: np.ndarray
    valid: np.ndarray


def bucket_length(size: int) -> int:
    """Padded z length the candidate search compiles for: 16, or ``size`` rounded up to a quarter
    of its power of two (20, 24, 28, 32, 40, ...), so at most 4 compilations per octave of column
    lengths and at most 25 % padding."""
    if size <= 16:
        return 16
    step = 1 << (int(size).bit_length() - 3)
    return -(-int(size) // step) * step


@functools.partial(
    jax.jit, static_argnames=("max_candidates", "min_distance_vox", "min_max_value", "rel")
)
def _find_per_channel(heatmaps, extent, *, max_candidates, min_distance_vox, min_max_value, rel):
    find = functools.partial(
        find_candidates,
        max_candidates=max_candidates,
        min_distance_vox=min_distance_vox,
        min_max_value=min_max_value,
        relative_threshold=rel,
        extent=extent,
    )
    return jax.vmap(find, in_axes=-1)(heatmaps)


def find_cache_size() -> int:
    """Number of compiled variants of the candidate search (for tests and logging)."""
    return _find_per_channel._cache_size()


def landmark_candidates(
    heatmaps,
    geometry,
    *,
    max_candidates: int | None = _RULE.max_candidates,
    min_distance_vox: float = _RULE.min_distance_mm / stages.SCN_PAPER.spacing_mm,
    min_max_value: float = _RULE.min_max_value,
    relative_threshold: float = _RULE.relative_threshold,
) -> LandmarkCandidates:
    """Candidate peaks of every heatmap channel, in physical mm.

    Args:
        heatmaps: `(x, y, z, K)` merged heatmaps on the grid `geometry`.
        geometry: the heatmaps' grid (`verse_jax.geometry.Geometry`, duck-typed:
            `index_to_physical`).
        max_candidates: None keeps every candidate the rule finds, as the reference (the search
            runs with M = 8, 16, 32, ... slots until some slot stays empty in every channel);
            an int caps M.
        min_distance_vox, min_max_value, relative_threshold: passed to
            `verse_jax.heatmaps.find_candidates` (reference: 7 voxels, 0.25, 0.1).

    Returns:
        `LandmarkCandidates` with K landmarks and M slots; invalid points are 0.
    """
    if np.ndim(heatmaps) != 4:
        raise ValueError(f"heatmaps must be (x, y, z, K), got shape {np.shape(heatmaps)}")
    limit = int(np.prod(np.shape(heatmaps)[:3]))  # no more maxima than voxels
    slots = min(8, limit) if max_candidates is None else int(max_candidates)
    # The column's z length varies from scan to scan: pad it to a bucket (never a candidate: the
    # true extent is a traced argument) so that a folder of scans compiles a few times, not once
    # per scan (about 1-3 s each on a CPU).
    size_z = int(np.shape(heatmaps)[2])
    extent = np.asarray(np.shape(heatmaps)[:3], np.int32)
    heatmaps = jnp.asarray(heatmaps)
    if bucket_length(size_z) > size_z:
        padding = ((0, 0), (0, 0), (0, bucket_length(size_z) - size_z), (0, 0))
        heatmaps = jnp.pad(heatmaps, padding)
    while True:
        found = _find_per_channel(
            heatmaps,
            extent,
            max_candidates=slots,
            min_distance_vox=float(min_distance_vox),
            min_max_value=float(min_max_value),
            rel=float(relative_threshold),
        )
        full = bool(np.any(np.asarray(found.valid)[:, -1]))
        if max_candidates is not None or not full or slots >= limit:
            break
        slots = min(2 * slots, limit)
    valid = np.asarray(found.valid, bool)
    points_mm = geometry.index_to_physical(np.asarray(found.points_vox, np.float64))
    points_mm = np.where(valid[..., None], points_mm, 0.0)
    values = np.where(valid, np.asarray(found.values, np.float64), 0.0)
    return LandmarkCandidates(values, points_mm, valid)


def column_z_range_mm(geometry) -> tuple[float, float]:
    """(bottom, top) world z in mm of a column grid, as the reference measures its borders.

    Bottom is the centre of slice 0, top is `bottom + size_z * spacing_z` (the reference's
    `Z * spacing`). The grid's z index axis must point to world +z (superior).
    """
    if not np.allclose(np.asarray(geometry.matrix)[:, 2], (0.0, 0.0, 1.0), atol=1e-6):
        raise ValueError(f"column z axis must point superior (+z), direction {geometry.direction}")
    bottom = float(geometry.origin_mm[2])
    return bottom, bottom + geometry.size[2] * float(geometry.spacing_mm[2])
