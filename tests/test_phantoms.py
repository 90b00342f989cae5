"""Tests of the synthetic spine phantoms (small grids: coarse voxel budgets)."""

import numpy as np
import pytest

from verse_jax import io, phantoms
from verse_jax.geometry import axis_codes
from verse_jax.labels import T13

SMALL = 400_000  # voxel budget of the test phantoms (about 3 mm voxels)


def _centroid_voxels(phantom):
    index = phantom.mask.geometry.physical_to_index(phantom.centroids.points_mm)
    return np.rint(index).astype(int)


@pytest.mark.parametrize(
    ("seed", "fov", "orientation"),
    [
        (0, "cervical", "RAS"),
        (1, "lumbar", "LPS"),
        (2, "thoracic", "PIR"),
        (3, "cervicothoracic", "oblique"),
        (4, "thoracolumbar", "oblique"),
    ],
)
def test_centroids_lie_in_their_vertebra(seed, fov, orientation):
    phantom = phantoms.generate_phantom(
        seed, fov=fov, orientation=orientation, max_voxels=SMALL, noise_hu=10.0
    )
    mask, labels = phantom.mask.array, phantom.centroids.labels
    if orientation != "oblique":
        assert "".join(axis_codes(phantom.image.geometry.direction)) == orientation
    assert mask.dtype == np.uint16 and phantom.image.array.dtype == np.int16
    assert phantom.image.geometry == phantom.mask.geometry
    assert len(labels) >= 3
    assert set(np.unique(mask).tolist()) - {0} == set(labels.tolist())
    voxels = _centroid_voxels(phantom)
    assert np.all(voxels >= 0) and np.all(voxels < np.array(mask.shape))
    for label, voxel in zip(labels, voxels, strict=True):
        if label != 1:
            assert mask[tuple(voxel)] == label, f"centroid of {label} not in its vertebra"
    # C1's centroid is the centre of its ring: C1 bone surrounds it within about 2 cm.
    if 1 in labels:
        geometry = phantom.mask.geometry
        ring = geometry.index_to_physical(np.argwhere(mask == 1))
        offsets = ring - phantom.centroids.points_mm[list(labels).index(1)]
        assert np.linalg.norm(offsets, axis=1).min() < 20.0
        assert offsets[:, 0].min() < -10.0 and offsets[:, 0].max() > 10.0  # left and right
    # Vertebrae go inferior from C1 (z decreases along the id order, T13 between T12 and L1).
    order = [phantoms.anatomy.vertebra_labels("T13").index(lab) for lab in labels]
    assert np.all(np.diff(phantom.centroids.points_mm[np.argsort(order), 2]) < 0)


def test_oblique_direction_is_not_a_permutation():
    phantom = phantoms.generate_phantom(5, fov="lumbar", orientation="oblique", max_voxels=SMALL)
    matrix = phantom.image.geometry.matrix
    assert np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-9)
    assert np.abs(matrix).max() < np.cos(np.deg2rad(1.9))


def test_vertebrae_grow_from_neck_to_lumbar_spine():
    phantom = phantoms.generate_phantom(7, fov="whole", orientation="LPS", max_voxels=SMALL)
    labels, counts = np.unique(phantom.mask.array, return_counts=True)
    volume = dict(zip(labels.tolist(), counts.tolist(), strict=True))
    assert {4, 13, 22} <= set(volume)
    assert volume[4] < volume[13] < volume[22]  # C4 < T6 < L3


def test_ribs_on_thoracic_vertebrae_only():
    spine = phantoms.draw_spine(0, extra_vertebra="T13")
    assert {v.label for v in spine.vertebrae if v.has_ribs} == set(range(8, 20)) | {T13}


def test_write_dataset_same_files_with_worker_processes(tmp_path):
    # Each case depends on its own seed only: two worker processes write the same bytes as one.
    one = phantoms.write_phantom_dataset(tmp_path / "one", 4, seed=5, max_voxels=60_000, workers=1)
    two = phantoms.write_phantom_dataset(tmp_path / "two", 4, seed=5, max_voxels=60_000, workers=2)
    assert one == two
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    assert len(files) == 4 * 3 + 1  # CT, mask, centroids per case; splits.json
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert phantoms.default_workers(3) == 1  # fewer than 4 cases per worker: no processes
    with pytest.raises(ValueError, match="workers must be >= 1"):
        phantoms.write_phantom_dataset(tmp_path / "x", 1, workers=0)


