"""Label-shift confidence on constructed candidate sets whose best alternatives are known."""

import math

import numpy as np
import pytest

from verse_jax.infer import candidates, confidence
from verse_jax.infer import sequence as sequence_lib

Z_RANGE = (-500.0, 500.0)  # far from every point: no border override


def _candidates(num_landmarks, peaks):
    """Candidate arrays from {landmark index: [(vertebra position 0.., value), ...]}.

    Vertebra i sits at z = -30 i mm on one vertical line; slots follow the given order.
    """
    slots = max(len(p) for p in peaks.values())
    values = np.zeros((num_landmarks, slots))
    points = np.zeros((num_landmarks, slots, 3))
    valid = np.zeros((num_landmarks, slots), bool)
    for k, found in peaks.items():
        for slot, (position, value) in enumerate(found):
            values[k, slot], valid[k, slot] = value, True
            points[k, slot] = (0.0, 0.0, -30.0 * position)
    return candidates.LandmarkCandidates(values, points, valid)


def _confidence(candidates, **kwargs):
    sequence = sequence_lib.select_landmark_sequence(*candidates, Z_RANGE)
    return sequence, confidence.label_confidence(candidates, sequence, **kwargs)


def test_confident_labelling_has_no_admissible_alternative():
    peaks = {19 + i: [(i, 0.9)] for i in range(5)}  # L1..L5, nothing else
    sequence, result = _confidence(_candidates(25, peaks))
    assert sequence.mode == "sequence" and result.labels == (20, 21, 22, 23, 24)
    assert [h.name for h in result.alternatives] == ["shift -1", "shift +1"]
    assert [h.labels for h in result.alternatives] == [(19, 20, 21, 22, 23), (21, 22, 23, 24, 25)]
    assert all(h.score == -math.inf for h in result.alternatives)
    assert result.margin == math.inf and not result.uncertain
    assert result.to_dict()["margin"] is None


@pytest.mark.parametrize(
    ("second", "threshold", "uncertain"), [(0.6, 0.3, False), (0.85, 0.2, True)]
)
def test_shift_margin_is_the_mean_score_difference(second, threshold, uncertain):
    # L1..L4 channels also peak one vertebra lower; a weak T12 peak sits on the top vertebra.
    peaks = {19 + i: [(i, 0.9), (i + 1, second)] for i in range(4)}
    peaks[23] = [(4, 0.9)]
    peaks[18] = [(0, 0.2)]  # below the 0.25 of the longest run, so not chosen
    sequence, result = _confidence(_candidates(25, peaks), threshold=threshold)
    assert result.labels == (20, 21, 22, 23, 24)
    assert result.score == pytest.approx(4.5, abs=1e-12)
    shift_down, shift_up = result.alternatives
    assert shift_down.labels == (19, 20, 21, 22, 23)
    assert shift_down.score == pytest.approx(0.2 + 4 * second, abs=1e-12)
    assert shift_up.score == -math.inf  # no L6 candidate
    assert result.margin == pytest.approx((4.5 - 0.2 - 4 * second) / 5, abs=1e-12)
    assert result.uncertain is uncertain
    assert ("below" in result.reason) is uncertain and "shift -1" in result.reason


def test_t13_insertion_with_26_landmarks():
    # T11 T12 L1 L2 L3 on vertebrae 0..4; T13 and the lumbar channels also fit one lower.
    peaks = {17: [(0, 0.9)], 18: [(1, 0.9)], 19: [(2, 0.9), (3, 0.8)], 20: [(3, 0.9), (4, 0.8)]}
    peaks[21] = [(4, 0.9)]
    # T13's peak (0.2) is below the run threshold, so the selection leaves it out of the chain
    # (sequence_lib.anatomical_order); the insertion hypothesis still scores it.
    peaks[25] = [(2, 0.2)]
    sequence, result = _confidence(_candidates(26, peaks), threshold=0.2)
    assert result.labels == (18, 19, 20, 21, 22)
    by_name = {h.name: h for h in result.alternatives}
    assert set(by_name) == {
        "shift -1",
        "shift +1",
        "T13 inserted, top kept",
        "T13 inserted, bottom kept",
    }
    assert by_name["T13 inserted, top kept"].labels == (18, 19, 28, 20, 21)
    assert by_name["T13 inserted, bottom kept"].labels == (19, 28, 20, 21, 22)
    assert by_name["T13 inserted, top kept"].score == pytest.approx(0.9 + 0.9 + 0.2 + 0.8 * 2)
    assert by_name["T13 inserted, bottom kept"].score == -math.inf
    assert result.margin == pytest.approx((4.5 - 3.6) / 5)
    assert result.uncertain and "T13 inserted, top kept" in result.reason


def test_t13_is_not_offered_with_25_landmarks():
    peaks = {17 + i: [(i, 0.9)] for i in range(5)}
    _, result = _confidence(_candidates(25, peaks))
    assert [h.name for h in result.alternatives] == ["shift -1", "shift +1"]


def test_no_admissible_sequence_is_uncertain():
    # Two landmarks on the same point: no admissible pair, the selection falls back to maxima.
    peaks = {19: [(0, 0.9)], 20: [(0, 0.9)]}
    sequence, result = _confidence(_candidates(25, peaks))
    assert sequence.mode == "range_maxima"
    assert result.uncertain and math.isnan(result.margin) and result.alternatives == ()
    assert result.reason == "no admissible sequence"
    assert result.to_dict()["margin"] is None and result.to_dict()["labelling_uncertain"] is True


def test_a_sequence_starting_at_c1_has_no_shift_up():
    peaks = {i: [(i, 0.9)] for i in range(3)}
    _, result = _confidence(_candidates(25, peaks))
    assert [h.name for h in result.alternatives] == ["shift +1"]
