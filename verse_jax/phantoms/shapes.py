"""Implicit shapes of the phantom anatomy: signed distance functions in a local frame (mm) and the
shapes of every structure (vertebrae, discs, ribs, pelvis, skull, organs) of a sampled spine.

A :class:`Shape` is an approximate signed distance function (negative inside, mm) in a local
frame with a local bounding box, a tissue and, for vertebrae, its VerSe id;
``verse_jax.phantoms.render`` evaluates the shapes at the physical position of every voxel.
"""

import itertools
from dataclasses import dataclass

import numpy as np

from verse_jax.phantoms.anatomy import (
    _DIMS,
    _RIBS,
    _SACRUM,
    Spine,
    Vertebra,
    _c1_ring,
    _frame,
    interpolate,
)


@dataclass(frozen=True)
class Shape:
    """One implicit part of the anatomy.

    Attributes:
        kind: 'body' (elliptic cylinder), 'annulus' (elliptic ring), 'capsule' (anisotropic
            capsule / ellipsoid) or 'shell' (ellipsoid shell with an optional hole).
        origin_mm: (3,) frame origin, LPS mm.
        rotation: (3, 3) columns = local axes (u, v, w) in the world.
        params: kind-specific numbers (see ``signed_distance``), mm.
        lo: (3,) lower corner of the local bounding box, mm.
        hi: (3,) upper corner of the local bounding box, mm.
        tissue: 'bone', 'disc', 'lung', 'gas', 'vessel' or 'organ'.
        label: VerSe id for vertebra parts, 0 otherwise.
        hu: intensity for non-bone tissues (HU).
    """

    kind: str
    origin_mm: np.ndarray
    rotation: np.ndarray
    params: tuple
    lo: np.ndarray
    hi: np.ndarray
    tissue: str = "bone"
    label: int = 0
    hu: float = 0.0

    def corners_mm(self, margin: float) -> np.ndarray:
        """(8, 3) world corners of the local bounding box grown by ``margin`` mm."""
        lo, hi = np.asarray(self.lo) - margin, np.asarray(self.hi) + margin
        local = np.array(list(itertools.product(*zip(lo, hi, strict=True))))
        return self.origin_mm + local @ self.rotation.T


def _ellipse(u, v, ru, rv):
    """Approximate signed distance (mm) to an axis-aligned ellipse (radial approximation)."""
    scaled = np.sqrt((u / ru) ** 2 + (v / rv) ** 2)
    return (scaled - 1.0) * min(ru, rv)


def _capsule(u, v, w, p0, p1, radii):
    """Signed distance to a capsule p0-p1 whose local axes are stretched by ``radii``."""
    (a, b, c), (d, e, f) = (np.asarray(p0) / radii).tolist(), (np.asarray(p1) / radii).tolist()
    u, v, w = u / float(radii[0]) - d, v / float(radii[1]) - e, w / float(radii[2]) - f
    du, dv, dw = a - d, b - e, c - f
    length2 = du * du + dv * dv + dw * dw
    if length2 > 0:
        t = np.clip((u * du + v * dv + w * dw) * (1.0 / length2), 0.0, 1.0)
        u, v, w = u - t * du, v - t * dv, w - t * dw
    return (np.sqrt(u * u + v * v + w * w) - 1.0) * float(min(radii))


