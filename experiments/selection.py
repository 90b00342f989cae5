"""Which training step is the best: a stage's validation metric, its direction and a tie-break.

A stage declares `select=("id_rate", "max")` (and optionally `tie_break=("mean_distance_mm",
"min")`) on `experiments.trainer.Stage`. Steps are compared by `rank`: a tuple, larger is better,
with a missing or non-finite value ranking below every finite one and, on equal values, the
earlier step winning. The same key ranks the orbax checkpoints (`verse_jax.train.checkpoint`), so
the best checkpoint kept on disk and the best export agree.
"""

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

MODES = ("max", "min")


@dataclasses.dataclass(frozen=True)
class Selection:
    """`metric` (a key of the stage's validation dict) is better when larger ("max") or smaller
    ("min"); `tie_break` is a second `(metric, mode)` compared on equal values."""

    metric: str
    mode: str
    tie_break: tuple[str, str] | None = None

    def __post_init__(self):
        for _, mode in self.keys():
            if mode not in MODES:
                raise ValueError(f"selection mode must be one of {MODES}, got {mode!r}")

    def keys(self) -> list[tuple[str, str]]:
        return [(self.metric, self.mode)] + ([tuple(self.tie_break)] if self.tie_break else [])

    def describe(self) -> dict:
        """The export metadata fields naming the rule."""
        out = {"metric": self.metric, "mode": self.mode}
        if self.tie_break:
            out["tie_break"] = list(self.tie_break)
        return out


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def rank(selection: Selection, values: Mapping, step: int) -> tuple[float, ...]:
    """Sort key of a step's validation `values`: larger is better (ties: the earlier step)."""
    key = []
    for name, mode in selection.keys():
        value = _finite(values.get(name))
        key.append(-math.inf if value is None else value if mode == "max" else -value)
    return (*key, -float(step))


def checkpoint_metrics(values: Mapping, step: int) -> dict:
    """JSON-able validation values stored with an orbax checkpoint (non-finite -> None)."""
    return {"step": int(step), **{str(k): _finite(v) for k, v in values.items()}}


def rank_fn(selection: Selection):
    """`rank` on what `checkpoint_metrics` stored (orbax's `best_fn`)."""
    return lambda stored: rank(selection, stored, stored.get("step", 0))


@dataclasses.dataclass
class Best:
    """The best step so far and its validation values (None before the first validation)."""

    selection: Selection
    step: int | None = None
    values: dict | None = None

    def offer(self, step: int, values: Mapping) -> bool:
        """Whether `values` at `step` is better than the best so far (then it becomes the best)."""
        if self.step is not None and rank(self.selection, values, step) <= rank(
            self.selection, self.values, self.step
        ):
            return False
        self.step, self.values = int(step), dict(values)
        return True

    def describe(self) -> str:
        if self.step is None:
            return "none yet"
        value = _finite(self.values.get(self.selection.metric))
        shown = "nan" if value is None else f"{value:.4g}"
        return f"{self.selection.metric} {shown} at step {self.step}"

    @classmethod
    def from_export(cls, selection: Selection, export_dir: Path) -> "Best":
        """The best so far recorded in a best export's `stage.json` (a resumed run's memory).

        An export of another rule (other metric or mode) or of the last step counts as none.
        """
        best = cls(selection)
        path = Path(export_dir) / "stage.json"
        if not path.is_file():
            return best
        extra = json.loads(path.read_text()).get("extra") or {}
        same_rule = all(extra.get(k) == v for k, v in selection.describe().items())
        if extra.get("selected") == "best" and same_rule and isinstance(extra.get("val"), dict):
            best.step, best.values = int(extra["step"]), dict(extra["val"])
        return best
