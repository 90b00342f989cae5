"""VerSe label ids and landmark indices (the one place that maps between them).

VerSe ids: 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, 28 T13 (VerSe'20 only).
Landmark index = id - 1 for ids 1..25; in the 26-landmark variant T13 (28) is index 25.
"""

import numpy as np

VERTEBRA_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 7)},
    28: "T13",
}
VALID_LABELS = frozenset(VERTEBRA_NAMES)
T13 = 28
# Landmark indices of T12 and T13 (26 landmarks): T13 follows T12 in the spine, not in index order.
T12_INDEX, T13_INDEX = 18, 25
L6_INDEX = 24  # the first transitional landmark index (L6, then T13)


def label_to_index(label: int, num_landmarks: int = 25) -> int:
    """Landmark index of a VerSe id; raises ValueError for ids this landmark set cannot hold."""
    label = int(label)
    if 1 <= label <= 25:
        return label - 1
    if label == T13 and num_landmarks >= 26:
        return 25
    raise ValueError(f"VerSe label {label} has no landmark index with {num_landmarks} landmarks")


def index_to_label(index: int) -> int:
    """VerSe id of a landmark index (0..24 -> 1..25, 25 -> 28 for T13)."""
    index = int(index)
    if 0 <= index <= 24:
        return index + 1
    if index == 25:
        return T13
    raise ValueError(f"landmark index {index} is outside 0..25")


def index_to_label_array(num_landmarks: int) -> np.ndarray:
    """(num_landmarks,) VerSe ids of landmark indices 0..num_landmarks-1."""
    return np.array([index_to_label(i) for i in range(num_landmarks)], dtype=np.int64)


def label_colors() -> np.ndarray:
    """(29, 4) RGBA colours in [0, 1] indexed by VerSe id, as the previews draw them; id 0 clear."""
    rng = np.random.default_rng(7)
    colors = np.concatenate([rng.uniform(0.25, 1.0, (29, 3)), np.ones((29, 1))], axis=1)
    colors[0] = 0.0
    return colors


def label_registry() -> list[dict]:
    """Every VerSe vertebra id with its name and preview colour, in id order.

    Returns:
        [{"id": 1, "name": "C1", "color": "#rrggbb"}, ...] (ids 1-25 and 28).
    """
    colors = np.rint(label_colors()[:, :3] * 255).astype(int)
    return [
        {"id": label, "name": name, "color": "#{:02x}{:02x}{:02x}".format(*colors[label])}
        for label, name in sorted(VERTEBRA_NAMES.items())
    ]


def vertebra_name(label: int) -> str:
    """Human name of a VerSe id, e.g. 20 -> 'L1'."""
    try:
        return VERTEBRA_NAMES[int(label)]
    except KeyError:
        raise ValueError(f"unknown VerSe label id {label}") from None
