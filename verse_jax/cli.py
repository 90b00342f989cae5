"""Command line: ``verse-jax phantoms / bundle / predict / evaluate / preview / demo``.

Run ``verse-jax <command> -h`` for the options. Exit codes: 0 success, 1 some cases failed,
2 bad arguments or inputs (missing path, unusable model bundle).
"""

import argparse
import csv
import io as text_io
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from verse_jax import io, metrics

logger = logging.getLogger("verse_jax.cli")

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_MASK_SUFFIXES = ("_seg", "_msk", "_mask")


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")


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
    cases = io.find_cases(path)
    if cases:
        return [(case.case_id, case.image_path) for case in cases]
    found = []
    for item in sorted(path.iterdir()):
        stem = _strip_suffix(item.name)
        if item.is_file() and stem is not None and not stem.endswith(_MASK_SUFFIXES):
            found.append((case_id_from_path(item), item))
    folders = [path, *sorted(p for p in path.rglob("*") if p.is_dir())]
    found += [(case_id_from_path(f), f) for f in folders if _is_dicom_folder(f)]
    if not found:
        raise ValueError(f"{path}: no CT files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series")
    ids = [case_id for case_id, _ in found]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: several inputs share the case ids {duplicates}")
    return found


def _predict_one(case_id, ct_path, out_dir, model, args) -> None:
    from verse_jax import pipeline, preview

    image = io.read_volume(ct_path)
    pipeline.check_ct(image, str(ct_path))
    centroids, mask = pipeline.predict_case(image, model, overlap_z=args.overlap)
    labels = np.asarray(mask.array, np.uint16)
    io.write_volume(out_dir / f"{case_id}_seg.nii.gz", type(mask)(labels, mask.geometry))
    io.write_centroids(out_dir / f"{case_id}_ctd.json", centroids, image.geometry)
    if args.preview:
        preview.write_preview(
            out_dir / f"{case_id}_preview.png", image, mask, centroids, title=case_id
        )
    logger.info("%s: %d vertebrae %s", case_id, len(centroids.labels), centroids.labels.tolist())


def cmd_predict(args) -> int:
    from tqdm import tqdm

    model = _load_model(args.model)
    inputs = find_inputs(Path(args.input))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for case_id, ct_path in tqdm(inputs, desc="cases", unit="case", disable=args.quiet):
        try:
            _predict_one(case_id, ct_path, out_dir, model, args)
        except Exception as error:  # one bad case must not stop the others
            logger.debug("case %s failed", case_id, exc_info=True)
            failures.append((case_id, ct_path, f"{type(error).__name__}: {error}"))
    done = len(inputs) - len(failures)
    _write(f"predicted {done} of {len(inputs)} cases into {out_dir}")
    for case_id, ct_path, reason in failures:
        sys.stderr.write(f"FAILED {case_id} ({ct_path}): {reason}\n")
    return 1 if failures else 0


def _prediction_cases(folder: Path) -> dict[str, tuple[Path | None, Path | None]]:
    """case id -> (``<id>_seg.nii.gz``, ``<id>_ctd.json``) of a prediction folder."""
    cases: dict[str, list] = {}
    for path in sorted(folder.glob("*_seg.nii.gz")):
        cases.setdefault(path.name[: -len("_seg.nii.gz")], [None, None])[0] = path
    for path in sorted(folder.glob("*_ctd.json")):
        cases.setdefault(path.name[: -len("_ctd.json")], [None, None])[1] = path
    return {k: (v[0], v[1]) for k, v in cases.items()}


def _ground_truth_cases(folder: Path) -> dict[str, tuple[Path | None, Path | None]]:
    cases = io.find_cases(folder)
    if cases:
        return {c.case_id: (c.mask_path, c.centroids_path) for c in cases}
    return _prediction_cases(folder)


def _same_grid(a, b, path) -> bool:
    try:
        io.check_same_grid(b, a, path)
    except ValueError:
        logger.info("%s: not on the ground truth's grid; resampled (nearest)", path)
        return False
    return True


