"""Landmark candidates and the anatomical label sequence of stage 2 (exact dynamic programme).

The label sequence follows the reference's spine post-processing (docs/reference.md §5.7) but
solves its exhaustive search exactly by dynamic programming over the landmark index, so it runs in
O(K M^2) time for K landmarks with M candidates each instead of O(M^K) (which could hang).

Candidate arrays: `values (K, M)`, `points_mm (K, M, 3)` (LPS mm, +z superior), `valid (K, M)`
bool. Slot 0 of each landmark holds its global maximum; slots are in the candidate finder's order
(decreasing value). A landmark whose slot 0 is invalid has no global maximum and is never selected
by the range and fallback rules.

Tie-break: among sequences with equal score the lexicographically largest tuple of candidate slots
wins, as in the reference (it enumerates sequences in lexicographic order and takes the last of the
best after a stable sort). Scores are right-fold sums `v_first + (v_next + (...))` in float64; the
tests check the DP against `best_sequence_brute_force` (same objective and tie-break).
"""

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from verse_jax.labels import T12_INDEX, T13_INDEX

_NEG_INF = -np.inf


@dataclass(frozen=True)
class LandmarkSequence:
    """Selected landmarks.

    Attributes:
        choice: (K,) int candidate slot per landmark, -1 where not selected.
        valid: (K,) bool, `choice >= 0`.
        points_mm: (K, 3) LPS mm, zeros where invalid.
        values: (K,) heatmap values, zeros where invalid.
        first, last: landmark index range of the final sequence (-1, -1 for the fallback).
        mode: "sequence" (best admissible sequence), "range_maxima" (none admissible: global
            maxima of first..last) or "all_maxima" (no range: every global maximum).
    """

    choice: np.ndarray
    valid: np.ndarray
    points_mm: np.ndarray
    values: np.ndarray
    first: int
    last: int
    mode: str


def _as_candidate_arrays(values, points_mm, valid):
    values, points_mm = np.asarray(values, np.float64), np.asarray(points_mm, np.float64)
    valid = np.asarray(valid, bool)
    if values.ndim != 2 or valid.shape != values.shape or points_mm.shape != values.shape + (3,):
        raise ValueError(
            "candidates must be values (K, M), points_mm (K, M, 3), valid (K, M); got "
            f"{values.shape}, {points_mm.shape}, {valid.shape}"
        )
    if not (np.all(np.isfinite(values[valid])) and np.all(np.isfinite(points_mm[valid]))):
        raise ValueError("valid candidates must have finite values and points_mm")
    return values, points_mm, valid


def _pair_ok(upper_mm, lower_mm, min_distance, max_distance):
    """Whether `lower_mm` may follow `upper_mm` (..., 3): distance in the open range, z below."""
    delta = upper_mm - lower_mm
    distance = np.sqrt(np.sum(delta * delta, axis=-1))
    return (
        (distance > min_distance)
        & (distance < max_distance)
        & (lower_mm[..., 2] < upper_mm[..., 2])
    )


