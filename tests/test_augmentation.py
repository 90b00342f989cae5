"""Tests for verse_jax.augmentation: identity, consistency of image/labels/landmarks, box bounds."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
import SimpleITK as sitk

from verse_jax.data import augmentation as aug

SPACING = 2.0
CROP = (24, 24, 40)  # one crop and box shape for all tests: one compilation
BOX = (40, 40, 64)
RANGES = aug.AugmentRanges()  # paper ranges


def _transform(params, box, labels, center, points, valid, crop=CROP, spacing=SPACING):
    """Image (intensity too), labels and landmarks of one sample; crop (24, 24, 40) at 2 mm."""
    grid = aug.sampling_grid_vox(params, center, crop, spacing)
    image = aug.apply_intensity(aug.apply_cubic(box, grid), params)
    label = aug.apply_nearest(labels, grid)
    out_points, out_valid = aug.apply_landmarks(params, center, grid, points, valid, spacing)
    return image, label, out_points, out_valid, grid


_jit_transform = jax.jit(_transform, static_argnames=("crop", "spacing"))


def _vertebra_phantom(shape=BOX, block=8):
    """Stack of labelled blocks along z (ids 1..), image = 0.05 * id, centroids at block centres."""
    labels = np.zeros(shape, np.uint8)
    points = []
    for k, z0 in enumerate(range(4, shape[2] - block - 3, block + 1)):
        labels[12:28, 10:30, z0 : z0 + block] = k + 1
        points.append([19.5, 19.5, z0 + (block - 1) / 2])
    image = (0.05 * labels).astype(np.float32)
    return image, labels, np.array(points, np.float32)


def test_identity_is_exact():
    rng = np.random.default_rng(0)
    box = rng.uniform(-1, 1, BOX).astype(np.float32)
    labels = rng.integers(0, 26, BOX).astype(np.uint8)
    start = np.array([5, 7, 9])
    center = (start + (np.array(CROP) - 1) / 2).astype(np.float32)
    points = np.array([[5, 7, 9], [10, 12, 20], [28, 30, 48], [0, 0, 0], [6, 7, 8], [9, 9, 9]])
    valid = np.array([True, True, True, True, True, False])
    params = aug.identity_params()
    image, label, out_points, out_valid, _ = _jit_transform(
        params, box, labels, center, points.astype(np.float32), valid
    )
    window = tuple(slice(a, a + n) for a, n in zip(start, CROP, strict=True))
    np.testing.assert_array_equal(np.asarray(image), box[window])
    np.testing.assert_array_equal(np.asarray(label), labels[window])
    np.testing.assert_allclose(np.asarray(out_points)[:3], points[:3] - start, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out_valid), [True, True, True, False, False, False])


def test_sample_params_ranges_and_determinism():
    a = aug.sample_params(np.random.default_rng(3), RANGES)
    b = aug.sample_params(np.random.default_rng(3), RANGES)
    c = aug.sample_params(np.random.default_rng(4), RANGES)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.displacement_mm, c.displacement_mm)
    assert a.displacement_mm.shape == (6, 6, 6, 3) and a.displacement_mm.dtype == np.float32
    assert np.all(np.abs(a.translation_mm) <= 30) and np.all(np.abs(a.rotation_rad) <= 0.25)
    assert np.all((a.scale >= 0.85**2) & (a.scale <= 1.15**2))
    assert np.abs(a.displacement_mm).max() <= 25 and 0.75 <= a.intensity_scale <= 1.25


def test_bspline_weights_partition_of_unity():
    positions = np.linspace(0, 48.0, 97).astype(np.float32)
    weights = np.asarray(aug.bspline_weights(positions, 48.0, 6))
    assert weights.shape == (97, 6) and weights.min() >= 0
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)


def test_context_box_holds_every_draw():
    size = aug.context_box_size(CROP, SPACING, RANGES)
    assert aug.context_box_size(CROP, SPACING, aug.AugmentRanges.none()) == (27, 27, 43)
    extreme = dataclasses.replace(RANGES, translation_mm=0.0)
    grid_fn = jax.jit(lambda p, c: aug.sampling_grid_vox(p, c, CROP, SPACING))
    rng = np.random.default_rng(1)
    for _ in range(20):
        params = aug.sample_params(rng, extreme)
        signs = rng.choice([-1.0, 1.0], size=params.displacement_mm.shape)
        params = params._replace(
            rotation_rad=rng.choice([-0.25, 0.25], 3).astype(np.float32),
            scale=np.full(3, 1.15**2, np.float32),
            displacement_mm=(25 * signs).astype(np.float32),
        )
        center = rng.uniform(0, 100, 3)
        start = aug.context_box_start(center, size)
        grid = np.asarray(grid_fn(params, (center - start).astype(np.float32)))
        assert grid.min() >= 0 and np.all(grid.max(axis=(0, 1, 2)) <= np.array(size) - 1)


def test_landmarks_stay_on_their_vertebra_and_align():
    image, labels, points = _vertebra_phantom()
    center = (np.array(image.shape, np.float32) - 1) / 2
    crop = CROP
    ranges = dataclasses.replace(RANGES, translation_mm=6.0)
    rng = np.random.default_rng(2)
    valid = np.ones(len(points), bool)
    hits = 0
    for _ in range(12):
        params = aug.sample_params(rng, ranges)._replace(
            intensity_shift=np.float32(0), intensity_scale=np.float32(1)
        )
        out_image, out_label, out_points, out_valid, grid = _jit_transform(
            params, image, labels, center, points, valid, crop=crop
        )
        out_label, out_points = np.asarray(out_label), np.asarray(out_points)
        # The mapped landmark maps back to the input landmark.
        back = np.asarray(aug.map_points_vox(params, center, out_points, crop, SPACING))
        ok = np.asarray(out_valid)
        np.testing.assert_allclose(back[ok], points[ok], atol=1e-2)
        for k in np.flatnonzero(ok):
            index = tuple(np.minimum(np.round(out_points[k]).astype(int), np.array(crop) - 1))
            assert out_label[index] == k + 1
            hits += 1
        # Image and labels come from one grid: linear image equals 0.05 * nearest label inside.
        interior = np.isclose(np.asarray(out_image) * 20, np.round(np.asarray(out_image) * 20))
        agree = np.isclose(np.asarray(out_image), 0.05 * out_label)
        assert agree[interior].mean() > 0.97
    assert hits >= 30


def test_landmarks_leaving_the_crop_become_invalid():
    rng = np.random.default_rng(5)
    box = rng.uniform(-1, 1, BOX).astype(np.float32)
    labels = np.zeros(BOX, np.uint8)
    center = np.array([20.0, 20.0, 25.0], np.float32)  # the crop covers z 5.5 .. 44.5
    points = np.array([[20, 20, 25], [20, 20, 50], [20, 20, 3], [39, 20, 25], [0, 0, 0], [0] * 3])
    points = points.astype(np.float32)
    valid = np.array([True, True, True, False, False, False])
    params = aug.identity_params()
    _, _, out, ok, _ = _jit_transform(params, box, labels, center, points, valid)
    np.testing.assert_array_equal(np.asarray(ok), [True, False, False, False, False, False])
    np.testing.assert_allclose(np.asarray(out)[0], [11.5, 11.5, 19.5], atol=1e-5)
    # Move the crop 10 voxels down in z (translation): the lower landmark enters.
    shifted = params._replace(translation_mm=np.array([0, 0, -10 * SPACING], np.float32))
    _, _, out, ok, _ = _jit_transform(shifted, box, labels, center, points, valid)
    np.testing.assert_array_equal(np.asarray(ok), [True, False, True, False, False, False])
    expected = [[11.5, 11.5, 29.5], [11.5, 11.5, 7.5]]
    np.testing.assert_allclose(np.asarray(out)[[0, 2]], expected, atol=1e-4)


def _sitk_resample(array, params, center, interpolator):
    """The reference's way: SimpleITK composite transform (affine after B-spline), resampling."""
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))  # numpy view is (z, y, x)
    image.SetSpacing((SPACING,) * 3)
    bspline = sitk.BSplineTransform(3, 3)
    bspline.SetTransformDomainPhysicalDimensions(tuple(float(n * SPACING) for n in CROP))
    bspline.SetTransformDomainMeshSize([3, 3, 3])
    coefficients = [params.displacement_mm[..., d].ravel(order="F") for d in range(3)]
    bspline.SetParameters(tuple(np.concatenate(coefficients).astype(float)))
    matrix = aug.rotation_matrix(params.rotation_rad.astype(float), xp=np) * params.scale[None, :]
    c_out = (np.array(CROP) - 1) / 2 * SPACING
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation(tuple(center * SPACING + params.translation_mm - matrix @ c_out))
    reference = sitk.Image(list(CROP), sitk.sitkFloat32)
    reference.SetSpacing((SPACING,) * 3)
    transform = sitk.CompositeTransform([affine, bspline])  # B-spline first
    out = sitk.Resample(image, reference, transform, interpolator, 0.0, image.GetPixelID())
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def _keys_brute_force(box, points, cval):
    """Cubic convolution (Keys, a = -0.5) tap by tap in float64."""

    def kernel(x):
        x = np.abs(x)
        near = (1.5 * x - 2.5) * x * x + 1
        far = ((-0.5 * x + 2.5) * x - 4) * x + 2
        return np.where(x <= 1, near, np.where(x < 2, far, 0.0))

    points = np.asarray(points, np.float64)
    base = np.floor(points).astype(int)
    out = np.zeros(points.shape[:-1])
    for offset in itertools.product(range(-1, 3), repeat=3):
        index = base + np.array(offset)
        weight = np.prod(kernel(points - index), axis=-1)
        inside = np.all((index >= 0) & (index < np.array(box.shape)), axis=-1)
        clipped = np.clip(index, 0, np.array(box.shape) - 1)
        values = np.where(inside, box[clipped[..., 0], clipped[..., 1], clipped[..., 2]], cval)
        out += weight * values
    return out


