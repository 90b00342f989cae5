"""How sure the vertebra labelling is: the chosen sequence against its one-level alternatives.

The commonest labelling error is the whole sequence named one level off (or a transitional T13/L6
miscounted). The candidate peaks hold the evidence against it: the best admissible sequence (the
same exact search as `sequence.best_sequence_dp`) of the same number of vertebrae with every
label moved one level up or down, or with T13 inserted or removed at the thoraco-lumbar junction
where the landmark set has a T13 channel (26 landmarks). An extra or missing L6 needs no own
hypothesis: L6 is the last label, so it is the -1 / +1 shift at the lumbar end.

Scores are sums of candidate heatmap values; the margin is the chosen sequence's score minus the
best alternative's, divided by the number of vertebrae (mean heatmap value per vertebra), so it is
comparable between short and long scans. A case is flagged ``uncertain`` when the margin is below a
threshold, or when no admissible sequence was found at all (the selection fell back to maxima).
"""

import math
from dataclasses import dataclass

import numpy as np

from verse_jax.infer.candidates import LandmarkCandidates
from verse_jax.infer.sequence import (
    SEQUENCE_RULES,
    LandmarkSequence,
    SequenceRules,
    best_sequence_dp,
)
from verse_jax.labels import T12_INDEX, T13_INDEX, index_to_label

# Provisional: not yet calibrated on a trained bundle (benchmarks/label_shift_calibration.py
# measures catch and false-alarm rates of any threshold on held-out phantoms).
DEFAULT_MARGIN_THRESHOLD = 0.15


def anatomical_orders(num_landmarks: int) -> list[list[int]]:
    """Landmark indices from C1 downwards: without T13 (C1..L6), and with it when K >= 26."""
    standard = list(range(min(num_landmarks, 25)))
    orders = [standard]
    if num_landmarks > T13_INDEX:
        orders.append(standard[: T12_INDEX + 1] + [T13_INDEX] + standard[T12_INDEX + 1 :])
    return orders


@dataclass(frozen=True)
class LabelHypothesis:
    """One alternative labelling: its name, VerSe ids (top to bottom) and best score."""

    name: str
    labels: tuple[int, ...]
    score: float  # -inf when no admissible sequence exists

    def to_dict(self) -> dict:
        score = self.score if math.isfinite(self.score) else None
        return {"name": self.name, "labels": list(self.labels), "score": score}


@dataclass(frozen=True)
class LabelConfidence:
    """The chosen labelling against its alternatives.

    Attributes:
        labels: chosen VerSe ids, top to bottom.
        score: sum of the chosen candidates' heatmap values.
        alternatives: the one-level alternatives that exist for this landmark set.
        margin: (score - best alternative score) / number of vertebrae; inf when no alternative
            is admissible; nan when the labelling is not a sequence (fallback or gaps).
        threshold: the margin below which the case is flagged.
        uncertain: margin < threshold, or no admissible sequence.
        reason: one line for people.
    """

    labels: tuple[int, ...]
    score: float
    alternatives: tuple[LabelHypothesis, ...]
    margin: float
    threshold: float
    uncertain: bool
    reason: str

    def to_dict(self) -> dict:
        """JSON-ready dict (inf and nan margins become None)."""
        return {
            "labelling_uncertain": self.uncertain,
            "margin": self.margin if math.isfinite(self.margin) else None,
            "threshold": self.threshold,
            "reason": self.reason,
            "labels": list(self.labels),
            "score": self.score,
            "alternatives": [h.to_dict() for h in self.alternatives],
        }


def _window(order: list[int], indices: list[int]) -> int | None:
    """Start of ``indices`` as a contiguous run of ``order``, or None."""
    if not indices or indices[0] not in order:
        return None
    start = order.index(indices[0])
    return start if order[start : start + len(indices)] == indices else None


def _hypotheses(indices: list[int], num_landmarks: int) -> list[tuple[str, list[int]]]:
    """(name, landmark indices) of the one-level alternatives of a contiguous run ``indices``."""
    orders = anatomical_orders(num_landmarks)
    home = next(o for o in orders if _window(o, indices) is not None)
    start, n = _window(home, indices), len(indices)
    found = []
    for step, name in ((-1, "shift -1"), (1, "shift +1")):
        if 0 <= start + step and start + step + n <= len(home):
            found.append((name, home[start + step : start + step + n]))
    t13 = "T13 removed" if T13_INDEX in indices else "T13 inserted"
    for other in (o for o in orders if o is not home):
        top, bottom = other.index(indices[0]), other.index(indices[-1])
        if top + n <= len(other):
            found.append((f"{t13}, top kept", other[top : top + n]))
        if bottom - n + 1 >= 0:
            found.append((f"{t13}, bottom kept", other[bottom - n + 1 : bottom + 1]))
    unique, seen = [], {tuple(indices)}
    for name, run in found:
        if tuple(run) not in seen:
            seen.add(tuple(run))
            unique.append((name, run))
    return unique


def label_confidence(
    candidates: LandmarkCandidates,
    sequence: LandmarkSequence,
    *,
    threshold: float = DEFAULT_MARGIN_THRESHOLD,
    rules: SequenceRules = SEQUENCE_RULES,
) -> LabelConfidence:
    """Margin of the chosen labelling over its shifted and T13 alternatives.

    Args:
        candidates: the landmark candidates the sequence was selected from (K landmarks).
        sequence: `sequence.select_landmark_sequence`'s result on them.
        threshold: flag the case when the per-vertebra margin is below this.
        rules: the sequence selection's rules (their admissible spacing of neighbours, mm).

    Returns:
        `LabelConfidence`.
    """
    values = np.asarray(candidates.values, np.float64)
    num_landmarks = values.shape[0]
    chosen = np.flatnonzero(sequence.valid).tolist()
    order = anatomical_orders(num_landmarks)
    chosen.sort(key=lambda k: order[-1].index(k) if k in order[-1] else k)
    labels = tuple(index_to_label(k) for k in chosen)
    score = float(np.sum(np.asarray(sequence.values, np.float64)[chosen]))
    runs = [o for o in order if _window(o, chosen) is not None]
    if sequence.mode != "sequence" or not runs:
        why = "no admissible sequence" if sequence.mode != "sequence" else "labels are not a run"
        return LabelConfidence(labels, score, (), math.nan, threshold, True, why)
    alternatives = []
    for name, run in _hypotheses(chosen, num_landmarks):
        _, alt_score = best_sequence_dp(
            values[run],
            np.asarray(candidates.points_mm)[run],
            np.asarray(candidates.valid)[run],
            min_valid_distance=rules.min_distance_mm,
            max_valid_distance=rules.max_distance_mm,
        )
        alternatives.append(LabelHypothesis(name, tuple(index_to_label(k) for k in run), alt_score))
    best = max(alternatives, key=lambda h: h.score, default=None)
    if best is None or best.score == -math.inf:
        margin, reason = math.inf, "no one-level alternative is admissible"
    else:
        margin = (score - best.score) / len(chosen)
        reason = f"margin {margin:.3f} per vertebra over '{best.name}'"
    uncertain = margin < threshold
    if uncertain:
        reason += f" (below {threshold:g})"
    return LabelConfidence(labels, score, tuple(alternatives), margin, threshold, uncertain, reason)