def best_sequence_dp(
    values, points_mm, valid, *, min_valid_distance: float = 12.5, max_valid_distance: float = 50.0
) -> tuple[tuple[int, ...] | None, float]:
    """Best admissible sequence, one candidate per landmark of the given (contiguous) range.

    Consecutive candidates must be `min_valid_distance < d < max_valid_distance` mm apart with the
    next one strictly inferior (lower z). Maximises the sum of values; ties as the module docstring.

    Args:
        values: (K, M) candidate values; points_mm: (K, M, 3) LPS mm; valid: (K, M) bool.

    Returns:
        (slots, score): the chosen slot per landmark and its score, or (None, -inf) if none.
    """
    values, points_mm, valid = _as_candidate_arrays(values, points_mm, valid)
    num = values.shape[0]
    if num == 0:
        return None, _NEG_INF
    suffix = [None] * num  # suffix[k][a]: best score of landmarks k.. starting at slot a
    links = [None] * (num - 1)  # links[k][a, b]: slot b of k + 1 may follow slot a of k
    suffix[-1] = np.where(valid[-1], values[-1], _NEG_INF)
    for k in range(num - 2, -1, -1):
        ok = _pair_ok(
            points_mm[k][:, None], points_mm[k + 1][None, :], min_valid_distance, max_valid_distance
        )
        links[k] = ok & valid[k][:, None] & valid[k + 1][None, :]
        follow = np.max(np.where(links[k], suffix[k + 1][None, :], _NEG_INF), axis=1)
        suffix[k] = np.where(valid[k] & (follow > _NEG_INF), values[k] + follow, _NEG_INF)
    score = float(np.max(suffix[0]))
    if score == _NEG_INF:
        return None, _NEG_INF
    slots = [_last_argmax(suffix[0], np.ones_like(valid[0]))]
    for k in range(num - 1):
        slots.append(_last_argmax(suffix[k + 1], links[k][slots[-1]]))
    return tuple(slots), score


def _last_argmax(scores, allowed) -> int:
    """Largest index among the maxima of `scores[allowed]` (lexicographically largest tie-break)."""
    masked = np.where(allowed, scores, _NEG_INF)
    return int(np.flatnonzero(masked == np.max(masked))[-1])


def best_sequence_brute_force(
    values, points_mm, valid, *, min_valid_distance: float = 12.5, max_valid_distance: float = 50.0
) -> tuple[tuple[int, ...] | None, float]:
    """Exhaustive search with `best_sequence_dp`'s objective and tie-break: O(M^K), for tests."""
    values, points_mm, valid = _as_candidate_arrays(values, points_mm, valid)
    if values.shape[0] == 0:
        return None, _NEG_INF

    def admissible(upper, lower):
        distance = np.linalg.norm(upper - lower)
        return min_valid_distance < distance < max_valid_distance and lower[2] < upper[2]

    best, best_slots = _NEG_INF, None
    for slots in itertools.product(*[np.flatnonzero(row).tolist() for row in valid]):
        pairs = enumerate(zip(slots[:-1], slots[1:], strict=True))
        if not all(admissible(points_mm[k, a], points_mm[k + 1, b]) for k, (a, b) in pairs):
            continue
        chosen = [float(values[k, a]) for k, a in enumerate(slots)]
        score = functools.reduce(lambda acc, v: v + acc, chosen[::-1])  # right fold, as the DP
        if score >= best:  # '>=': of equal scores the last in lexicographic order wins
            best, best_slots = score, tuple(slots)
    return best_slots, best


def _longest_run(global_values, threshold) -> tuple[int, int]:
    """(first, last) of the longest run of values > threshold; ties: the last run (reference)."""
    best, best_length, start = (-1, -1), 0, None
    for k, above in enumerate(list(global_values > threshold) + [False]):
        if above and start is None:
            start = k
        elif not above and start is not None:
            if k - start >= best_length:
                best, best_length = (start, k - 1), k - start
            start = None
    return best


def _best_in_z_range(global_values, global_z, low_mm, high_mm, min_value) -> int:
    """Landmark index of the largest global maximum with z in [low, high] and value >= min_value.

    Ties go to the later index and values must also be >= 0 (as the reference); -1 if none.
    """
    best_index, best_value = -1, 0.0
    for k, (value, z) in enumerate(zip(global_values, global_z, strict=True)):
        if low_mm <= z <= high_mm and value >= min_value and value >= best_value:
            best_index, best_value = k, value
    return best_index


