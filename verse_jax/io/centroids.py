"""Centroid JSON in both VerSe flavours (VerSe'19 millimetres, BIDS voxels) and landmark arrays."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verse_jax import labels as label_ids
from verse_jax.geometry import Geometry, axis_codes, reorientation_to_codes
from verse_jax.io.files import VerseFormatError, write_text_atomic


@dataclass(frozen=True, eq=False)  # array fields: compare arrays explicitly
class Centroids:
    """Vertebra centroids.

    Attributes:
        labels: (N,) int64 VerSe ids (1-25, 28).
        points_mm: (N, 3) float64 physical points, LPS mm.
    """

    labels: np.ndarray
    points_mm: np.ndarray

    def __post_init__(self):
        labels = np.asarray(self.labels)
        points = np.asarray(self.points_mm, np.float64)
        if labels.ndim != 1:
            raise ValueError(f"Centroids labels must have shape (N,), got {labels.shape}")
        if points.shape != (labels.shape[0], 3):
            raise ValueError(
                f"Centroids points_mm must have shape ({labels.shape[0]}, 3), got {points.shape}"
            )
        if labels.size and not np.all(labels == np.round(labels)):
            raise ValueError(f"Centroids labels must be integers, got {labels}")
        if not np.all(np.isfinite(points)):
            raise ValueError("Centroids points_mm must be finite")
        object.__setattr__(self, "labels", labels.astype(np.int64))
        object.__setattr__(self, "points_mm", points)


# VerSe'19 (MICCAI) JSON axes are millimetres in the RAI-reoriented (identity direction), origin-0
# image: internal x = Z, y = Y, z = S_z * h_z - X (docs/reference.md §2.2).
_IDENTITY_CODES = ("L", "P", "S")


def _load_json_list(path: Path) -> list:
    if not path.is_file():
        raise VerseFormatError(f"{path}: file not found")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VerseFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(entries, list):
        raise VerseFormatError(f"{path}: expected a JSON list, got {type(entries).__name__}")
    return entries


def _parse_entry(entry, path: Path, position: int) -> tuple[int, tuple[float, float, float]]:
    if not isinstance(entry, dict):
        raise VerseFormatError(f"{path}: entry {position} is not an object: {entry!r}")
    missing = [key for key in ("label", "X", "Y", "Z") if key not in entry]
    if missing:
        raise VerseFormatError(f"{path}: entry {position} misses keys {missing}: {entry!r}")
    label, coords = entry["label"], [entry[key] for key in ("X", "Y", "Z")]
    if not _is_finite_number(label) or label != int(label):
        raise VerseFormatError(f"{path}: entry {position} has a non-integer label {label!r}")
    if int(label) not in label_ids.VALID_LABELS:
        raise VerseFormatError(f"{path}: entry {position} has unknown VerSe label id {label}")
    for value in coords:
        if not _is_finite_number(value):
            raise VerseFormatError(f"{path}: entry {position} has a bad coordinate {value!r}")
    return int(label), tuple(float(v) for v in coords)


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _verse19_to_reoriented_index(coords: np.ndarray, reoriented: Geometry) -> np.ndarray:
    """VerSe'19 JSON (N, 3) mm -> continuous index in the identity-oriented (LPS codes) grid."""
    size, spacing = np.array(reoriented.size), np.array(reoriented.spacing_mm)
    internal_mm = np.stack(
        [coords[:, 2], coords[:, 1], size[2] * spacing[2] - coords[:, 0]], axis=-1
    )
    return internal_mm / spacing