def test_matches_simpleitk_composite_transform():
    rng = np.random.default_rng(7)
    box = rng.uniform(-1, 1, BOX).astype(np.float32)
    labels = rng.integers(0, 26, BOX).astype(np.uint8)
    center = ((np.array(BOX) - 1) / 2).astype(np.float32)
    params = aug.sample_params(rng, dataclasses.replace(RANGES, translation_mm=4.0))
    params = params._replace(intensity_shift=np.float32(0), intensity_scale=np.float32(1))
    points, valid = np.zeros((6, 3), np.float32), np.zeros(6, bool)
    image, label, _, _, grid = _jit_transform(params, box, labels, center, points, valid)
    grid = np.asarray(grid)
    inside = np.all((grid >= 0) & (grid <= np.array(BOX) - 1), axis=-1)
    assert inside.mean() > 0.3
    expected = _sitk_resample(box, params, center, sitk.sitkLinear)
    linear = np.asarray(aug.apply_linear(box, grid))  # ITK has no cubic convolution: the grid
    np.testing.assert_allclose(linear[inside], expected[inside], atol=1e-4)
    cubic = np.clip(_keys_brute_force(box, grid, aug.OUTSIDE_VALUE), -1, 1)  # + intensity clip
    np.testing.assert_allclose(np.asarray(image), cubic, atol=1e-5)
    expected = _sitk_resample(labels, params, center, sitk.sitkNearestNeighbor)
    assert np.mean(np.asarray(label)[inside] == expected[inside]) > 0.999