def signed_distance(shape: Shape, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) of points to a shape.

    Args:
        shape: the shape.
        u, v, w: float32 arrays (any one shape) of point coordinates in the shape's local frame
            (mm along ``shape.rotation``'s columns from ``shape.origin_mm``).

    Returns:
        float32 signed distances in mm, shaped like ``u``.
    """
    p = shape.params
    if shape.kind == "body":  # (a, b, h, waist, posterior cut, wedge, endplate concavity)
        a, b, h, waist, cut, wedge, concave = p
        scale = 1.0 - waist * (1.0 - np.minimum((w / h) ** 2, 1.0))
        radial = np.sqrt((u / (a * scale)) ** 2 + (v / (b * scale)) ** 2)
        sdf = (radial - 1.0) * (b * scale)
        dip = (concave * h) * (1.0 - np.minimum(radial, 1.0) ** 2)
        top = h - (2 * h * wedge) * np.clip((b - v) / (2 * b), 0.0, 1.0) if wedge else h
        return np.maximum(np.maximum(sdf, np.maximum(w - top + dip, -h - w + dip)), v - cut)
    if (
        shape.kind == "annulus"
    ):  # (v centre, inner u radius, inner v radius, thickness, h, w0, vmin)
        vc, ru, rv, t, h, w0, vmin = p
        outer = _ellipse(u, v - vc, ru + t, rv + t)
        inner = _ellipse(u, v - vc, ru, rv)
        sdf = np.maximum(np.maximum(outer, -inner), np.abs(w - w0) - h)
        return np.maximum(sdf, vmin - v)
    if shape.kind == "capsule":  # (p0, p1, radii)
        return _capsule(u, v, w, *p)
    if shape.kind == "shell":  # (radii, thickness, hole radius, hole v, hole w max)
        radii, t, hole_r, hole_v, hole_w = p
        scaled = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2)
        radial = np.sqrt(u * u + v * v + w * w) * (scaled - 1.0) / np.maximum(scaled, 1e-3)
        hole = np.minimum(hole_r - np.sqrt(u**2 + (v - hole_v) ** 2), w - hole_w)
        return np.maximum(np.abs(radial) - 0.5 * t, hole)
    raise ValueError(f"unknown shape kind {shape.kind!r}")


# ---------------------------------------------------------------------------------------------
# The spine: vertebra frames along a smooth curved centreline


# ---------------------------------------------------------------------------------------------
# Shapes of each structure


def _capsule_shape(centre, rotation, p0, p1, radii, **kwargs) -> Shape:
    p0, p1, radii = (np.asarray(x, np.float64) for x in (p0, p1, radii))
    lo, hi = np.minimum(p0, p1) - radii, np.maximum(p0, p1) + radii
    return Shape("capsule", centre, rotation, (p0, p1, radii), lo, hi, **kwargs)


def _body_shape(centre, rotation, a, b, h, form=(0.0, None, 0.0, 0.0), **kwargs) -> Shape:
    """Elliptic cylinder; ``form`` = (waist, posterior cut (default b), wedge, concavity)."""
    waist, cut, wedge, concave = form
    cut = b if cut is None else cut
    lo, hi = np.array([-1.1 * a, -1.1 * b, -h]), np.array([1.1 * a, b, h])
    return Shape("body", centre, rotation, (a, b, h, waist, cut, wedge, concave), lo, hi, **kwargs)


def _tube(verts, offsets, radii, **kwargs) -> list[Shape]:
    """Capsules joining points given in the frames of successive vertebrae.

    Args:
        verts: vertebrae (or anything with ``center_mm`` and ``rotation``).
        offsets: one local (u, v, w) point (mm) per vertebra.
        radii: one (3,) radii per segment (len(verts) - 1).
    """
    points = [
        v.center_mm + v.rotation @ np.asarray(o, float) for v, o in zip(verts, offsets, strict=True)
    ]
    shapes = []
    for v, p0, p1, rad in zip(verts[:-1], points[:-1], points[1:], radii, strict=True):
        local = [v.rotation.T @ (p - v.center_mm) for p in (p0, p1)]
        shapes.append(_capsule_shape(v.center_mm, v.rotation, *local, rad, **kwargs))
    return shapes


def _atlas_shapes(c1: Vertebra) -> list[Shape]:
    c, r, s = c1.center_mm, c1.rotation, c1.dims["a"] / 8.0
    vr, ru, rv = _c1_ring(c1)
    t, back = 4.5 * s, (0, vr + rv + 4.5 * s, 0)
    lo, hi = np.array([-ru - t, vr - rv - t, -5 * s]), np.array([ru + t, vr + rv + t, 5 * s])
    shapes = [Shape("annulus", c, r, (vr, ru, rv, t, 5 * s, 0.0, -1e3), lo, hi, label=1)]
    shapes.append(_capsule_shape(c, r, back, back, (4 * s, 4 * s, 6 * s), label=1))
    for side in (-1, 1):  # lateral masses and transverse processes
        u, v = side * (ru + 1 * s), vr - 4 * s
        shapes.append(
            _capsule_shape(c, r, (u, v, -4 * s), (u, v, 4 * s), (6 * s, 8 * s, 5 * s), label=1)
        )
        shapes.append(
            _capsule_shape(
                c,
                r,
                (side * (ru + 3 * s), v, 0),
                (side * (ru + 22 * s), v, 0),
                (5 * s,) * 3,
                label=1,
            )
        )
    return shapes


def _spinous_shapes(vert: Vertebra, vc: float, w0: float) -> list[Shape]:
    d, c, r = vert.dims, vert.center_mm, vert.rotation
    angle = np.deg2rad(d["spine_deg"])
    root = np.array([0.0, vc + d["canal_v"] + 0.5 * d["arch"], w0])
    tip = root + d["spine_len"] * np.array([0.0, np.cos(angle), -np.sin(angle)])
    thickness = 0.5 * d["arch"] + (1.0 if vert.level >= 19 else 0.5)
    radii = (thickness, 0.8 * d["spine_rw"], d["spine_rw"])
    tips = [tip] if not 1 <= vert.level <= 5 else [tip + (-4, 0, 0), tip + (4, 0, 0)]
    return [_capsule_shape(c, r, root, end, radii, label=vert.label) for end in tips]


def _process_shapes(vert: Vertebra, vc: float, w0: float) -> list[Shape]:
    """Transverse and articular processes of one vertebra, both sides."""
    d, c, r, label = vert.dims, vert.center_mm, vert.rotation, vert.label
    shapes = []
    ru, rv, t = d["canal_u"], d["canal_v"], d["arch"]
    cervical = vert.level < 6.5
    art = (0.8 if cervical else 0.6) * t
    reach = d["h"] + 0.5 * d["disc"] + 1.0
    tp_radii = (d["tp_r"], 0.8 * d["tp_r"], 1.1 * d["tp_r"])
    for side in (-1, 1):
        tip = (side * d["tp_u"], vc + d["tp_v"], w0 + (2.0 if 6.5 < vert.level < 19 else 0))
        root = (side * (ru + 0.5 * t), vc - 0.3 * rv, w0)
        shapes.append(_capsule_shape(c, r, root, tip, tp_radii, label=label))
        if cervical:  # anterior bar: the foramen transversarium lies between the two bars
            front = (side * 0.8 * d["a"], -0.2 * d["b"], 0.0)
            shapes.append(_capsule_shape(c, r, front, tip, tp_radii, label=label))
        ua, v_sup = side * (ru + 0.45 * t), vc + 0.1 * rv
        v_inf = v_sup + 2 * art + 1.5  # inferior facets sit behind the superior ones below
        for v, end in ((v_sup, reach), (v_inf, -reach)):
            shapes.append(_capsule_shape(c, r, (ua, v, w0), (ua, v, end), (art,) * 3, label=label))
    return shapes


def vertebra_shapes(vert: Vertebra) -> list[Shape]:
    """Body, neural arch, spinous, transverse and articular processes (C1: ring; C2: dens)."""
    if vert.label == 1:
        return _atlas_shapes(vert)
    d, c, r, label = vert.dims, vert.center_mm, vert.rotation, vert.label
    a, b, h = d["a"], d["b"], d["h"]
    body = _body_shape(c, r, a, b, h, (0.06, 0.8 * b, d["wedge"], 0.1), label=label)
    vc, w0 = 0.8 * b + d["canal_v"], 0.15 * h
    h_arch = (0.6 if vert.level < 6.5 else 0.55) * h
    ru, rv, t = d["canal_u"], d["canal_v"], d["arch"]
    lo, hi = np.array([-ru - t, 0.5 * b, w0 - h_arch]), np.array([ru + t, vc + rv + t, w0 + h_arch])
    arch = Shape("annulus", c, r, (vc, ru, rv, t, h_arch, w0, 0.5 * b), lo, hi, label=label)
    shapes = [body, arch, *_spinous_shapes(vert, vc, w0), *_process_shapes(vert, vc, w0)]
    if label == 2:  # the dens rises into the ring of C1
        k = d["a"] / 8.5
        shapes.append(
            _capsule_shape(c, r, (0, -1, h - 2), (0, -1, h + 14 * k), (5 * k,) * 3, label=label)
        )
    return shapes


@dataclass(frozen=True)
class _Frame:
    center_mm: np.ndarray
    rotation: np.ndarray
    dims: dict


def disc_shapes(spine: Spine, hu: float) -> list[Shape]:
    """Intervertebral discs from C2-C3 down to L5-S1 (or L6-S1), not labelled."""
    verts, k = spine.vertebrae, spine.scale
    sacrum = _Frame(
        *spine.sacrum[0], {"a": _SACRUM[0][0] * k, "b": _SACRUM[0][1] * k, "h": _SACRUM[0][2] * k}
    )
    shapes = []
    for upper, lower in zip(verts[1:], [*verts[2:], sacrum], strict=True):
        top = upper.center_mm - upper.dims["h"] * upper.rotation[:, 2]
        bottom = lower.center_mm + lower.dims["h"] * lower.rotation[:, 2]
        rotation = _frame(-(upper.rotation[:, 2] + lower.rotation[:, 2]), 0.0)
        a = 0.485 * (upper.dims["a"] + lower.dims["a"])
        b = 0.485 * (upper.dims["b"] + lower.dims["b"])
        h = 0.5 * np.linalg.norm(top - bottom) + 1.5
        form = (-0.04, 0.8 * b, 0.0, -0.1 * upper.dims["h"] / h)  # bulging, convex
        shapes.append(
            _body_shape(0.5 * (top + bottom), rotation, a, b, h, form, tissue="disc", hu=hu)
        )
    return shapes


def rib_shapes(vert: Vertebra) -> list[Shape]:
    """Left and right rib of a thoracic vertebra as chains of capsules (not labelled)."""
    d, c, r, level = vert.dims, vert.center_mm, vert.rotation, vert.level
    s = d["a"] / interpolate(_DIMS, "a", level)
    cx, cy, rx, ry = (interpolate(_RIBS, k, level) * s for k in ("cx", "cy", "rx", "ry"))
    end, drop = np.deg2rad(interpolate(_RIBS, "end_deg", level)), interpolate(_RIBS, "drop", level)
    vc, w0 = 0.8 * d["b"] + d["canal_v"], 0.15 * d["h"]
    start = np.arccos(np.clip((d["tp_u"] + 6 - cx) / rx, -1.0, 1.0))
    phi = np.linspace(start, end, 7)
    radii = np.array([3.5, 3.5, 5.5]) * s
    shapes = []
    for side in (-1, 1):  # head at the body, tubercle at the transverse process, then around
        points = [
            (side * (d["a"] + 1), 0.4 * d["b"], 0.2 * d["h"]),
            (side * 0.9 * d["tp_u"], vc + d["tp_v"] + 3, w0),
        ]
        points += [(side * (cx + rx * np.cos(p)), cy + ry * np.sin(p), w0) for p in phi]
        points = np.array(points)
        along = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        points[:, 2] -= drop * (along / along[-1]) ** 1.3
        for p0, p1 in zip(points[:-1], points[1:], strict=True):
            shapes.append(_capsule_shape(c, r, p0, p1, radii))
    return shapes


def pelvis_shapes(spine: Spine) -> list[Shape]:
    """Sacrum S1-S5 with alae, iliac wings and femoral heads (bone, not labelled)."""
    shapes, k = [], spine.scale
    for j, ((c, r), (a, b, h)) in enumerate(zip(spine.sacrum, _SACRUM, strict=True)):
        a, b, h = a * k, b * k, (h + 1) * k
        shapes.append(_body_shape(c, r, a, b, h))
        back = (4 * k, 4 * k, h)  # dorsal wall
        shapes.append(_capsule_shape(c, r, (-0.7 * a, b + 5 * k, 0), (0.7 * a, b + 5 * k, 0), back))
        if j < 3:  # alae
            reach, rad = (45, 38, 26)[j] * k, np.array(((12, 9, 13), (9, 7, 10), (6, 5, 7))[j]) * k
            for side in (-1, 1):
                shapes.append(
                    _capsule_shape(
                        c, r, (side * 12 * k, 4 * k, 2 * k), (side * reach, 10 * k, -4 * k), rad
                    )
                )
    c, r = spine.sacrum[0]
    for side in (-1, 1):
        turn = np.deg2rad(side * 35.0)
        cos, sin = np.cos(turn), np.sin(turn)
        plate = r @ np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
        centre = c + r @ (np.array([side * 62, -15, 40]) * k)
        shapes.append(
            _capsule_shape(centre, plate, (0, 0, 0), (0, 0, 0), np.array([5, 55, 60]) * k)
        )
        low = np.array([[side * 58, -20, -10], [side * 80, -45, -75]]) * k
        shapes.append(_capsule_shape(c, r, low[0], low[1], np.array([12, 12, 12]) * k))
        head = np.array([side * 92, -45, -95]) * k
        shapes.append(_capsule_shape(c, r, head, head, np.array([22, 22, 22]) * k))
    return shapes


def skull_shape(spine: Spine) -> Shape:
    """Skull above C1: an ellipsoid shell with the foramen magnum (bone, not labelled)."""
    c1 = spine.vertebrae[0]
    k, vr = spine.scale, _c1_ring(c1)[0]
    radii = np.array([72.0, 88.0, 78.0]) * k
    centre = c1.center_mm + c1.rotation @ (np.array([0.0, -10.0, 88.0]) * k)
    params = (radii, 7.0 * k, 17.0 * k, vr + 10 * k, -40 * k)
    return Shape("shell", centre, c1.rotation, params, -radii - 4, radii + 4)


def soft_organ_shapes(spine: Spine, rng: np.random.Generator, hu: dict) -> list[Shape]:
    """Lungs, aorta, inferior vena cava, cerebrospinal fluid and bowel gas (not labelled).

    Args:
        spine: the spine they are placed around.
        rng: generator for vessel sizes and gas pockets.
        hu: intensities (HU) under the keys 'lung', 'aorta', 'ivc', 'csf', 'gas'.
    """
    by_label = {v.label: v for v in spine.vertebrae}
    thorax = [by_label[label] for label in range(9, 18)]  # T2 .. T10
    cage = np.array(
        [
            [
                interpolate(_RIBS, key, v.level) * v.dims["a"] / interpolate(_DIMS, "a", v.level)
                for key in ("cx", "cy", "rx", "ry")
            ]
            for v in thorax
        ]
    )
    radii = 0.4 * (cage[:-1, 2:] + cage[1:, 2:])
    radii = np.stack([radii[:, 0], radii[:, 1], radii[:, 0]], axis=1)
    shapes = []
    for side in (-1, 1):
        offsets = [(side * cx, cy, 0.0) for cx, cy in cage[:, :2]]
        shapes += _tube(thorax, offsets, radii, tissue="lung", hu=hu["lung"])
    for name, labels, u_sign, radius in (
        ("aorta", range(12, 25), 1, rng.uniform(10, 14)),
        ("ivc", range(18, 25), -1, rng.uniform(9, 13)),
    ):
        chain = [by_label[label] for label in labels if label in by_label]
        offsets = [(u_sign * (0.5 * v.dims["a"] + 10), -v.dims["b"] - 12, 0) for v in chain]
        shapes += _tube(
            chain, offsets, [(radius,) * 3] * (len(chain) - 1), tissue="vessel", hu=hu[name]
        )
    chain = spine.vertebrae[1:]
    offsets = [(0, 0.8 * v.dims["b"] + v.dims["canal_v"], 0) for v in chain]
    radii = [(0.8 * min(v.dims["canal_u"], v.dims["canal_v"]),) * 3 for v in chain]
    shapes += _tube(chain, offsets, radii[:-1], tissue="vessel", hu=hu["csf"])
    for _ in range(rng.poisson(2.5)):
        v = by_label[int(rng.integers(20, 25))]
        where = (rng.uniform(-80, 80), -v.dims["b"] - rng.uniform(40, 110), rng.uniform(-15, 15))
        shapes.append(
            _capsule_shape(
                v.center_mm,
                v.rotation,
                where,
                where,
                rng.uniform(6, 22, 3),
                tissue="gas",
                hu=hu["gas"],
            )
        )
    return shapes


def abdominal_organ_shapes(spine: Spine, hu: dict) -> list[Shape]:
    """Liver, spleen and kidneys around the thoracolumbar junction (not labelled).

    Args:
        spine: the spine they are placed around.
        hu: intensities (HU) under the keys 'liver', 'spleen', 'kidney'.
    """
    by_label = {v.label: v for v in spine.vertebrae}
    k = spine.scale
    organs = (  # (vertebra, local centre (mm), radii (mm), tissue)
        (18, (-70, -60, -10), (70, 80, 75), "liver"),
        (18, (85, -5, 0), (25, 45, 50), "spleen"),
        (20, (70, 5, 10), (22, 28, 50), "kidney"),
        (21, (-70, 5, 15), (22, 28, 50), "kidney"),
    )
    shapes = []
    for label, centre, radii, organ in organs:
        v = by_label[label]
        where = np.array(centre) * k
        shapes.append(
            _capsule_shape(
                v.center_mm,
                v.rotation,
                where,
                where,
                np.array(radii) * k,
                tissue="organ",
                hu=hu[organ],
            )
        )
    return shapes
