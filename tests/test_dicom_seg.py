"""DICOM-SEG written from a mask on a DICOM series read back voxel for voxel (needs highdicom)."""

import math
import types

import numpy as np
import pytest
import SimpleITK as sitk

from verse_jax import io, phantoms, stages
from verse_jax.cli import main
from verse_jax.geometry import Geometry, Volume
from verse_jax.infer import confidence as label_confidence
from verse_jax.infer import inputs, predict
from verse_jax.infer import sequence as sequence_lib
from verse_jax.labels import vertebra_name

highdicom = pytest.importorskip("highdicom")
# Our module itself must import (a wrong path here once skipped this whole file silently).
from verse_jax.io import dicom_seg  # noqa: E402

_UID = "1.2.826.0.1.3680043.2.1125.1.777"


def _write_series(folder, volume: Volume, frame_of_reference: bool = True):
    """int16 CT series of ``volume``, one file per index-z slice, with the tags a SEG needs."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    geometry = volume.geometry
    for k in range(geometry.size[2]):
        origin = geometry.index_to_physical([0.0, 0.0, k])
        plane = Geometry((*geometry.size[:2], 1), geometry.spacing_mm, origin, geometry.direction)
        image = io.volume_to_sitk(Volume(volume.array[:, :, k : k + 1], plane))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{_UID}.4.{k + 1}",
            "0010|0010": "Phantom^Test",
            "0010|0020": "phantom",
            "0018|0050": f"{geometry.spacing_mm[2]:.6f}",
            "0020|000d": f"{_UID}.1",
            "0020|000e": f"{_UID}.2",
            "0020|0011": "1",
            "0020|0013": str(k + 1),
        }
        if frame_of_reference:
            tags["0020|0052"] = f"{_UID}.3"
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


@pytest.fixture(scope="module")
def phantom():
    return phantoms.generate_phantom(
        3, fov="lumbar", spacing_mm=(4.0, 4.0, 4.0), orientation="oblique", max_voxels=30**3
    )


def test_round_trip_voxel_for_voxel(phantom, tmp_path):
    _write_series(tmp_path / "series", phantom.image)
    image = io.read_volume(tmp_path / "series")
    io.write_mask(tmp_path / "mask.nii.gz", Volume(phantom.mask.array, image.geometry))
    mask = io.read_mask(tmp_path / "mask.nii.gz")
    datasets = dicom_seg.series_datasets(tmp_path / "series")
    dicom_seg.write_dicom_seg(tmp_path / "seg.dcm", mask, datasets[::-1])  # any slice order
    back = dicom_seg.read_dicom_seg(tmp_path / "seg.dcm", datasets, image.geometry)
    np.testing.assert_array_equal(back.array, mask.array)
    assert back.geometry == image.geometry
    seg = highdicom.seg.segread(tmp_path / "seg.dcm")
    present = [int(v) for v in np.unique(mask.array) if v]
    assert [item.SegmentLabel for item in seg.SegmentSequence] == [
        vertebra_name(v) for v in present
    ]
    assert [item.SegmentNumber for item in seg.SegmentSequence] == list(range(1, len(present) + 1))
    assert all(
        item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "51282000"
        for item in seg.SegmentSequence
    )
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == f"{_UID}.2"


def test_errors_name_the_problem(phantom, tmp_path):
    _write_series(tmp_path / "bare", phantom.image, frame_of_reference=False)
    image = io.read_volume(tmp_path / "bare")
    datasets = dicom_seg.series_datasets(tmp_path / "bare")
    mask = Volume(phantom.mask.array, image.geometry)
    with pytest.raises(ValueError, match="seg.dcm: cannot make a DICOM-SEG.*Frame Of Reference"):
        dicom_seg.write_dicom_seg(tmp_path / "seg.dcm", mask, datasets)
    empty = Volume(np.zeros(image.geometry.size, np.uint16), image.geometry)
    with pytest.raises(ValueError, match="empty"):
        dicom_seg.write_dicom_seg(tmp_path / "seg.dcm", empty, datasets)
    shifted = Geometry(image.geometry.size, image.geometry.spacing_mm, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="not a slice of the grid"):
        dicom_seg.write_dicom_seg(tmp_path / "seg.dcm", Volume(mask.array, shifted), datasets)
    with pytest.raises(ValueError, match="not a DICOM series folder"):
        dicom_seg.series_datasets(tmp_path)
    assert not list(tmp_path.glob("*seg.dcm*"))


def test_cli_writes_the_seg_for_a_dicom_series(phantom, tmp_path, monkeypatch, capsys):
    _write_series(tmp_path / "series", phantom.image)
    image = io.read_volume(tmp_path / "series")
    mask = Volume(phantom.mask.array, image.geometry)

    def fake_prediction(image, model, **kwargs):  # the truth, to test the plumbing only
        k = len(phantom.centroids.labels)
        sequence = sequence_lib.LandmarkSequence(
            np.zeros(k, np.int64),
            np.ones(k, bool),
            phantom.centroids.points_mm,
            np.ones(k),
            0,
            k - 1,
            "sequence",
        )
        confidence = label_confidence.LabelConfidence((), 0.0, (), math.nan, 0.15, True, "test")
        return predict.CasePrediction(
            phantom.centroids, mask, np.ones(k), None, sequence, confidence, None
        )

    monkeypatch.setattr(predict, "predict_case_details", fake_prediction)
    monkeypatch.setattr(inputs, "prepare_case", lambda image, model: None)
    # the CLI reads only the SCN window length of the bundle before predict_case_details
    fake_bundle = types.SimpleNamespace(
        scn=types.SimpleNamespace(grid=stages.StageGrid(4, (8, 8, 16), 1)), extra={}, path="m"
    )
    monkeypatch.setattr("verse_jax.infer.bundle.load_bundle", lambda path: fake_bundle)
    out = tmp_path / "out"
    args = ["predict", "-i", str(tmp_path / "series"), "-o", str(out), "--model", "m", "-q"]
    assert main([*args, "--output-type", "dicom-seg"]) == 0
    assert "series: labelling uncertain, check the levels (test)" in capsys.readouterr().out
    datasets = dicom_seg.series_datasets(tmp_path / "series")
    back = dicom_seg.read_dicom_seg(out / "series_seg.dcm", datasets, image.geometry)
    np.testing.assert_array_equal(back.array, io.read_mask(out / "series_seg.nii.gz").array)
    nifti = tmp_path / "ct.nii.gz"
    io.write_volume(nifti, phantom.image)
    assert (
        main(
            [
                "predict",
                "-i",
                str(nifti),
                "-o",
                str(out),
                "--model",
                "m",
                "--output-type",
                "dicom-seg",
            ]
        )
        == 2
    )
    assert "needs DICOM series inputs" in capsys.readouterr().err