def test_intensity_and_outside_value():
    params = aug.identity_params()._replace(
        intensity_shift=np.float32(0.25), intensity_scale=np.float32(1.25)
    )
    image = np.array([-1.0, -0.5, 0.0, 0.6], np.float32)
    np.testing.assert_allclose(aug.apply_intensity(image, params), [-0.9375, -0.3125, 0.3125, 1.0])
    box = np.zeros((4, 4, 4), np.float32)
    grid = np.full((1, 1, 1, 3), 10.0, np.float32)
    assert float(aug.apply_linear(box, grid)[0, 0, 0]) == aug.OUTSIDE_VALUE


def test_bad_ranges_raise():
    with pytest.raises(ValueError, match="control_points"):
        aug.AugmentRanges(control_points=3)
    with pytest.raises(ValueError, match="translation_mm"):
        aug.AugmentRanges(translation_mm=-1.0)


def test_cubic_sampling_is_interpolating_exact_on_quadratics_and_reads_cval_outside():
    rng = np.random.default_rng(3)
    box = rng.normal(size=(7, 8, 9)).astype(np.float32)
    whole = np.stack(np.meshgrid(*[np.arange(n) for n in box.shape], indexing="ij"), -1)
    np.testing.assert_array_equal(np.asarray(aug.apply_cubic(box, whole.astype(np.float32))), box)
    # Keys' kernel reproduces polynomials up to degree 2 exactly (away from the box edge)
    grid = np.stack(np.meshgrid(*[np.arange(12.0)] * 3, indexing="ij"), -1)

    def quadratic(p):
        return 0.01 * p[..., 0] ** 2 - 0.02 * p[..., 1] * p[..., 2] + 0.03 * p[..., 2] + 0.5

    points = rng.uniform(1.0, 10.0, (4, 5, 6, 3))
    got = np.asarray(aug.apply_cubic(quadratic(grid).astype(np.float32), points.astype(np.float32)))
    np.testing.assert_allclose(got, quadratic(points), atol=2e-6)
    # every tap outside the box reads cval, far away on either side too (negative starts must not
    # wrap around to the far end of the box)
    far = np.array([[[[-16.0, 3, 3], [3, -40, 3], [3, 3, 100.0], [-1.5, 3, 3]]]], np.float32)
    out = np.asarray(aug.apply_cubic(box, far, cval=-0.5))
    np.testing.assert_array_equal(out[0, 0, :3], -0.5)
    # one voxel beyond the edge: taps at -3..0, only the one at 0 inside (weight far(1.5))
    w = np.asarray(aug.keys_weights(np.float32(0.5)))
    assert out[0, 0, 3] == pytest.approx(-0.5 * w[:3].sum() + w[3] * box[0, 3, 3], abs=1e-6)
