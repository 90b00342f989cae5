"""Evaluation of a prediction folder against ground truth, one case at a time.

``evaluate_folder`` matches ``<id>_seg.nii.gz`` / ``<id>_ctd.json`` predictions to ground-truth
cases, scores each case on its own (a bad file fails that case only, with its reason) and
aggregates the valid ones. Centroids are always read in the grid of the file they belong to: a
prediction's JSON in its own mask's grid (the CT's, where the prediction has no mask), the ground
truth's in its CT's grid; a ground-truth mask must lie on its CT's grid.
"""

import csv
import io as text_io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from verse_jax import io, metrics, preprocessing
from verse_jax.geometry import Geometry, Volume
from verse_jax.labels import VALID_LABELS

logger = logging.getLogger(__name__)

_MASK_NAMES = ("_seg.nii.gz", "_seg.nii")
_CENTROID_NAME = "_ctd.json"


@dataclass(frozen=True)
class CaseFiles:
    """Files of one case; any may be None. ``image_path`` is the ground truth's CT."""

    case_id: str
    mask_path: Path | None = None
    centroids_path: Path | None = None
    image_path: Path | None = None


@dataclass(frozen=True)
class CaseFailure:
    """A case that could not be scored and why (the reason names the file)."""

    case_id: str
    error: str


@dataclass(frozen=True)
class FolderEvaluation:
    """Scores of the valid cases, the failed cases, and the aggregate over the valid ones."""

    cases: list[metrics.CaseMetrics]
    failures: list[CaseFailure]
    overall: metrics.AggregateMetrics
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "overall": {**self.overall.to_dict(), "num_failed": len(self.failures)},
            "cases": [case.to_dict() for case in self.cases],
            "failed": [{"case_id": f.case_id, "error": f.error} for f in self.failures],
        }


def _flat_cases(folder: Path, with_images: bool) -> dict[str, CaseFiles]:
    """``<id>_seg.nii[.gz]`` and ``<id>_ctd.json`` (and the CT ``<id>.<image suffix>``)."""
    found: dict[str, dict] = {}
    for item in sorted(folder.iterdir()):
        if not item.is_file() or item.name.startswith("."):
            continue
        for suffix, key in [*((m, "mask_path") for m in _MASK_NAMES), (_CENTROID_NAME, "ctd")]:
            if item.name.endswith(suffix):
                entry = found.setdefault(item.name[: -len(suffix)], {})
                entry.setdefault("centroids_path" if key == "ctd" else key, item)
                break
    cases = {}
    for case_id, entry in found.items():
        image = None
        if with_images:
            candidates = [folder / f"{case_id}{suffix}" for suffix in io.IMAGE_SUFFIXES]
            image = next((c for c in candidates if c.is_file()), None)
        cases[case_id] = CaseFiles(case_id, image_path=image, **entry)
    return cases


def find_predictions(folder) -> dict[str, CaseFiles]:
    """case id -> prediction files (``<id>_seg.nii[.gz]``, ``<id>_ctd.json``) of a folder."""
    return _flat_cases(Path(folder), with_images=False)


def find_ground_truth(folder) -> dict[str, CaseFiles]:
    """case id -> ground-truth files of a BIDS data set (``rawdata/``, ``derivatives/``) or of a
    flat folder (``<id>_seg.nii.gz``, ``<id>_ctd.json``, optionally the CT ``<id>.nii.gz``)."""
    folder = Path(folder)
    if (folder / "rawdata").is_dir():
        return {
            c.case_id: CaseFiles(c.case_id, c.mask_path, c.centroids_path, c.image_path)
            for c in io.find_cases(folder)
            if c.mask_path or c.centroids_path
        }
    return _flat_cases(folder, with_images=True)


def _check_labels(mask: Volume, path: Path) -> None:
    present = set(np.unique(mask.array).tolist()) - {0}
    unknown = sorted(present - VALID_LABELS)
    if unknown:
        raise io.VerseFormatError(f"{path}: labels {unknown} are not VerSe vertebra ids (1-25, 28)")


