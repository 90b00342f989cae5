"""VerSe evaluation: identification rate, localisation distance, per-vertebra Dice and Hausdorff.

Definitions follow docs/reference.md §8. Centroids are `(labels (N,), points_mm (N, 3))` pairs or
records with those attributes (`verse_jax.io.Centroids`), in a common physical frame (mm). Masks are
`(x, y, z)` integer label maps on one grid with `spacing_mm` (x, y, z). Missing vertebrae (in the
ground truth, not predicted) and extra ones (predicted, not in the ground truth) are always counted
and listed; how each mean treats them is stated on each field. Metrics are computed on the given
grid in physical mm (the VerSe evaluation first resampled masks to 1 mm).
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from verse_jax.labels import index_to_label_array


def _centroid_arrays(centroids, name: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(centroids, "labels") and hasattr(centroids, "points_mm"):
        labels, points_mm = centroids.labels, centroids.points_mm
    else:
        labels, points_mm = centroids
    labels = np.asarray(labels, np.int64).reshape(-1)
    points_mm = np.asarray(points_mm, np.float64)
    if points_mm.shape != (labels.shape[0], 3):
        raise ValueError(f"{name}: points_mm must be ({labels.shape[0]}, 3), got {points_mm.shape}")
    if len(np.unique(labels)) != len(labels):
        raise ValueError(f"{name}: duplicate labels {labels.tolist()}")
    if not np.all(np.isfinite(points_mm)):
        raise ValueError(f"{name}: points_mm must be finite")
    order = np.argsort(labels)
    return labels[order], points_mm[order]


def _to_dict(record) -> dict:
    """dataclass -> dict of plain Python values (tuples become lists, numpy scalars floats)."""
    out = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if dataclasses.is_dataclass(value):
            value = _to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


@dataclass(frozen=True)
class LocalizationMetrics:
    """Centroid metrics of one case.

    Attributes:
        num_gt, num_pred: numbers of ground-truth and predicted vertebrae.
        hits: predicted vertebrae whose closest ground truth (among labels in both) is their own
            label and lies within `max_distance_mm` (VerSe `get_hits`).
        id_rate: hits / num_gt (NaN without ground truth).
        mean_distance_mm: mean distance over labels in both (NaN if none).
        distances_mm: label -> distance, labels in both.
        hit_labels, missing_labels (in GT only), extra_labels (predicted only): sorted labels.
    """

    num_gt: int
    num_pred: int
    hits: int
    id_rate: float
    mean_distance_mm: float
    distances_mm: dict[int, float]
    hit_labels: tuple[int, ...]
    missing_labels: tuple[int, ...]
    extra_labels: tuple[int, ...]

    def to_dict(self) -> dict:
        return _to_dict(self)


def localization_metrics(pred, gt, *, max_distance_mm: float = 20.0) -> LocalizationMetrics:
    """VerSe identification rate and localisation distance of one case.

    Args:
        pred, gt: centroids, `(labels (N,), points_mm (N, 3))` or records with those attributes.
        max_distance_mm: identification radius (VerSe: 20 mm, inclusive).
    """
    pred_labels, pred_mm = _centroid_arrays(pred, "predicted centroids")
    gt_labels, gt_mm = _centroid_arrays(gt, "ground-truth centroids")
    common = np.intersect1d(pred_labels, gt_labels)
    p = pred_mm[np.searchsorted(pred_labels, common)]
    g = gt_mm[np.searchsorted(gt_labels, common)]
    distance = np.sqrt(np.sum((p[:, None, :] - g[None, :, :]) ** 2, axis=-1))  # (pred, gt)
    own = np.diagonal(distance)
    is_hit = np.zeros(len(common), bool)
    if len(common):  # closest ground truth (first of equals, as numpy's argmin) must be its own
        is_hit = (np.argmin(distance, axis=1) == np.arange(len(common))) & (own <= max_distance_mm)
    hits = int(np.sum(is_hit))
    return LocalizationMetrics(
        num_gt=len(gt_labels),
        num_pred=len(pred_labels),
        hits=hits,
        id_rate=hits / len(gt_labels) if len(gt_labels) else math.nan,
        mean_distance_mm=float(np.mean(own)) if len(common) else math.nan,
        distances_mm={int(k): float(d) for k, d in zip(common, own, strict=True)},
        hit_labels=tuple(int(k) for k in common[is_hit]),
        missing_labels=tuple(int(k) for k in np.setdiff1d(gt_labels, pred_labels)),
        extra_labels=tuple(int(k) for k in np.setdiff1d(pred_labels, gt_labels)),
    )


def landmark_localization_metrics(
    pred_points_mm, pred_valid, gt_points_mm, gt_valid, *, max_distance_mm: float = 20.0
) -> LocalizationMetrics:
    """`localization_metrics` for landmark arrays: `(points_mm (K, 3), valid (K,))` pairs.

    Landmark index k is VerSe label `verse_jax.labels.index_to_label(k)` (K = 25 or 26).
    """
    pairs = []
    for name, points_mm, valid in (
        ("predicted", pred_points_mm, pred_valid),
        ("ground-truth", gt_points_mm, gt_valid),
    ):
        points_mm, valid = np.asarray(points_mm, np.float64), np.asarray(valid, bool)
        if valid.ndim != 1 or points_mm.shape != (valid.shape[0], 3):
            raise ValueError(
                f"{name} landmarks must be points_mm (K, 3) and valid (K,), "
                f"got {points_mm.shape} and {valid.shape}"
            )
        labels = index_to_label_array(valid.shape[0])
        pairs.append((labels[valid], points_mm[valid]))
    return localization_metrics(pairs[0], pairs[1], max_distance_mm=max_distance_mm)


def dice_score(a, b) -> float:
    """Dice `2 |A & B| / (|A| + |B|)` of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.sum(a & b)) / total


