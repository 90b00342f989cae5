"""Image grids in the LPS world: index <-> physical transforms, reorientation, bounding grids.

Pure numpy. A grid is described exactly as SimpleITK does: ``physical = origin + D @ (spacing *
index)`` with ``D`` the 3x3 direction matrix (column ``j`` = unit vector of index axis ``j`` in the
world). World axes: +x towards patient left (L), +y posterior (P), +z superior (S). Arrays are
``(x, y, z)``.
"""

import itertools
from dataclasses import dataclass

import numpy as np

# Anatomical letter each world axis points towards (+) and away from (-), LPS world.
_POSITIVE_CODES = ("L", "P", "S")
_NEGATIVE_CODES = ("R", "A", "I")


@dataclass(frozen=True)
class Geometry:
    """Size, spacing, origin and direction of a 3-D grid (SimpleITK conventions, LPS world).

    Attributes:
        size: (x, y, z) number of voxels.
        spacing_mm: (x, y, z) voxel spacing in mm.
        origin_mm: physical position (LPS mm) of voxel index (0, 0, 0).
        direction: 9 floats, row-major 3x3 direction matrix (SimpleITK ``GetDirection`` order);
            column j is the world direction of index axis j.
    """

    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        size_arr = np.asarray(self.size).reshape(-1)
        size = tuple(int(s) for s in size_arr)
        if not np.array_equal(size_arr, size):
            raise ValueError(f"Geometry size must be integers, got {self.size}")
        spacing = tuple(float(s) for s in np.asarray(self.spacing_mm, np.float64).reshape(-1))
        origin = tuple(float(s) for s in np.asarray(self.origin_mm, np.float64).reshape(-1))
        direction = tuple(float(s) for s in np.asarray(self.direction, np.float64).reshape(-1))
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"Geometry size must be 3 positive ints, got {self.size}")
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(
                f"Geometry spacing_mm must be 3 positive floats, got {self.spacing_mm}"
            )
        if len(origin) != 3 or not all(np.isfinite(origin)):
            raise ValueError(f"Geometry origin_mm must be 3 finite floats, got {self.origin_mm}")
        if len(direction) != 9 or not all(np.isfinite(direction)):
            raise ValueError(f"Geometry direction must be 9 finite floats, got {self.direction}")
        if abs(np.linalg.det(np.reshape(direction, (3, 3)))) < 1e-6:
            raise ValueError(f"Geometry direction matrix is singular: {direction}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin_mm", origin)
        object.__setattr__(self, "direction", direction)

    @property
    def matrix(self) -> np.ndarray:
        """(3, 3) direction matrix; column j = world direction of index axis j."""
        return np.reshape(np.array(self.direction, np.float64), (3, 3))

    def index_to_physical(self, points_vox) -> np.ndarray:
        """Continuous voxel indices (..., 3) (x, y, z) -> physical points (..., 3) in LPS mm."""
        points_vox = np.asarray(points_vox, np.float64)
        scaled = points_vox * np.array(self.spacing_mm)
        return np.array(self.origin_mm) + scaled @ self.matrix.T

    def physical_to_index(self, points_mm) -> np.ndarray:
        """Physical points (..., 3) in LPS mm -> continuous voxel indices (..., 3) (x, y, z)."""
        points_mm = np.asarray(points_mm, np.float64)
        inverse = np.linalg.inv(self.matrix)
        return ((points_mm - np.array(self.origin_mm)) @ inverse.T) / np.array(self.spacing_mm)

    @classmethod
    def axis_aligned(cls, center_mm, size, spacing_mm) -> "Geometry":
        """Identity-direction grid whose centre (index (size - 1) / 2) sits at ``center_mm``.

        Args:
            center_mm: (3,) physical centre, LPS mm.
            size: (3,) voxels (x, y, z).
            spacing_mm: scalar or (3,) mm.
        """
        size_arr = np.asarray(size, np.int64).reshape(3)
        spacing = np.broadcast_to(np.asarray(spacing_mm, np.float64), (3,))
        origin = np.asarray(center_mm, np.float64).reshape(3) - (size_arr - 1) / 2.0 * spacing
        return cls(tuple(size_arr), tuple(spacing), tuple(origin))

    def corners_mm(self) -> np.ndarray:
        """(8, 3) physical positions (LPS mm) of the 8 corner voxel centres."""
        last = np.array(self.size, np.float64) - 1.0
        corners = np.array(list(itertools.product((0.0, 1.0), repeat=3))) * last
        return self.index_to_physical(corners)


