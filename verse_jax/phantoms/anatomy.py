"""Synthetic spine anatomy for the phantoms: a curved spine built from implicit shapes in mm.

Everything here lives in the LPS world (+x patient left, +y posterior, +z superior), in mm.
A vertebra has a local frame at its body centre with axes ``u`` (towards the patient's left),
``v`` (posterior) and ``w`` (superior, along the spine's centreline). Each part of the anatomy is
a :class:`Shape`: an approximate signed distance function (negative inside, mm) in a local frame,
with a local bounding box, a tissue and, for vertebrae, its VerSe id. ``verse_jax.phantoms``
evaluates the shapes at the physical position of every voxel of an output grid.
"""

from dataclasses import dataclass

import numpy as np

from verse_jax.labels import T13

# Level positions (0 = C1 ... 6 = C7, 7 = T1 ... 18 = T12, 19 = L1 ... 23 = L5) used to interpolate
# per-level dimensions; T13 and L6 get in-between / extrapolated positions.
_LEVEL = {**{i: float(i - 1) for i in range(1, 25)}, T13: 18.6, 25: 23.8}

# fmt: off
# Anchors (level position, value) of vertebra dimensions in mm, linearly interpolated:
# body half-width a, half-depth b, half-height h; disc height below; canal radii; arch thickness;
# spinous process length, downward angle and vertical radius; transverse process tip (u, v), radius.
_DIMS = {
    "a": ((1, 8.0), (2, 8.5), (6, 11), (7, 12), (12, 14), (18, 19), (19, 20), (23, 24)),
    "b": ((1, 7.5), (2, 7.5), (6, 8), (7, 8.5), (12, 12), (18, 15), (19, 16), (23, 17)),
    "h": ((1, 8.5), (2, 6.5), (6, 7), (7, 8), (12, 9.5), (18, 11.5), (19, 12.5), (23, 13)),
    "disc": ((1, 5), (6, 5), (7, 4), (12, 5), (18, 7), (19, 9), (23, 11)),
    "canal_u": ((1, 12), (6, 12), (7, 9), (12, 8), (18, 10), (19, 11), (23, 12.5)),
    "canal_v": ((1, 7.5), (6, 7.5), (7, 7.5), (12, 8), (18, 8.5), (23, 8.5)),
    "arch": ((1, 3), (6, 3.2), (7, 4.5), (18, 5), (19, 6), (23, 6.5)),
    "spine_len": ((1, 22), (2, 12), (5, 16), (6, 28), (7, 32), (12, 38), (18, 32), (19, 30),
                  (23, 25)),
    "spine_deg": ((1, 15), (5, 20), (6, 25), (7, 35), (12, 60), (18, 30), (19, 10), (23, 10)),
    "spine_rw": ((1, 4.5), (6, 4), (7, 5), (18, 6), (19, 9), (23, 9)),
    "tp_u": ((1, 24), (6, 28), (7, 36), (12, 32), (18, 22), (19, 32), (21, 45), (23, 40)),
    "tp_v": ((0, -8), (6, -6), (7, 8), (18, 6), (19, -2), (23, -2)),
    "tp_r": ((1, 3.5), (6, 3.5), (7, 5), (18, 4.5), (19, 4), (23, 4.5)),
}
# Rib cage per thoracic level: hemithorax ellipse centre (cx, cy) and radii (rx, ry) in the
# vertebra's (u, v) plane, the end angle of the rib on that ellipse (deg) and its total drop (mm).
_RIBS = {
    "cx": ((7, 28), (8, 45), (10, 62), (13, 72), (15, 74), (16, 72), (17, 68), (18, 62), (19, 58)),
    "cy": ((7, -5), (8, -10), (10, -16), (13, -20), (15, -20), (19, -18)),
    "rx": ((7, 35), (8, 45), (10, 55), (13, 62), (15, 62), (16, 60), (17, 55), (18, 48), (19, 45)),
    "ry": ((7, 40), (8, 60), (10, 85), (13, 95), (15, 95), (16, 90), (17, 80), (18, 68), (19, 60)),
    "end_deg": ((7, -20), (8, -70), (10, -80), (13, -80), (14, -60), (15, -50), (16, -20),
                (17, 20), (18, 60), (19, 80)),
    "drop": ((7, 20), (8, 45), (10, 70), (13, 85), (15, 80), (16, 65), (17, 45), (18, 25),
             (19, 15)),
}
# Body outline per level position: half-width, half-depth (mm) and the posterior offset (mm) of the
# outline's centre from the spinal centreline (negative: the body centre is anterior of the spine).
_BODY = ((-8, 60, 75, -10), (-5, 82, 100, -12), (-2, 75, 92, -15), (-0.5, 58, 60, -10),
         (3, 58, 55, -10), (6, 75, 65, -10), (7, 150, 85, -30), (9, 155, 100, -40),
         (13, 155, 105, -42), (18, 150, 110, -40), (21, 150, 112, -37), (23, 160, 110, -33),
         (26, 175, 110, -25), (32, 175, 105, -20))