def hausdorff_distance_mm(a, b, spacing_mm) -> float:
    """Exact symmetric Hausdorff distance (mm) between the voxel-centre sets of two masks.

    Euclidean distance transforms in physical space (anisotropic `spacing_mm`), computed on the
    two masks' joint bounding box. Both masks must be non-empty.

    Args:
        a, b: `(x, y, z)` boolean masks on one grid.
        spacing_mm: (x, y, z) voxel spacing in mm.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"masks must be 3-D with one shape, got {a.shape} and {b.shape}")
    if not (a.any() and b.any()):
        raise ValueError("Hausdorff distance needs two non-empty masks")
    box = scipy.ndimage.find_objects((a | b).astype(np.uint8))[0]
    a, b = a[box], b[box]
    spacing = _check_spacing(spacing_mm)
    to_b = scipy.ndimage.distance_transform_edt(~b, sampling=spacing)
    to_a = scipy.ndimage.distance_transform_edt(~a, sampling=spacing)
    return float(max(np.max(to_b[a]), np.max(to_a[b])))


def _check_spacing(spacing_mm) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in np.asarray(spacing_mm, np.float64).reshape(-1))
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be 3 positive numbers (x, y, z), got {spacing_mm}")
    return spacing


@dataclass(frozen=True)
class SegmentationMetrics:
    """Per-vertebra mask metrics of one case.

    Attributes:
        dice: label -> Dice for every label in the ground truth or the prediction (missing and
            extra vertebrae have Dice 0).
        hausdorff_mm: label -> symmetric Hausdorff distance (mm), labels in both.
        mean_dice: mean Dice over ground-truth vertebrae, missing ones counting 0 (NaN if none).
        mean_hausdorff_mm: mean over labels in both (NaN if none); missing vertebrae have no
            Hausdorff distance and are reported in `missing_labels` instead.
        num_gt, num_pred: numbers of labels in each mask.
        missing_labels (in GT only), extra_labels (predicted only): sorted labels.
    """

    dice: dict[int, float]
    hausdorff_mm: dict[int, float]
    mean_dice: float
    mean_hausdorff_mm: float
    num_gt: int
    num_pred: int
    missing_labels: tuple[int, ...]
    extra_labels: tuple[int, ...]

    def to_dict(self) -> dict:
        return _to_dict(self)


def segmentation_metrics(pred_mask, gt_mask, spacing_mm) -> SegmentationMetrics:
    """Per-vertebra Dice and Hausdorff distance of two label maps (0 = background).

    Args:
        pred_mask, gt_mask: `(x, y, z)` integer label maps on one grid.
        spacing_mm: (x, y, z) voxel spacing of that grid in mm.
    """
    pred_mask, gt_mask = np.asarray(pred_mask), np.asarray(gt_mask)
    if pred_mask.shape != gt_mask.shape or pred_mask.ndim != 3:
        raise ValueError(
            f"masks must be 3-D with one shape, got {pred_mask.shape}, {gt_mask.shape}"
        )
    for name, mask in (("pred_mask", pred_mask), ("gt_mask", gt_mask)):
        if not np.issubdtype(mask.dtype, np.integer) or mask.min(initial=0) < 0:
            raise ValueError(f"{name} must hold non-negative integer labels, got {mask.dtype}")
    spacing = _check_spacing(spacing_mm)
    pred_labels = np.setdiff1d(np.unique(pred_mask), [0])
    gt_labels = np.setdiff1d(np.unique(gt_mask), [0])
    boxes_pred = scipy.ndimage.find_objects(pred_mask.astype(np.int64))
    boxes_gt = scipy.ndimage.find_objects(gt_mask.astype(np.int64))
    dice, hausdorff = {}, {}
    for label in np.union1d(pred_labels, gt_labels).tolist():
        if label not in pred_labels or label not in gt_labels:
            dice[label] = 0.0
            continue
        box = _union_box(boxes_pred[label - 1], boxes_gt[label - 1])
        a, b = pred_mask[box] == label, gt_mask[box] == label
        dice[label] = dice_score(a, b)
        hausdorff[label] = hausdorff_distance_mm(a, b, spacing)
    gt_dice = [dice[label] for label in gt_labels.tolist()]
    return SegmentationMetrics(
        dice=dice,
        hausdorff_mm=hausdorff,
        mean_dice=float(np.mean(gt_dice)) if gt_dice else math.nan,
        mean_hausdorff_mm=float(np.mean(list(hausdorff.values()))) if hausdorff else math.nan,
        num_gt=len(gt_labels),
        num_pred=len(pred_labels),
        missing_labels=tuple(int(k) for k in np.setdiff1d(gt_labels, pred_labels)),
        extra_labels=tuple(int(k) for k in np.setdiff1d(pred_labels, gt_labels)),
    )


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(min(s.start, t.start), max(s.stop, t.stop)) for s, t in zip(a, b, strict=True)
    )


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one case; either part may be absent (None)."""

    case_id: str
    localization: LocalizationMetrics | None = None
    segmentation: SegmentationMetrics | None = None

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass(frozen=True)
class AggregateMetrics:
    """Metrics over cases.

    Means are means of per-case values over the cases where that value is defined; `num_undefined`
    counts, per metric, the cases left out (no ground truth, or no vertebra in both). Totals add
    up per-case counts. `pooled_id_rate` = total hits / total ground-truth vertebrae.
    """

    num_cases: int
    id_rate: float
    pooled_id_rate: float
    mean_distance_mm: float
    dice: float
    hausdorff_mm: float
    hits: int
    num_gt_vertebrae: int
    num_pred_vertebrae: int
    missing_vertebrae: int
    extra_vertebrae: int
    missing_masks: int
    extra_masks: int
    num_undefined: dict[str, int]

    def to_dict(self) -> dict:
        return _to_dict(self)


