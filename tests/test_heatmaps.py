"""Tests of Gaussian heatmap targets, the spine target and candidate peak finding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from verse_jax.heatmaps import Candidates, find_candidates, gaussian_heatmaps, spine_heatmap

SHAPE = (16, 12, 20)


def _gaussians(points, valid, sigma, shape=SHAPE, **kwargs):
    fn = functools.partial(gaussian_heatmaps, shape=shape, **kwargs)
    return jax.jit(fn)(points, valid, sigma)


def _spine(points, valid, shape=SHAPE, **kwargs):
    return jax.jit(functools.partial(spine_heatmap, shape=shape, **kwargs))(points, valid)


def test_gaussian_heatmap_peaks_at_a_subvoxel_landmark_with_the_analytic_value():
    points = jnp.array([[5.3, 6.7, 8.2], [10.0, 3.0, 2.0], [1.0, 1.0, 1.0]])
    valid = jnp.array([True, True, False])
    sigma = jnp.array([2.0, 3.0, 4.0])
    h = _gaussians(points, valid, sigma)
    assert h.shape == (*SHAPE, 3) and h.dtype == jnp.float32
    peak = np.unravel_index(int(jnp.argmax(h[..., 0])), SHAPE)
    assert np.all(np.abs(np.array(peak) - np.array([5.3, 6.7, 8.2])) <= 0.5)
    d2 = 0.3**2 + 0.3**2 + 0.2**2  # from voxel (5, 7, 8) to the landmark
    expected = 1000.0 / (math.sqrt(2 * math.pi) * 2.0) ** 3 * math.exp(-d2 / 8.0)
    assert float(h[5, 7, 8, 0]) == pytest.approx(expected, rel=1e-5)
    # Integer landmark, sigma 4: the paper's peak 1000 / (sqrt(2 pi) 4)^3 = 0.992.
    h4 = _gaussians(points[1:2], valid[1:2], 4.0)
    assert float(jnp.max(h4)) == pytest.approx(0.99213, rel=1e-4)
    assert float(jnp.max(jnp.abs(h[..., 2]))) == 0.0


def test_unnormalized_heatmap_has_peak_scale():
    h = _gaussians(jnp.array([[4.0, 5.0, 6.0]]), jnp.array([True]), 3.0, scale=1.0, normalize=False)
    assert float(h[4, 5, 6, 0]) == pytest.approx(1.0)
    assert float(h[4, 5, 9, 0]) == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_gaussian_heatmap_gradient_wrt_sigma_is_finite_and_nonzero():
    points = jnp.array([[5.3, 6.7, 8.2], [10.0, 3.0, 2.0]])
    valid = jnp.array([True, False])
    target = jnp.zeros((*SHAPE, 2))

    def loss(sigma):
        return jnp.sum((gaussian_heatmaps(points, valid, sigma, SHAPE) - target) ** 2)

    grad = jax.jit(jax.grad(loss))(jnp.array([4.0, 4.0]))
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(grad[0]) < 0  # wider Gaussian: lower peak, smaller sum of squares
    assert float(grad[1]) == 0.0  # invalid landmark


def _windowed_gaussian(point, sigma, shape):
    """The reference numpy generator, written plainly: exp(...) filled only in the per-axis
    window int(mu - 2.5 sigma) <= i < int(mu + 2.5 sigma) (Python int truncates toward 0)."""
    out = np.zeros(shape)
    box = tuple(slice(max(int(m - 2.5 * sigma), 0), max(int(m + 2.5 * sigma), 0)) for m in point)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    values = np.exp(-np.sum((grid - np.asarray(point)) ** 2, -1) / (2 * sigma**2))
    out[box] = values[box]
    return out


def test_spine_heatmap_matches_scipy_gaussian_filter():
    points = jnp.array([[5.0, 6.0, 3.5], [6.0, 6.5, 9.0], [7.0, 7.0, 15.0], [0.0, 0.0, 0.0]])
    valid = jnp.array([True, True, True, False])
    h = _spine(points, valid)
    raw = sum(
        _windowed_gaussian(np.asarray(p, np.float64), 3.0, SHAPE)
        for p, v in zip(points, valid, strict=True)
        if v
    )
    expected = scipy.ndimage.gaussian_filter(raw, 3.0, mode="nearest", truncate=4.0)
    assert h.shape == SHAPE
    np.testing.assert_allclose(h, expected, atol=1e-6)
    unblurred = _spine(points, valid, blur_sigma_vox=0.0)
    np.testing.assert_allclose(unblurred, raw, atol=1e-6)


REFERENCE_RULE = {"min_distance_vox": 7.0, "min_max_value": 0.25, "relative_threshold": 0.1}


def _candidates(heatmap, **kwargs):
    return jax.jit(functools.partial(find_candidates, **(REFERENCE_RULE | kwargs)))(heatmap)


def _peaks(shape, points, values):
    h = np.zeros(shape, np.float32)
    for p, v in zip(points, values, strict=True):
        h[p] = v
    return jnp.asarray(h)


def test_find_candidates_finds_planted_integer_peaks_in_order():
    h = _peaks((20, 20, 30), [(10, 10, 5), (10, 10, 20), (3, 15, 12)], [1.0, 0.8, 0.5])
    c = _candidates(h, max_candidates=4)
    assert isinstance(c, Candidates)
    np.testing.assert_array_equal(c.valid, [True, True, True, False])
    np.testing.assert_allclose(c.values, [1.0, 0.8, 0.5, 0.0])
    np.testing.assert_allclose(c.points_vox[:3], [[10, 10, 5], [10, 10, 20], [3, 15, 12]])


def test_find_candidates_refines_a_symmetric_quadratic_peak_to_subvoxel():
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (12, 12, 12)], indexing="ij"), -1)
    centre = np.array([5.3, 6.6, 4.75])
    h = 10.0 - np.sum((grid - centre) ** 2, -1)  # exactly quadratic along each axis
    c = _candidates(jnp.asarray(h, jnp.float32), max_candidates=2, min_distance_vox=100.0)
    np.testing.assert_allclose(c.points_vox[0], centre, atol=1e-4)
    np.testing.assert_array_equal(c.valid, [True, False])


def test_find_candidates_respects_the_exclusion_radius():
    # A second peak 6 voxels away is inside the 7-voxel ball, one 8 voxels away is not.
    h = _peaks((24, 24, 24), [(12, 12, 4), (12, 12, 10), (12, 12, 20)], [1.0, 0.9, 0.3])
    c = _candidates(h, max_candidates=3)
    np.testing.assert_array_equal(c.valid, [True, True, False])
    np.testing.assert_allclose(c.points_vox[1], [12, 12, 20])
    c = _candidates(h, max_candidates=3, min_distance_vox=5.0)
    np.testing.assert_allclose(c.points_vox[:3, 2], [4, 10, 20])


def test_find_candidates_thresholds():
    h = _peaks((16, 16, 16), [(3, 3, 3), (12, 12, 12), (3, 12, 8)], [1.0, 0.11, 0.09])
    c = _candidates(h, max_candidates=4)  # 0.09 <= 0.1 * 1.0 ends the search
    np.testing.assert_array_equal(c.valid, [True, True, False, False])
    weak = _candidates(h * 0.2, max_candidates=4)  # global max 0.2 < 0.25: only the maximum
    np.testing.assert_array_equal(weak.valid, [True, False, False, False])
    np.testing.assert_allclose(weak.values[0], 0.2)


def test_find_candidates_vmaps_over_channels():
    a = _peaks((8, 8, 8), [(1, 2, 3)], [1.0])
    b = _peaks((8, 8, 8), [(6, 5, 4)], [2.0])
    heatmaps = jnp.stack([a, b], axis=-1)
    find = functools.partial(find_candidates, max_candidates=2, **REFERENCE_RULE)
    c = jax.jit(jax.vmap(find, in_axes=-1))(heatmaps)
    assert c.points_vox.shape == (2, 2, 3)
    np.testing.assert_allclose(c.points_vox[:, 0], [[1, 2, 3], [6, 5, 4]])
    with pytest.raises(ValueError, match="heatmap"):
        find_candidates(heatmaps, **REFERENCE_RULE)


def _reference_candidates(h, max_candidates, radius, min_max_value, rel):
    """Plain numpy version of docs/reference.md §5.6 (full-volume sphere zeroing)."""
    h = np.array(h, np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in h.shape], indexing="ij"), -1)
    found = []
    while len(found) < max_candidates:
        index = np.array(np.unravel_index(np.argmax(h), h.shape))
        value, point = h[tuple(index)], index.astype(np.float64)
        for axis in range(3):
            if 0 < index[axis] < h.shape[axis] - 1:
                step = np.eye(3, dtype=int)[axis]
                lo, hi = h[tuple(index - step)], h[tuple(index + step)]
                point[axis] += 0.5 * (lo - hi) / (lo - 2 * value + hi)
        if found and value <= rel * found[0][0]:
            break
        found.append((value, point))
        if found[0][0] < min_max_value:
            break
        h[np.sum((grid - point) ** 2, -1) <= radius**2] = 0.0
    return found


def test_find_candidates_matches_a_full_volume_numpy_reference():
    rng = np.random.default_rng(0)
    shape = (14, 11, 24)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centres = rng.uniform(-1, np.array(shape), size=(12, 3))  # some near or beyond the border
    heights = rng.uniform(0.05, 1.0, size=12)
    h = sum(
        a * np.exp(-np.sum((grid - c) ** 2, -1) / 8.0)
        for a, c in zip(heights, centres, strict=True)
    )
    c = _candidates(jnp.asarray(h, jnp.float32), max_candidates=10, min_distance_vox=3.5)
    expected = _reference_candidates(h.astype(np.float32), 10, 3.5, 0.25, 0.1)
    assert int(c.valid.sum()) == len(expected) >= 4
    np.testing.assert_allclose(c.values[: len(expected)], [v for v, _ in expected], rtol=1e-5)
    np.testing.assert_allclose(c.points_vox[: len(expected)], [p for _, p in expected], atol=1e-3)


def test_find_candidates_on_a_padded_heatmap_equals_the_unpadded_search_exactly():
    # Peaks on and next to the true last slice and row: the quadratic refinement must skip the
    # true border (not the padded one), and the padding (even larger values) is never a candidate.
    rng = np.random.default_rng(3)
    shape = (9, 10, 17)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centres = np.concatenate(
        [rng.uniform(0, np.array(shape), size=(6, 3)), [[4.0, 9.0, 16.0], [2.3, 5.5, 15.6]]]
    )
    h = sum(np.exp(-np.sum((grid - c) ** 2, -1) / 6.0) for c in centres).astype(np.float32)
    expected = _candidates(jnp.asarray(h), max_candidates=12, min_distance_vox=2.5)
    assert int(expected.valid.sum()) >= 5
    padded = np.full((12, 13, 24), 5.0, np.float32)  # larger than any true value
    padded[: shape[0], : shape[1], : shape[2]] = h
    got = _candidates(
        jnp.asarray(padded), max_candidates=12, min_distance_vox=2.5, extent=jnp.asarray(shape)
    )
    for name in ("values", "points_vox", "valid"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)


def test_numpy_window_is_the_references_asymmetric_window():
    # mu = 5.0, sigma = 3: int(-2.5) = -2 -> from 0; int(12.5) = 12 -> voxels 0..11 in x.
    # mu = 6.5: int(-1.0) = -1 -> 0, int(14.0) = 14 -> 0..13 (clipped at size 12 here).
    point = jnp.array([[5.0, 6.5, 9.7]])
    shape = (12, 12, 20)
    h = gaussian_heatmaps(
        point, jnp.array([True]), 3.0, shape, scale=1.0, normalize=False, window=2.5
    )
    expected = _windowed_gaussian(np.array([5.0, 6.5, 9.7]), 3.0, shape)
    np.testing.assert_allclose(np.asarray(h[..., 0]), expected, atol=1e-6)
    # z: int(9.7 - 7.5) = 2 .. int(17.2) = 17 (exclusive): 2.7 sigma below, 2.4 above.
    assert float(h[5, 6, 1, 0]) == 0.0 and float(h[5, 6, 2, 0]) > 0
    assert float(h[5, 6, 16, 0]) > 0 and float(h[5, 6, 17, 0]) == 0.0