def _read_ground_truth(gt: CaseFiles) -> tuple[Volume | None, Geometry | None]:
    """Ground-truth mask (checked against its CT's grid) and the grid its centroids belong to."""
    mask = io.read_mask(gt.mask_path) if gt.mask_path else None
    if mask is not None:
        _check_labels(mask, gt.mask_path)
    grid = io.read_geometry(gt.image_path) if gt.image_path else None
    if mask is not None and grid is not None:
        where = f"{gt.mask_path} (ground-truth mask of {gt.image_path.name})"
        io.check_same_grid(grid, mask.geometry, where)
    return mask, grid or (mask.geometry if mask is not None else None)


def evaluate_case(pred: CaseFiles | None, gt: CaseFiles) -> metrics.CaseMetrics:
    """Scores of one case; a missing prediction (None or missing files) counts as all missed.

    Raises:
        ValueError: unreadable or inconsistent files (the message names the file).
    """
    pred = pred or CaseFiles(gt.case_id)
    gt_mask, gt_grid = _read_ground_truth(gt)
    pred_mask = io.read_mask(pred.mask_path) if pred.mask_path else None
    if pred_mask is not None:
        _check_labels(pred_mask, pred.mask_path)
    segmentation = localization = None
    if gt_mask is not None:
        on_gt = pred_mask
        if pred_mask is None:
            on_gt = Volume(np.zeros(gt_mask.geometry.size, np.uint16), gt_mask.geometry)
        elif not _same_grid(gt_mask.geometry, pred_mask.geometry):
            logger.info("%s: not on the ground truth's grid; resampled (nearest)", pred.mask_path)
            on_gt = preprocessing.resample(pred_mask, gt_mask.geometry, interpolation="nearest")
        segmentation = metrics.segmentation_metrics(
            np.asarray(on_gt.array), gt_mask.array, gt_mask.geometry.spacing_mm
        )
    if gt.centroids_path:
        if gt_grid is None:
            raise io.VerseFormatError(
                f"{gt.centroids_path}: centroids need their CT or mask for their grid"
            )
        gt_ctd = io.read_centroids(gt.centroids_path, gt_grid)
        pred_ctd = io.Centroids(np.zeros(0, np.int64), np.zeros((0, 3)))
        if pred.centroids_path:  # in the grid of its own mask, else of the CT it was made from
            pred_grid = pred_mask.geometry if pred_mask is not None else gt_grid
            pred_ctd = io.read_centroids(pred.centroids_path, pred_grid)
        localization = metrics.localization_metrics(pred_ctd, gt_ctd)
    return metrics.CaseMetrics(gt.case_id, localization, segmentation)


def _same_grid(a: Geometry, b: Geometry) -> bool:
    try:
        io.check_same_grid(a, b, "")
    except ValueError:
        return False
    return True


def match_cases(preds: dict[str, CaseFiles], gts: dict[str, CaseFiles], pred_dir, gt_dir):
    """Warnings for unmatched cases; ValueError when no prediction matches a ground-truth case."""
    if not gts:
        raise ValueError(f"{gt_dir}: no ground-truth cases (masks or centroid JSON) found")
    if not set(preds) & set(gts):
        raise ValueError(
            f"no prediction in {pred_dir} matches a ground-truth case in {gt_dir} "
            f"(predictions: {_listed(preds)}; ground truth: {_listed(gts)})"
        )
    warnings = [
        f"{i}: prediction without ground truth, ignored" for i in sorted(set(preds) - set(gts))
    ]
    for case_id in sorted(gts):
        pred, gt = preds.get(case_id), gts[case_id]
        if pred is None:
            warnings.append(f"{case_id}: no prediction, counted as all vertebrae missed")
            continue
        if gt.centroids_path and not pred.centroids_path:
            warnings.append(
                f"{case_id}: prediction has no centroid JSON ({case_id}{_CENTROID_NAME}), "
                "counted as all vertebrae missed"
            )
        if gt.mask_path and not pred.mask_path:
            warnings.append(
                f"{case_id}: prediction has no mask ({case_id}_seg.nii.gz), "
                "counted as all vertebrae missed"
            )
    return warnings


