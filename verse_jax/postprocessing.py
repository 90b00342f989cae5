"""Post-processing: landmark candidates, the anatomical label sequence, largest component, fusion.

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
from typing import NamedTuple

import jax
import numpy as np
import scipy.ndimage

from verse_jax import stages
from verse_jax.heatmaps import find_candidates
from verse_jax.labels import T12_INDEX, T13_INDEX

_NEG_INF = -np.inf
_RULE = stages.SCN_PAPER.candidates  # defaults: the paper's rule at the paper's 2 mm


class LandmarkCandidates(NamedTuple):
    """Per-landmark candidate peaks: values (K, M), points_mm (K, M, 3) LPS mm, valid (K, M)."""

    values: np.ndarray
    points_mm: np.ndarray
    valid: np.ndarray


@functools.partial(
    jax.jit, static_argnames=("max_candidates", "min_distance_vox", "min_max_value", "rel")
)
def _find_per_channel(heatmaps, *, max_candidates, min_distance_vox, min_max_value, rel):
    find = functools.partial(
        find_candidates,
        max_candidates=max_candidates,
        min_distance_vox=min_distance_vox,
        min_max_value=min_max_value,
        relative_threshold=rel,
    )
    return jax.vmap(find, in_axes=-1)(heatmaps)


def landmark_candidates(
    heatmaps,
    geometry,
    *,
    max_candidates: int | None = _RULE.max_candidates,
    min_distance_vox: float = _RULE.min_distance_mm / stages.SCN_PAPER.spacing_mm,
    min_max_value: float = _RULE.min_max_value,
    relative_threshold: float = _RULE.relative_threshold,
) -> LandmarkCandidates:
    """Candidate peaks of every heatmap channel, in physical mm.

    Args:
        heatmaps: `(x, y, z, K)` merged heatmaps on the grid `geometry`.
        geometry: the heatmaps' grid (`verse_jax.geometry.Geometry`, duck-typed:
            `index_to_physical`).
        max_candidates: None keeps every candidate the rule finds, as the reference (the search
            runs with M = 8, 16, 32, ... slots until some slot stays empty in every channel);
            an int caps M.
        min_distance_vox, min_max_value, relative_threshold: passed to
            `verse_jax.heatmaps.find_candidates` (reference: 7 voxels, 0.25, 0.1).

    Returns:
        `LandmarkCandidates` with K landmarks and M slots; invalid points are 0.
    """
    if np.ndim(heatmaps) != 4:
        raise ValueError(f"heatmaps must be (x, y, z, K), got shape {np.shape(heatmaps)}")
    limit = int(np.prod(np.shape(heatmaps)[:3]))  # no more maxima than voxels
    slots = min(8, limit) if max_candidates is None else int(max_candidates)
    while True:
        found = _find_per_channel(
            heatmaps,
            max_candidates=slots,
            min_distance_vox=float(min_distance_vox),
            min_max_value=float(min_max_value),
            rel=float(relative_threshold),
        )
        full = bool(np.any(np.asarray(found.valid)[:, -1]))
        if max_candidates is not None or not full or slots >= limit:
            break
        slots = min(2 * slots, limit)
    valid = np.asarray(found.valid, bool)
    points_mm = geometry.index_to_physical(np.asarray(found.points_vox, np.float64))
    points_mm = np.where(valid[..., None], points_mm, 0.0)
    values = np.where(valid, np.asarray(found.values, np.float64), 0.0)
    return LandmarkCandidates(values, points_mm, valid)


def column_z_range_mm(geometry) -> tuple[float, float]:
    """(bottom, top) world z in mm of a column grid, as the reference measures its borders.

    Bottom is the centre of slice 0, top is `bottom + size_z * spacing_z` (the reference's
    `Z * spacing`). The grid's z index axis must point to world +z (superior).
    """
    if not np.allclose(np.asarray(geometry.matrix)[:, 2], (0.0, 0.0, 1.0), atol=1e-6):
        raise ValueError(f"column z axis must point superior (+z), direction {geometry.direction}")
    bottom = float(geometry.origin_mm[2])
    return bottom, bottom + geometry.size[2] * float(geometry.spacing_mm[2])


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


def select_landmark_sequence(
    values,
    points_mm,
    valid,
    z_range_mm: tuple[float, float],
    *,
    order=None,
    min_landmark_value_for_longest_sequence: float = 0.25,
    min_landmark_value_for_best_border_index: float = 0.5,
    border_distance_for_best_index_mm: float = 30.0,
    min_valid_distance: float = 12.5,
    max_valid_distance: float = 50.0,
    min_landmark_value_for_front_back_append: float = 0.25,
    min_valid_distance_for_front_back_append: float = 15.0,
    max_valid_distance_for_front_back_append: float = 35.0,
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
        border_distance_for_best_index_mm: the reference's 15 voxels at 2 mm.
        search: `best_sequence_dp` or `best_sequence_brute_force`.
        Other keyword arguments: the reference's names and defaults (distances in mm).
    """
    values, points_mm, valid = _as_candidate_arrays(values, points_mm, valid)
    num_landmarks = values.shape[0]
    if order is None:
        order = anatomical_order(values, valid, min_landmark_value_for_longest_sequence)
    order = np.asarray(order, np.int64)
    values, points_mm, valid = values[order], points_mm[order], valid[order]
    has_max = valid[:, 0]
    global_values = np.where(has_max, values[:, 0], _NEG_INF)
    global_z = np.where(has_max, points_mm[:, 0, 2], np.nan)
    first, last = _longest_run(global_values, min_landmark_value_for_longest_sequence)
    bottom, top = z_range_mm
    border, min_border = border_distance_for_best_index_mm, min_landmark_value_for_best_border_index
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
        min_valid_distance=min_valid_distance,
        max_valid_distance=max_valid_distance,
    )
    mode = "sequence" if slots is not None else "range_maxima"
    choice[span] = slots if slots is not None else np.where(has_max[span], 0, -1)
    append = (
        min_valid_distance_for_front_back_append,
        max_valid_distance_for_front_back_append,
        min_landmark_value_for_front_back_append,
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


def largest_component(prob, threshold: float = 0.5) -> np.ndarray:
    """Keeps the largest 18-connected component of `prob > threshold` (reference section 6.4).

    Voxels above the threshold outside that component are set to 0; all others keep their value.
    Of equally large components the first in index order is kept.

    Args:
        prob: `(x, y, z)` probabilities.
        threshold: foreground threshold (strictly greater).

    Returns:
        `(x, y, z)` numpy array, dtype of `prob`.
    """
    prob = np.array(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be a 3-D (x, y, z) array, got shape {prob.shape}")
    foreground = prob > threshold
    structure = scipy.ndimage.generate_binary_structure(3, 2)  # 3x3x3 minus corners: 18-neighbours
    components, count = scipy.ndimage.label(foreground, structure=structure)
    if count <= 1:
        return prob
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    keep = 1 + int(np.argmax(sizes))
    prob[foreground & (components != keep)] = 0
    return prob


class LabelFusion:
    """Running per-voxel best (probability, label) pair: a multi-label map without (X, Y, Z, 26).

    Starts at probability 0.5, label 0 (background). `add` replaces a voxel's pair where the new
    probability is strictly greater, so adding labels in increasing order reproduces the
    reference's argmax over [0.5, p_1, ..., p_K] with ties to the lowest index (and background
    wherever no probability exceeds 0.5). With another order, ties go to the label added first.
    Probabilities are compared in float32 (the reference stored float16).

    With `keep_low_probabilities`, `best_prob` starts at 0 and holds the highest vertebra
    probability of every voxel, also where it is <= 0.5 (background); a label is set only where
    its probability is > 0.5, so the labels are the same as without it.

    Args:
        shape: `(x, y, z)` size of the full grid.
        keep_low_probabilities: track probabilities below the background's 0.5 too.
    """

    def __init__(self, shape, *, keep_low_probabilities: bool = False):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"fusion grid shape must be 3 positive sizes (x, y, z), got {shape}")
        self.best_prob = np.full(shape, 0.0 if keep_low_probabilities else 0.5, np.float32)
        self.best_label = np.zeros(shape, np.uint16)

    def add(self, label: int, prob, offset=(0, 0, 0)) -> None:
        """Fuses one vertebra's probabilities `prob (x, y, z)` placed at voxel `offset` of the grid.

        The box may reach outside the grid (a crop at the scan's edge); only the overlap counts.
        """
        if not 0 < int(label) < 2**16:
            raise ValueError(f"label must be in 1..65535, got {label}")
        prob = np.asarray(prob, np.float32)
        if prob.ndim != 3 or len(offset) != 3:
            raise ValueError(
                f"prob must be (x, y, z) with a 3-D offset, got {prob.shape}, {offset}"
            )
        grid, local = [], []
        for start, size, full in zip(offset, prob.shape, self.best_prob.shape, strict=True):
            low, high = max(int(start), 0), min(int(start) + size, full)
            if low >= high:
                return
            grid.append(slice(low, high))
            local.append(slice(low - int(start), high - int(start)))
        grid, local = tuple(grid), tuple(local)
        better = prob[local] > self.best_prob[grid]
        self.best_prob[grid] = np.where(better, prob[local], self.best_prob[grid])
        wins = better & (prob[local] > 0.5)  # == better unless low probabilities are kept
        self.best_label[grid] = np.where(wins, np.uint16(label), self.best_label[grid])

    @property
    def labels(self) -> np.ndarray:
        """`(x, y, z)` uint16 fused label map (0 = background)."""
        return self.best_label
