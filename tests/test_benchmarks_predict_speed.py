"""benchmarks/predict_speed.py --quick: every stage timed, network calls counted, overhead."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script():
    return importlib.import_module("benchmarks.predict_speed")


def test_quick_run_times_every_stage_against_the_networks(tmp_path):
    out = tmp_path / "predict_speed.json"
    result = _load_script().main(["--quick", "--rounds", "1", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    stages = {row["stage"]: row for row in result["stages"]}
    assert list(stages) == [
        "read",
        "preprocessing",
        "spine stage",
        "scn windows",
        "candidates + sequence",
        "segmentation crops",
        "segmentation networks",
        "fusion",
        "write",
    ]
    assert all(row["seconds"] > 0 for row in stages.values()), stages
    # One spine call, one SCN column, one segmentation call per vertebra (batch size 1).
    calls = result["network_calls"]
    assert calls["spine"] == 1 and calls["scn"] == 1 and calls["seg"] == result["vertebrae"] > 0
    assert result["scn_windows"] >= 1
    assert sum(row["seconds"] for row in stages.values()) <= result["total_s"]
    assert result["overhead_fraction"] == pytest.approx(
        (result["total_s"] - result["network_s"]) / result["total_s"]
    )
    assert result["network_s"] == pytest.approx(sum(result["network_s_per_stage"].values()))
    assert stages["spine stage"]["network_seconds"] > 0
