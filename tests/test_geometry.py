"""Tests of verse_jax.geometry: index <-> physical, axis codes, reorientation, bounding grids."""

import itertools

import numpy as np
import pytest

from verse_jax.geometry import (
    Geometry,
    Volume,
    axis_codes,
    physical_bounding_grid,
    reorient_to_identity,
    reorientation_to_codes,
)


def _rotation(angles):
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


# Direction matrices (columns = index axes in LPS world) named by their to-naming codes.
PIR = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], np.float64)
RAS = np.diag([-1.0, -1.0, 1.0])
LPS = np.eye(3)
OBLIQUE = PIR @ _rotation((0.1, -0.2, 0.15))  # near PIR, rotated ~15 degrees
DIRECTIONS = {"LPS": LPS, "RAS": RAS, "PIR": PIR, "oblique": OBLIQUE}


def _geometry(direction, size=(5, 6, 7)):
    return Geometry(size, (0.8, 1.1, 2.5), (10.0, -20.0, 30.5), tuple(direction.reshape(-1)))


def test_axis_codes_to_naming():
    assert axis_codes(LPS.reshape(-1)) == ("L", "P", "S")
    assert axis_codes(RAS) == ("R", "A", "S")
    assert axis_codes(PIR) == ("P", "I", "R")
    assert axis_codes(OBLIQUE) == ("P", "I", "R")


@pytest.mark.parametrize("name", DIRECTIONS)
def test_index_physical_round_trip(name):
    geometry = _geometry(DIRECTIONS[name])
    points_vox = np.random.default_rng(0).uniform(-2, 8, size=(4, 5, 3))
    points_mm = geometry.index_to_physical(points_vox)
    assert points_mm.shape == (4, 5, 3)
    np.testing.assert_allclose(geometry.physical_to_index(points_mm), points_vox, atol=1e-10)
    # Origin and one step along index axis x: origin + spacing_x * column 0.
    np.testing.assert_allclose(geometry.index_to_physical([0, 0, 0]), geometry.origin_mm)
    step = geometry.index_to_physical([1, 0, 0]) - np.array(geometry.origin_mm)
    np.testing.assert_allclose(step, 0.8 * DIRECTIONS[name][:, 0], atol=1e-12)


def test_axis_aligned_centre():
    geometry = Geometry.axis_aligned((1.0, 2.0, 3.0), (4, 5, 6), 2.0)
    assert geometry.direction == tuple(np.eye(3).reshape(-1))
    np.testing.assert_allclose(geometry.index_to_physical([1.5, 2.0, 2.5]), [1.0, 2.0, 3.0])


def test_geometry_rejects_bad_values():
    with pytest.raises(ValueError, match="size"):
        Geometry((0, 2, 2), (1, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="integers"):
        Geometry((2.5, 2, 2), (1, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="singular"):
        Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 0, 0, 1, 0, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="spacing"):
        Geometry((2, 2, 2), (1, -1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="shape"):
        Volume(np.zeros((2, 2, 3)), Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0)))


@pytest.mark.parametrize("name", DIRECTIONS)
def test_reorient_to_identity_is_lossless(name):
    geometry = _geometry(DIRECTIONS[name])
    array = np.arange(np.prod(geometry.size), dtype=np.int16).reshape(geometry.size)
    volume = Volume(array, geometry)
    reoriented, record = reorient_to_identity(volume)
    assert axis_codes(reoriented.geometry.direction) == ("L", "P", "S")
    if name != "oblique":
        assert reoriented.geometry.direction == tuple(np.eye(3).reshape(-1))
    # Every voxel keeps its value and physical position.
    index = np.stack(np.meshgrid(*[np.arange(s) for s in geometry.size], indexing="ij"), -1)
    new_index = np.rint(reoriented.geometry.physical_to_index(geometry.index_to_physical(index)))
    new_index = new_index.astype(np.int64)
    np.testing.assert_array_equal(reoriented.array[tuple(np.moveaxis(new_index, -1, 0))], array)
    back = record.undo(reoriented)
    assert back.geometry == geometry
    np.testing.assert_array_equal(back.array, array)


def test_reorientation_index_maps_are_inverse():
    record = reorientation_to_codes(_geometry(OBLIQUE), ("R", "A", "S"))
    points = np.random.default_rng(1).uniform(0, 5, size=(6, 3))
    np.testing.assert_allclose(record.from_original_index(record.to_original_index(points)), points)
    original = record.original
    np.testing.assert_allclose(
        record.geometry.index_to_physical(points),
        original.index_to_physical(record.to_original_index(points)),
        atol=1e-10,
    )


@pytest.mark.parametrize("name", DIRECTIONS)
def test_physical_bounding_grid_contains_corners(name):
    geometry = _geometry(DIRECTIONS[name], size=(9, 12, 5))
    grid = physical_bounding_grid(geometry, 1.5)
    assert grid.direction == tuple(np.eye(3).reshape(-1))
    assert grid.spacing_mm == (1.5, 1.5, 1.5)
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in geometry.size])))
    corners_vox = grid.physical_to_index(geometry.index_to_physical(corners))
    assert np.all(corners_vox >= -1e-9)
    assert np.all(corners_vox <= np.array(grid.size) - 1 + 1e-9)
    # Tight: one voxel fewer would not contain the extent.
    extent = corners_vox.max(0) - corners_vox.min(0)
    assert np.all(np.array(grid.size) - 1 < extent + 1)
