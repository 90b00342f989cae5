"""`verse-jax predict` over many cases: shards (--shard, JAX processes) and reading ahead."""

import gzip
import shutil
import threading

import jax
import pytest

from verse_jax import cli, io, testing
from verse_jax.cli import main
from verse_jax.infer import batch as batch_predict
from verse_jax.infer.batch import Shard, parse_shard, read_ahead

GRIDS = {
    "spine": {"spacing_mm": 16.0, "crop_size": (16, 16, 32), "smoothing_mm": 3.0},
    "scn": {"spacing_mm": 8.0, "crop_size": (12, 12, 16), "smoothing_mm": 0.75},
    "seg": {"spacing_mm": 4.0, "crop_size": (16, 16, 12), "smoothing_mm": 0.75},
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "bundle"
    return testing.random_bundle(path, grids=GRIDS, seed=2, network_kwargs={"conv_impl": "lax"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three tiny phantom CTs in one plain folder."""
    data = tmp_path_factory.mktemp("data") / "phantoms"
    assert (
        main(["phantoms", str(data), "--cases", "3", "--seed", "5", "--max-voxels", "30000"]) == 0
    )
    flat = tmp_path_factory.mktemp("flat")
    for case in io.find_cases(data):
        shutil.copy(case.image_path, flat / f"{case.case_id}.nii.gz")
    return flat


@pytest.fixture()
def predicted(monkeypatch):
    """Case ids that `_predict_one` was called with, in order."""
    calls, original = [], cli._predict_one

    def counting(case_id, *args):
        calls.append(case_id)
        return original(case_id, *args)

    monkeypatch.setattr(cli, "_predict_one", counting)
    return calls


def test_shard_parsing_selection_and_names():
    assert parse_shard("1/3") == Shard(1, 3)
    for bad in ("3/3", "0/0", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    inputs = [(c, f"/d/{c}.nii.gz") for c in ("e", "a", "d", "b", "c")]
    assert [c for c, _ in Shard(0, 2).select(inputs)] == ["a", "c", "e"]
    assert [c for c, _ in Shard(1, 2).select(inputs)] == ["b", "d"]
    assert [c for c, _ in Shard(4, 6).select(inputs)] == ["e"] and Shard(5, 6).select(inputs) == []
    assert Shard(1, 4).summary_name("statistics.csv") == "statistics-shard1of4.csv"
    assert Shard().summary_name("statistics.csv") == "statistics.csv"


def test_read_ahead_keeps_order_errors_and_one_item_ahead():
    started, lock = [], threading.Lock()

    def prepare(item):
        with lock:
            started.append(item)
        if item == 2:
            raise OSError("unreadable 2")
        return item * 10

    for enabled in (True, False):
        started.clear()
        seen = []
        for i, (item, outcome) in enumerate(read_ahead([0, 1, 2, 3], prepare, enabled=enabled)):
            assert len(started) <= i + 2  # never more than one item ahead of the current
            if item == 2:
                with pytest.raises(OSError, match="unreadable 2"):
                    outcome()
            else:
                seen.append(outcome())
        assert seen == [0, 10, 30] and sorted(started) == [0, 1, 2, 3]


def test_two_shards_predict_every_case_exactly_once(model, folder, tmp_path, predicted, capsys):
    out = tmp_path / "pred"
    base = ["predict", "-i", str(folder), "-o", str(out), "--model", str(model), "-q"]
    assert main([*base, "--shard", "0/2"]) == 0
    assert "predicted 2 of 2 cases (shard 0/2 of 3 cases)" in capsys.readouterr().out
    assert main([*base, "--shard", "1/2"]) == 0
    ids = sorted(io.case_id_from_path(p) for p in folder.iterdir())
    assert predicted == [ids[0], ids[2], ids[1]]
    for case_id in ids:
        assert (out / f"{case_id}_seg.nii.gz").is_file() and (out / f"{case_id}_ctd.json").is_file()
    assert not (out / "statistics.csv").exists()
    rows = []
    for index in (0, 1):
        lines = (out / f"statistics-shard{index}of2.csv").read_text().splitlines()
        assert lines[0].startswith("case,label")
        rows += [line.split(",")[0] for line in lines[1:]]
    assert set(rows) <= set(ids)
    # A shard run again refuses its own outputs, not the other shard's.
    assert main([*base, "--shard", "1/2"]) == 2
    assert f"{ids[1]}_seg.nii.gz: exists" in capsys.readouterr().err


def test_bad_shard_is_refused_before_any_case(model, folder, tmp_path, predicted, capsys):
    base = ["predict", "-i", str(folder), "-o", str(tmp_path / "p"), "--model", str(model)]
    for bad in ("2/2", "0/0", "1of2"):
        assert main([*base, "--shard", bad]) == 2
        assert f"error: --shard {bad}: " in capsys.readouterr().err
    assert predicted == [] and not (tmp_path / "p").exists()


def test_jax_processes_split_the_cases(model, folder, tmp_path, predicted, monkeypatch, capsys):
    initialised = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: initialised.append(True))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    out = tmp_path / "pred"
    base = ["predict", "-i", str(folder), "-o", str(out), "--model", str(model), "-q"]
    assert main([*base, "--shard", "0/2"]) == 2  # the processes already split the cases
    assert "pass either --shard or --distributed" in capsys.readouterr().err
    assert main([*base, "--distributed"]) == 0
    ids = sorted(io.case_id_from_path(p) for p in folder.iterdir())
    assert initialised == [True] and predicted == [ids[1]]
    assert (out / "statistics-shard1of2.csv").is_file()
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == [f"{ids[1]}_seg.nii.gz"]


def test_reading_ahead_gives_identical_outputs_and_keeps_failures(model, folder, tmp_path, capsys):
    data = tmp_path / "two"
    data.mkdir()
    for path in sorted(folder.iterdir())[:2]:
        shutil.copy(path, data / path.name)
    (data / "broken.nii.gz").write_bytes(b"not a nifti")
    outputs = {}
    for flag in ([], ["--no-overlap-io"]):
        out = tmp_path / ("overlap" if not flag else "serial")
        args = ["predict", "-i", str(data), "-o", str(out), "--model", str(model), "-q", *flag]
        assert main([*args, "--save-probabilities"]) == 1
        captured = capsys.readouterr()
        assert "predicted 2 of 3 cases" in captured.out
        assert captured.err.count("FAILED broken (") == 1
        outputs[bool(flag)] = {p.name: _content(p) for p in sorted(out.iterdir())}
    assert len(outputs[False]) == 2 * 4 + 1  # seg, ctd, stats, prob per case; statistics.csv
    assert outputs[False] == outputs[True]


def _content(path):
    """The file's bytes; a gzip file's uncompressed bytes (its header has a name and a time)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith("_prob.nii.gz") else data


def test_stale_temporaries_of_other_shards_are_kept(tmp_path):
    mine = tmp_path / ".a_seg.999999-0123abcd.tmp.nii.gz"
    other = tmp_path / ".b_seg.999999-0123abcd.tmp.nii.gz"
    for path in (mine, other):
        path.write_bytes(b"")
    assert io.remove_stale_temporaries(tmp_path, ["a_seg.nii.gz", "a_ctd.json"]) == [mine]
    assert other.exists()


def test_add_arguments_defaults():
    import argparse

    p = argparse.ArgumentParser()
    batch_predict.add_arguments(p)
    args = p.parse_args([])
    assert (args.shard, args.distributed, args.no_overlap_io) == (None, False, False)


def test_failed_distributed_initialisation_is_a_clear_error(tmp_path, monkeypatch, capsys):
    def no_coordinator():
        raise ValueError("coordinator_address should be defined")

    monkeypatch.setattr(jax.distributed, "initialize", no_coordinator)
    argv = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "p"), "--distributed"]
    assert main(argv) == 2
    assert "--distributed: jax.distributed.initialize() failed: coordinator_address" in (
        capsys.readouterr().err
    )
