"""Command line: ``verse-jax phantoms / bundle / predict / evaluate / preview / labels / demo``.

Run ``verse-jax <command> -h`` for the options. Exit codes: 0 success, 1 some cases failed,
2 bad arguments or inputs (missing path, unusable model bundle, unwritable or existing outputs),
found before any case runs.
"""

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from verse_jax import io
from verse_jax.infer import batch as batch_predict

logger = logging.getLogger("verse_jax.cli")


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")


def _check_output_folder(path: Path) -> None:
    """ValueError unless ``path`` is, or can be made, a folder this process can write into.

    Creates nothing that stays: writability is probed by creating and deleting a file in the
    folder (or in its nearest existing ancestor), which also holds for root and read-only mounts.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a folder")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{path}: cannot create this folder ({existing} is a file)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".verse-jax-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"{path}: cannot write into {existing} ({reason.lower()})") from error


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]}: exists{more}; pass --overwrite to replace")


def _prepare_output_folder(path: Path, names: list[str] | None = None) -> None:
    """Create the (checked) output folder; remove temporary files of killed runs in it (only those
    of the output file ``names`` if given)."""
    path.mkdir(parents=True, exist_ok=True)
    removed = io.remove_stale_temporaries(path, names)
    if removed:
        logger.info("%s: removed %d temporary files of an interrupted run", path, len(removed))


def _case_outputs(case_id: str, args) -> list[str]:
    """File names ``predict`` writes for one case."""
    names = [f"{case_id}_seg.nii.gz", f"{case_id}_ctd.json", f"{case_id}_stats.json"]
    names += [f"{case_id}_preview.png"] if args.preview else []
    names += [f"{case_id}_prob.nii.gz"] if args.save_probabilities else []
    return names + ([f"{case_id}_seg.dcm"] if args.output_type == "dicom-seg" else [])


def _check_overlap(overlap: int | None, window_z: int | None = None) -> None:
    if overlap is None:
        return
    if overlap < 0 or (window_z is not None and overlap >= window_z):
        upper = f"{window_z - 1}" if window_z is not None else "window - 1"
        raise ValueError(
            f"--overlap {overlap}: must lie in 0..{upper} (slices of the SCN window"
            + (f" of {window_z})" if window_z is not None else ")")
        )


def _read_case(case: tuple[str, Path], model):
    """The CT and its stage volumes (``inputs.prepare_case``); runs ahead in a thread."""
    from verse_jax.infer import inputs

    ct_path = case[1]
    image = io.read_volume(ct_path)
    inputs.check_ct(image, str(ct_path))
    return image, inputs.prepare_case(image, model)


def _predict_one(case_id, ct_path, out_dir, model, args, prepared) -> dict:
    from verse_jax import preview
    from verse_jax.infer import confidence, predict

    image, volumes = prepared
    margin = args.label_margin
    result = predict.predict_case_details(
        image,
        model,
        overlap_z=args.overlap,
        keep_probabilities=args.save_probabilities,
        margin_threshold=confidence.DEFAULT_MARGIN_THRESHOLD if margin is None else margin,
        volumes=volumes,
    )
    centroids, mask = result.centroids, result.mask
    labels = np.asarray(mask.array, np.uint16)
    io.write_volume(out_dir / f"{case_id}_seg.nii.gz", type(mask)(labels, mask.geometry))
    io.write_centroids(
        out_dir / f"{case_id}_ctd.json", centroids, image.geometry, args.centroid_format
    )
    if args.preview:
        preview.write_preview(
            out_dir / f"{case_id}_preview.png", image, mask, centroids, title=case_id
        )
    logger.info("%s: %d vertebrae %s", case_id, len(centroids.labels), centroids.labels.tolist())
    return _write_case_extras(case_id, ct_path, out_dir, image, result, args)


def _write_case_extras(case_id, ct_path, out_dir, image, result, args) -> dict:
    """Statistics JSON, probabilities and DICOM-SEG of one case; its CSV rows and confidence."""
    from verse_jax.infer import statistics
    from verse_jax.io import probabilities

    records = statistics.vertebra_statistics(
        image, result.mask, result.centroids, result.landmark_values
    )
    report = statistics.case_report(case_id, records, result.confidence)
    io.write_text_atomic(out_dir / f"{case_id}_stats.json", report)
    if result.probabilities is not None:
        probabilities.write_probabilities(out_dir / f"{case_id}_prob.nii.gz", result.probabilities)
    if args.output_type == "dicom-seg" and not np.any(result.mask.array):
        logger.warning("%s: empty mask, no DICOM-SEG written", case_id)
    elif args.output_type == "dicom-seg":
        from verse_jax.io import dicom_seg

        datasets = dicom_seg.series_datasets(ct_path)
        dicom_seg.write_dicom_seg(out_dir / f"{case_id}_seg.dcm", result.mask, datasets)
    return {"rows": statistics.csv_rows(case_id, records), "confidence": result.confidence}


def cmd_predict(args) -> int:
    from tqdm import tqdm

    _check_overlap(args.overlap)
    if args.output_type == "dicom-seg":
        from verse_jax.io import dicom_seg

        if not dicom_seg.available():
            raise ValueError(
                "--output-type dicom-seg needs highdicom: pip install 'verse-jax[dicom]'"
            )
    out_dir = Path(args.output)
    _check_output_folder(out_dir)
    # Before anything touches JAX: jax.distributed.initialize() must come first.
    shard = batch_predict.run_shard(args.shard, args.distributed)
    model = _load_model(args.model)
    _check_overlap(args.overlap, model.scn.grid.crop_size[2])
    all_inputs = io.find_inputs(Path(args.input))
    inputs = shard.select(all_inputs)
    not_dicom = [str(path) for _, path in inputs if not path.is_dir()]
    if args.output_type == "dicom-seg" and not_dicom:
        raise ValueError(f"--output-type dicom-seg needs DICOM series inputs, got {not_dicom}")
    names = [name for case_id, _ in inputs for name in _case_outputs(case_id, args)]
    names.append(shard.summary_name("statistics.csv"))
    _refuse_existing([out_dir / name for name in names], args.overwrite)
    _prepare_output_folder(out_dir, names if shard.count > 1 else None)
    failures, done = [], {}
    read = functools.partial(_read_case, model=model)
    cases = batch_predict.read_ahead(inputs, read, enabled=not args.no_overlap_io)
    progress = tqdm(cases, total=len(inputs), desc="cases", unit="case", disable=args.quiet)
    for (case_id, ct_path), prepared in progress:
        try:
            done[case_id] = _predict_one(case_id, ct_path, out_dir, model, args, prepared())
        except Exception as error:  # one bad case must not stop the others
            logger.debug("case %s failed", case_id, exc_info=True)
            failures.append((case_id, ct_path, f"{type(error).__name__}: {error}"))
    _write_summary(done, out_dir / shard.summary_name("statistics.csv"))
    part = f" (shard {shard} of {len(all_inputs)} cases)" if shard.count > 1 else ""
    _write(f"predicted {len(done)} of {len(inputs)} cases{part} into {out_dir}")
    for case_id, ct_path, reason in failures:
        sys.stderr.write(f"FAILED {case_id} ({ct_path}): {reason}\n")
    return 1 if failures else 0


def _write_summary(done: dict, path: Path) -> None:
    """statistics.csv (one row per vertebra of every case) and a line per uncertain labelling."""
    from verse_jax.infer import statistics

    rows = [row for case in done.values() for row in case["rows"]]
    io.write_text_atomic(path, statistics.format_csv(rows))
    for case_id, case in done.items():
        if case["confidence"].uncertain:
            _write(
                f"{case_id}: labelling uncertain, check the levels ({case['confidence'].reason})"
            )


def cmd_labels(args) -> int:
    from verse_jax import labels

    registry = labels.label_registry()
    if args.json:
        _write(json.dumps(registry, indent=2))
        return 0
    _write(f"{'id':>3}  {'name':<4}  colour")
    for entry in registry:
        _write(f"{entry['id']:>3}  {entry['name']:<4}  {entry['color']}")
    return 0


def cmd_evaluate(args) -> int:
    from verse_jax import evaluation

    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: folder not found")
    out_dir = Path(args.output) if args.output else pred_dir
    csv_path, json_path = out_dir / "evaluation.csv", out_dir / "evaluation.json"
    _check_output_folder(out_dir)
    _refuse_existing([csv_path, json_path], args.overwrite)
    result = evaluation.evaluate_folder(pred_dir, gt_dir)
    rows = evaluation.report_rows(result)
    _write(evaluation.format_table(rows))
    _prepare_output_folder(out_dir)
    evaluation.write_reports(result, csv_path, json_path)
    _write(f"wrote {csv_path} and {json_path}")
    for failure in result.failures:
        sys.stderr.write(f"FAILED {failure.case_id}: {failure.error}\n")
    if result.failures:
        cases = len(rows) - 1  # without the overall row
        _write(f"{len(result.failures)} of {cases} cases failed; overall is over the others")
    return 1 if result.failures else 0


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
    if args.workers is not None:
        extra["workers"] = args.workers
    ids = phantoms.write_phantom_dataset(args.out, args.cases, args.seed, **extra)
    _write(f"wrote {len(ids)} phantom cases into {args.out}")
    return 0


def cmd_bundle(args) -> int:
    from verse_jax.infer import bundle

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
    from verse_jax import demo, evaluation

    model = _load_model(args.model)
    extra = {} if args.max_voxels is None else {"max_voxels": args.max_voxels}
    result = demo.run_demo(
        args.out, model, seed=args.seed, fov=args.fov, overlap_z=args.overlap, **extra
    )
    if result.failure:
        sys.stderr.write(f"verse-jax demo: the model found nothing ({result.failure})\n")
    _write(evaluation.format_table([evaluation.case_row(result.scores)]))
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
    p.add_argument(
        "--workers",
        type=int,
        help="processes drawing cases (default: one per core, >= 4 cases each; same files)",
    )
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
    p.add_argument(
        "--centroid-format",
        choices=io.CENTROID_FORMATS,
        default="bids",
        help="<id>_ctd.json flavour: bids (voxels + axis codes) or verse19 (MICCAI millimetres)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_predict_extras(p)
    batch_predict.add_arguments(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="id rate, distance, Dice, Hausdorff against ground truth")
    p.add_argument("--pred", required=True, help="folder with <id>_seg.nii.gz and <id>_ctd.json")
    p.add_argument("--gt", required=True, help="ground-truth data set (VerSe layout) or folder")
    p.add_argument("-o", "--output", help="folder for evaluation.csv/.json (default: --pred)")
    p.add_argument("--overwrite", action="store_true", help="replace existing evaluation files")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("preview", help="PNG with sagittal and coronal views of a CT")
    p.add_argument("ct", help="CT file or DICOM folder")
    p.add_argument("--mask", help="vertebra label mask on the CT's grid")
    p.add_argument("--centroids", help="centroid JSON (either VerSe flavour)")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("labels", help="the VerSe label registry: id, name, preview colour")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_labels)
    _add_demo_parser(sub)
    return parser


def _add_predict_extras(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <id>_prob.nii.gz: the winning vertebra's probability per voxel",
    )
    p.add_argument(
        "--output-type",
        choices=("nifti", "dicom-seg"),
        default="nifti",
        help="dicom-seg: also write <id>_seg.dcm for DICOM series inputs (needs highdicom)",
    )
    p.add_argument(
        "--label-margin",
        type=float,
        default=None,
        help="flag a labelling whose margin per vertebra over a one-level alternative is below "
        "this (default confidence.DEFAULT_MARGIN_THRESHOLD, provisional 0.15)",
    )


def main(argv=None) -> int:
    """Entry point of the ``verse-jax`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else 10
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("verse_jax").setLevel(level)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # bad inputs and model bundles carry their reason
        sys.stderr.write(f"verse-jax {args.command}: error: {error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
