"""benchmarks/train_speed.py: --quick (smoke configs) gives finite figures for every stage."""

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_finite_positive_figures_for_every_stage(tmp_path):
    out = tmp_path / "train_speed-quick.json"
    _load_script().main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] and result["benchmark"] == "train_speed-quick"
    rows = {row["stage"]: row for row in result["results"]}
    assert sorted(rows) == ["scn", "seg", "spine"]
    for stage, row in rows.items():
        assert row["preset"] == "smoke" and "error" not in row, stage
        figures = {
            "compile_s": row["compile_s"],
            "step_s": row["step_s_median"],
            "steps_per_s": row["steps_per_s"],
            "samples_per_s": row["samples_per_s"],
            "host_samples_per_s": row["host"]["samples_per_s"],
            "data_share": row["data_share"],
            "augment_s": row["augment"]["step_s_median"],
            "augment_fraction": row["augment"]["fraction_of_step"],
        }
        for name, value in figures.items():
            assert math.isfinite(value) and value > 0, (stage, name, value)
        assert row["samples_per_s"] == row["steps_per_s"] * row["batch_size"]
        assert len(row["step_s"]) == result["repeats"]["smoke"]
        assert all(math.isfinite(loss) for loss in row["losses"]), stage