def _evaluate_case(case_id, pred_paths, gt_paths) -> metrics.CaseMetrics:
    from verse_jax import preprocessing
    from verse_jax.geometry import Volume

    gt_mask = io.read_mask(gt_paths[0]) if gt_paths[0] else None
    pred_mask = io.read_mask(pred_paths[0]) if pred_paths and pred_paths[0] else None
    localization = segmentation = None
    if gt_mask is not None:
        if pred_mask is None:  # no prediction: every vertebra is missed
            pred_mask = Volume(np.zeros(gt_mask.geometry.size, np.uint16), gt_mask.geometry)
        elif not _same_grid(pred_mask.geometry, gt_mask.geometry, pred_paths[0]):
            pred_mask = preprocessing.resample(pred_mask, gt_mask.geometry, interpolation="nearest")
        segmentation = metrics.segmentation_metrics(
            pred_mask.array, gt_mask.array, gt_mask.geometry.spacing_mm
        )
    if gt_paths[1]:
        if gt_mask is None:
            raise ValueError(f"{gt_paths[1]}: centroids need the ground-truth mask for their grid")
        gt_ctd = io.read_centroids(gt_paths[1], gt_mask.geometry)
        pred_ctd = io.Centroids(np.zeros(0, np.int64), np.zeros((0, 3)))
        if pred_paths and pred_paths[1]:
            grid = pred_mask.geometry if pred_paths[0] else gt_mask.geometry
            pred_ctd = io.read_centroids(pred_paths[1], grid)
        localization = metrics.localization_metrics(pred_ctd, gt_ctd)
    return metrics.CaseMetrics(case_id, localization, segmentation)


_COLUMNS = ("case", "num_gt", "num_pred", "id_rate", "mean_distance_mm", "dice", "hausdorff_mm")


def _row(case: metrics.CaseMetrics) -> dict:
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


