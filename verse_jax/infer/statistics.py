"""Per-vertebra statistics of a prediction: position, extent, volume, HU, heatmap value, partial.

One record per centroid, from the CT, the label mask on the CT's grid and the centroids; the
README ("Per-case statistics") describes every field.
"""

import csv
import io as text_io
import itertools
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.ndimage

from verse_jax.geometry import Volume
from verse_jax.io import Centroids
from verse_jax.labels import vertebra_name

CSV_COLUMNS = (
    "case",
    "label",
    "name",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
    "centroid_x_vox",
    "centroid_y_vox",
    "centroid_z_vox",
    "bbox_min_x_vox",
    "bbox_min_y_vox",
    "bbox_min_z_vox",
    "bbox_max_x_vox",
    "bbox_max_y_vox",
    "bbox_max_z_vox",
    "bbox_min_x_mm",
    "bbox_min_y_mm",
    "bbox_min_z_mm",
    "bbox_max_x_mm",
    "bbox_max_y_mm",
    "bbox_max_z_mm",
    "voxels",
    "volume_ml",
    "mean_hu",
    "median_hu",
    "heatmap_value",
    "partial",
)


@dataclass(frozen=True)
class VertebraStatistics:
    """Statistics of one predicted vertebra (mask fields None when its mask is empty).

    Attributes:
        label, name: VerSe id and name ("L1").
        centroid_mm: (3,) LPS mm predicted centroid (as in the centroid JSON).
        centroid_vox: (3,) continuous (x, y, z) index of the centroid in the CT's grid.
        bbox_vox: ((3,), (3,)) first and last (inclusive) voxel index of the mask.
        bbox_mm: ((3,), (3,)) LPS mm axis-aligned box around the centres of the 8 corner voxels
            of ``bbox_vox``.
        voxels: number of mask voxels.
        volume_ml: voxels x voxel volume / 1000.
        mean_hu, median_hu: CT values inside the mask.
        heatmap_value: heatmap peak value of the landmark (None if not known).
        partial: the mask touches a face of the scan (first or last index on any axis).
    """

    label: int
    name: str
    centroid_mm: tuple[float, float, float]
    centroid_vox: tuple[float, float, float]
    bbox_vox: tuple[tuple[int, ...], tuple[int, ...]] | None
    bbox_mm: tuple[tuple[float, ...], tuple[float, ...]] | None
    voxels: int
    volume_ml: float
    mean_hu: float | None
    median_hu: float | None
    heatmap_value: float | None
    partial: bool | None

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return _plain(asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _corner_box_mm(geometry, low, high) -> tuple[tuple[float, ...], tuple[float, ...]]:
    corners = np.array(list(itertools.product(*zip(low, high, strict=True))), np.float64)
    points = geometry.index_to_physical(corners)
    return tuple(points.min(axis=0).tolist()), tuple(points.max(axis=0).tolist())


def vertebra_statistics(
    image: Volume, mask: Volume, centroids: Centroids, heatmap_values=None
) -> list[VertebraStatistics]:
    """One record per centroid, in centroid order.

    Args:
        image: CT in HU, (x, y, z).
        mask: (x, y, z) VerSe label mask on exactly ``image``'s grid.
        centroids: VerSe ids and LPS mm points.
        heatmap_values: (N,) heatmap peak per centroid, or None.

    Raises:
        ValueError: mask and image shapes differ, or heatmap_values has the wrong length.
    """
    labels = np.asarray(mask.array)
    hu = np.asarray(image.array)
    if labels.shape != hu.shape:
        raise ValueError(f"mask shape {labels.shape} differs from the image shape {hu.shape}")
    if heatmap_values is not None and len(heatmap_values) != len(centroids.labels):
        raise ValueError(
            f"{len(heatmap_values)} heatmap values for {len(centroids.labels)} centroids"
        )
    geometry = mask.geometry
    voxel_ml = float(np.prod(geometry.spacing_mm)) / 1000.0
    boxes = scipy.ndimage.find_objects(labels.astype(np.int64)) if labels.size else []
    shape = np.asarray(labels.shape)
    records = []
    for i, (label, point) in enumerate(zip(centroids.labels, centroids.points_mm, strict=True)):
        label = int(label)
        box = boxes[label - 1] if label - 1 < len(boxes) else None
        inside = (labels[box] == label) if box is not None else np.zeros(0, bool)
        count = int(inside.sum())
        bbox_vox = bbox_mm = mean = median = partial = None
        if count:
            values = hu[box][inside].astype(np.float64)
            mean, median = float(values.mean()), float(np.median(values))
            low = tuple(int(s.start) for s in box)
            high = tuple(int(s.stop) - 1 for s in box)
            bbox_vox, bbox_mm = (low, high), _corner_box_mm(geometry, low, high)
            partial = bool(min(low) == 0 or np.any(np.asarray(high) == shape - 1))
        value = None if heatmap_values is None else float(heatmap_values[i])
        records.append(
            VertebraStatistics(
                label=label,
                name=vertebra_name(label),
                centroid_mm=tuple(float(v) for v in point),
                centroid_vox=tuple(geometry.physical_to_index(point).tolist()),
                bbox_vox=bbox_vox,
                bbox_mm=bbox_mm,
                voxels=count,
                volume_ml=count * voxel_ml,
                mean_hu=mean,
                median_hu=median,
                heatmap_value=value,
                partial=partial,
            )
        )
    return records


def csv_rows(case_id: str, records: list[VertebraStatistics]) -> list[dict]:
    """Flat rows (`CSV_COLUMNS`) of one case; empty cells where a value is None."""
    rows = []
    for r in records:
        row = {"case": case_id, "label": r.label, "name": r.name}
        for axis, c in enumerate("xyz"):
            row[f"centroid_{c}_mm"] = r.centroid_mm[axis]
            row[f"centroid_{c}_vox"] = r.centroid_vox[axis]
            for end, which in enumerate(("min", "max")):
                row[f"bbox_{which}_{c}_vox"] = r.bbox_vox[end][axis] if r.bbox_vox else ""
                row[f"bbox_{which}_{c}_mm"] = r.bbox_mm[end][axis] if r.bbox_mm else ""
        row |= {"voxels": r.voxels, "volume_ml": r.volume_ml}
        for key in ("mean_hu", "median_hu", "heatmap_value", "partial"):
            value = getattr(r, key)
            row[key] = (
                "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            )
        rows.append(row)
    return rows


def format_csv(rows: list[dict]) -> str:
    """CSV text with a header line and one line per row."""
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def case_report(case_id: str, records: list[VertebraStatistics], confidence=None) -> str:
    """``<id>_stats.json`` text: the case id, the labelling confidence (or null), the vertebrae.

    Args:
        case_id: the case's id.
        records: `vertebra_statistics` of the case.
        confidence: `confidence.LabelConfidence` or None.
    """
    report = {
        "case": case_id,
        "labelling": None if confidence is None else confidence.to_dict(),
        "vertebrae": [r.to_dict() for r in records],
    }
    return json.dumps(report, indent=2, allow_nan=False) + "\n"
