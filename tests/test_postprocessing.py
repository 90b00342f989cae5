"""Tests for candidate selection (DP == brute force), largest component and label fusion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from verse_jax.geometry import Geometry
from verse_jax.heatmaps import find_candidates
from verse_jax.infer import candidates as candidates_lib
from verse_jax.infer.candidates import column_z_range_mm, landmark_candidates
from verse_jax.infer.fusion import LabelFusion, largest_component
from verse_jax.infer.sequence import (
    anatomical_order,
    best_sequence_brute_force,
    best_sequence_dp,
    select_landmark_sequence,
)

Z_RANGE = (0.0, 400.0)


def random_candidates(rng, max_landmarks=6, max_slots=3, dyadic=True):
    """A small random spine: landmark k near z = 350 - 25 k, noisy enough to be often infeasible."""
    num = int(rng.integers(1, max_landmarks + 1))
    slots = int(rng.integers(1, max_slots + 1))
    valid = rng.random((num, slots)) < 0.8
    valid[:, 0] = rng.random(num) < 0.95
    z = 350.0 - 25.0 * np.arange(num)[:, None] + rng.normal(0.0, 12.0, (num, slots))
    points = np.concatenate([rng.normal(0.0, 8.0, (num, slots, 2)), z[..., None]], axis=-1)
    if dyadic:  # exact sums and many ties
        values = rng.integers(0, 9, (num, slots)) / 8.0
    else:
        values = rng.random((num, slots))
    values[:, 1:] = np.minimum(values[:, 1:], values[:, :1])  # slot 0 holds the global maximum
    return values, points, valid


def test_dp_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    outcomes = {"feasible": 0, "infeasible": 0}
    for trial in range(400):
        size = (
            dict(max_landmarks=6, max_slots=3) if trial % 2 else dict(max_landmarks=5, max_slots=4)
        )
        values, points, valid = random_candidates(rng, dyadic=trial % 4 != 0, **size)
        dp = best_sequence_dp(values, points, valid)
        brute = best_sequence_brute_force(values, points, valid)
        assert dp == brute, (trial, dp, brute)
        outcomes["feasible" if dp[0] is not None else "infeasible"] += 1
    assert min(outcomes.values()) > 40, outcomes


def test_dp_tie_break_is_lexicographically_largest():
    points = np.array([[[0, 0, 100.0], [0, 0, 100.0]], [[0, 0, 80.0], [0, 0, 70.0]]])
    values = np.array([[0.5, 0.5], [0.5, 0.5]])
    valid = np.ones((2, 2), bool)
    assert best_sequence_dp(values, points, valid) == ((1, 1), 1.0)
    assert best_sequence_brute_force(values, points, valid) == ((1, 1), 1.0)


def test_dp_respects_distance_and_z_order():
    # Slot 1 of landmark 1 has the larger value but lies above landmark 0: not admissible.
    points = np.array([[[0, 0, 100.0], [0, 0, 0]], [[0, 0, 80.0], [0, 0, 120.0]]])
    values = np.array([[1.0, 0.0], [0.3, 0.9]])
    valid = np.array([[True, False], [True, True]])
    assert best_sequence_dp(values, points, valid) == ((0, 0), 1.3)
    points[1, 0, 2] = 90.0  # 10 mm: too close, nothing admissible
    assert best_sequence_dp(values, points, valid) == (None, -np.inf)


def test_dp_is_polynomial_for_many_candidates():
    rng = np.random.default_rng(1)
    values = rng.random((26, 16))
    z = 700.0 - 25.0 * np.arange(26)[:, None] + rng.normal(0.0, 3.0, (26, 16))
    points = np.stack([rng.normal(0, 3, (26, 16)), rng.normal(0, 3, (26, 16)), z], axis=-1)
    slots, score = best_sequence_dp(values, points, np.ones((26, 16), bool))  # 16^26 sequences
    assert slots is not None and len(slots) == 26 and score > 0


@pytest.mark.parametrize("dyadic", [True, False])
def test_selection_with_dp_equals_selection_with_brute_force(dyadic):
    rng = np.random.default_rng(2)
    modes = set()
    for _ in range(150):
        values, points, valid = random_candidates(rng, max_landmarks=7, dyadic=dyadic)
        values = values * 1.25  # some maxima above the 0.5 border threshold; still exact
        bottom = float(rng.uniform(150.0, 250.0))
        dp = select_landmark_sequence(values, points, valid, (bottom, 400.0))
        brute = select_landmark_sequence(
            values, points, valid, (bottom, 400.0), search=best_sequence_brute_force
        )
        for name in ("choice", "valid", "points_mm", "values"):
            np.testing.assert_array_equal(getattr(dp, name), getattr(brute, name))
        assert (dp.first, dp.last, dp.mode) == (brute.first, brute.last, brute.mode)
        modes.add(dp.mode)
    assert modes == {"sequence", "range_maxima", "all_maxima"}


def chain(num, z_top=300.0, step=25.0, value=0.9, slots=2):
    """Landmarks in a clean chain: slot 0 on the chain, other slots far away with value 0.1."""
    values = np.full((num, slots), 0.1)
    values[:, 0] = value
    points = np.zeros((num, slots, 3))
    points[:, 0, 2] = z_top - step * np.arange(num)
    points[:, 1:, 0] = 500.0
    return values, points, np.ones((num, slots), bool)


def test_longest_run_ties_go_to_the_last_run():
    values, points, valid = chain(7)
    values[[2, 5], 0] = 0.2  # runs 0-1 and 3-4 (length 2) and 6
    seq = select_landmark_sequence(values, points, valid, Z_RANGE)
    # Run 3..4 chosen; the front extension needs value > 0.25, so it stops at 3; back stops at 5.
    assert (seq.first, seq.last, seq.mode) == (3, 4, "sequence")
    np.testing.assert_array_equal(seq.valid, [0, 0, 0, 1, 1, 0, 0])


def test_border_overrides_and_front_back_extension():
    values, points, valid = chain(8, z_top=390.0)  # landmark 0 within 30 mm of the top (400)
    values[[1, 4], 0] = 0.2
    values[0, 0] = 0.6
    seq = select_landmark_sequence(values, points, valid, Z_RANGE)
    # Longest run 5..7, top border overrides first = 0; the DP keeps slot 0 everywhere.
    assert (seq.first, seq.last, seq.mode) == (0, 7, "sequence")
    assert seq.valid.all()
    np.testing.assert_array_equal(seq.points_mm, points[:, 0])


def _t13_candidates(with_t13: bool):
    """26 landmarks, T9..L3 present 30 mm apart (T13 between T12 and L1 when `with_t13`)."""
    present = [15, 16, 17, 18] + ([25] if with_t13 else []) + [19, 20, 21]
    values = np.zeros((26, 2))
    points = np.zeros((26, 2, 3))
    valid = np.zeros((26, 2), bool)
    for rank, k in enumerate(present):
        values[k] = (0.9, 0.1)
        points[k, 0, 2] = 390.0 - 30.0 * rank
        points[k, 1] = (500.0, 0.0, 100.0)
        valid[k] = True
    if not with_t13:  # a weak, stray T13 peak below the run threshold
        values[25, 0], points[25, 0, 2], valid[25, 0] = 0.2, 300.0, True
    return values, points, valid, present


@pytest.mark.parametrize("with_t13", [True, False])
def test_t13_is_chained_between_t12_and_l1(with_t13):
    values, points, valid, present = _t13_candidates(with_t13)
    order = anatomical_order(values, valid)
    assert (25 in order) == with_t13
    seq = select_landmark_sequence(values, points, valid, Z_RANGE)
    assert seq.mode == "sequence"
    np.testing.assert_array_equal(np.flatnonzero(seq.valid), sorted(present))
    np.testing.assert_array_equal(seq.points_mm[present], points[present, 0])
    # in index order T12 -> L1 (60 mm with T13 between) is not admissible: no sequence
    plain = select_landmark_sequence(values, points, valid, Z_RANGE, order=np.arange(25))
    assert plain.mode == ("range_maxima" if with_t13 else "sequence")


def test_fallbacks():
    values, points, valid = chain(5, value=0.2)
    seq = select_landmark_sequence(values, points, valid, Z_RANGE)  # no value > 0.25
    assert (seq.mode, seq.first, seq.last) == ("all_maxima", -1, -1)
    np.testing.assert_array_equal(seq.choice, [0] * 5)
    np.testing.assert_array_equal(seq.points_mm, points[:, 0])
    values, points, valid = chain(6)
    points[4, 0, 2] = 395.0  # top border -> first = 4
    points[1, 0, 2] = 5.0  # bottom border -> last = 1
    seq = select_landmark_sequence(values, points, valid, Z_RANGE)
    assert seq.mode == "all_maxima"  # first > last: the reference fails and falls back
    values, points, valid = chain(4, step=5.0)  # neighbours 5 mm apart: nothing admissible
    seq = select_landmark_sequence(values, points, valid, Z_RANGE)
    assert (seq.mode, seq.first, seq.last) == ("range_maxima", 0, 3)
    np.testing.assert_array_equal(seq.choice, [0, 0, 0, 0])
    valid[2, 0] = False  # a landmark without a global maximum stays invalid
    seq = select_landmark_sequence(values, points, valid, Z_RANGE)
    np.testing.assert_array_equal(seq.valid, [1, 1, 0, 0])


def test_extension_quirk_stops_after_a_match_that_is_not_the_first_candidate():
    values, points, valid = chain(6)  # z 300, 275, ..., 175
    values[3, 0] = 0.95  # the strongest in the bottom border [215, 245]: last = 3
    # Landmark 4: slot 0 too close below landmark 3 (10 mm), slot 1 fine (25 mm) -> appended.
    points[4, 0] = points[3, 0] - [0, 0, 10.0]
    points[4, 1] = points[3, 0] - [0, 0, 25.0]
    values[4] = [0.9, 0.8]
    points[5, 0] = points[4, 1] - [0, 0, 25.0]  # would match next, but extension has stopped
    seq = select_landmark_sequence(values, points, valid, (215.0, 1000.0))
    assert (seq.mode, seq.first, seq.last) == ("sequence", 0, 4)
    np.testing.assert_array_equal(seq.choice, [0, 0, 0, 0, 1, -1])
    points[4, [0, 1]] = points[4, [1, 0]]  # now the first candidate matches: extension goes on
    seq = select_landmark_sequence(values, points, valid, (215.0, 1000.0))
    assert (seq.first, seq.last) == (0, 5)
    np.testing.assert_array_equal(seq.choice, [0, 0, 0, 0, 0, 0])


def test_bad_candidate_shapes_raise():
    with pytest.raises(ValueError, match="candidates"):
        best_sequence_dp(np.zeros((3, 2)), np.zeros((3, 2)), np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="finite"):
        best_sequence_dp(np.full((1, 1), np.nan), np.zeros((1, 1, 3)), np.ones((1, 1), bool))


def test_column_z_range_mm():
    geometry = Geometry(size=(4, 4, 50), spacing_mm=(2.0, 2.0, 2.0), origin_mm=(0.0, 0.0, -30.0))
    assert column_z_range_mm(geometry) == (-30.0, 70.0)


HEATMAP_SHAPE = (12, 12, 60)  # one shape for both tests: find_candidates compiles once


def test_landmark_candidates_in_mm():
    geometry = Geometry(size=HEATMAP_SHAPE, spacing_mm=(2.0, 2.0, 2.0), origin_mm=(10.0, 0.0, -5.0))
    heatmaps = np.zeros(HEATMAP_SHAPE + (5,), np.float32)
    heatmaps[3, 4, 5, 0] = 1.0
    heatmaps[2, 2, 15, 1] = 0.8
    heatmaps[..., 2:] = -1.0  # channels without a positive response still have a global max
    cands = landmark_candidates(heatmaps, geometry, max_candidates=3)
    assert cands.values.shape == (5, 3) and cands.points_mm.shape == (5, 3, 3)
    np.testing.assert_array_equal(cands.valid[:, 0], True)
    np.testing.assert_array_equal(cands.valid[:2, 1:], False)  # nothing > 0.1 * max elsewhere
    np.testing.assert_allclose(cands.values[:, 0], [1.0, 0.8, -1.0, -1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(cands.points_mm[:2, 0], [[16.0, 8.0, 5.0], [14.0, 4.0, 25.0]])


def test_bucket_length():
    assert [candidates_lib.bucket_length(n) for n in (1, 16, 17, 20, 21, 31, 32, 33, 60, 65)] == [
        16,
        16,
        20,
        20,
        24,
        32,
        32,
        40,
        64,
        80,
    ]


def test_landmark_candidates_compile_once_per_bucket_and_equal_the_unpadded_search():
    # Columns of 57-60 slices share the 64-slice bucket: one compilation; each result equals the
    # search on the unpadded heatmaps exactly (peaks at the true last slice included).
    rng = np.random.default_rng(1)
    find = jax.jit(
        jax.vmap(
            functools.partial(
                find_candidates,
                max_candidates=4,
                min_distance_vox=7.0,
                min_max_value=0.25,
                relative_threshold=0.1,
            ),
            in_axes=-1,
        )
    )
    before = None
    for size_z in (57, 58, 60):
        shape = (12, 12, size_z)
        geometry = Geometry(size=shape, spacing_mm=(2.0, 2.0, 2.0), origin_mm=(0.0, 0.0, 0.0))
        heatmaps = rng.uniform(0.0, 0.2, shape + (3,)).astype(np.float32)
        heatmaps[5, 6, size_z - 1, 0] = 1.0  # on the true border: no refinement along z
        heatmaps[5, 6, size_z - 2, 1], heatmaps[5, 6, size_z - 1, 1] = 1.0, 0.6
        cands = landmark_candidates(heatmaps, geometry, max_candidates=4)
        if before is None:
            before = candidates_lib.find_cache_size()
        expected = find(jnp.asarray(heatmaps))
        np.testing.assert_array_equal(cands.valid, expected.valid)
        np.testing.assert_array_equal(cands.values, np.where(expected.valid, expected.values, 0))
        points = geometry.index_to_physical(np.asarray(expected.points_vox, np.float64))
        np.testing.assert_array_equal(
            cands.points_mm, np.where(expected.valid[..., None], points, 0)
        )
        assert cands.points_mm[0, 0, 2] == 2.0 * (size_z - 1)
    assert candidates_lib.find_cache_size() == before


def test_heatmaps_to_sequence_end_to_end():
    geometry = Geometry(size=HEATMAP_SHAPE, spacing_mm=(2.0, 2.0, 2.0), origin_mm=(0.0, 0.0, -50.0))
    truth_vox = np.array([[6.0, 6.0, z] for z in (50.0, 38.0, 26.0, 14.0, 2.0)])  # 24 mm apart
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in HEATMAP_SHAPE], indexing="ij"), -1)
    d2 = np.sum((grid[..., None, :] - truth_vox) ** 2, axis=-1)  # (x, y, z, K)
    heatmaps = np.exp(-d2 / (2 * 1.5**2)).astype(np.float32)
    heatmaps[2, 2, 45, 2] = 1.5  # a stronger distractor for landmark 2, far from its neighbours
    cands = landmark_candidates(heatmaps, geometry, max_candidates=3)
    assert cands.valid[2, :2].all() and cands.values[2, 0] == pytest.approx(1.5)
    seq = select_landmark_sequence(*cands, column_z_range_mm(geometry))
    assert (seq.mode, seq.first, seq.last) == ("sequence", 0, 4)
    np.testing.assert_array_equal(seq.choice, [0, 0, 1, 0, 0])
    truth_mm = geometry.index_to_physical(truth_vox)
    # Within one voxel (2 mm): sub-voxel refinement belongs to (and is tested with) heatmaps.
    np.testing.assert_allclose(seq.points_mm, truth_mm, atol=2.0)


def test_every_candidate_is_kept_the_right_one_can_be_the_ninth():
    geometry = Geometry(size=HEATMAP_SHAPE, spacing_mm=(2.0, 2.0, 2.0), origin_mm=(0.0, 0.0, -50.0))
    truth_vox = np.array([[6.0, 6.0, z] for z in (50.0, 38.0, 26.0, 14.0, 2.0)])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in HEATMAP_SHAPE], indexing="ij"), -1)
    d2 = np.sum((grid[..., None, :] - truth_vox) ** 2, axis=-1)
    heatmaps = np.exp(-d2 / (2 * 1.5**2)).astype(np.float32)
    # Eight stronger maxima for landmark 2 above landmark 1 (inadmissible: z order), so that
    # its true peak is the 9th candidate.
    corners = [(x, y, z) for z in (45, 55) for x in (0, 11) for y in (0, 11)]
    for rank, corner in enumerate(corners):
        heatmaps[(*corner, 2)] = 1.9 - 0.1 * rank
    cands = landmark_candidates(heatmaps, geometry)  # every candidate (M grows 8 -> 16)
    assert cands.valid.shape[1] == 16 and cands.valid[2, :9].all() and not cands.valid[2, 9:].any()
    seq = select_landmark_sequence(*cands, column_z_range_mm(geometry))
    assert (seq.mode, seq.choice[2]) == ("sequence", 8)
    np.testing.assert_allclose(seq.points_mm, geometry.index_to_physical(truth_vox), atol=2.0)
    capped = landmark_candidates(heatmaps, geometry, max_candidates=8)
    seq8 = select_landmark_sequence(*capped, column_z_range_mm(geometry))
    assert not (seq8.valid.all() and np.allclose(seq8.points_mm, seq.points_mm))


def test_largest_component_18_connectivity():
    prob = np.full((5, 5, 5), 0.2, np.float32)
    edge_joined = [(0, 0, 0), (1, 1, 0), (2, 1, 0), (3, 2, 0)]  # 4 voxels with 18 (2 with 6)
    line = [(4, 4, 2), (4, 4, 3), (4, 4, 4)]  # 3 voxels
    corner_a = [(0, 4, 2), (0, 4, 3), (0, 4, 4)]  # 3 voxels, 5 with 26-connectivity:
    corner_b = [(1, 3, 0), (1, 3, 1)]  # (1, 3, 1) touches (0, 4, 2) only at a corner
    for voxel in edge_joined + line + corner_a + corner_b:
        prob[voxel] = 0.9
    out = largest_component(prob)
    expected = prob.copy()
    for voxel in line + corner_a + corner_b:
        expected[voxel] = 0.0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32 and prob[line[0]] == np.float32(0.9)  # input untouched
    np.testing.assert_array_equal(largest_component(np.zeros((2, 2, 2))), np.zeros((2, 2, 2)))


def test_largest_component_keeps_values_at_or_below_threshold():
    prob = np.zeros((3, 3, 7))
    prob[1, 1, :3] = 0.9
    prob[1, 1, 3] = 0.5  # not foreground: breaks the run, keeps its value
    prob[1, 1, 4:] = 0.6
    out = largest_component(prob)  # two components of 3 voxels: the first in index order wins
    np.testing.assert_array_equal(out[1, 1], [0.9, 0.9, 0.9, 0.5, 0.0, 0.0, 0.0])
    out = largest_component(prob, threshold=0.4)  # one component of 7 voxels now
    np.testing.assert_array_equal(out, prob)


def test_fusion_equals_dense_argmax_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(30):
        shape = tuple(int(s) for s in rng.integers(3, 9, 3))
        labels = np.sort(rng.choice(np.arange(1, 27), int(rng.integers(1, 6)), replace=False))
        dense = np.zeros((len(labels) + 1,) + shape, np.float32)
        dense[0] = 0.5
        fusion = LabelFusion(shape)
        low = LabelFusion(shape, keep_low_probabilities=True)
        for channel, label in enumerate(labels, start=1):
            box = tuple(int(s) for s in rng.integers(1, 6, 3))
            offset = tuple(int(o) for o in rng.integers(-2, 6, 3))
            prob = (rng.integers(0, 5, box) / 4.0).astype(np.float32)  # ties with 0.5 and others
            fusion.add(int(label), prob, offset)
            low.add(int(label), prob, offset)
            grid = [np.arange(o, o + b) for o, b in zip(offset, box, strict=True)]
            inside = [(g >= 0) & (g < s) for g, s in zip(grid, shape, strict=True)]
            sub = prob[np.ix_(*inside)]
            dense[(channel,) + np.ix_(*[g[i] for g, i in zip(grid, inside, strict=True)])] = sub
        expected = np.concatenate([[0], labels])[np.argmax(dense, axis=0)]
        np.testing.assert_array_equal(fusion.labels, expected.astype(np.uint16))
        assert fusion.labels.dtype == np.uint16
        np.testing.assert_array_equal(low.labels, fusion.labels)  # same labels, and
        np.testing.assert_array_equal(low.best_prob, dense[1:].max(axis=0))  # the max below 0.5


def test_fusion_ties_go_to_the_label_added_first():
    fusion = LabelFusion((2, 1, 1))
    fusion.add(3, np.full((2, 1, 1), 0.7))
    fusion.add(5, np.array([[[0.7]], [[0.8]]]))
    np.testing.assert_array_equal(fusion.labels[:, 0, 0], [3, 5])
    fusion.add(4, np.full((1, 1, 1), 0.9), offset=(5, 0, 0))  # entirely outside: ignored
    np.testing.assert_array_equal(fusion.labels[:, 0, 0], [3, 5])
    with pytest.raises(ValueError, match="label"):
        fusion.add(0, np.ones((1, 1, 1)))
    with pytest.raises(ValueError, match="shape"):
        LabelFusion((2, 2))
