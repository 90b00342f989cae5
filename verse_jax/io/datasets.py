"""Data set layouts: the cases of a VerSe folder (both layouts), its splits and folds, and the
command line's input discovery (files, DICOM folders, data sets).
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verse_jax.io.files import VerseFormatError
from verse_jax.io.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One scan of a data set: CT path and, when present, its mask and centroid JSON."""

    case_id: str
    image_path: Path
    mask_path: Path | None
    centroids_path: Path | None


_MICCAI_IMAGE = re.compile(r"^(?P<id>.*\d)\.nii(\.gz)?$")
_BIDS_IMAGE = re.compile(r"^(?P<prefix>sub-.+)_ct\.nii(\.gz)?$")


def _first_existing(candidates) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _miccai_cases(root: Path) -> list[Case]:
    cases = []
    for image in sorted(root.iterdir()):
        match = _MICCAI_IMAGE.match(image.name)
        if not match or not image.is_file():
            continue
        case_id = match["id"]
        mask = _first_existing([root / f"{case_id}_seg.nii.gz", root / f"{case_id}_seg.nii"])
        centroids = _first_existing([root / f"{case_id}_ctd.json"])
        cases.append(Case(case_id, image, mask, centroids))
    if not any(case.mask_path or case.centroids_path for case in cases):
        return []  # CTs whose names end in a digit, but no annotation: not a VerSe'19 data set
    return cases


def _bids_cases(root: Path) -> list[Case]:
    rawdata, derivatives = root / "rawdata", root / "derivatives"
    images = sorted([*rawdata.glob("sub-*/*_ct.nii*"), *rawdata.glob("sub-*/*/*_ct.nii*")])
    cases = []
    for image in images:
        match = _BIDS_IMAGE.match(image.name)
        if not match or not image.is_file():
            continue
        prefix = match["prefix"]
        subject = image.relative_to(rawdata).parts[0]
        found = sorted((derivatives / subject).rglob(f"{prefix}_*")) if derivatives.is_dir() else []
        by_name = {p.name: p for p in found}
        mask = by_name.get(f"{prefix}_seg-vert_msk.nii.gz") or by_name.get(
            f"{prefix}_seg-vert_msk.nii"
        )
        cases.append(
            Case(
                prefix.removeprefix("sub-"),
                image,
                mask,
                by_name.get(f"{prefix}_seg-subreg_ctd.json"),
            )
        )
    return cases


def find_cases(root) -> list[Case]:
    """Discover the scans of a data set folder, sorted by case id.

    Layouts:
        * MICCAI (VerSe'19): ``root/verseNNN.nii.gz`` (any name ending in a digit),
          ``verseNNN_seg.nii.gz``, ``verseNNN_ctd.json``; case id ``verseNNN``. Recognised only
          when at least one such CT has its mask or centroid JSON beside it.
        * BIDS (re-release, phantoms): ``root/rawdata/sub-<id>[/ses-*]/sub-<id>[_...]_ct.nii.gz``,
          ``root/derivatives/sub-<id>/.../<prefix>_seg-vert_msk.nii.gz`` and
          ``<prefix>_seg-subreg_ctd.json``; case id = file prefix without ``sub-`` (``<id>[_...]``).

    Returns:
        The cases; empty when ``root`` follows neither layout.

    Raises:
        VerseFormatError: ``root`` is not a folder, or two scans share a case id.
    """
    root = Path(root)
    if not root.is_dir():
        raise VerseFormatError(f"{root}: data set folder not found")
    cases = _miccai_cases(root) + _bids_cases(root)
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise VerseFormatError(f"{root}: duplicate case ids {duplicates}")
    return sorted(cases, key=lambda case: case.case_id)


def read_splits(root) -> dict[str, list[str]]:
    """Read ``root/splits.json`` -> {"train": [...], "val": [...], "test": [...]} (case ids).

    Missing standard keys are returned as empty lists; extra keys are kept.

    Raises:
        VerseFormatError: missing file, invalid JSON, not a dict of string lists.
    """
    path = Path(root) / "splits.json"
    if not path.is_file():
        raise VerseFormatError(f"{path}: file not found")
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VerseFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(splits, dict):
        raise VerseFormatError(f"{path}: expected a JSON object, got {type(splits).__name__}")
    for key, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise VerseFormatError(f"{path}: split {key!r} must be a list of case id strings")
    return {"train": [], "val": [], "test": [], **splits}


# Splits and cross-validation folds


NUM_FOLDS = 3
_FOLD_SEED = 0


def read_fold_file(path) -> dict[int, dict[str, list[str]]]:
    """A fixed cross-validation split: ``{"0": {"train": [ids], "val": [ids]}, "1": ..., ...}``.

    Lets a user reproduce given folds (e.g. the original's ``setup/cv/<fold>/{train,val}.txt``
    lists) instead of the seeded random split. ValueError naming the file otherwise.
    """
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the fold file ({error})") from error
    out = {}
    if not isinstance(folds, dict) or not folds:
        raise ValueError(f'{path}: expected {{"0": {{"train": [...], "val": [...]}}, ...}}')
    for key, parts in folds.items():
        ok = isinstance(parts, dict) and set(parts) == {"train", "val"}
        if not (key.isdigit() and ok and all(isinstance(v, list) for v in parts.values())):
            raise ValueError(
                f"{path}: fold {key!r} must be a digit key with 'train' and 'val' lists"
            )
        overlap = sorted(set(parts["train"]) & set(parts["val"]))
        if overlap:
            raise ValueError(f"{path}: fold {key} has cases in both train and val: {overlap}")
        out[int(key)] = {name: [str(i) for i in ids] for name, ids in parts.items()}
    return out