@dataclass(frozen=True, eq=False)  # array field: compare arrays explicitly
class Volume:
    """An image array with its grid.

    Attributes:
        array: (x, y, z) array in SimpleITK index order, ``array.shape == geometry.size``.
        geometry: the grid of the array.
    """

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self):
        if tuple(np.shape(self.array)) != self.geometry.size:
            raise ValueError(
                f"Volume array shape {np.shape(self.array)} != geometry size {self.geometry.size}"
            )


def closest_axes(direction) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """World axis and sign closest to each index axis, as a permutation (oblique matrices too).

    The matrix is first orthogonalised (polar decomposition), then index axes are assigned, in
    order x, y, z, to the world axis with the largest absolute cosine among those not yet taken
    (the rule nibabel's ``io_orientation`` uses; VerSe's BIDS centroid files were made with it).
    ITK's DICOMOrient takes the largest cosine overall first; the two agree except for directions
    far from any permutation (near-ties between two world axes).

    Args:
        direction: 9 floats (row-major) or a (3, 3) matrix, columns = index axes.

    Returns:
        (world_axis, sign): for index axis j, ``world_axis[j]`` in {0, 1, 2} and
        ``sign[j]`` in {1, -1}.
    """
    matrix = np.reshape(np.asarray(direction, np.float64), (3, 3))
    u, _, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    world_axis, sign = [], []
    for j in range(3):
        column = np.abs(rotation[:, j])
        column[world_axis] = -1.0
        axis = int(np.argmax(column))
        world_axis.append(axis)
        sign.append(1 if rotation[axis, j] > 0 else -1)
    return tuple(world_axis), tuple(sign)


def axis_codes(direction) -> tuple[str, str, str]:
    """Anatomical direction each index axis points TOWARDS (to-naming, as VerSe/BIDS JSON).

    Identity direction -> ('L', 'P', 'S'). Oblique directions get the closest permutation's codes.

    Args:
        direction: 9 floats (row-major) or (3, 3) matrix.
    """
    world_axis, sign = closest_axes(direction)
    return tuple(
        (_POSITIVE_CODES if s > 0 else _NEGATIVE_CODES)[a]
        for a, s in zip(world_axis, sign, strict=True)
    )