def read_centroids(json_path, geometry: Geometry) -> Centroids:
    """Read a centroid JSON of either VerSe flavour into physical points of ``geometry``'s world.

    * BIDS/re-released: first entry ``{"direction": [c0, c1, c2]}`` (to-naming axis codes), then
      ``{label, X, Y, Z}`` continuous voxel indices of the image reoriented (permute/flip only) so
      that its index axes point towards the codes. Mapped back through that reorientation and the
      image's exact (possibly oblique) geometry.
    * VerSe'19/MICCAI: no direction entry; millimetres in the identity-oriented, origin-0 image.

    Args:
        json_path: the ``*_ctd.json`` file.
        geometry: grid of the image (or mask) the centroids belong to.

    Raises:
        VerseFormatError: missing/invalid JSON, unknown labels, missing keys, non-finite values.
    """
    path = Path(json_path)
    entries = _load_json_list(path)
    codes = None
    if entries and isinstance(entries[0], dict) and "direction" in entries[0]:
        codes, entries = entries[0]["direction"], entries[1:]
        if not isinstance(codes, list | tuple) or not all(isinstance(c, str) for c in codes):
            raise VerseFormatError(f"{path}: bad direction entry {codes!r}")
    parsed = [_parse_entry(entry, path, i + (codes is not None)) for i, entry in enumerate(entries)]
    labels = np.array([label for label, _ in parsed], np.int64)
    coords = np.array([c for _, c in parsed], np.float64).reshape(-1, 3)
    if len(set(labels.tolist())) != len(labels):
        raise VerseFormatError(f"{path}: duplicate labels {sorted(labels.tolist())}")
    try:
        record = reorientation_to_codes(geometry, _IDENTITY_CODES if codes is None else codes)
    except ValueError as error:
        raise VerseFormatError(f"{path}: {error}") from error
    if codes is None:
        coords = _verse19_to_reoriented_index(coords, record.geometry)
    points_mm = geometry.index_to_physical(record.to_original_index(coords))
    return Centroids(labels, points_mm.reshape(-1, 3))


CENTROID_FORMATS = ("bids", "verse19")


def write_centroids(json_path, centroids: Centroids, geometry: Geometry, fmt: str = "bids") -> None:
    """Write centroids atomically in either VerSe flavour (``read_centroids`` reads both).

    ``"bids"`` (default): the grid's axis codes ``axis_codes(geometry.direction)`` and plain
    continuous voxel indices of ``geometry``. ``"verse19"``: the MICCAI release's millimetres in
    the identity-oriented, origin-0 image (``X = S_z h_z - z``, ``Y = y``, ``Z = x``), as the
    original's writer and evaluators for that release expect. Full float precision is kept
    (write -> read is exact to ~1e-9 mm).
    """
    if fmt not in CENTROID_FORMATS:
        raise ValueError(f"centroid format must be one of {CENTROID_FORMATS}, got {fmt!r}")
    path = Path(json_path)
    points_vox = geometry.physical_to_index(centroids.points_mm).reshape(-1, 3)
    entries: list[dict] = []
    if fmt == "bids":
        entries.append({"direction": list(axis_codes(geometry.direction))})
        coords = points_vox
    else:
        record = reorientation_to_codes(geometry, _IDENTITY_CODES)
        size = np.array(record.geometry.size, np.float64)
        spacing = np.array(record.geometry.spacing_mm, np.float64)
        internal_mm = record.from_original_index(points_vox).reshape(-1, 3) * spacing
        coords = np.stack(
            [size[2] * spacing[2] - internal_mm[:, 2], internal_mm[:, 1], internal_mm[:, 0]], -1
        )
    for label, (x, y, z) in zip(centroids.labels.tolist(), coords.tolist(), strict=True):
        entries.append({"label": int(label), "X": x, "Y": y, "Z": z})
    write_text_atomic(path, json.dumps(entries) + "\n")


def centroids_to_landmarks(
    centroids: Centroids, num_landmarks: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids -> landmark arrays indexed by ``labels.label_to_index``.

    Returns:
        points_mm (K, 3) float64 (zeros where invalid), valid (K,) bool.

    Raises:
        ValueError: a label has no index among ``num_landmarks`` (e.g. T13 with 25 landmarks).
    """
    points = np.zeros((num_landmarks, 3), np.float64)
    valid = np.zeros((num_landmarks,), bool)
    for label, point in zip(centroids.labels.tolist(), centroids.points_mm, strict=True):
        index = label_ids.label_to_index(label, num_landmarks)
        points[index], valid[index] = point, True
    return points, valid


def landmarks_to_centroids(points_mm, valid) -> Centroids:
    """Landmark arrays points_mm (K, 3), valid (K,) bool -> Centroids of the valid ones."""
    points_mm, valid = np.asarray(points_mm, np.float64), np.asarray(valid, bool)
    if points_mm.ndim != 2 or points_mm.shape[1] != 3 or valid.shape != points_mm.shape[:1]:
        raise ValueError(
            f"expected points_mm (K, 3) and valid (K,), got {points_mm.shape}, {valid.shape}"
        )
    labels = label_ids.index_to_label_array(points_mm.shape[0])
    return Centroids(labels[valid], points_mm[valid])
