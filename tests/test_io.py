"""Tests of verse_jax.io: volumes, masks, centroid JSON (both flavours), data set layouts."""

import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk

from verse_jax import io
from verse_jax.geometry import Geometry, Volume, reorientation_to_codes


def _rotation_z(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


PIR = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], np.float64)
DIRECTIONS = {
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "LPS": np.eye(3),
    "PIR": PIR,
    "oblique": PIR @ _rotation_z(0.2) @ np.array([[1, 0, 0], [0, 0.96, -0.28], [0, 0.28, 0.96]]),
}


def _geometry(name, size=(6, 7, 8)):
    direction = tuple(DIRECTIONS[name].reshape(-1))
    return Geometry(size, (0.7, 1.3, 2.1), (10.123456789, -20.5, 33.3), direction)


@pytest.fixture(scope="module")
def sample_mask(verse_sample) -> Volume:
    """The real VerSe mask (oblique PIR grid, float64 on disk, labels 16..24)."""
    return io.read_mask(verse_sample / "sub-verse004_seg-vert_msk.nii.gz")


def _assert_same_geometry(a: Geometry, b: Geometry, atol=1e-5):
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing_mm, b.spacing_mm, atol=atol)
    np.testing.assert_allclose(a.origin_mm, b.origin_mm, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


# ---------------------------------------------------------------------------------------------
# Volumes and masks


@pytest.mark.parametrize("name", DIRECTIONS)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_round_trip(tmp_path, name, suffix):
    geometry = _geometry(name)
    array = np.random.default_rng(0).integers(-1024, 3000, size=geometry.size).astype(np.int16)
    path = tmp_path / f"ct{suffix}"
    io.write_volume(path, Volume(array, geometry))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    volume = io.read_volume(path)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, array)
    # NIfTI stores the geometry in float32; NRRD and MHA keep it (nearly) exactly.
    _assert_same_geometry(volume.geometry, geometry, atol=1e-5 if "nii" in suffix else 1e-12)