def codes_to_axes(codes) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Axis codes (e.g. ('P', 'I', 'R')) -> (world_axis, sign) per index axis; ValueError if bad."""
    letters = tuple(str(c).upper() for c in codes)
    world_axis, sign = [], []
    for letter in letters:
        if letter in _POSITIVE_CODES:
            world_axis.append(_POSITIVE_CODES.index(letter))
            sign.append(1)
        elif letter in _NEGATIVE_CODES:
            world_axis.append(_NEGATIVE_CODES.index(letter))
            sign.append(-1)
        else:
            raise ValueError(f"unknown axis code {letter!r} in {codes}")
    if len(letters) != 3 or sorted(world_axis) != [0, 1, 2]:
        raise ValueError(f"axis codes {codes} do not name each of L/R, A/P, S/I exactly once")
    return tuple(world_axis), tuple(sign)


@dataclass(frozen=True)
class Reorientation:
    """A lossless permutation/flip of a grid's index axes (no resampling).

    New index axis k is original axis ``perm[k]``, reversed when ``flip[k]``.

    Attributes:
        perm: (3,) original axis of each new axis.
        flip: (3,) whether the new axis runs opposite to the original one.
        original: the grid before reorientation.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    original: Geometry

    @property
    def geometry(self) -> Geometry:
        """The reoriented grid (same physical voxel centres as ``original``)."""
        size = tuple(self.original.size[p] for p in self.perm)
        spacing = tuple(self.original.spacing_mm[p] for p in self.perm)
        signs = np.where(np.array(self.flip), -1.0, 1.0)
        matrix = self.original.matrix[:, list(self.perm)] * signs[None, :]
        origin = self.original.index_to_physical(self.to_original_index(np.zeros(3)))
        return Geometry(size, spacing, tuple(origin), tuple(matrix.reshape(-1)))

    def to_original_index(self, points_vox) -> np.ndarray:
        """Continuous indices (..., 3) of the reoriented grid -> those of ``original``."""
        points_vox = np.asarray(points_vox, np.float64)
        out = np.empty_like(points_vox)
        for k, (p, f) in enumerate(zip(self.perm, self.flip, strict=True)):
            v = points_vox[..., k]
            out[..., p] = (self.original.size[p] - 1.0 - v) if f else v
        return out

    def from_original_index(self, points_vox) -> np.ndarray:
        """Continuous indices (..., 3) of ``original`` -> those of the reoriented grid."""
        points_vox = np.asarray(points_vox, np.float64)
        out = np.empty_like(points_vox)
        for k, (p, f) in enumerate(zip(self.perm, self.flip, strict=True)):
            v = points_vox[..., p]
            out[..., k] = (self.original.size[p] - 1.0 - v) if f else v
        return out

    def apply(self, volume: Volume) -> Volume:
        """Reorient a volume on ``original`` (array (x, y, z)) -> volume on ``geometry``."""
        if volume.geometry.size != self.original.size:
            raise ValueError(f"volume size {volume.geometry.size} != {self.original.size}")
        array = np.transpose(volume.array, self.perm)
        array = np.flip(array, [k for k in range(3) if self.flip[k]])
        return Volume(array, self.geometry)

    def undo(self, volume: Volume) -> Volume:
        """Bring a volume on the reoriented grid back to ``original`` exactly (array, geometry)."""
        if volume.geometry.size != self.geometry.size:
            raise ValueError(
                f"volume size {volume.geometry.size} != reoriented {self.geometry.size}"
            )
        array = np.flip(volume.array, [k for k in range(3) if self.flip[k]])
        array = np.transpose(array, np.argsort(self.perm))
        return Volume(array, self.original)


def reorientation_to_codes(geometry: Geometry, codes) -> Reorientation:
    """Permutation/flip that makes the index axes of ``geometry`` point towards ``codes``.

    Each original index axis is first snapped to its closest world axis (``closest_axes``); an
    oblique grid keeps its small rotation in the reoriented ``Reorientation.geometry``.

    Args:
        geometry: the grid to reorient.
        codes: 3 axis codes in to-naming, e.g. ('P', 'I', 'R') or ('L', 'P', 'S').
    """
    target_axis, target_sign = codes_to_axes(codes)
    own_axis, own_sign = closest_axes(geometry.direction)
    perm, flip = [], []
    for axis, sign in zip(target_axis, target_sign, strict=True):
        j = own_axis.index(axis)
        perm.append(j)
        flip.append(bool(own_sign[j] != sign))
    return Reorientation(tuple(perm), tuple(flip), geometry)


def reorient_to_identity(volume: Volume) -> tuple[Volume, "Reorientation"]:
    """Transpose/flip a volume so its index axes point towards L, P, S (closest to identity).

    Lossless: the returned volume holds the same voxels at the same physical positions. For a
    permutation direction the new direction is exactly the identity; for an oblique one it is the
    oblique matrix with permuted/negated columns (near identity), never rounded.

    Returns:
        (reoriented volume, record whose ``undo`` goes back exactly).
    """
    record = reorientation_to_codes(volume.geometry, _POSITIVE_CODES)
    return record.apply(volume), record


def physical_bounding_grid(geometry: Geometry, spacing_mm: float) -> Geometry:
    """Identity-direction grid at isotropic ``spacing_mm`` covering all voxel centres of a grid.

    The grid is centred on the physical bounding box of the 8 corner voxel centres (oblique grids
    too); its size is the smallest that contains that box.
    """
    spacing_mm = float(spacing_mm)
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    corners = geometry.corners_mm()
    low, high = corners.min(axis=0), corners.max(axis=0)
    size = np.ceil((high - low) / spacing_mm - 1e-6).astype(np.int64) + 1
    return Geometry.axis_aligned((low + high) / 2.0, tuple(np.maximum(size, 1)), spacing_mm)