def _listed(cases: dict, limit: int = 5) -> str:
    ids = sorted(cases)
    more = f", ... ({len(ids) - limit} more)" if len(ids) > limit else ""
    return (", ".join(ids[:limit]) + more) if ids else "none"


def evaluate_folder(pred_dir, gt_dir) -> FolderEvaluation:
    """Evaluate every ground-truth case against ``pred_dir`` (nnU-Net's
    ``compute_metrics_on_folder`` in shape); one bad case fails alone.

    Raises:
        ValueError: a folder is missing, holds no ground truth, or no prediction matches.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder not found")
    preds, gts = find_predictions(pred_dir), find_ground_truth(gt_dir)
    warnings = match_cases(preds, gts, pred_dir, gt_dir)
    for warning in warnings:
        logger.warning("%s", warning)
    cases, failures = [], []
    for case_id in sorted(gts):
        try:
            cases.append(evaluate_case(preds.get(case_id), gts[case_id]))
        except Exception as error:  # one bad case must not stop the others
            logger.debug("case %s failed", case_id, exc_info=True)
            failures.append(CaseFailure(case_id, f"{type(error).__name__}: {error}"))
    return FolderEvaluation(cases, failures, metrics.aggregate_metrics(cases), warnings)


# ---------------------------------------------------------------------------------------------
# Reports: the table printed by `verse-jax evaluate`, evaluation.csv and evaluation.json


_COLUMNS = ("case", "num_gt", "num_pred", "id_rate", "mean_distance_mm", "dice", "hausdorff_mm")
_FAILED = {c: "" for c in _COLUMNS[1:]} | {"num_gt": "FAILED"}


def case_row(case: metrics.CaseMetrics) -> dict:
    """The table row of one scored case (`report_rows`)."""
    loc, seg = case.localization, case.segmentation
    return {
        "case": case.case_id,
        "num_gt": loc.num_gt if loc else (seg.num_gt if seg else ""),
        "num_pred": loc.num_pred if loc else (seg.num_pred if seg else ""),
        "id_rate": loc.id_rate if loc else math.nan,
        "mean_distance_mm": loc.mean_distance_mm if loc else math.nan,
        "dice": seg.mean_dice if seg else math.nan,
        "hausdorff_mm": seg.mean_hausdorff_mm if seg else math.nan,
    }


def format_table(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(row[c]) for c in _COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(_COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(_COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def report_rows(result: FolderEvaluation) -> list[dict]:
    """One row per case (failed cases marked FAILED), sorted by case id, then the overall row."""
    overall = result.overall
    rows = [case_row(case) for case in result.cases]
    rows += [{"case": f.case_id, **_FAILED} for f in result.failures]
    rows.sort(key=lambda row: row["case"])
    total = {"case": "overall", "num_gt": overall.num_gt_vertebrae}
    total |= {"num_pred": overall.num_pred_vertebrae, "id_rate": overall.id_rate}
    total |= {"mean_distance_mm": overall.mean_distance_mm, "dice": overall.dice}
    total |= {"hausdorff_mm": overall.hausdorff_mm}
    return [*rows, total]


def write_reports(result: FolderEvaluation, csv_path, json_path) -> None:
    """``evaluation.csv`` (`report_rows` plus each failure's error) and ``evaluation.json``
    (``result.to_dict()``, strict JSON), both written atomically."""
    errors = {f.case_id: f.error for f in result.failures}
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*_COLUMNS, "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows([{**row, "error": errors.get(row["case"], "")} for row in report_rows(result)])
    io.write_text_atomic(Path(csv_path), buffer.getvalue())
    io.write_text_atomic(Path(json_path), json.dumps(io.json_safe(result.to_dict()), indent=2))
