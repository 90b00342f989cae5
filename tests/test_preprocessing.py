"""Tests of verse_jax.preprocessing: resampling, smoothing, CT normalisation, stage grids."""

import numpy as np
import pytest

from verse_jax import io
from verse_jax.geometry import Geometry, Volume, physical_bounding_grid
from verse_jax.preprocessing import normalize_ct, resample, smooth_mm, to_stage_grid

PIR = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def _oblique_direction():
    angle = 0.3
    c, s = np.cos(angle), np.sin(angle)
    return tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).reshape(-1))


def _volume(direction=PIR, dtype=np.float32):
    geometry = Geometry((6, 7, 8), (1.0, 1.5, 2.0), (3.0, -4.0, 5.0), direction)
    array = np.random.default_rng(0).normal(size=geometry.size) * 100
    return Volume(array.astype(dtype), geometry)


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_resample_identical_grid_is_identity(interpolation):
    volume = _volume(_oblique_direction())
    out = resample(volume, volume.geometry, interpolation=interpolation)
    assert out.geometry == volume.geometry
    assert out.array.dtype == np.float32
    np.testing.assert_array_equal(out.array, volume.array)


def test_resample_keeps_physical_values_and_default():
    # A linear ramp in physical x is reproduced exactly by linear interpolation on any grid.
    source_geometry = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), _oblique_direction())
    index = np.stack(np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij"), -1)
    ramp = source_geometry.index_to_physical(index)[..., 0]
    target = Geometry.axis_aligned(source_geometry.index_to_physical([4.5] * 3), (4, 4, 4), 1.3)
    out = resample(Volume(ramp, source_geometry), target)
    expected = target.index_to_physical(
        np.stack(np.meshgrid(*[np.arange(4.0)] * 3, indexing="ij"), -1)
    )
    np.testing.assert_allclose(out.array, expected[..., 0], atol=1e-9)
    far = Geometry((2, 2, 2), (1.0, 1.0, 1.0), (500.0, 0.0, 0.0))
    np.testing.assert_array_equal(
        resample(Volume(ramp, source_geometry), far, default_value=-7).array, -7
    )


def test_resample_nearest_keeps_labels():
    labels = np.random.default_rng(1).integers(0, 5, size=(6, 7, 8)).astype(np.uint16)
    volume = Volume(labels, _volume().geometry)
    target = physical_bounding_grid(volume.geometry, 0.7)
    out = resample(volume, target, interpolation="nearest")
    assert out.array.dtype == np.uint16
    assert set(np.unique(out.array)) <= set(range(5))


def test_smooth_mm_constant_and_mass():
    geometry = Geometry((9, 9, 3), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    constant = smooth_mm(Volume(np.full(geometry.size, 5, np.int16), geometry), 1.5)
    assert constant.array.dtype == np.float32
    np.testing.assert_allclose(constant.array, 5.0, rtol=1e-5)
    impulse = np.zeros((21, 21, 21), np.float32)
    impulse[10, 10, 10] = 1.0
    grid = Geometry(impulse.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    smoothed = smooth_mm(Volume(impulse, grid), 2.0).array
    assert smoothed.sum() == pytest.approx(1.0, rel=1e-2)  # recursive approximation
    assert np.unravel_index(np.argmax(smoothed), smoothed.shape) == (10, 10, 10)
    # Variance along x of the blurred impulse is sigma^2 (4 mm^2).
    profile = smoothed.sum(axis=(1, 2))
    variance = np.sum(profile * (np.arange(21) - 10.0) ** 2) / profile.sum()
    assert variance == pytest.approx(4.0, rel=0.05)


def test_normalize_ct():
    out = normalize_ct(np.array([-3000, -1024, 0, 1024, 2048, 5000], np.int16))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-0.5, -0.5, 0.0, 0.5, 1.0, 1.0])


def test_to_stage_grid_range_and_air():
    volume = _volume(_oblique_direction(), np.int16)
    array = np.full(volume.geometry.size, -1024, np.int16)
    array[2:4, 2:5, 2:6] = 3000
    array[0, 0, 0] = -3000
    out = to_stage_grid(Volume(array, volume.geometry), spacing_mm=2.0, smoothing_mm=0.75)
    assert out.array.dtype == np.float32
    assert out.geometry == physical_bounding_grid(volume.geometry, 2.0)
    assert out.array.min() >= -1.0 and out.array.max() <= 1.0
    air_grid = Geometry((5, 5, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    air_volume = Volume(np.full((5, 5, 5), -1024, np.int16), air_grid)
    air = to_stage_grid(air_volume, spacing_mm=2.0, smoothing_mm=3.0)
    np.testing.assert_allclose(air.array, -0.5, atol=1e-6)


def test_to_stage_grid_on_real_ct(verse_sample):
    ct = io.read_volume(verse_sample / "sub-verse004_0000_vertebra_21_im.nii.gz")
    # At the input spacing (1 mm, identity) and no smoothing, the stage grid is the input grid.
    same = to_stage_grid(ct, spacing_mm=1.0, smoothing_mm=0.0)
    assert same.geometry.size == ct.geometry.size
    np.testing.assert_allclose(same.geometry.origin_mm, ct.geometry.origin_mm, atol=1e-9)
    np.testing.assert_allclose(same.array, normalize_ct(ct.array), atol=1e-6)
    coarse = to_stage_grid(ct, spacing_mm=2.0, smoothing_mm=0.75)
    assert coarse.geometry.size == (51, 45, 38)
    assert coarse.array.min() >= -1.0 and coarse.array.max() <= 1.0
    assert 0.3 < coarse.array.max() < normalize_ct(ct.array).max()  # bone survives, smoothed
