"""benchmarks/inference_speed.py: --quick runs every contender and the windowed results agree."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script():
    return importlib.import_module("benchmarks.inference_speed")


def test_quick_run_times_ours_and_the_loop_with_identical_outputs(tmp_path):
    out = tmp_path / "inference-quick.json"
    _load_script().main(["--quick", "--no-torch", "--skip", "seg,predict", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["scn"]["windows"] == 5
    # The jitted sliding window and the per-window Python loop compute the same max merge (up to
    # float rounding: batched and single-window programs are compiled separately and the CPU
    # Winograd F(4,3) path is accurate to 1e-4 of the largest output).
    assert result["scn"]["rel_diff_ours_vs_loop"] < 1e-4
    rows = {(row["section"], row["contender"]): row for row in result["rows"]}
    assert ("scn column", "loop (original)") in rows
    # Three alternating rounds per contender; the speed-ups are medians of per-round ratios.
    rounds = result["scn"]["round_seconds"]
    assert sorted(rounds) == ["loop (original)", "ours bs=1", "ours bs=2"]
    assert all(len(times) == 3 for times in rounds.values())
    loop, ours = rounds["loop (original)"], rounds["ours bs=1"]
    expected = sorted(lo / o for lo, o in zip(loop, ours, strict=True))[1]
    assert rows[("scn column", "ours bs=1")]["ratio_vs_loop"] == pytest.approx(expected)
    for key, row in rows.items():
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0, key
    for bs in (1, 2):
        row = rows[("scn column", f"ours bs={bs}")]
        assert math.isfinite(row["ratio_vs_loop"]) and row["flop_fraction_of_peak"] > 0
    whole = rows[("whole column", "whole column z=48")]
    assert whole["flops"] < whole["flops_windows"]


def test_fewer_than_three_rounds_are_refused():
    with pytest.raises(SystemExit):
        _load_script().parse_args(["--quick", "--repeats", "2"])
