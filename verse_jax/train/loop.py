"""The shared training loop `fit` and its metric writer (`<workdir>/metrics.jsonl` + progress).

`fit` runs a jitted pure step (`verse_jax.train.state.make_train_step`) over a batch iterator,
logs every `log_every` steps, validates every `eval_every` and saves every `checkpoint_every`;
the metric writer appends one JSON record per logged or validated step and drops the records
after the step a resumed run starts from.
"""

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax
import numpy as np
import tqdm

from verse_jax.io.files import write_text_atomic
from verse_jax.train.state import Batch, Metrics, TrainState

log = logging.getLogger(__name__)


# --- metrics ----------------------------------------------------------------------------------


def _jsonable(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class MetricWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and shows progress.

    One JSON object per line: `{"step", "kind": "train"|"eval", "time", <scalars>}` (non-finite
    values as null; eval scalars prefixed `val/`). Progress is a tqdm bar with loss and steps/s
    when `progress` is true (default: stderr is a terminal), plain INFO log lines otherwise.
    Resuming at `start_step` drops records of later steps left by the interrupted run.
    `eval_note() -> str`, when given, is appended to each validation log line (e.g. the best so
    far).
    """

    def __init__(
        self, workdir, *, total_steps: int, start_step: int = 0, progress=None, eval_note=None
    ):
        self._eval_note = eval_note
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.path, start_step)
        self._file = self.path.open("a")
        self._total = total_steps
        self._last = (start_step, time.perf_counter())
        if progress is None:
            progress = sys.stderr.isatty()
        self._bar = None
        if progress:
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step")

    def _append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_train(self, step: int, scalars: Mapping[str, float]) -> None:
        """Training scalars at completed step `step` (means over the logging interval)."""
        now = time.perf_counter()
        last_step, last_time = self._last
        rate = (step - last_step) / max(now - last_time, 1e-9)
        self._last = (step, now)
        record = {k: _jsonable(v) for k, v in scalars.items()}
        self._append(
            {"step": step, "kind": "train", "time": time.time(), **record, "steps_per_s": rate}
        )
        loss = scalars.get("loss", float("nan"))
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4g}", steps_per_s=f"{rate:.3g}")
        else:
            log.info("step %d/%d  loss %.5g  %.3g steps/s", step, self._total, loss, rate)

    def write_eval(self, step: int, scalars: Mapping[str, float]) -> None:
        """Validation scalars at completed step `step`; also logged at INFO."""
        record = {f"val/{k}": _jsonable(v) for k, v in scalars.items()}
        self._append({"step": step, "kind": "eval", "time": time.time(), **record})
        text = ", ".join(f"{k} {float(v):.4g}" for k, v in scalars.items())
        if self._eval_note is not None:
            text += f"; {self._eval_note()}"
        log.info("validation at step %d: %s", step, text)
        self._last = (self._last[0], time.perf_counter())  # do not count validation in steps/s

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites `path` (atomically) without records of steps after `step`."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) == len(lines):
        return
    write_text_atomic(path, "".join(line + "\n" for line in keep))


# --- the loop ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopSchedule:
    """When `fit` logs, validates and checkpoints (every N completed steps; 0 = only at the end)."""

    num_steps: int
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0

    def due(self, every: int, done: int) -> bool:
        return done == self.num_steps or (every > 0 and done % every == 0)


def _flush(pending: list[tuple[int, Metrics]]) -> tuple[int, dict[str, float]]:
    """Pulls buffered step metrics to the host; raises on the first non-finite loss."""
    host = jax.device_get(pending)
    for done, metrics in host:
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss}) at step {done}; stopping. Terms: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
            )
    keys = host[-1][1].keys()
    mean = {k: float(np.mean([m[k] for _, m in host])) for k in keys}
    pending.clear()
    return host[-1][0], mean


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]],
    batches: Iterator[Batch],
    *,
    rng: jax.Array,
    loop: LoopSchedule,
    writer: MetricWriter,
    evaluate: Callable[[TrainState], Mapping[str, float]] | None = None,
    save: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Runs `train_step` from `state.step` up to `loop.num_steps`, the one loop of all stages.

    Metrics stay on the device until they are logged (every `loop.log_every` steps: mean over the
    interval). Before each validation (`evaluate(state) -> scalars`, written with prefix `val/`)
    and each checkpoint (`save(state)`), buffered losses are checked, so a non-finite loss stops
    the run (FloatingPointError naming the step) before it reaches a checkpoint. All three happen
    at the last step too. `batches` must yield device-ready batches (see `shard_batch`).
    """
    start = int(jax.device_get(state.step))
    pending: list[tuple[int, Metrics]] = []
    for done in range(start + 1, loop.num_steps + 1):
        state, metrics = train_step(state, next(batches), rng)
        pending.append((done, metrics))
        if len(pending) >= 3:  # bound how far the host runs ahead of the device
            jax.block_until_ready(pending[-3][1]["loss"])
        log_now = loop.due(loop.log_every, done)
        eval_now = evaluate is not None and loop.due(loop.eval_every, done)
        save_now = save is not None and loop.due(loop.checkpoint_every, done)
        if pending and (log_now or eval_now or save_now):
            writer.write_train(*_flush(pending))
        if eval_now:
            writer.write_eval(done, evaluate(state))
        if save_now:
            save(state)
    if pending:
        writer.write_train(*_flush(pending))
    return state
