"""Tests of verse_jax.device_preprocessing: equality to SimpleITK, crops, the hull border."""

import numpy as np
import pytest

from verse_jax import device_preprocessing as dp
from verse_jax import phantoms, preprocessing
from verse_jax.geometry import Geometry, Volume, physical_bounding_grid
from verse_jax.infer import fusion

# (spacing_mm, smoothing_mm): paper spine / vertebra stages and an unsmoothed grid.
SETTINGS = [(8.0, 3.0), (2.0, 0.75), (2.5, 0.0)]


@pytest.fixture(scope="module", params=["PIR", "oblique"])
def phantom(request):
    return phantoms.generate_phantom(3, orientation=request.param, max_voxels=40_000).image


def test_to_stage_grid_equals_simpleitk(phantom):
    for spacing, smoothing in SETTINGS:
        ref = preprocessing.to_stage_grid(phantom, spacing_mm=spacing, smoothing_mm=smoothing)
        out = dp.to_stage_grid(phantom, spacing_mm=spacing, smoothing_mm=smoothing)
        assert out.geometry == ref.geometry
        assert out.array.dtype == np.float32
        assert np.abs(out.array - ref.array).max() < 1e-5, (spacing, smoothing)
        assert (ref.array > -0.45).any() and (ref.array == -0.5).any()  # tissue and outside


def test_crop_equals_sub_block(phantom):
    ct = dp.smooth(dp.put_ct(phantom), 0.75)
    grid = physical_bounding_grid(phantom.geometry, 2.0)
    whole = np.asarray(dp.sample_grid(ct, grid))
    stage = Volume(whole, grid)
    size = (20, 16, 12)
    for start in [(5, 7, 3), (-4, grid.size[1] - 10, 2)]:  # inside; reaching past the grid
        crop = np.asarray(dp.sample_crop(ct, grid, np.asarray(start, np.float64), size))
        expected = fusion.cut_box(stage, start, size).array
        np.testing.assert_allclose(crop, expected, atol=1e-6)
    assert (crop == preprocessing.OUTSIDE_NORMALIZED).any()


def test_smoothing_equals_itk_filter_at_borders():
    # Tiny axes (ITK needs 4 voxels: preprocessing edge-pads them) and anisotropic spacing.
    geometry = Geometry((9, 3, 6), (0.8, 1.7, 1.0), (2.0, -3.0, 1.0))
    array = np.random.default_rng(0).normal(0.0, 500.0, geometry.size).astype(np.float32)
    volume = Volume(np.maximum(array, preprocessing.CT_MIN_HU), geometry)
    ct = dp.smooth(dp.put_ct(volume), 1.3)
    x, y, z = geometry.size
    out = np.asarray(ct.array)[:x, :y, :z]
    np.testing.assert_allclose(out, preprocessing.smooth_mm(volume, 1.3).array, atol=2e-3)


@pytest.mark.parametrize(
    ("x0_mm", "expected_hu"),
    [(-0.5 - 1e-8, None), (-0.5, 100.0), (-0.3, 100.0), (3.7, 137.0), (4.5 - 1e-8, 140.0)]
    + [(4.5, None), (-0.7, None)],
)
def test_hull_border_as_itk(x0_mm, expected_hu):
    # ITK: inside for continuous index in [-0.5, size - 0.5), clamped neighbours; -1024 outside.
    source = Geometry((5, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    ramp = np.broadcast_to((100.0 + 10.0 * np.arange(5))[:, None, None], source.size)
    volume = Volume(np.array(ramp, np.float32), source)
    target = Geometry((1, 4, 4), (1.0, 1.0, 1.0), (x0_mm, 0.0, 0.0))
    out = np.asarray(dp.sample_grid(dp.put_ct(volume), target))[0, 0, 0]
    ref = preprocessing.resample(volume, target, default_value=preprocessing.CT_MIN_HU)
    hu = preprocessing.CT_MIN_HU if expected_hu is None else expected_hu
    assert ref.array[0, 0, 0] == pytest.approx(hu)
    assert out == pytest.approx(hu / preprocessing.CT_SCALE_HU, abs=1e-7)


def test_bucketing_does_not_change_results():
    # Two sizes in one source bucket share the compiled functions and stay exact.
    geometry = Geometry((33, 40, 35), (1.5, 1.5, 2.0), (0.0, 0.0, 0.0))
    array = np.random.default_rng(1).normal(0.0, 400.0, geometry.size).astype(np.int16)
    for size in [(33, 40, 35), (40, 45, 50)]:
        grid = Geometry(size, geometry.spacing_mm, geometry.origin_mm)
        volume = Volume(np.resize(array, size), grid)
        ct = dp.put_ct(volume)
        assert ct.array.shape == (64, 64, 64)
        ref = preprocessing.to_stage_grid(volume, spacing_mm=3.0, smoothing_mm=1.0)
        out = np.asarray(dp.sample_grid(dp.smooth(ct, 1.0), ref.geometry))
        assert np.abs(out - ref.array).max() < 1e-5
