"""Fusion of the vertebra masks of stage 3 into one label map on the input's own grid.

Each vertebra's crop probabilities keep their largest component (`largest_component`), are
resampled onto the part of the target grid they can win (`fuse_crop`) and are fused with a running
best (probability, label) pair (`LabelFusion`, docs/reference.md §6.4), never a (volume x K) array.
"""

import numpy as np
import scipy.ndimage

from verse_jax import preprocessing
from verse_jax.data import samples
from verse_jax.geometry import Geometry, Volume


def cut_box(volume: Volume, start, size, pad_value: float = preprocessing.OUTSIDE_NORMALIZED):
    """Integer box of an identity-direction volume, padded where it leaves the volume.

    Args:
        volume: (x, y, z) volume on an identity-direction grid.
        start: (3,) int voxel index (may be negative) of the box's first voxel in ``volume``.
        size: (3,) box size in voxels.
        pad_value: value outside the volume.

    Returns:
        Volume of ``size`` whose geometry is the box's own grid (same spacing, identity).
    """
    start = np.asarray(start, np.int64)
    out = samples.cut_box(np.asarray(volume.array), start, size, pad_value)
    origin = volume.geometry.index_to_physical(start.astype(np.float64))
    return Volume(out, Geometry(tuple(out.shape), volume.geometry.spacing_mm, tuple(origin)))


def largest_component(prob, threshold: float = 0.5) -> np.ndarray:
    """Keeps the largest 18-connected component of `prob > threshold` (reference section 6.4).

    Voxels above the threshold outside that component are set to 0; all others keep their value.
    Of equally large components the first in index order is kept.

    Args:
        prob: `(x, y, z)` probabilities.
        threshold: foreground threshold (strictly greater).

    Returns:
        `(x, y, z)` numpy array, dtype of `prob`.
    """
    prob = np.array(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be a 3-D (x, y, z) array, got shape {prob.shape}")
    foreground = prob > threshold
    structure = scipy.ndimage.generate_binary_structure(3, 2)  # 3x3x3 minus corners: 18-neighbours
    components, count = scipy.ndimage.label(foreground, structure=structure)
    if count <= 1:
        return prob
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    keep = 1 + int(np.argmax(sizes))
    prob[foreground & (components != keep)] = 0
    return prob


class LabelFusion:
    """Running per-voxel best (probability, label) pair: a multi-label map without (X, Y, Z, 26).

    Starts at probability 0.5, label 0 (background). `add` replaces a voxel's pair where the new
    probability is strictly greater, so adding labels in increasing order reproduces the
    reference's argmax over [0.5, p_1, ..., p_K] with ties to the lowest index (and background
    wherever no probability exceeds 0.5). With another order, ties go to the label added first.
    Probabilities are compared in float32 (the reference stored float16).

    With `keep_low_probabilities`, `best_prob` starts at 0 and holds the highest vertebra
    probability of every voxel, also where it is <= 0.5 (background); a label is set only where
    its probability is > 0.5, so the labels are the same as without it.

    Args:
        shape: `(x, y, z)` size of the full grid.
        keep_low_probabilities: track probabilities below the background's 0.5 too.
    """

    def __init__(self, shape, *, keep_low_probabilities: bool = False):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"fusion grid shape must be 3 positive sizes (x, y, z), got {shape}")
        self.best_prob = np.full(shape, 0.0 if keep_low_probabilities else 0.5, np.float32)
        self.best_label = np.zeros(shape, np.uint16)

    def add(self, label: int, prob, offset=(0, 0, 0)) -> None:
        """Fuses one vertebra's probabilities `prob (x, y, z)` placed at voxel `offset` of the grid.

        The box may reach outside the grid (a crop at the scan's edge); only the overlap counts.
        """
        if not 0 < int(label) < 2**16:
            raise ValueError(f"label must be in 1..65535, got {label}")
        prob = np.asarray(prob, np.float32)
        if prob.ndim != 3 or len(offset) != 3:
            raise ValueError(
                f"prob must be (x, y, z) with a 3-D offset, got {prob.shape}, {offset}"
            )
        grid, local = [], []
        for start, size, full in zip(offset, prob.shape, self.best_prob.shape, strict=True):
            low, high = max(int(start), 0), min(int(start) + size, full)
            if low >= high:
                return
            grid.append(slice(low, high))
            local.append(slice(low - int(start), high - int(start)))
        grid, local = tuple(grid), tuple(local)
        better = prob[local] > self.best_prob[grid]
        self.best_prob[grid] = np.where(better, prob[local], self.best_prob[grid])
        wins = better & (prob[local] > 0.5)  # == better unless low probabilities are kept
        self.best_label[grid] = np.where(wins, np.uint16(label), self.best_label[grid])

    @property
    def labels(self) -> np.ndarray:
        """`(x, y, z)` uint16 fused label map (0 = background)."""
        return self.best_label


def fuse_crop(
    fusion: LabelFusion, prob: Volume, label: int, target: Geometry, threshold: float = 0.5
) -> None:
    """Resample one vertebra's probabilities onto the part of ``target`` they can win and fuse.

    Only voxels with probability > 0.5 can beat the background's 0.5, and a linearly interpolated
    value > 0.5 needs a grid neighbour > 0.5, so the source is cut to the bounding box of those
    voxels plus one voxel; the result equals resampling the whole crop. A fusion that keeps
    probabilities below 0.5 passes ``threshold=0`` (every voxel with a positive probability).
    """
    above = np.argwhere(prob.array > threshold)
    if above.size == 0:
        return
    low, high = above.min(axis=0) - 1, above.max(axis=0) + 2
    source = cut_box(prob, low, high - low, pad_value=0.0)
    index = target.physical_to_index(source.geometry.corners_mm())
    lo = np.maximum(np.floor(index.min(axis=0) - 1e-6).astype(np.int64), 0)
    hi = np.minimum(np.ceil(index.max(axis=0) + 1e-6).astype(np.int64) + 1, target.size)
    if np.any(hi <= lo):
        return
    origin = target.index_to_physical(lo.astype(np.float64))
    sub = Geometry(tuple(hi - lo), target.spacing_mm, tuple(origin), target.direction)
    resampled = preprocessing.resample(source, sub, interpolation="linear", default_value=0.0)
    fusion.add(label, resampled.array, offset=tuple(lo))
