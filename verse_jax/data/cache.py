"""The per-case, per-stage disk cache of resampled volumes (stage definitions: ``stages``).

Once per case and stage (host, SimpleITK through ``preprocessing``): the CT on the stage's
isotropic axis-aligned grid (``preprocessing.to_stage_grid``), the label mask resampled nearest
onto it (stage "seg"), the landmark mask of reference §5.2 (stage "scn") and the landmark positions
in stage voxels. Stored as ``.npy`` files memory-mapped on reading, in a folder keyed by case id and
a hash of the stage settings and the source files, written atomically (temporary folder + rename).
The image is cached as float16 (normalised values in [-1, 1]: at most 1 HU rounding error).
"""

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from verse_jax import io, preprocessing
from verse_jax import workers as workers_lib
from verse_jax.geometry import Geometry, Volume
from verse_jax.io.files import atomic_directory
from verse_jax.stages import StageSpec, mask_margin_slices

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StageCase:
    """One case on a stage grid (arrays memory-mapped from the cache).

    Attributes:
        case_id: data set case id.
        image: (x, y, z) float16 normalised CT (-0.5 = -1024 HU).
        labels: (x, y, z) uint8 VerSe ids (stage "seg"), else None.
        landmark_mask: (x, y, z) uint8 in {0, 1} (stage "scn"), else None.
        landmarks_vox: (K, 3) float32 continuous stage voxel index (zeros where invalid).
        valid: (K,) bool.
        geometry: the stage grid (identity direction, isotropic spacing).
    """

    case_id: str
    image: np.ndarray
    labels: np.ndarray | None
    landmark_mask: np.ndarray | None
    landmarks_vox: np.ndarray
    valid: np.ndarray
    geometry: Geometry


def _source_fingerprint(case: io.Case) -> list:
    paths = (case.image_path, case.mask_path, case.centroids_path)
    out = []
    for path in paths:
        if path is not None:
            stat = Path(path).stat()
            out.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def cache_path(case: io.Case, spec: StageSpec, cache_dir) -> Path:
    """Folder of one case's cached stage arrays: ``<cache_dir>/<case_id>-<hash>``."""
    key = {"version": CACHE_VERSION, "stage": spec.cache_key(), "source": _source_fingerprint(case)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{case.case_id}-{digest}"


def _landmark_mask(image: Volume, stage: Geometry, spec: StageSpec) -> np.ndarray:
    """Reference §5.2 mask: ones on the scan grid except a margin at both z ends, resampled."""
    axis = int(np.argmax(np.abs(image.geometry.matrix[2])))  # index axis closest to world z
    cut = mask_margin_slices(spec, image.geometry.spacing_mm[axis])
    ones = np.ones(image.geometry.size, np.uint8)
    index = [slice(None)] * 3
    index[axis] = slice(0, cut)
    ones[tuple(index)] = 0
    index[axis] = slice(max(image.geometry.size[axis] - cut, 0), None)
    ones[tuple(index)] = 0
    mask = preprocessing.resample(
        Volume(ones, image.geometry), stage, interpolation="nearest", default_value=0.0
    )
    return np.asarray(mask.array, np.uint8)


def _compute_arrays(case: io.Case, spec: StageSpec) -> tuple[dict, dict]:
    image = io.read_volume(case.image_path)
    stage = preprocessing.to_stage_grid(
        image, spacing_mm=spec.spacing_mm, smoothing_mm=spec.smoothing_mm
    )
    arrays = {"image": np.asarray(stage.array, np.float16)}
    points_vox = np.zeros((spec.num_landmarks, 3), np.float32)
    valid = np.zeros((spec.num_landmarks,), bool)
    if case.centroids_path is not None:
        centroids = io.read_centroids(case.centroids_path, image.geometry)
        points_mm, valid = io.centroids_to_landmarks(centroids, spec.num_landmarks)
        points_vox = np.where(valid[:, None], stage.geometry.physical_to_index(points_mm), 0.0)
    if spec.name == "seg":
        if case.mask_path is None:
            raise ValueError(f"case {case.case_id}: stage 'seg' needs a mask, none found")
        mask = preprocessing.resample(
            io.read_mask(case.mask_path), stage.geometry, interpolation="nearest"
        )
        if np.max(mask.array, initial=0) > 255:
            raise ValueError(f"{case.mask_path}: label ids above 255")
        arrays["labels"] = np.asarray(mask.array, np.uint8)
    if spec.name == "scn":
        arrays["landmark_mask"] = _landmark_mask(image, stage.geometry, spec)
    geometry = dataclasses.asdict(stage.geometry)
    meta = {"case_id": case.case_id, "geometry": geometry, "stage": spec.cache_key()}
    meta |= {"landmarks_vox": np.asarray(points_vox, np.float32).tolist()}
    meta |= {"valid": np.asarray(valid, bool).tolist()}
    return arrays, meta


def build_stage_case(case: io.Case, spec: StageSpec, cache_dir) -> Path:
    """Computes and caches one case on the stage grid unless cached already; returns its folder."""
    target = cache_path(case, spec, cache_dir)
    if _is_cached(target):
        return target
    _store(case, spec, cache_dir)
    logger.info("cached %s stage %s at %s", case.case_id, spec.name, target)
    return target


def _store(case: io.Case, spec: StageSpec, cache_dir) -> Path:
    """Computes and writes one case's cache folder (atomically); a worker process's job."""
    target = cache_path(case, spec, cache_dir)
    arrays, meta = _compute_arrays(case, spec)
    with atomic_directory(target, complete="meta.json") as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "meta.json").write_text(json.dumps(meta))
    return target


def load_stage_case(path) -> StageCase:
    """Opens a cached case (arrays memory-mapped read-only)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a stage cache folder ({error})") from error
    load = lambda name: (
        np.load(path / f"{name}.npy", mmap_mode="r") if (path / f"{name}.npy").is_file() else None
    )
    return StageCase(
        case_id=meta["case_id"],
        image=load("image"),
        labels=load("labels"),
        landmark_mask=load("landmark_mask"),
        landmarks_vox=np.asarray(meta["landmarks_vox"], np.float32).reshape(-1, 3),
        valid=np.asarray(meta["valid"], bool),
        geometry=Geometry(**meta["geometry"]),
    )


def prepare_stage_cases(
    cases: list[io.Case], spec: StageSpec, cache_dir, *, workers: int | None = None
) -> list[Path]:
    """Caches every case; returns the cache folders in the same order.

    Cases not cached yet are computed in ``workers`` processes (None:
    ``verse_jax.workers.default_workers`` of their number; 1: in this process). Each case depends
    on its own files only, so the cache is the same for any number of workers.
    """
    paths = [cache_path(case, spec, cache_dir) for case in cases]
    # each missing folder once (a case listed twice is computed once)
    todo = list({p: c for p, c in zip(paths, cases, strict=True) if not _is_cached(p)}.values())
    if todo:
        count = workers_lib.default_workers(len(todo)) if workers is None else int(workers)
        jobs = [(case, spec, cache_dir) for case in todo]
        results = workers_lib.map_in_processes(_store, jobs, count)
        for case, target in zip(todo, results, strict=True):
            logger.info("cached %s stage %s at %s", case.case_id, spec.name, target)
    return paths


def _is_cached(path: Path) -> bool:
    return (path / "meta.json").is_file()
