"""Phantom data sets in the VerSe BIDS layout: seeded cases, their split and the cached default."""

import json
import logging
import time
from pathlib import Path

import numpy as np

from verse_jax import workers as workers_lib
from verse_jax.io.centroids import write_centroids
from verse_jax.io.files import atomic_directory, write_text_atomic
from verse_jax.io.images import write_mask, write_volume
from verse_jax.phantoms.render import (
    DEFAULT_MAX_VOXELS,
    DEFAULT_NUM_CASES,
    PHANTOM_VERSION,
    generate_phantom,
)
from verse_jax.workers import default_workers

logger = logging.getLogger(__name__)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a data set drawn with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def split_cases(case_ids: list[str], seed: int = 0) -> dict[str, list[str]]:
    """Shuffle case ids into train/val/test (about 70/15/15; >= 1 val and test from 3 cases)."""
    ids = [case_ids[i] for i in np.random.default_rng(int(seed)).permutation(len(case_ids))]
    held_out = max(1, round(0.15 * len(ids))) if len(ids) >= 3 else 0
    return {
        "train": sorted(ids[2 * held_out :]),
        "val": sorted(ids[:held_out]),
        "test": sorted(ids[held_out : 2 * held_out]),
    }


def _write_case(out: Path, case_id: str, seed: int, max_voxels: int) -> tuple[str, int, float]:
    """Generate and write one case; returns ``(grid size, number of vertebrae, seconds)``."""
    start = time.perf_counter()
    phantom = generate_phantom(seed, max_voxels=max_voxels)
    raw, derived = out / "rawdata" / f"sub-{case_id}", out / "derivatives" / f"sub-{case_id}"
    raw.mkdir(parents=True, exist_ok=True)
    derived.mkdir(parents=True, exist_ok=True)
    write_volume(raw / f"sub-{case_id}_ct.nii.gz", phantom.image)
    write_mask(derived / f"sub-{case_id}_seg-vert_msk.nii.gz", phantom.mask)
    write_centroids(
        derived / f"sub-{case_id}_seg-subreg_ctd.json", phantom.centroids, phantom.mask.geometry
    )
    size = "x".join(map(str, phantom.image.geometry.size))
    return size, len(phantom.centroids.labels), time.perf_counter() - start


def write_phantom_dataset(
    out_dir,
    num_cases: int,
    seed: int = 0,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    workers: int | None = None,
) -> list[str]:
    """Write ``num_cases`` phantoms in the BIDS VerSe layout plus ``splits.json``.

    Layout: ``rawdata/sub-<id>/sub-<id>_ct.nii.gz``, ``derivatives/sub-<id>/sub-<id>_seg-vert_msk
    .nii.gz`` and ``derivatives/sub-<id>/sub-<id>_seg-subreg_ctd.json`` with ids ``phantom000``,
    ``phantom001``, ...; case i is ``generate_phantom(case_seed(seed, i), max_voxels=...)``.
    Cases are drawn in ``workers`` processes (None: ``default_workers``; 1: in this process);
    each case depends on its own seed only, so the files are the same for any number of workers.

    Returns:
        The case ids, in order.
    """
    if int(num_cases) < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    workers = default_workers(num_cases) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    case_ids = [f"phantom{i:03d}" for i in range(int(num_cases))]
    jobs = [(out, case_id, case_seed(seed, i), max_voxels) for i, case_id in enumerate(case_ids)]

    def report(i: int, result: tuple[str, int, float]) -> None:
        size, count, seconds = result
        message = "phantom %d/%d %s: %s voxels, %d vertebrae, %.1f s"
        logger.info(message, i + 1, len(case_ids), case_ids[i], size, count, seconds)

    for i, result in enumerate(workers_lib.map_in_processes(_write_case, jobs, workers)):
        report(i, result)
    splits_path = out / "splits.json"
    write_text_atomic(splits_path, json.dumps(split_cases(case_ids, seed), indent=1) + "\n")
    return case_ids


def default_dataset(
    cache_dir=None,
    num_cases: int = DEFAULT_NUM_CASES,
    seed: int = 0,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Path:
    """The default phantom data set, generated once (atomically) into a cache folder.

    Args:
        cache_dir: folder of the data set; default ``~/.cache/verse-jax/phantoms-v<version>-
            <num_cases>-<seed>`` (``PHANTOM_VERSION``).
        num_cases: number of cases (default 32: about 1 CPU minute, 2-3 minutes on a busy
            2-core machine, 260 MB).
        seed: data set seed.
        max_voxels: voxel budget per case (see ``generate_phantom``).

    Returns:
        The folder (BIDS layout + ``splits.json``, readable with ``verse_jax.io.find_cases``).
    """
    if cache_dir is None:
        name = f"phantoms-v{PHANTOM_VERSION}-{num_cases}-{seed}"
        if max_voxels != DEFAULT_MAX_VOXELS:
            name += f"-{max_voxels}"
        cache_dir = Path.home() / ".cache" / "verse-jax" / name
    path = Path(cache_dir)
    if (path / "splits.json").is_file():
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists but is not a complete phantom data set (no splits.json)")
    logger.info("generating %d phantoms into %s", num_cases, path)
    with atomic_directory(path, complete="splits.json") as temporary:
        write_phantom_dataset(temporary, num_cases, seed, max_voxels=max_voxels)
    return path
