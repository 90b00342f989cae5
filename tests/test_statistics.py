"""Per-vertebra statistics against values worked out by hand."""

import json

import numpy as np
import pytest

from verse_jax import phantoms
from verse_jax.geometry import Geometry, Volume
from verse_jax.infer import statistics
from verse_jax.io import Centroids


def _case():
    geometry = Geometry((10, 8, 6), (2.0, 1.0, 3.0), (10.0, 20.0, 30.0))
    labels = np.zeros(geometry.size, np.uint16)
    hu = np.full(geometry.size, -1000, np.int16)
    labels[2:5, 1:4, 0:3] = 20  # 27 voxels, touches z = 0
    hu[2:5, 1:4, 0:3] = 200
    hu[2, 1, 0] = 1100  # mean (26 * 200 + 1100) / 27, median 200
    labels[5:7, 4:6, 3:5] = 21  # 8 voxels, inside
    hu[5:7, 4:6, 3:5] = np.arange(8).reshape(2, 2, 2) * 10  # 0..70: mean 35, median 35
    centroids = Centroids(
        np.array([20, 21, 22]), [[16.0, 22.0, 33.0], [21.0, 24.5, 40.5], [0, 0, 0]]
    )
    return Volume(hu, geometry), Volume(labels, geometry), centroids


def test_statistics_of_a_hand_made_case():
    image, mask, centroids = _case()
    first, second, empty = statistics.vertebra_statistics(image, mask, centroids, [0.9, 0.5, 0.25])
    assert (first.label, first.name, second.name) == (20, "L1", "L2")
    assert first.centroid_mm == (16.0, 22.0, 33.0) and first.centroid_vox == (3.0, 2.0, 1.0)
    assert first.bbox_vox == ((2, 1, 0), (4, 3, 2))
    assert first.bbox_mm == ((14.0, 21.0, 30.0), (18.0, 23.0, 36.0))
    assert first.voxels == 27 and first.volume_ml == pytest.approx(27 * 6.0 / 1000)
    assert first.mean_hu == pytest.approx((26 * 200 + 1100) / 27) and first.median_hu == 200.0
    assert first.heatmap_value == 0.9 and first.partial is True
    assert second.bbox_vox == ((5, 4, 3), (6, 5, 4)) and second.voxels == 8
    assert second.mean_hu == 35.0 and second.median_hu == 35.0 and second.partial is False
    assert second.centroid_vox == (5.5, 4.5, 3.5)
    assert empty.voxels == 0 and empty.volume_ml == 0.0 and empty.name == "L3"
    assert empty.bbox_vox is None and empty.mean_hu is None and empty.partial is None
    report = json.loads(statistics.case_report("c1", [first, second, empty]))
    assert report["case"] == "c1" and report["labelling"] is None
    assert report["vertebrae"][0]["bbox_vox"] == [[2, 1, 0], [4, 3, 2]]
    rows = statistics.csv_rows("c1", [first, second, empty])
    text = statistics.format_csv(rows).splitlines()
    assert text[0] == ",".join(statistics.CSV_COLUMNS) and len(text) == 4
    assert text[1].startswith("c1,20,L1,16.0,22.0,33.0,3.0,2.0,1.0,2,1,0,4,3,2,14.0,21.0,30.0,")
    assert text[3].endswith(",0,0.0,,,0.25,")


def test_statistics_on_an_oblique_phantom():
    phantom = phantoms.generate_phantom(
        2, fov="lumbar", spacing_mm=(4.0, 4.0, 4.0), orientation="oblique", max_voxels=30**3
    )
    image, mask, centroids = phantom.image, phantom.mask, phantom.centroids
    records = statistics.vertebra_statistics(image, mask, centroids)
    assert [r.label for r in records] == centroids.labels.tolist()
    voxel_ml = float(np.prod(mask.geometry.spacing_mm)) / 1000
    for record in records:
        inside = np.argwhere(mask.array == record.label)
        values = image.array[mask.array == record.label]
        assert record.voxels == len(inside) and record.volume_ml == pytest.approx(
            len(inside) * voxel_ml
        )
        assert record.mean_hu == pytest.approx(values.mean()) and record.median_hu == np.median(
            values
        )
        assert record.bbox_vox == (tuple(inside.min(0)), tuple(inside.max(0)))
        centres = mask.geometry.index_to_physical(inside)
        low, high = np.asarray(record.bbox_mm)
        assert np.all(centres >= low - 1e-9) and np.all(centres <= high + 1e-9)
        touches = inside.min() == 0 or np.any(inside.max(0) == np.asarray(mask.geometry.size) - 1)
        assert record.partial == touches and record.heatmap_value is None
    assert any(r.partial for r in records) and not all(r.partial for r in records)


def test_bad_arguments():
    image, mask, centroids = _case()
    with pytest.raises(ValueError, match="2 heatmap values for 3 centroids"):
        statistics.vertebra_statistics(image, mask, centroids, [1.0, 2.0])
    small = Volume(np.zeros((2, 2, 2), np.int16), Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0)))
    with pytest.raises(ValueError, match="mask shape"):
        statistics.vertebra_statistics(small, mask, centroids)