def test_volume_sitk_axis_order():
    geometry = Geometry((2, 3, 4), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    image = io.volume_to_sitk(Volume(array, geometry))
    assert image.GetSize() == (2, 3, 4)
    assert image.GetPixel(1, 2, 3) == array[1, 2, 3]
    back = io.volume_from_sitk(image)
    np.testing.assert_array_equal(back.array, array)
    assert back.geometry == geometry


@pytest.mark.parametrize("name", DIRECTIONS)
def test_mask_round_trip_dtypes(tmp_path, name):
    geometry = _geometry(name)
    labels = np.random.default_rng(1).integers(0, 25, size=geometry.size).astype(np.int64)
    io.write_mask(tmp_path / "small.nii.gz", Volume(labels, geometry))
    assert sitk.ReadImage(str(tmp_path / "small.nii.gz")).GetPixelID() == sitk.sitkUInt8
    mask = io.read_mask(tmp_path / "small.nii.gz")
    assert mask.array.dtype == np.uint16
    np.testing.assert_array_equal(mask.array, labels)
    _assert_same_geometry(mask.geometry, geometry)
    labels[0, 0, 0] = 300
    io.write_mask(tmp_path / "large.nii.gz", Volume(labels, geometry))
    assert sitk.ReadImage(str(tmp_path / "large.nii.gz")).GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(io.read_mask(tmp_path / "large.nii.gz").array, labels)


def test_sample_mask_round_trip(tmp_path, sample_mask):
    # Real oblique float64 mask: labels and geometry survive write_mask -> read_mask (NIfTI keeps
    # the direction to float32 precision; ITK re-orthonormalises it to ~1e-10).
    mask = sample_mask
    assert sorted(np.unique(mask.array).tolist()) == [0, *range(16, 25)]
    io.write_mask(tmp_path / "msk.nii.gz", mask)
    back = io.read_mask(tmp_path / "msk.nii.gz")
    np.testing.assert_array_equal(back.array, mask.array)
    _assert_same_geometry(back.geometry, mask.geometry, atol=1e-8)
    io.check_same_grid(mask.geometry, back.geometry, "msk.nii.gz")


def test_float_mask_is_read_as_labels_and_fractions_refused(tmp_path):
    geometry = _geometry("PIR")
    labels = np.random.default_rng(2).integers(0, 25, size=geometry.size).astype(np.float64)
    io.write_volume(tmp_path / "float_msk.nii.gz", Volume(labels, geometry))
    mask = io.read_mask(tmp_path / "float_msk.nii.gz")
    assert mask.array.dtype == np.uint16
    np.testing.assert_array_equal(mask.array, labels)
    labels[1, 2, 3] = 4.5
    io.write_volume(tmp_path / "fraction_msk.nii.gz", Volume(labels, geometry))
    with pytest.raises(io.VerseFormatError, match="fraction_msk.nii.gz.*non-integer"):
        io.read_mask(tmp_path / "fraction_msk.nii.gz")
    labels[1, 2, 3] = -1
    with pytest.raises(io.VerseFormatError, match="neg_msk.nii.gz"):
        io.write_mask(tmp_path / "neg_msk.nii.gz", Volume(labels, geometry))


def _write_dicom_series(folder, volume: Volume):
    """int16 DICOM series of a volume (right-handed direction), one file per index-z slice."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    geometry = volume.geometry
    for k in range(geometry.size[2]):
        # The writer derives pixel spacing, position and orientation tags from the slice image.
        origin = geometry.index_to_physical([0.0, 0.0, k])
        plane = Geometry((*geometry.size[:2], 1), geometry.spacing_mm, origin, geometry.direction)
        image = io.volume_to_sitk(Volume(volume.array[:, :, k : k + 1], plane))
        tags = {
            "0008|0060": "CT",
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0018|0050": f"{geometry.spacing_mm[2]:.6f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


@pytest.mark.parametrize("name", ["LPS", "oblique"])
def test_read_dicom_series(tmp_path, name):
    geometry = Geometry((7, 6, 5), (0.5, 0.75, 2.0), (-10.0, 20.0, 30.0), _geometry(name).direction)
    array = np.random.default_rng(3).integers(-1000, 2000, size=geometry.size).astype(np.int16)
    _write_dicom_series(tmp_path / "series", Volume(array, geometry))
    volume = io.read_volume(tmp_path / "series")
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, array)
    _assert_same_geometry(volume.geometry, geometry)
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.VerseFormatError, match="empty.*no DICOM"):
        io.read_volume(tmp_path / "empty")


def test_bad_images_raise_naming_the_file(tmp_path):
    with pytest.raises(io.VerseFormatError, match="missing.nii.gz.*not found"):
        io.read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(io.VerseFormatError, match="missing_msk.nii.gz"):
        io.read_mask(tmp_path / "missing_msk.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4], sitk.sitkInt16), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(io.VerseFormatError, match="flat.nii.gz.*2-D"):
        io.read_volume(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), str(tmp_path / "time.nii.gz"))
    with pytest.raises(io.VerseFormatError, match="time.nii.gz.*4-D"):
        io.read_volume(tmp_path / "time.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image" * 20)
    with pytest.raises(io.VerseFormatError, match="junk.nii.gz"):
        io.read_volume(tmp_path / "junk.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused(tmp_path, suffix):
    geometry = _geometry("LPS", size=(16, 16, 16))
    array = np.random.default_rng(4).integers(-1024, 3000, size=geometry.size).astype(np.int16)
    io.write_volume(tmp_path / f"full{suffix}", Volume(array, geometry))
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.VerseFormatError, match=f"cut{suffix}.*(truncated|unreadable)"):
        io.read_volume(tmp_path / f"cut{suffix}")


def test_multi_member_gzip_is_read(tmp_path):
    geometry = _geometry("RAS")
    array = np.arange(np.prod(geometry.size), dtype=np.int16).reshape(geometry.size)
    io.write_volume(tmp_path / "one.nii.gz", Volume(array, geometry))
    raw = gzip.decompress((tmp_path / "one.nii.gz").read_bytes())
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    np.testing.assert_array_equal(io.read_volume(tmp_path / "two.nii.gz").array, array)


def test_writes_are_atomic_and_checked(tmp_path):
    volume = Volume(np.zeros((2, 3, 4), np.int16), _geometry("LPS", size=(2, 3, 4)))
    with pytest.raises(io.VerseFormatError, match="nofolder.*does not exist"):
        io.write_volume(tmp_path / "nofolder" / "ct.nii.gz", volume)
    with pytest.raises(io.VerseFormatError, match="ct.unknownformat"):
        io.write_volume(tmp_path / "ct.unknownformat", volume)
    centroids = io.Centroids(np.array([1]), np.zeros((1, 3)))
    with pytest.raises(io.VerseFormatError, match="nofolder"):
        io.write_centroids(tmp_path / "nofolder" / "ctd.json", centroids, volume.geometry)
    io.write_volume(tmp_path / "ct.nii.gz", volume)
    io.write_volume(tmp_path / "ct.nii.gz", Volume(volume.array + 1, volume.geometry))  # replace
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]
    assert np.all(io.read_volume(tmp_path / "ct.nii.gz").array == 1)


def test_check_same_grid():
    geometry = _geometry("oblique")
    io.check_same_grid(geometry, geometry, "same_msk.nii.gz")
    nudged = Geometry(
        geometry.size, geometry.spacing_mm, np.add(geometry.origin_mm, 1e-6), geometry.direction
    )
    io.check_same_grid(geometry, nudged, "nudged_msk.nii.gz")
    moved = Geometry(
        geometry.size, geometry.spacing_mm, np.add(geometry.origin_mm, 0.5), geometry.direction
    )
    with pytest.raises(io.VerseFormatError, match="moved_msk.nii.gz.*origin"):
        io.check_same_grid(geometry, moved, "moved_msk.nii.gz")
    other = _geometry("oblique", size=(6, 7, 9))
    with pytest.raises(io.VerseFormatError, match="other_msk.nii.gz.*size"):
        io.check_same_grid(geometry, other, "other_msk.nii.gz")
    with pytest.raises(io.VerseFormatError, match="turned_msk.nii.gz.*direction"):
        io.check_same_grid(geometry, _geometry("PIR"), "turned_msk.nii.gz")


# ---------------------------------------------------------------------------------------------
# Centroids


def _centroids(geometry, n=4, seed=5):
    rng = np.random.default_rng(seed)
    points_vox = rng.uniform(0, np.array(geometry.size) - 1, size=(n, 3))
    return io.Centroids(np.arange(18, 18 + n), geometry.index_to_physical(points_vox))


@pytest.mark.parametrize("name", DIRECTIONS)
def test_centroids_round_trip(tmp_path, name):
    geometry = _geometry(name)
    centroids = _centroids(geometry)
    path = tmp_path / "sub-x_seg-subreg_ctd.json"
    io.write_centroids(path, centroids, geometry)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    entries = json.loads(path.read_text())
    codes = {"RAS": "RAS", "LPS": "LPS", "PIR": "PIR", "oblique": "PIR"}[name]
    assert entries[0] == {"direction": list(codes)}
    back = io.read_centroids(path, geometry)
    np.testing.assert_array_equal(back.labels, centroids.labels)
    assert back.labels.dtype == np.int64
    np.testing.assert_allclose(back.points_mm, centroids.points_mm, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", DIRECTIONS)
def test_verse19_centroids_written_read_back(tmp_path, name):
    geometry = _geometry(name)
    centroids = _centroids(geometry)
    path = tmp_path / "verse004_ctd.json"
    io.write_centroids(path, centroids, geometry, "verse19")
    entries = json.loads(path.read_text())
    assert all(set(e) == {"label", "X", "Y", "Z"} for e in entries)  # no direction entry
    back = io.read_centroids(path, geometry)
    np.testing.assert_array_equal(back.labels, centroids.labels)
    np.testing.assert_allclose(back.points_mm, centroids.points_mm, atol=1e-6, rtol=0)


def test_verse19_writer_known_answer(tmp_path):
    # Voxel (2, 3, 4) of an LPS (10, 12, 14) grid, spacing (1, 2, 3): internal mm (2, 6, 12),
    # X = 14 * 3 - 12 = 30, Y = 6, Z = 2 (the reader's known answer above, the other way).
    geometry = Geometry((10, 12, 14), (1.0, 2.0, 3.0), (5.0, -6.0, 7.0))
    point = geometry.index_to_physical(np.array([[2.0, 3.0, 4.0]]))
    io.write_centroids(tmp_path / "c.json", io.Centroids([20], point), geometry, "verse19")
    entry = json.loads((tmp_path / "c.json").read_text())[0]
    assert entry["label"] == 20
    np.testing.assert_allclose([entry["X"], entry["Y"], entry["Z"]], [30.0, 6.0, 2.0])
    with pytest.raises(ValueError, match="centroid format must be one of"):
        io.write_centroids(tmp_path / "d.json", io.Centroids([20], point), geometry, "csv")


def test_bids_centroids_known_answer(tmp_path):
    geometry = Geometry((10, 12, 14), (1.0, 2.0, 3.0), (5.0, -6.0, 7.0))
    expected = np.array([5.0 + 2.0, -6.0 + 6.0, 7.0 + 12.0])  # voxel (2, 3, 4)
    for codes, xyz in [(["R", "A", "S"], (7, 8, 4)), (["P", "I", "R"], (3, 9, 7))]:
        path = tmp_path / "ctd.json"
        path.write_text(
            json.dumps([{"direction": codes}, {"label": 20, "X": xyz[0], "Y": xyz[1], "Z": xyz[2]}])
        )
        centroids = io.read_centroids(path, geometry)
        np.testing.assert_allclose(centroids.points_mm, expected[None], atol=1e-12)


@pytest.mark.parametrize(
    ("name", "json_xyz", "offset_mm"),
    [
        ("LPS", (30.0, 6.0, 2.0), (2.0, 6.0, 12.0)),
        ("RAS", (30.0, 16.0, 7.0), (-2.0, -6.0, 12.0)),
        ("PIR", (8.0, 2.0, 27.0), (-12.0, 2.0, -6.0)),
    ],
)
def test_verse19_centroids_known_answer(tmp_path, name, json_xyz, offset_mm):
    # Voxel (2, 3, 4) of a (10, 12, 14) grid with spacing (1, 2, 3). VerSe'19 JSON (reference §2.2):
    # in the identity-oriented origin-0 image, x = Z, y = Y, z = S_z * h_z - X (mm).
    geometry = Geometry(
        (10, 12, 14), (1.0, 2.0, 3.0), (5.0, -6.0, 7.0), tuple(DIRECTIONS[name].reshape(-1))
    )
    path = tmp_path / "verse004_ctd.json"
    x, y, z = json_xyz
    path.write_text(json.dumps([{"label": 1, "X": x, "Y": y, "Z": z}]))
    centroids = io.read_centroids(path, geometry)
    np.testing.assert_allclose(centroids.points_mm[0], np.add((5.0, -6.0, 7.0), offset_mm))
    np.testing.assert_allclose(geometry.physical_to_index(centroids.points_mm[0]), (2, 3, 4))


def test_sample_centroids_lie_on_their_labels(verse_sample, sample_mask):
    # BIDS JSON: direction ["P", "I", "R"], voxel coordinates; the scan is oblique.
    assert sample_mask.array.dtype == np.uint16
    json_path = verse_sample / "sub-verse004_seg-subreg_ctd.json"
    centroids = io.read_centroids(json_path, sample_mask.geometry)
    assert centroids.labels.tolist() == list(range(16, 25))
    index = np.rint(sample_mask.geometry.physical_to_index(centroids.points_mm)).astype(np.int64)
    np.testing.assert_array_equal(sample_mask.array[tuple(index.T)], centroids.labels)
    entries = json.loads(json_path.read_text())[1:]
    np.testing.assert_allclose(
        sample_mask.geometry.physical_to_index(centroids.points_mm),
        [[e["X"], e["Y"], e["Z"]] for e in entries],
        atol=1e-9,
    )


@pytest.mark.parametrize("codes", ["LPS", "RAS", "IRA", "SAL"])
def test_reorientation_matches_itk_dicom_orient(sample_mask, codes):
    # Independent check of the permute/flip (and its geometry) against ITK's DICOMOrient filter.
    ours = reorientation_to_codes(sample_mask.geometry, tuple(codes)).apply(sample_mask)
    itk = io.volume_from_sitk(sitk.DICOMOrient(io.volume_to_sitk(sample_mask), codes))
    np.testing.assert_array_equal(ours.array, itk.array)
    _assert_same_geometry(ours.geometry, itk.geometry, atol=1e-9)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("R", "A", "S"), ("I", "R", "A")])
def test_sample_centroids_in_other_orientations(tmp_path, verse_sample, sample_mask, codes):
    # The same scan stored in another orientation: the PIR JSON must still land on its labels.
    mask = sample_mask
    json_path = verse_sample / "sub-verse004_seg-subreg_ctd.json"
    reference = io.read_centroids(json_path, mask.geometry)
    moved = reorientation_to_codes(mask.geometry, codes).apply(mask)
    centroids = io.read_centroids(json_path, moved.geometry)
    np.testing.assert_allclose(centroids.points_mm, reference.points_mm, atol=1e-6)
    index = np.rint(moved.geometry.physical_to_index(centroids.points_mm)).astype(np.int64)
    np.testing.assert_array_equal(moved.array[tuple(index.T)], centroids.labels)
    io.write_centroids(tmp_path / "ctd.json", centroids, moved.geometry)
    assert json.loads((tmp_path / "ctd.json").read_text())[0] == {"direction": list(codes)}
    back = io.read_centroids(tmp_path / "ctd.json", mask.geometry)
    np.testing.assert_allclose(back.points_mm, reference.points_mm, atol=1e-6)


def test_sample_centroids_as_verse19_json(tmp_path, verse_sample, sample_mask):
    # The sample's centroids written by hand in the VerSe'19 mm flavour (oblique PIR scan).
    mask = sample_mask
    reference = io.read_centroids(verse_sample / "sub-verse004_seg-subreg_ctd.json", mask.geometry)
    record = reorientation_to_codes(mask.geometry, ("L", "P", "S"))
    rai = record.geometry  # the RAI (identity-oriented) image; internal mm = index * spacing
    internal_mm = record.from_original_index(mask.geometry.physical_to_index(reference.points_mm))
    internal_mm = internal_mm * np.array(rai.spacing_mm)
    height_mm = rai.size[2] * rai.spacing_mm[2]
    entries = [
        {"label": int(label), "X": height_mm - z, "Y": y, "Z": x}
        for label, (x, y, z) in zip(reference.labels, internal_mm.tolist(), strict=True)
    ]
    (tmp_path / "verse004_ctd.json").write_text(json.dumps(entries))
    centroids = io.read_centroids(tmp_path / "verse004_ctd.json", mask.geometry)
    np.testing.assert_allclose(centroids.points_mm, reference.points_mm, atol=1e-6)
    index = np.rint(mask.geometry.physical_to_index(centroids.points_mm)).astype(np.int64)
    np.testing.assert_array_equal(mask.array[tuple(index.T)], centroids.labels)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"label": 1}', "expected a JSON list"),
        ('[{"label": 99, "X": 1, "Y": 2, "Z": 3}]', "unknown VerSe label id 99"),
        ('[{"label": 26, "X": 1, "Y": 2, "Z": 3}]', "unknown VerSe label id 26"),
        ('[{"label": 3, "X": 1, "Y": 2}]', r"misses keys \['Z'\]"),
        ('[{"label": 3, "X": NaN, "Y": 2, "Z": 3}]', "bad coordinate nan"),
        ('[{"label": 3, "X": "1", "Y": 2, "Z": 3}]', "bad coordinate '1'"),
        ('[{"label": 2.5, "X": 1, "Y": 2, "Z": 3}]', "non-integer label"),
        ('[{"label": NaN, "X": 1, "Y": 2, "Z": 3}]', "non-integer label"),
        ('[{"label": true, "X": 1, "Y": 2, "Z": 3}]', "non-integer label"),
        ('[{"direction": ["P", "I", "X"]}]', "unknown axis code"),
        ('[{"direction": ["P", "A", "R"]}]', "exactly once"),
        ('[{"direction": "PIR"}]', "bad direction"),
        ("[[1, 2, 3]]", "not an object"),
        (
            '[{"label": 3, "X": 1, "Y": 2, "Z": 3}, {"label": 3, "X": 1, "Y": 2, "Z": 3}]',
            "duplicate",
        ),
    ],
)
def test_bad_centroid_json_raises_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad_ctd.json"
    path.write_text(content)
    with pytest.raises(io.VerseFormatError, match=f"bad_ctd.json.*{message}"):
        io.read_centroids(path, _geometry("LPS"))


def test_missing_centroid_file(tmp_path):
    with pytest.raises(io.VerseFormatError, match="nothing_ctd.json.*not found"):
        io.read_centroids(tmp_path / "nothing_ctd.json", _geometry("LPS"))


def test_centroids_validate_shapes():
    with pytest.raises(ValueError, match="shape"):
        io.Centroids(np.array([1, 2]), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        io.Centroids(np.array([[1, 2]]), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        io.Centroids(np.array([1]), np.full((1, 3), np.nan))
    empty = io.Centroids(np.zeros((0,), np.int64), np.zeros((0, 3)))
    assert empty.points_mm.shape == (0, 3)


def test_landmarks_round_trip():
    centroids = io.Centroids(np.array([1, 20, 25]), np.arange(9.0).reshape(3, 3))
    points, valid = io.centroids_to_landmarks(centroids)
    assert points.shape == (25, 3) and valid.shape == (25,)
    assert np.flatnonzero(valid).tolist() == [0, 19, 24]
    np.testing.assert_array_equal(points[19], [3.0, 4.0, 5.0])
    assert np.all(points[~valid] == 0)
    back = io.landmarks_to_centroids(points, valid)
    np.testing.assert_array_equal(back.labels, centroids.labels)
    np.testing.assert_array_equal(back.points_mm, centroids.points_mm)
    t13 = io.Centroids(np.array([19, 28]), np.zeros((2, 3)))
    points, valid = io.centroids_to_landmarks(t13, num_landmarks=26)
    assert np.flatnonzero(valid).tolist() == [18, 25]
    assert io.landmarks_to_centroids(points, valid).labels.tolist() == [19, 28]
    with pytest.raises(ValueError, match="28"):
        io.centroids_to_landmarks(t13, num_landmarks=25)


# ---------------------------------------------------------------------------------------------
# Data set layouts


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_find_cases_miccai(tmp_path):
    for name in [
        "verse010.nii.gz",
        "verse010_seg.nii.gz",
        "verse010_ctd.json",
        "verse002.nii.gz",
        "verse002_seg.nii.gz",
        "notes.txt",
    ]:
        _touch(tmp_path / name)
    cases = io.find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["verse002", "verse010"]
    assert cases[0] == io.Case(
        "verse002", tmp_path / "verse002.nii.gz", tmp_path / "verse002_seg.nii.gz", None
    )
    assert cases[1].centroids_path == tmp_path / "verse010_ctd.json"


def test_find_cases_bids(tmp_path):
    raw, der = tmp_path / "rawdata", tmp_path / "derivatives"
    _touch(raw / "sub-b01" / "sub-b01_ct.nii.gz")
    _touch(der / "sub-b01" / "sub-b01_seg-vert_msk.nii.gz")
    _touch(der / "sub-b01" / "sub-b01_seg-subreg_ctd.json")
    _touch(raw / "sub-a02" / "ses-1" / "sub-a02_ses-1_ct.nii.gz")  # nested one level deeper
    _touch(der / "sub-a02" / "ses-1" / "sub-a02_ses-1_seg-vert_msk.nii.gz")
    _touch(raw / "sub-c03" / "sub-c03_ct.nii.gz")  # no derivatives
    cases = io.find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["a02_ses-1", "b01", "c03"]
    a, b, c = cases
    assert a.image_path == raw / "sub-a02" / "ses-1" / "sub-a02_ses-1_ct.nii.gz"
    assert a.mask_path == der / "sub-a02" / "ses-1" / "sub-a02_ses-1_seg-vert_msk.nii.gz"
    assert a.centroids_path is None
    assert b == io.Case(
        "b01",
        raw / "sub-b01" / "sub-b01_ct.nii.gz",
        der / "sub-b01" / "sub-b01_seg-vert_msk.nii.gz",
        der / "sub-b01" / "sub-b01_seg-subreg_ctd.json",
    )
    assert c.mask_path is None and c.centroids_path is None
    with pytest.raises(io.VerseFormatError, match="nowhere"):
        io.find_cases(tmp_path / "nowhere")


def test_read_splits(tmp_path):
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["b01", "c03"], "val": ["a02"]}))
    assert io.read_splits(tmp_path) == {"train": ["b01", "c03"], "val": ["a02"], "test": []}
    (tmp_path / "splits.json").write_text(json.dumps({"train": "b01"}))
    with pytest.raises(io.VerseFormatError, match="splits.json.*train"):
        io.read_splits(tmp_path)
    (tmp_path / "splits.json").write_text("[]")
    with pytest.raises(io.VerseFormatError, match="splits.json.*object"):
        io.read_splits(tmp_path)
    with pytest.raises(io.VerseFormatError, match="splits.json.*not found"):
        io.read_splits(tmp_path / "elsewhere")
