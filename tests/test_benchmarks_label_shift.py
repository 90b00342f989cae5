"""benchmarks/label_shift_calibration.py: exact rates and threshold choice, and a tiny run."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from verse_jax import io, testing

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GRIDS = {
    "spine": {"spacing_mm": 16.0, "crop_size": (16, 16, 32), "smoothing_mm": 3.0},
    "scn": {"spacing_mm": 8.0, "crop_size": (12, 12, 16), "smoothing_mm": 0.75},
    "seg": {"spacing_mm": 4.0, "crop_size": (16, 16, 12), "smoothing_mm": 0.75},
}


def _script():
    path = BENCHMARKS / "label_shift_calibration.py"
    spec = importlib.util.spec_from_file_location("label_shift_calibration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mislabelled_rates_and_threshold():
    script = _script()
    gt = io.Centroids(np.array([20, 21, 22]), [[0, 0, 0], [0, 0, -30], [0, 0, -60]])
    right = io.Centroids(np.array([20, 21]), [[0, 0, 1], [0, 0, -29]])
    shifted = io.Centroids(np.array([19, 20]), [[0, 0, 1], [0, 0, -29]])
    far = io.Centroids(np.array([5]), [[0, 0, 100]])  # nothing within 20 mm: not a mislabel
    assert not script.is_mislabelled(right, gt) and script.is_mislabelled(shifted, gt)
    assert not script.is_mislabelled(far, gt)

    def record(margin, wrong, no_sequence=False):
        return {"margin": margin, "mislabelled": wrong, "no_sequence": no_sequence}

    records = [record(0.05, True), record(0.3, True), record(None, True, True)]
    records += [record(0.1, False), record(0.4, False), record(None, False)]  # None: inf margin
    r = script.rates(records, 0.2)
    assert (r["wrong"], r["caught"], r["correct"], r["false_alarms"]) == (3, 2, 3, 1)
    assert r["catch_rate"] == 2 / 3 and r["false_alarm_rate"] == 1 / 3
    # 0.075: catches 2 of 3 with no false alarm (0.05 < t <= 0.1); the smallest such grid value.
    assert script.choose_threshold(records) == 0.075
    assert math.isnan(script.rates(records[3:], 0.2)["catch_rate"])


def test_tiny_run_writes_consistent_rates(tmp_path):
    path = testing.random_bundle(
        tmp_path / "b", grids=GRIDS, seed=1, network_kwargs={"conv_impl": "lax"}
    )
    out = tmp_path / "calibration.json"
    args = ["--bundle", str(path), "--cases", "2", "--seed", "5", "--max-voxels", "40000"]
    result = _script().main([*args, "--out", str(out)])
    assert json.loads(out.read_text())["chosen_threshold"] == result["chosen_threshold"]
    assert len(result["records"]) == 2
    evaluation = result["evaluation"]
    assert evaluation["wrong"] + evaluation["correct"] == 1