def _extend(choice, values, points_mm, valid, end, step, min_distance, max_distance, min_value):
    """Appends landmarks beyond `end` in direction `step` (-1 front, +1 back), in place.

    Reproduces the reference's quirk (reference §5.7 step 5): its loop flag is cleared by every
    candidate that does not match before a match, so extension goes on only while the matching
    candidate is the first (strongest) one of each new landmark; a later match is still appended,
    then extension stops. A landmark without candidates stops extension (the reference would loop).
    """
    num = values.shape[0]
    keep_going = True
    while keep_going and 0 <= end + step < num and choice[end] >= 0:
        here, there = points_mm[end, choice[end]], end + step
        appended = False
        for slot in np.flatnonzero(valid[there]):
            other = points_mm[there, slot]
            upper, lower = (other, here) if step < 0 else (here, other)
            if values[there, slot] > min_value and _pair_ok(
                upper, lower, min_distance, max_distance
            ):
                choice[there], end, appended = slot, there, True
                break
            keep_going = False
        keep_going = keep_going and appended
    return end


def anatomical_order(values, valid, threshold: float = 0.25) -> np.ndarray:
    """Landmark indices from C1 downwards in which `select_landmark_sequence` walks the spine.

    25 landmarks: 0..24 (C1..L6). 26 landmarks (VerSe'20, T13 = index 25): T13 sits between T12
    and L1 when its global maximum exceeds `threshold` (the longest-run threshold), so a sequence
    T12, T13, L1 is one chain of neighbours; otherwise T13 is left out and T12 is followed by L1.
    (The reference had 25 landmarks; in index order T13 would come after L6 and a T13 case could
    never be chained.)
    """
    values, valid = np.asarray(values), np.asarray(valid, bool)
    num = values.shape[0]
    standard = np.arange(min(num, T13_INDEX))
    if num <= T13_INDEX or not (valid[T13_INDEX, 0] and values[T13_INDEX, 0] > threshold):
        return standard
    return np.concatenate(
        [standard[: T12_INDEX + 1], [T13_INDEX], standard[T12_INDEX + 1 :]]
    ).astype(np.int64)


@dataclass(frozen=True)
class SequenceRules:
    """Thresholds and distances of `select_landmark_sequence` (the reference's values, §5.7).

    Attributes:
        min_value_longest_sequence: a landmark is in the longest run when its global maximum is
            above this (also `anatomical_order`'s T13 threshold).
        min_value_border_index: a global maximum near the column's top or bottom must reach this
            to override the run's first or last landmark.
        border_distance_mm: how near (mm) to the column's top or bottom that is (the reference's
            15 voxels at 2 mm).
        min_distance_mm, max_distance_mm: admissible distance of consecutive landmarks in the
            sequence search (exclusive bounds, mm).
        min_value_append: candidate value needed to extend the sequence at its ends.
        min_distance_append_mm, max_distance_append_mm: admissible distance (mm) when extending.
    """

    min_value_longest_sequence: float = 0.25
    min_value_border_index: float = 0.5
    border_distance_mm: float = 30.0
    min_distance_mm: float = 12.5
    max_distance_mm: float = 50.0
    min_value_append: float = 0.25
    min_distance_append_mm: float = 15.0
    max_distance_append_mm: float = 35.0


SEQUENCE_RULES = SequenceRules()