def aggregate_metrics(cases: Sequence[CaseMetrics]) -> AggregateMetrics:
    """Aggregates per-case metrics (mean of per-case values, totals of counts)."""
    loc = [c.localization for c in cases if c.localization is not None]
    seg = [c.segmentation for c in cases if c.segmentation is not None]
    per_case = {
        "id_rate": [m.id_rate for m in loc],
        "mean_distance_mm": [m.mean_distance_mm for m in loc],
        "dice": [m.mean_dice for m in seg],
        "hausdorff_mm": [m.mean_hausdorff_mm for m in seg],
    }
    means = {k: _nan_mean(v) for k, v in per_case.items()}
    num_gt = sum(m.num_gt for m in loc)
    hits = sum(m.hits for m in loc)
    return AggregateMetrics(
        num_cases=len(cases),
        id_rate=means["id_rate"],
        pooled_id_rate=hits / num_gt if num_gt else math.nan,
        mean_distance_mm=means["mean_distance_mm"],
        dice=means["dice"],
        hausdorff_mm=means["hausdorff_mm"],
        hits=hits,
        num_gt_vertebrae=num_gt,
        num_pred_vertebrae=sum(m.num_pred for m in loc),
        missing_vertebrae=sum(len(m.missing_labels) for m in loc),
        extra_vertebrae=sum(len(m.extra_labels) for m in loc),
        missing_masks=sum(len(m.missing_labels) for m in seg),
        extra_masks=sum(len(m.extra_labels) for m in seg),
        num_undefined={k: sum(math.isnan(x) for x in v) for k, v in per_case.items()},
    )


def _nan_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