# Sacral segments S1-S5: half-width, half-depth, half-height (mm).
_SACRUM = ((25, 16, 12), (20, 13, 10), (15, 10, 8), (11, 8, 6), (8, 6, 5))
# fmt: on


def body_outline(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body half-width, half-depth and centre offset (mm, each shaped like ``levels``)."""
    table = np.array(_BODY, np.float64)
    return tuple(np.interp(levels, table[:, 0], table[:, i]) for i in (1, 2, 3))


def interpolate(table: dict, key: str, level: float) -> float:
    """Value of a dimension table at a level position (linear, clamped at the ends)."""
    anchors = np.array(table[key], np.float64)
    return float(np.interp(level, anchors[:, 0], anchors[:, 1]))


@dataclass(frozen=True)
class Vertebra:
    """One vertebra: VerSe id, level position, body-centre frame and its dimensions (mm)."""

    label: int
    level: float
    center_mm: np.ndarray
    rotation: np.ndarray
    dims: dict

    @property
    def has_ribs(self) -> bool:
        """Whether ribs articulate with this vertebra (T1-T12 and T13)."""
        return 6.5 < self.level < 19

    @property
    def centroid_mm(self) -> np.ndarray:
        """(3,) vertebral-body centre (C1: centre of the ring), LPS mm."""
        if self.label != 1:
            return self.center_mm
        return self.center_mm + self.rotation[:, 1] * _c1_ring(self)[0]


@dataclass(frozen=True)
class Spine:
    """A sampled spine.

    Attributes:
        vertebrae: C1 first, going inferior.
        sacrum: (center_mm (3,), rotation (3, 3)) frames of S1..S5.
        curve_mm: (M, 3) centreline samples from far above C1 to far below S5, LPS mm.
        curve_level: (M,) level position of each sample (0 = C1, 23 = L5, continuous).
        scale: overall size factor of this patient.
    """

    vertebrae: tuple
    sacrum: tuple
    curve_mm: np.ndarray
    curve_level: np.ndarray
    scale: float


def vertebra_labels(extra: str = "none") -> list[int]:
    """VerSe ids from C1 going inferior; ``extra`` is 'none', 'T13' or 'L6'."""
    if extra not in ("none", "T13", "L6"):
        raise ValueError(f"extra vertebra must be 'none', 'T13' or 'L6', got {extra!r}")
    thoracic = list(range(8, 20)) + ([T13] if extra == "T13" else [])
    return list(range(1, 8)) + thoracic + list(range(20, 25)) + ([25] if extra == "L6" else [])


def _bump(t, t0, t1):
    inside = (t > t0) & (t < t1)
    return np.where(inside, np.sin(np.pi * (t - t0) / (t1 - t0)) ** 2, 0.0)


def _curve_offsets(rng, t, marks) -> tuple[np.ndarray, np.ndarray]:
    """Lateral (x) and posterior (y) offsets (mm) of the centreline at depths ``t`` below C1."""
    c1, t1, l1, s1 = marks
    y = (
        -rng.uniform(-5, 20) * _bump(t, c1 - 20, t1)
        + rng.uniform(10, 45) * _bump(t, t1 - 10, l1 + 10)
        - rng.uniform(5, 35) * _bump(t, l1 - 10, s1 + 10)
        + rng.uniform(-0.05, 0.05) * t
    )
    below = np.maximum(t - (s1 - 15), 0.0)
    y = y + np.where(below < 60, 0.01 * below**2, 36 + 1.2 * (below - 60))
    x = rng.uniform(-0.03, 0.03) * t
    if rng.random() < 0.25:  # marked scoliosis: a primary and a compensating curve
        start = rng.uniform(t1 - 40, l1 - 120)
        mid = start + rng.uniform(120, 220)
        amplitude = rng.choice([-1, 1]) * rng.uniform(8, 30)
        x = x + amplitude * _bump(t, start, mid)
        x = x - amplitude * rng.uniform(0.3, 0.7) * _bump(t, mid, mid + rng.uniform(100, 180))
    else:
        x = x + rng.uniform(-6, 6) * _bump(t, t1, s1)
    return x, y


def _frame(tangent_down: np.ndarray, twist_rad: float) -> np.ndarray:
    """(3, 3) columns (u, v, w): w superior along the curve, v posterior, u = v x w (left)."""
    w = -tangent_down / np.linalg.norm(tangent_down)
    v = np.array([0.0, 1.0, 0.0]) - w[1] * w
    v /= np.linalg.norm(v)
    u = np.cross(v, w)
    c, s = np.cos(twist_rad), np.sin(twist_rad)
    return np.stack([c * u + s * v, -s * u + c * v, w], axis=1)


def sample_spine(rng: np.random.Generator, extra: str = "none") -> Spine:
    """Draw a spine: sizes, disc heights, curvature (lordosis, kyphosis, scoliosis), twist."""
    scale = rng.uniform(0.88, 1.12)
    labels = vertebra_labels(extra)
    dims = []
    for label in labels:
        jitter = 1.0 + 0.03 * rng.standard_normal()
        dims.append({k: interpolate(_DIMS, k, _LEVEL[label]) * scale * jitter for k in _DIMS})
        dims[-1]["spine_deg"] /= scale * jitter
        fractured = 9.5 < _LEVEL[label] and rng.random() < 0.02  # T4 and below
        dims[-1]["wedge"] = rng.uniform(0.1, 0.3) if fractured else 0.0
        dims[-1]["hu_offset"] = rng.normal(0.0, 20.0)
    arc = [0.0, dims[1]["h"] + 12.0 * scale]
    for k in range(1, len(labels) - 1):
        arc.append(arc[-1] + dims[k]["h"] + dims[k]["disc"] + dims[k + 1]["h"])
    sacral = [arc[-1] + dims[-1]["h"] + dims[-1]["disc"] + _SACRUM[0][2] * scale]
    for j in range(1, len(_SACRUM)):
        sacral.append(sacral[-1] + (_SACRUM[j - 1][2] + _SACRUM[j][2] - 1.0) * scale)
    marks = (0.0, arc[labels.index(8)], arc[labels.index(20)], sacral[0])
    t = np.arange(-300.0, sacral[-1] + 300.0, 0.5)
    x, y = _curve_offsets(rng, t, marks)
    curve = np.stack([x, y, -t], axis=1) + rng.uniform(-20, 20, 3) * (1, 1, 0)
    steps = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    length = np.concatenate([[0.0], np.cumsum(steps)])
    length -= np.interp(0.0, t, length)
    tangent = np.gradient(curve, axis=0)

    def frame_at(s, twist):
        centre = np.array([np.interp(s, length, curve[:, i]) for i in range(3)])
        down = np.array([np.interp(s, length, tangent[:, i]) for i in range(3)])
        return centre, _frame(down, twist)

    vertebrae = []
    for label, s, d in zip(labels, arc, dims, strict=True):
        twist = np.deg2rad(0.4 * np.interp(s, length, x) + rng.normal(0, 1.5))
        centre, rotation = frame_at(s, twist)
        vertebrae.append(Vertebra(label, _LEVEL[label], centre, rotation, d))
    sacrum = tuple(frame_at(s, 0.0) for s in sacral)
    levels = [_LEVEL[label] for label in labels] + [_LEVEL[labels[-1]] + 1 + j for j in range(5)]
    anchors = np.array([-1e4, *arc, *sacral, 1e5])
    anchor_levels = np.array([-1e4 / 18, *levels, levels[-1] + (1e5 - sacral[-1]) / 25])
    return Spine(tuple(vertebrae), sacrum, curve, np.interp(length, anchors, anchor_levels), scale)


def _c1_ring(c1: Vertebra) -> tuple[float, float, float]:
    """C1 ring centre (v, mm) and inner radii (u, v) in C1's frame."""
    s = c1.dims["a"] / 8.0  # the patient's scale (C1's 'a' anchor is 8 mm)
    front, back = -8.0 * s, 21.0 * s  # anterior arch behind the dens, posterior arch
    return 0.5 * (front + back), 13.0 * s, 0.5 * (back - front)