def _format_table(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(row[c]) for c in _COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(_COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(_COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def cmd_evaluate(args) -> int:
    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder not found")
    preds, gts = _prediction_cases(pred_dir), _ground_truth_cases(gt_dir)
    if not gts:
        raise ValueError(f"{gt_dir}: no ground-truth cases (masks or centroid JSON) found")
    for case_id in sorted(set(preds) - set(gts)):
        logger.warning("%s: prediction without ground truth, ignored", case_id)
    for case_id in sorted(set(gts) - set(preds)):
        logger.warning("%s: no prediction, counted as all vertebrae missed", case_id)
    cases = [_evaluate_case(case_id, preds.get(case_id), gts[case_id]) for case_id in sorted(gts)]
    overall = metrics.aggregate_metrics(cases)
    rows = [_row(case) for case in cases]
    total = {"case": "overall", "num_gt": overall.num_gt_vertebrae}
    total |= {"num_pred": overall.num_pred_vertebrae, "id_rate": overall.id_rate}
    total |= {"mean_distance_mm": overall.mean_distance_mm, "dice": overall.dice}
    total |= {"hausdorff_mm": overall.hausdorff_mm}
    _write(_format_table([*rows, total]))
    out_dir = Path(args.output) if args.output else pred_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([*rows, total])
    io.write_text_atomic(out_dir / "evaluation.csv", buffer.getvalue())
    report = {"overall": overall.to_dict(), "cases": [case.to_dict() for case in cases]}
    io.write_text_atomic(out_dir / "evaluation.json", json.dumps(_json_safe(report), indent=2))
    _write(f"wrote {out_dir / 'evaluation.csv'} and {out_dir / 'evaluation.json'}")
    return 0


def cmd_preview(args) -> int:
    from verse_jax import preview

    image = io.read_volume(args.ct)
    mask = io.read_mask(args.mask) if args.mask else None
    centroids = io.read_centroids(args.centroids, image.geometry) if args.centroids else None
    out = preview.write_preview(args.output, image, mask, centroids, title=Path(args.ct).name)
    _write(f"wrote {out}")
    return 0


def cmd_phantoms(args) -> int:
    from verse_jax import phantoms

    extra = {} if args.max_voxels is None else {"max_voxels": args.max_voxels}
    ids = phantoms.write_phantom_dataset(args.out, args.cases, args.seed, **extra)
    _write(f"wrote {len(ids)} phantom cases into {args.out}")
    return 0


def cmd_bundle(args) -> int:
    from verse_jax import bundle

    out = bundle.make_bundle(args.output, spine=args.spine, scn=args.scn, seg=args.seg)
    _write(f"wrote model bundle {out}")
    return 0


def _load_model(path):
    """The bundle at ``path`` (the shipped demo model when None); its notice once on stderr."""
    from verse_jax import demo

    model, notice = demo.load_model(path)
    if notice:
        sys.stderr.write(notice + "\n")
    return model


def cmd_demo(args) -> int:
    from verse_jax import demo

    model = _load_model(args.model)
    extra = {} if args.max_voxels is None else {"max_voxels": args.max_voxels}
    result = demo.run_demo(
        args.out, model, seed=args.seed, fov=args.fov, overlap_z=args.overlap, **extra
    )
    if result.failure:
        sys.stderr.write(f"verse-jax demo: the model found nothing ({result.failure})\n")
    _write(_format_table([_row(result.scores)]))
    trained = model.extra.get("trained")
    state = {True: "trained", False: "UNTRAINED placeholder"}.get(trained, "")
    _write(f"model: {model.path}" + (f" ({state})" if state else ""))
    width = max(map(len, result.files))
    _write("\n".join(f"{name.ljust(width)}  {path}" for name, path in result.files.items()))
    return 0


def _add_demo_parser(sub) -> None:
    from verse_jax import demo, phantoms

    p = sub.add_parser("demo", help="predict and score one fresh phantom (shipped demo model)")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--seed",
        type=int,
        default=demo.DEMO_SEED,
        help=f"phantom seed (default {demo.DEMO_SEED}, not a training seed)",
    )
    p.add_argument("--fov", choices=phantoms.FIELDS_OF_VIEW, help="field of view (default drawn)")
    p.add_argument("--max-voxels", type=int, help="phantom voxel budget (coarser spacing above)")
    p.add_argument("--model", help="model bundle folder (default: the shipped demo model)")
    p.add_argument("--overlap", type=int, default=None, help="SCN window overlap in slices")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``verse-jax`` argument parser (one sub-command per task)."""
    parser = argparse.ArgumentParser(
        prog="verse-jax", description="Vertebra localisation and segmentation in spine CT."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="write a synthetic phantom data set (BIDS layout)")
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-voxels", type=int, help="voxel budget per case (coarser spacing above)")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("bundle", help="combine three stage exports into one model bundle")
    p.add_argument("--spine", required=True, help="spine localisation stage export folder")
    p.add_argument("--scn", required=True, help="vertebra localisation (SCN) stage export folder")
    p.add_argument("--seg", required=True, help="vertebra segmentation stage export folder")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("predict", help="centroids and vertebra masks for CTs")
    p.add_argument("-i", "--input", required=True, help="CT file, DICOM folder, data set or folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", help="model bundle folder (default: the shipped demo model)")
    p.add_argument("--preview", action="store_true", help="also write <id>_preview.png")
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="SCN window overlap in slices (default 3/4 of the window: 96 for paper models)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="id rate, distance, Dice, Hausdorff against ground truth")
    p.add_argument("--pred", required=True, help="folder with <id>_seg.nii.gz and <id>_ctd.json")
    p.add_argument("--gt", required=True, help="ground-truth data set (VerSe layout) or folder")
    p.add_argument("-o", "--output", help="folder for evaluation.csv/.json (default: --pred)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("preview", help="PNG with sagittal and coronal views of a CT")
    p.add_argument("ct", help="CT file or DICOM folder")
    p.add_argument("--mask", help="vertebra label mask on the CT's grid")
    p.add_argument("--centroids", help="centroid JSON (either VerSe flavour)")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_preview)
    _add_demo_parser(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``verse-jax`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else 10
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("verse_jax").setLevel(level)
    try:
        return args.func(args)
    except ValueError as error:  # bad inputs and model bundles carry their reason
        sys.stderr.write(f"verse-jax {args.command}: error: {error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