def test_write_dataset_round_trip_and_splits(tmp_path):
    ids = phantoms.write_phantom_dataset(tmp_path, 3, seed=4, max_voxels=150_000)
    assert ids == ["phantom000", "phantom001", "phantom002"]
    cases = io.find_cases(tmp_path)
    assert [case.case_id for case in cases] == ids
    for i, case in enumerate(cases):
        image, mask = io.read_volume(case.image_path), io.read_mask(case.mask_path)
        centroids = io.read_centroids(case.centroids_path, mask.geometry)
        assert image.array.dtype == np.int16
        assert set(np.unique(mask.array).tolist()) - {0} == set(centroids.labels.tolist())
        assert len(centroids.labels) > 0
        # The files hold exactly generate_phantom(case_seed(seed, i)).
        phantom = phantoms.generate_phantom(phantoms.case_seed(4, i), max_voxels=150_000)
        geometry = phantom.image.geometry
        assert image.geometry.size == geometry.size
        np.testing.assert_allclose(image.geometry.spacing_mm, geometry.spacing_mm, rtol=1e-6)
        np.testing.assert_allclose(image.geometry.origin_mm, geometry.origin_mm, atol=1e-4)
        np.testing.assert_allclose(image.geometry.direction, geometry.direction, atol=1e-6)
        np.testing.assert_array_equal(image.array, phantom.image.array)
        np.testing.assert_array_equal(mask.array, phantom.mask.array)
        np.testing.assert_array_equal(centroids.labels, phantom.centroids.labels)
        np.testing.assert_allclose(centroids.points_mm, phantom.centroids.points_mm, atol=1e-3)
    splits = io.read_splits(tmp_path)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids
    assert len(splits["val"]) == 1 and len(splits["test"]) == 1


def test_split_cases_cover_without_overlap():
    ids = [f"c{i:02d}" for i in range(20)]
    splits = phantoms.split_cases(ids, seed=3)
    together = splits["train"] + splits["val"] + splits["test"]
    assert sorted(together) == ids and len(set(together)) == len(ids)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (14, 3, 3)
    assert phantoms.split_cases(ids, seed=3) == splits
    assert phantoms.split_cases(["a", "b"])["train"] == ["a", "b"]


def test_same_seed_same_phantom_other_seed_differs():
    a = phantoms.generate_phantom(11, fov="lumbar", max_voxels=150_000)
    b = phantoms.generate_phantom(11, fov="lumbar", max_voxels=150_000)
    c = phantoms.generate_phantom(12, fov="lumbar", max_voxels=150_000)
    assert a.image.geometry == b.image.geometry
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.mask.array, b.mask.array)
    np.testing.assert_array_equal(a.centroids.points_mm, b.centroids.points_mm)
    assert a.image.geometry != c.image.geometry or not np.array_equal(a.image.array, c.image.array)


def test_intensities_are_ct_like():
    phantom = phantoms.generate_phantom(6, fov="cervical", max_voxels=SMALL, noise_hu=10.0)
    image, mask = phantom.image.array, phantom.mask.array
    assert image.min() >= -1024
    assert np.percentile(image, 5) < -950  # air around the neck
    assert image.max() > 500  # cortical bone
    assert np.median(image[mask > 0]) > 150  # vertebrae are bone
    soft = image[(image > -200) & (image < 200)]
    assert soft.size > 0.1 * image.size and abs(np.median(soft) - 40) < 40


def test_extra_vertebrae_appear_for_some_seeds():
    extras = {seed: phantoms.draw_spine(seed) for seed in range(100)}
    l6 = [s for s, spine in extras.items() if 25 in [v.label for v in spine.vertebrae]]
    t13 = [s for s, spine in extras.items() if T13 in [v.label for v in spine.vertebrae]]
    assert 2 <= len(l6) <= 20 and 2 <= len(t13) <= 20 and not set(l6) & set(t13)
    phantom = phantoms.generate_phantom(l6[0], fov="lumbar", max_voxels=SMALL)
    assert 25 in phantom.centroids.labels and 25 in phantom.mask.array
    phantom = phantoms.generate_phantom(
        0, fov="thoracolumbar", extra_vertebra="T13", max_voxels=SMALL
    )
    assert T13 in phantom.centroids.labels and T13 in phantom.mask.array


def test_default_dataset_is_generated_once(tmp_path):
    root = tmp_path / "cache" / "phantoms"
    path = phantoms.default_dataset(root, num_cases=1, max_voxels=100_000)
    assert path == root and (root / "splits.json").is_file()
    stamp = (root / "splits.json").stat().st_mtime_ns
    assert phantoms.default_dataset(root, num_cases=1, max_voxels=100_000) == root
    assert (root / "splits.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in root.parent.iterdir()) == ["phantoms"]  # no temporary left
    (tmp_path / "partial" / "rawdata").mkdir(parents=True)  # an interrupted generation
    with pytest.raises(ValueError, match="not a complete"):
        phantoms.default_dataset(tmp_path / "partial", num_cases=1)


@pytest.mark.parametrize(
    "variation",
    [{"fov": "legs"}, {"orientation": "XYZ"}, {"extra_vertebra": "L7"}, {"spacing_mm": (1, 0, 1)}],
)
def test_bad_variation_raises(variation):
    with pytest.raises(ValueError):
        phantoms.generate_phantom(0, max_voxels=SMALL, **variation)
