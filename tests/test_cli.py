"""The verse-jax command line end to end on small phantoms with a tiny random bundle."""

import gzip
import json
import shutil

import numpy as np
import pytest

from verse_jax import io, labels, testing
from verse_jax.cli import main
from verse_jax.infer import bundle
from verse_jax.io import probabilities

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
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "phantoms"
    assert main(["phantoms", str(out), "--cases", "2", "--seed", "3", "--max-voxels", "40000"]) == 0
    return out


def test_predict_evaluate_preview(model, dataset, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ["predict", "-i", str(dataset), "-o", str(out), "--model", str(model)]
    assert main([*args, "--preview", "--overlap", "8", "-q", "--save-probabilities"]) == 0
    cases = io.find_cases(dataset)
    assert len(cases) == 2
    _check_extras(out, cases)
    for case in cases:
        mask = io.read_mask(out / f"{case.case_id}_seg.nii.gz")
        image = io.read_volume(case.image_path)
        io.check_same_grid(image.geometry, mask.geometry, "prediction")  # NIfTI float32 round trip
        assert io.read_volume(out / f"{case.case_id}_seg.nii.gz").array.dtype == np.uint16
        centroids = io.read_centroids(out / f"{case.case_id}_ctd.json", image.geometry)
        assert set(np.unique(mask.array).tolist()) <= {0, *centroids.labels.tolist()}
        assert (out / f"{case.case_id}_preview.png").stat().st_size > 1000
    assert main(["evaluate", "--pred", str(out), "--gt", str(dataset)]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == [c.case_id for c in cases]
    lines = (out / "evaluation.csv").read_text().splitlines()
    assert lines[0].startswith("case,num_gt") and lines[-1].startswith("overall,")
    png = tmp_path / "one.png"
    case = cases[0]
    args = ["preview", str(case.image_path), "--mask", str(case.mask_path)]
    assert main([*args, "--centroids", str(case.centroids_path), "-o", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert "overall" in capsys.readouterr().out


def _check_extras(out, cases):
    """Statistics JSON and CSV, probabilities: consistent with the mask and centroids written."""
    csv_lines = (out / "statistics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("case,label,name,centroid_x_mm")
    for case in cases:
        mask = io.read_mask(out / f"{case.case_id}_seg.nii.gz")
        centroids = io.read_centroids(out / f"{case.case_id}_ctd.json", mask.geometry)
        report = json.loads((out / f"{case.case_id}_stats.json").read_text())
        assert report["case"] == case.case_id
        assert isinstance(report["labelling"]["labelling_uncertain"], bool)
        vertebrae = report["vertebrae"]
        assert [v["label"] for v in vertebrae] == centroids.labels.tolist()
        np.testing.assert_allclose(
            [v["centroid_mm"] for v in vertebrae], centroids.points_mm, atol=1e-3
        )
        assert [v["voxels"] for v in vertebrae] == [
            int(np.sum(mask.array == v)) for v in centroids.labels
        ]
        assert sum(line.startswith(case.case_id + ",") for line in csv_lines) == len(vertebrae)
        prob = probabilities.read_probabilities(out / f"{case.case_id}_prob.nii.gz")
        io.check_same_grid(mask.geometry, prob.geometry, "probabilities")
        labelled, step = mask.array > 0, 1 / probabilities.SCALE  # 16-bit storage: 0.5 +- step
        assert np.all(prob.array[labelled] >= 0.5 - step) and np.all(
            prob.array[~labelled] <= 0.5 + step
        )
        assert np.any((prob.array > 0.01) & (prob.array < 0.49))  # probabilities below 0.5 kept


def test_labels_command(capsys):
    assert main(["labels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "colour"] and len(lines) == 27
    assert lines[1].split() == ["1", "C1", "#6b79e7"] and lines[-1].split()[:2] == ["28", "T13"]
    assert main(["labels", "--json"]) == 0
    registry = json.loads(capsys.readouterr().out)
    assert registry == labels.label_registry() and registry[19] == {
        "id": 20,
        "name": "L1",
        "color": registry[19]["color"],
    }
    rgb = [int(registry[19]["color"][i : i + 2], 16) / 255 for i in (1, 3, 5)]
    np.testing.assert_allclose(rgb, labels.label_colors()[20, :3], atol=0.5 / 255)


def test_evaluate_ground_truth_against_itself(dataset, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in io.find_cases(dataset):
        shutil.copy(case.mask_path, pred / f"{case.case_id}_seg.nii.gz")
        shutil.copy(case.centroids_path, pred / f"{case.case_id}_ctd.json")
    assert main(["evaluate", "--pred", str(pred), "--gt", str(dataset), "-o", str(tmp_path)]) == 0
    overall = json.loads((tmp_path / "evaluation.json").read_text())["overall"]
    assert overall["id_rate"] == 1.0 and overall["dice"] == 1.0
    assert overall["mean_distance_mm"] == 0.0 and overall["hausdorff_mm"] == 0.0
    missing = io.find_cases(dataset)[1].case_id  # no prediction: every vertebra missed
    (pred / f"{missing}_seg.nii.gz").unlink()
    (pred / f"{missing}_ctd.json").unlink()
    args = ["evaluate", "--pred", str(pred), "--gt", str(dataset), "-o", str(tmp_path)]
    assert main(args) == 2  # the first run's evaluation files exist
    assert main([*args, "--overwrite"]) == 0
    cases = json.loads((tmp_path / "evaluation.json").read_text())["cases"]
    assert cases[1]["localization"]["id_rate"] == 0.0 and cases[1]["segmentation"]["mean_dice"] == 0
    assert cases[0]["localization"]["id_rate"] == 1.0


def test_bad_inputs(model, dataset, tmp_path, capsys):
    missing = tmp_path / "nowhere.nii.gz"
    assert main(["predict", "-i", str(missing), "-o", str(tmp_path / "o"), "--model", str(model)])
    assert "nowhere.nii.gz: no such file" in capsys.readouterr().err
    folder = tmp_path / "cts"
    folder.mkdir()
    shutil.copy(io.find_cases(dataset)[0].image_path, folder / "good.nii.gz")
    (folder / "broken.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 20))
    out = tmp_path / "out"
    args = ["predict", "-i", str(folder), "-o", str(out), "--model", str(model), "-q"]
    code = main([*args, "--centroid-format", "verse19"])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED broken" in err and "broken.nii.gz" in err and "good" not in err
    assert (out / "good_seg.nii.gz").is_file() and (out / "good_ctd.json").is_file()
    entries = json.loads((out / "good_ctd.json").read_text())  # VerSe'19 mm: no direction entry
    assert entries and all(set(entry) == {"label", "X", "Y", "Z"} for entry in entries)
    assert not (out / "broken_seg.nii.gz").exists()


def test_bundle_command_and_bad_bundle(model, tmp_path, capsys):
    stages = [f"--{s}={model / s}" for s in ("spine", "scn", "seg")]
    assert main(["bundle", *stages, "-o", str(tmp_path / "b")]) == 0
    assert bundle.load_bundle(tmp_path / "b").seg.grid.crop_size == (16, 16, 12)
    (tmp_path / "b" / "bundle.json").write_text('{"format": "verse-jax-bundle", "version": 9}')
    args = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--model"]
    assert main([*args, str(tmp_path / "b")]) == 2
    assert "version 9 is not supported" in capsys.readouterr().err


def test_phantoms_command_arguments(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        "verse_jax.phantoms.write_phantom_dataset",
        lambda out, n, seed, **kw: calls.append((out, n, seed, kw)) or ["a"] * n,
    )
    assert main(["phantoms", str(tmp_path), "--cases", "3", "--seed", "7"]) == 0
    assert calls == [(str(tmp_path), 3, 7, {})]
    assert main(["phantoms", str(tmp_path), "--cases", "8", "--workers", "2"]) == 0
    assert calls[-1] == (str(tmp_path), 8, 0, {"workers": 2})
