"""Bad input never gives a silent wrong answer: one test per kind of bad input (issue 13).

Small inputs made here: one phantom case (CT, mask, centroids) and a tiny random model bundle.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cli import GRIDS
from test_io import _write_dicom_series

from verse_jax import cli, evaluation, io, phantoms, preprocessing, testing
from verse_jax.cli import main
from verse_jax.geometry import Geometry, Volume
from verse_jax.infer import bundle


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "bundle"
    return testing.random_bundle(path, grids=GRIDS, seed=2, network_kwargs={"conv_impl": "lax"})


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> io.Case:
    root = tmp_path_factory.mktemp("phantom")
    phantoms.write_phantom_dataset(root, 1, seed=3, max_voxels=30000)
    return io.find_cases(root)[0]


def _flat_ground_truth(folder: Path, case: io.Case, case_id: str, with_ct=True) -> None:
    """``<id>.nii.gz`` (CT), ``<id>_seg.nii.gz``, ``<id>_ctd.json`` copies of a phantom case."""
    folder.mkdir(exist_ok=True)
    if with_ct:
        shutil.copy(case.image_path, folder / f"{case_id}.nii.gz")
    shutil.copy(case.mask_path, folder / f"{case_id}_seg.nii.gz")
    shutil.copy(case.centroids_path, folder / f"{case_id}_ctd.json")


def _half_resolution(mask: Volume) -> Volume:
    g = mask.geometry
    size = tuple((n + 1) // 2 for n in g.size)
    half = Geometry(size, tuple(2 * s for s in g.spacing_mm), g.origin_mm, g.direction)
    return preprocessing.resample(mask, half, interpolation="nearest")


def _evaluate(pred, gt, out, *extra):
    code = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "-o", str(out), *extra])
    report = json.loads((out / "evaluation.json").read_text()) if code in (0, 1) else None
    return code, report


# 1 -------------------------------------------------------------------------------------------
def test_prediction_centroids_are_read_in_their_own_masks_grid(case, tmp_path):
    """The ground truth itself, written at half resolution as a prediction, scores perfectly."""
    mask = io.read_mask(case.mask_path)
    centroids = io.read_centroids(case.centroids_path, mask.geometry)
    pred = tmp_path / "pred"
    pred.mkdir()
    half = _half_resolution(mask)
    io.write_mask(pred / f"{case.case_id}_seg.nii.gz", half)
    io.write_centroids(pred / f"{case.case_id}_ctd.json", centroids, half.geometry)
    code, report = _evaluate(pred, case.image_path.parents[2], tmp_path)
    assert code == 0
    loc = report["cases"][0]["localization"]
    assert loc["id_rate"] == 1.0 and loc["num_gt"] == len(centroids.labels) > 3
    assert loc["mean_distance_mm"] < 1e-6


# 2 -------------------------------------------------------------------------------------------
def test_ground_truth_mask_must_lie_on_its_ct_grid(case, tmp_path, capsys):
    gt = tmp_path / "gt"
    _flat_ground_truth(gt, case, "good")
    _flat_ground_truth(gt, case, "half")
    io.write_mask(gt / "half_seg.nii.gz", _half_resolution(io.read_mask(case.mask_path)))
    pred = tmp_path / "pred"
    for case_id in ("good", "half"):
        _flat_ground_truth(pred, case, case_id, with_ct=False)
    code, report = _evaluate(pred, gt, tmp_path)
    assert code == 1
    assert [c["case_id"] for c in report["cases"]] == ["good"]
    assert report["cases"][0]["localization"]["mean_distance_mm"] == 0.0
    [failed] = report["failed"]
    assert failed["case_id"] == "half"
    assert "half_seg.nii.gz (ground-truth mask of half.nii.gz): grid differs" in failed["error"]
    assert "FAILED half" in capsys.readouterr().err


# 3 -------------------------------------------------------------------------------------------
def test_plain_folder_inputs_are_all_taken_and_skips_named(case, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(case.image_path, folder / "scan1.nii.gz")  # name ends in a digit
    shutil.copy(case.image_path, folder / "other.nii.gz")
    (folder / "notes.txt").write_text("x")
    (folder / "empty").mkdir()
    geometry = Geometry((6, 5, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    _write_dicom_series(folder / "series", Volume(np.zeros((6, 5, 4), np.int16), geometry))
    inputs = io.find_inputs(folder)
    assert [i for i, _ in inputs] == ["other", "scan1", "series"]
    assert "skipped (not CT inputs): empty/, notes.txt" in caplog.text
    assert "no VerSe cases" not in caplog.text
    # A real VerSe'19 folder: CTs with their masks and centroids beside them.
    miccai = tmp_path / "miccai"
    _flat_ground_truth(miccai, case, "verse004")
    assert [i for i, _ in io.find_inputs(miccai)] == ["verse004"]
    assert [c.case_id for c in io.find_cases(miccai)] == ["verse004"]
    assert io.find_cases(folder) == []  # CTs ending in a digit alone are no data set


# 4 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated", "removed"])
def test_dicom_series_with_a_bad_slice_is_refused(tmp_path, damage):
    geometry = Geometry((8, 8, 7), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    array = np.random.default_rng(0).integers(-1000, 2000, geometry.size).astype(np.int16)
    _write_dicom_series(tmp_path / "series", Volume(array, geometry))
    slice_path = tmp_path / "series" / "slice003.dcm"
    if damage == "garbage":
        slice_path.write_bytes(np.random.default_rng(1).bytes(3000))
    elif damage == "truncated":
        slice_path.write_bytes(slice_path.read_bytes()[:-40])
    else:
        slice_path.unlink()
    message = (
        "slice slice003.dcm is not a readable"
        if damage != "removed"
        else ("uneven slice spacing: 5 mm between slices slice002.dcm and slice004.dcm, 2.5 mm")
    )
    with pytest.raises(io.VerseFormatError, match=f"series: {message}"):
        io.read_volume(tmp_path / "series")


# 5 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_voxels_are_refused_in_every_format(tmp_path, suffix, dtype):
    geometry = Geometry((5, 6, 7), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    array = np.linspace(-1000, 1000, 210).reshape(5, 6, 7).astype(dtype)
    array[1, 2, 3], array[4, 5, 6] = np.nan, np.inf
    path = tmp_path / f"ct{suffix}"
    io.write_volume(path, Volume(array, geometry))
    name = np.dtype(dtype).name
    with pytest.raises(io.VerseFormatError, match=f"ct{suffix}: 2 voxels are NaN or inf.*{name}"):
        io.read_volume(path)
    io.write_volume(path, Volume(np.full_like(array, np.nan), geometry))
    with pytest.raises(io.VerseFormatError, match="210 voxels are NaN"):
        io.read_volume(path)
    array[1, 2, 3], array[4, 5, 6] = 0.0, 5.0
    io.write_volume(path, Volume(array, geometry))
    np.testing.assert_array_equal(io.read_volume(path).array, array)


# 6 -------------------------------------------------------------------------------------------
def test_evaluate_isolates_bad_cases(case, tmp_path, capsys, caplog):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for case_id in ("a", "label99", "badjson", "truncated", "nojson"):
        _flat_ground_truth(gt, case, case_id)
        _flat_ground_truth(pred, case, case_id, with_ct=False)
    mask = io.read_mask(case.mask_path)
    labels = mask.array.copy()
    labels[labels == labels.max()] = 99
    io.write_mask(gt / "label99_seg.nii.gz", Volume(labels, mask.geometry))
    (pred / "badjson_ctd.json").write_text('[{"label": 3, "X": 1,')
    data = (pred / "truncated_seg.nii.gz").read_bytes()
    (pred / "truncated_seg.nii.gz").write_bytes(data[: len(data) // 2])
    (pred / "nojson_ctd.json").unlink()
    code, report = _evaluate(pred, gt, tmp_path)
    assert code == 1
    failed = {f["case_id"]: f["error"] for f in report["failed"]}
    assert sorted(failed) == ["badjson", "label99", "truncated"]
    assert "label99_seg.nii.gz: labels [99] are not VerSe vertebra ids" in failed["label99"]
    assert "badjson_ctd.json: not valid JSON" in failed["badjson"]
    assert "truncated_seg.nii.gz: truncated or corrupt gzip" in failed["truncated"]
    scores = {c["case_id"]: c for c in report["cases"]}
    assert scores["a"]["localization"]["id_rate"] == 1.0
    assert scores["nojson"]["localization"]["id_rate"] == 0.0
    assert scores["nojson"]["segmentation"]["mean_dice"] == 1.0
    assert report["overall"]["num_failed"] == 3 and report["overall"]["id_rate"] == 0.5
    rows = (tmp_path / "evaluation.csv").read_text().splitlines()
    assert len(rows) == 7 and any(r.startswith("label99,FAILED,") for r in rows)
    assert "nojson: prediction has no centroid JSON (nojson_ctd.json)" in caplog.text
    err = capsys.readouterr().err
    assert "FAILED truncated" in err and "Traceback" not in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "zzz_ctd.json").write_text("[]")
    assert main(["evaluate", "--pred", str(other), "--gt", str(gt)]) == 2
    assert "no prediction in" in capsys.readouterr().err
    assert not (other / "evaluation.csv").exists()


# 7 -------------------------------------------------------------------------------------------
def test_arguments_and_outputs_are_checked_before_any_case(
    model, case, tmp_path, monkeypatch, capsys
):
    calls = []
    monkeypatch.setattr(cli, "_predict_one", lambda *a: calls.append(a))
    monkeypatch.setattr(evaluation, "evaluate_case", lambda *a: calls.append(a))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    predict = ["predict", "-i", str(case.image_path), "--model", str(model), "-q"]
    out = tmp_path / "new" / "out"
    for extra, message in [
        (["-o", str(out), "--overlap", "-1"], "--overlap -1: must lie in 0..window - 1"),
        (["-o", str(out), "--overlap", "16"], "--overlap 16: must lie in 0..15"),
        (["-o", str(a_file)], "a_file: exists and is not a folder"),
        (["-o", str(a_file / "sub")], "a_file/sub: cannot create this folder"),
    ]:
        assert main([*predict, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    gt = case.image_path.parents[2]
    evaluate = ["evaluate", "--pred", str(tmp_path), "--gt", str(gt)]
    assert main([*evaluate, "-o", str(a_file / "sub")]) == 2
    assert "cannot create this folder" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch:  # as root a chmod-ed folder stays writable: simulate
        patch.setattr("tempfile.mkstemp", refuse)
        assert main([*predict, "-o", str(out)]) == 2
        assert f"cannot write into {tmp_path} (permission denied)" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused(model, case, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    predict = ["predict", "-i", str(case.image_path), "--model", str(model), "-q"]
    assert main([*predict, "-o", str(locked / "out")]) == 2
    assert "permission denied" in capsys.readouterr().err


# 8 -------------------------------------------------------------------------------------------
def test_existing_outputs_are_kept_and_stale_temporaries_removed(model, case, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    case_id = case.case_id
    (out / f"{case_id}_ctd.json").write_text("[]")
    stale = [
        out / f".{case_id}_seg.4194305-0123abcd.tmp.nii.gz",
        out / ".x_ctd.0123456789ab.tmp.json",
    ]
    alive = out / f".{case_id}_seg.{os.getpid()}-0123abcd.tmp.nii.gz"
    for path in [*stale, alive]:
        path.write_bytes(b"partial")
    predict = ["predict", "-i", str(case.image_path), "-o", str(out), "--model", str(model), "-q"]
    assert main(predict) == 2
    assert f"{case_id}_ctd.json: exists; pass --overwrite to replace" in capsys.readouterr().err
    assert all(p.exists() for p in stale)
    assert main([*predict, "--overwrite"]) == 0
    assert not any(p.exists() for p in stale) and alive.exists()
    assert io.read_centroids(out / f"{case_id}_ctd.json", io.read_geometry(case.image_path))
    assert main(predict) == 2
    # seg, stats and statistics.csv exist besides the centroids
    assert "_seg.nii.gz: exists (and 3 more outputs)" in capsys.readouterr().err


# 9 -------------------------------------------------------------------------------------------
def test_bundle_errors_name_the_file(model, tmp_path, case, capsys):
    broken = tmp_path / "bundle"
    shutil.copytree(model, broken)
    (broken / "scn" / "sigmas.npy").write_bytes(b"garbage" * 10)
    with pytest.raises(bundle.BundleError, match=r"scn/sigmas.npy: not a readable .npy array"):
        bundle.load_bundle(broken)
    np.save(broken / "scn" / "sigmas.npy", np.full(25, np.nan, np.float32))
    with pytest.raises(bundle.BundleError, match=r"scn/sigmas.npy: sigmas must be positive"):
        bundle.load_bundle(broken)
    shutil.copy(model / "scn" / "sigmas.npy", broken / "scn" / "sigmas.npy")
    meta = json.loads((broken / "seg" / "stage.json").read_text())
    meta["network"]["kwargs"]["preset"] = "huge"
    (broken / "seg" / "stage.json").write_text(json.dumps(meta))
    predict = ["predict", "-i", str(case.image_path), "-o", str(tmp_path / "o"), "--model"]
    assert main([*predict, str(broken)]) == 2
    err = capsys.readouterr().err
    assert "seg/stage.json: network: cannot build" in err and "'huge'" in err
    assert not (tmp_path / "o").exists()


# all together --------------------------------------------------------------------------------
def test_bad_input_folder_end_to_end(model, case, tmp_path, capsys, caplog):
    """A folder of good and bad CTs: clear per-case lines, exit 1, correct scores, no traceback."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(case.image_path, folder / "good1.nii.gz")
    ct = io.read_volume(case.image_path)
    nan_ct = np.asarray(ct.array, np.float32)
    nan_ct[0, 0, 0] = np.nan
    io.write_volume(folder / "nan.nii.gz", Volume(nan_ct, ct.geometry))
    geometry = Geometry((8, 8, 6), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    _write_dicom_series(folder / "dicom", Volume(np.zeros((8, 8, 6), np.int16), geometry))
    (folder / "dicom" / "slice002.dcm").write_bytes(b"\0" * 500)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(folder), "-o", str(out), "--model", str(model), "-q"]) == 1
    captured = capsys.readouterr()
    assert "predicted 1 of 3 cases" in captured.out
    assert "FAILED nan" in captured.err and "1 voxels are NaN or infinite" in captured.err
    assert "FAILED dicom" in captured.err and "slice002.dcm" in captured.err
    assert "Traceback" not in captured.err
    gt = tmp_path / "gt"
    _flat_ground_truth(gt, case, "good1")
    _flat_ground_truth(gt, case, "nan")
    code, report = _evaluate(out, gt, out)
    assert code == 0 and [c["case_id"] for c in report["cases"]] == ["good1", "nan"]
    assert report["cases"][1]["localization"]["id_rate"] == 0.0  # no prediction: all missed
    assert "nan: no prediction, counted as all vertebrae missed" in caplog.text