def select_landmark_sequence(
    values,
    points_mm,
    valid,
    z_range_mm: tuple[float, float],
    *,
    order=None,
    rules: SequenceRules = SEQUENCE_RULES,
    search=best_sequence_dp,
) -> LandmarkSequence:
    """The reference's anatomical label sequence (docs/reference.md §5.7), solved exactly.

    1. first..last = the longest run of landmarks whose global maximum > 0.25 (ties: last run).
    2. The strongest global maximum (>= 0.5) within 30 mm of the column top (bottom) overrides
       first (last).
    3. No first or last, or first > last (the reference fails and falls back): every global
       maximum is valid ("all_maxima").
    4. One candidate per landmark of first..last, consecutive ones (12.5, 50) mm apart and strictly
       inferior, maximising the sum of values (`search`); if none is admissible, the global maxima
       of first..last ("range_maxima").
    5. Extension at the front and back (value > 0.25, (15, 35) mm, z order; see `_extend`).

    The steps walk the landmarks in `order` (default `anatomical_order`: index order, with T13
    between T12 and L1 when its heatmap has a peak); landmarks outside the order are never chosen.

    Args:
        values, points_mm, valid: candidates (K, M), (K, M, 3) LPS mm, (K, M); slot 0 = global max.
        z_range_mm: (bottom, top) world z of the column (`column_z_range_mm`).
        order: landmark indices from top to bottom; None: `anatomical_order(values, valid)`.
        rules: the thresholds and distances of the steps (`SequenceRules`; default the reference's).
        search: `best_sequence_dp` or `best_sequence_brute_force`.
    """
    r = rules
    values, points_mm, valid = _as_candidate_arrays(values, points_mm, valid)
    num_landmarks = values.shape[0]
    if order is None:
        order = anatomical_order(values, valid, r.min_value_longest_sequence)
    order = np.asarray(order, np.int64)
    values, points_mm, valid = values[order], points_mm[order], valid[order]
    has_max = valid[:, 0]
    global_values = np.where(has_max, values[:, 0], _NEG_INF)
    global_z = np.where(has_max, points_mm[:, 0, 2], np.nan)
    first, last = _longest_run(global_values, r.min_value_longest_sequence)
    bottom, top = z_range_mm
    border, min_border = r.border_distance_mm, r.min_value_border_index
    top_index = _best_in_z_range(global_values, global_z, top - border, top, min_border)
    bottom_index = _best_in_z_range(global_values, global_z, bottom, bottom + border, min_border)
    first = top_index if top_index > -1 else first
    last = bottom_index if bottom_index > -1 else last
    choice = np.full(values.shape[0], -1, np.int64)
    if first == -1 or last == -1 or first > last:
        choice[has_max] = 0
        return _reorder(
            _sequence(choice, values, points_mm, -1, -1, "all_maxima"), order, num_landmarks
        )
    span = slice(first, last + 1)
    slots, _ = search(
        values[span],
        points_mm[span],
        valid[span],
        min_valid_distance=r.min_distance_mm,
        max_valid_distance=r.max_distance_mm,
    )
    mode = "sequence" if slots is not None else "range_maxima"
    choice[span] = slots if slots is not None else np.where(has_max[span], 0, -1)
    append = (
        r.min_distance_append_mm,
        r.max_distance_append_mm,
        r.min_value_append,
    )
    first = _extend(choice, values, points_mm, valid, first, -1, *append)
    last = _extend(choice, values, points_mm, valid, last, 1, *append)
    return _reorder(_sequence(choice, values, points_mm, first, last, mode), order, num_landmarks)


def _reorder(sequence: LandmarkSequence, order: np.ndarray, num: int) -> LandmarkSequence:
    """A sequence found over landmarks `order` back in landmark index order (K = `num`)."""
    choice = np.full(num, -1, np.int64)
    choice[order] = sequence.choice
    points = np.zeros((num, 3))
    points[order] = sequence.points_mm
    values = np.zeros(num)
    values[order] = sequence.values
    first = int(order[sequence.first]) if sequence.first >= 0 else -1
    last = int(order[sequence.last]) if sequence.last >= 0 else -1
    return LandmarkSequence(choice, choice >= 0, points, values, first, last, sequence.mode)


def _sequence(choice, values, points_mm, first, last, mode) -> LandmarkSequence:
    ok = choice >= 0
    rows, slots = np.arange(choice.shape[0]), np.maximum(choice, 0)
    return LandmarkSequence(
        choice=choice,
        valid=ok,
        points_mm=np.where(ok[:, None], points_mm[rows, slots], 0.0),
        values=np.where(ok, values[rows, slots], 0.0),
        first=int(first),
        last=int(last),
        mode=mode,
    )