def select_case_ids(
    root, *, split: str | None = None, fold=None, part: str = "train", fold_file=None
) -> list[str]:
    """Case ids of a split, optionally one part of a 3-fold cross-validation inside it.

    Args:
        root: data set folder (``io.find_cases`` layouts; ``splits.json`` when ``split`` is given).
        split: a key of ``root/splits.json`` ("train", "val", "test"), or None for all cases.
        fold: None (the whole split), 0, 1, 2 (cross-validation fold) or "all" (the whole split as
            training data, nothing held out). Folds: the sorted ids, permuted with a fixed seed,
            every third id from position ``fold`` is held out.
        part: "train" or "val" part of the fold.
        fold_file: a fixed split (``read_fold_file``) used for an integer ``fold`` instead of the
            seeded one; its ids must be cases of ``root`` (and of ``split``, if given).
    """
    ids = [case.case_id for case in find_cases(root)]
    if split is not None:
        splits = read_splits(root)
        if split not in splits:
            raise ValueError(f"{root}/splits.json: no split {split!r} (has {sorted(splits)})")
        known = set(ids)
        missing = [i for i in splits[split] if i not in known]
        if missing:
            raise ValueError(f"{root}/splits.json: split {split!r} names unknown cases {missing}")
        ids = sorted(splits[split])
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if fold is None or fold == "all":
        return ids if part == "train" or fold is None else []
    if fold_file is not None:
        folds = read_fold_file(fold_file)
        if fold not in folds:
            raise ValueError(f"{fold_file}: no fold {fold!r} (has {sorted(folds)})")
        unknown = sorted(set(folds[fold][part]) - set(ids))
        if unknown:
            raise ValueError(
                f"{fold_file}: fold {fold} {part} names cases not in the data {unknown}"
            )
        return sorted(folds[fold][part])
    if fold not in range(NUM_FOLDS):
        raise ValueError(f"fold must be None, 'all' or 0..{NUM_FOLDS - 1}, got {fold!r}")
    order = np.random.default_rng(_FOLD_SEED).permutation(len(ids))
    held_out = {ids[i] for i in order[fold::NUM_FOLDS]}
    return [i for i in ids if (i in held_out) == (part == "val")]


# The command line's inputs


_MASK_SUFFIXES = ("_seg", "_msk", "_mask")


def _strip_suffix(name: str) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def case_id_from_path(path: Path) -> str:
    """Case id of a CT file or DICOM folder: name without extension, ``sub-X_ct`` -> ``X``."""
    stem = _strip_suffix(path.name) or path.name
    if stem.startswith("sub-") and stem.endswith("_ct"):
        stem = stem[4:-3]
    return stem


def _is_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a DICOM series (files named *.dcm, *.ima or without suffix)."""
    import SimpleITK as sitk

    names = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
    if not any(f.suffix.lower() in (".dcm", ".ima", "") for f in names):
        return False
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def find_inputs(path: Path) -> list[tuple[str, Path]]:
    """(case id, CT path) pairs of a file, a VerSe data set, or a folder of CTs / DICOM series.

    Raises:
        ValueError: ``path`` does not exist, or holds no CT.
    """
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        return [(case_id_from_path(path), path)]
    if (path / "rawdata").is_dir():  # BIDS data set: its CTs, by their structure
        cases = find_cases(path)
        if cases:
            return [(case.case_id, case.image_path) for case in cases]
    found, skipped = _plain_folder_inputs(path)
    if skipped:
        logger.warning("%s: skipped (not CT inputs): %s", path, _names(skipped))
    if not found:
        raise ValueError(f"{path}: no CT files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series")
    ids = [case_id for case_id, _ in found]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: several inputs share the case ids {duplicates}")
    return found


def _plain_folder_inputs(path: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Every CT file of a folder and every DICOM series below it; names of what is skipped
    (masks, other files, folders without a series); hidden entries are ignored."""
    folders = [path, *sorted(p for p in path.rglob("*") if p.is_dir())]
    dicom = [f for f in folders if not f.name.startswith(".") and _is_dicom_folder(f)]
    found, skipped = [], []
    for item in sorted(path.iterdir()):
        stem = _strip_suffix(item.name)
        if item.name.startswith("."):
            continue
        if item.is_dir():
            if not any(d == item or item in d.parents for d in dicom):
                skipped.append(item.name + "/")
        elif stem is not None and not stem.endswith(_MASK_SUFFIXES):
            found.append((case_id_from_path(item), item))
        elif not (path in dicom and item.suffix.lower() in (".dcm", ".ima", "")):
            skipped.append(item.name)
    found += [(case_id_from_path(f), f) for f in dicom]
    return found, skipped


def _names(names: list[str], limit: int = 20) -> str:
    more = f", and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
