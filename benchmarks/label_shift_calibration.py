"""Calibrate the label-shift flag (`infer.confidence`) on held-out phantoms with a trained bundle.

Draws fresh phantoms with a seed no training run used (held out by construction), runs stages 1-2
of `predict_case` on each (no segmentation: the flag only needs the landmarks), and records the
labelling margin and whether the labelling is wrong: a predicted centroid whose nearest
ground-truth centroid (within the VerSe 20 mm) carries another label. The first half of the cases
chooses the threshold (largest catch rate minus false-alarm rate, ties to the smaller threshold);
the second half reports, at that threshold and at the provisional default:

* catch rate: flagged wrong labellings / wrong labellings;
* false-alarm rate: flagged correct labellings / correct labellings.

    python benchmarks/label_shift_calibration.py --bundle bundle               # 40 cases, seed 1001
    python benchmarks/label_shift_calibration.py --bundle bundle --cases 80 --seed 2002

Writes `benchmarks/results/label_shift_calibration-<device>-<N>-cases-<date>.json` (per-case
margins included) and prints the summary.
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import common as bench
from verse_jax import io, phantoms
from verse_jax.infer import bundle as bundle_lib
from verse_jax.infer import confidence as label_confidence
from verse_jax.infer import inputs, predict

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = tuple(round(float(t), 3) for t in np.arange(0.0, 0.505, 0.025))


def is_mislabelled(pred: io.Centroids, gt: io.Centroids, max_distance_mm: float = 20.0) -> bool:
    """Whether a predicted centroid's nearest ground truth (within the radius) has another label."""
    if not len(pred.labels) or not len(gt.labels):
        return False
    distance = np.linalg.norm(pred.points_mm[:, None] - gt.points_mm[None], axis=-1)
    nearest = np.argmin(distance, axis=1)
    close = distance[np.arange(len(nearest)), nearest] <= max_distance_mm
    return bool(np.any(close & (gt.labels[nearest] != pred.labels)))


def case_record(image, gt: io.Centroids, model) -> dict:
    """Margin, flag inputs and correctness of one case (stages 1-2 only)."""
    grids = {"spine": model.spine.grid, "scn": model.scn.grid}
    volumes = inputs.stage_volumes(image, grids)
    try:
        spine_mm = predict.predict_spine(volumes["spine"], model.spine)
    except predict.NoSpineFoundError:
        return {"margin": None, "no_sequence": True, "mislabelled": True, "labels": []}
    candidates, sequence = predict.predict_landmark_sequence(volumes["scn"], spine_mm, model.scn)
    confidence = label_confidence.label_confidence(candidates, sequence)
    pred = io.landmarks_to_centroids(sequence.points_mm, sequence.valid)
    return {
        "margin": confidence.margin if not math.isnan(confidence.margin) else None,
        "no_sequence": math.isnan(confidence.margin),
        "mislabelled": is_mislabelled(pred, gt),
        "labels": pred.labels.tolist(),
        "gt_labels": gt.labels.tolist(),
        "best_alternative": confidence.reason,
    }


def flagged(record: dict, threshold: float) -> bool:
    """The flag of `label_confidence` at ``threshold`` (margin None: inf or no sequence)."""
    if record["no_sequence"]:
        return True
    return record["margin"] is not None and record["margin"] < threshold


def rates(records: list[dict], threshold: float) -> dict:
    """Catch and false-alarm rates (nan where a class is empty) and the counts."""
    wrong = [r for r in records if r["mislabelled"]]
    right = [r for r in records if not r["mislabelled"]]
    caught = sum(flagged(r, threshold) for r in wrong)
    alarms = sum(flagged(r, threshold) for r in right)
    return {
        "threshold": threshold,
        "wrong": len(wrong),
        "correct": len(right),
        "caught": caught,
        "false_alarms": alarms,
        "catch_rate": caught / len(wrong) if wrong else math.nan,
        "false_alarm_rate": alarms / len(right) if right else math.nan,
    }


def choose_threshold(records: list[dict], thresholds=THRESHOLDS) -> float:
    """Threshold with the largest catch rate minus false-alarm rate (ties: the smaller)."""

    def youden(t):
        r = rates(records, t)
        catch = 0.0 if math.isnan(r["catch_rate"]) else r["catch_rate"]
        alarm = 0.0 if math.isnan(r["false_alarm_rate"]) else r["false_alarm_rate"]
        return round(catch - alarm, 9)  # equal fractions compare equal

    return max(thresholds, key=lambda t: (youden(t), -t))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="trained model bundle folder")
    parser.add_argument("--cases", type=int, default=40, help="held-out phantoms (default 40)")
    parser.add_argument("--seed", type=int, default=1001, help="data set seed (default 1001)")
    parser.add_argument("--max-voxels", type=int, default=None, help="phantom voxel budget")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    model = bundle_lib.load_bundle(args.bundle)
    extra = {} if args.max_voxels is None else {"max_voxels": args.max_voxels}
    records = []
    with tempfile.TemporaryDirectory() as folder:
        phantoms.write_phantom_dataset(folder, args.cases, args.seed, **extra)
        for case in io.find_cases(folder):
            image = io.read_volume(case.image_path)
            gt = io.read_centroids(case.centroids_path, image.geometry)
            record = {"case": case.case_id, **case_record(image, gt, model)}
            records.append(record)
            print(json.dumps(record), file=sys.stderr)
    half = len(records) // 2
    calibration, evaluation = records[:half], records[half:]
    chosen = choose_threshold(calibration)
    result = {
        **bench.header("label_shift_calibration", f"{args.cases}-cases", argv),
        "bundle": str(args.bundle),
        "cases": args.cases,
        "seed": args.seed,
        "chosen_threshold": chosen,
        "calibration": rates(calibration, chosen),
        "evaluation": rates(evaluation, chosen),
        "evaluation_at_default": rates(evaluation, label_confidence.DEFAULT_MARGIN_THRESHOLD),
        "records": records,
    }
    preset = f"{args.cases}-cases"
    out = bench.result_path("label_shift_calibration", preset, out=args.out)
    bench.write_result(out, result, indent=2)
    summary = {k: v for k, v in result.items() if k != "records"}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
