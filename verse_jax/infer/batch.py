"""``verse-jax predict`` over many cases: shards across processes and hosts, and reading ahead.

Shards: the sorted case list is split so that case i goes to shard i % COUNT; every case is done
by exactly one shard and its outputs stay per case; what a run writes once (``statistics.csv``) is
named per shard (``statistics-shard<I>of<N>.csv``). The shard comes from ``--shard INDEX/COUNT``
(scheduler array jobs) or from JAX's multi-process runtime (``jax.process_index()`` of
``jax.process_count()``; ``--distributed`` calls ``jax.distributed.initialize()`` first).

Reading ahead: while the networks run on one case, a background thread reads the next CT and
computes its stage volumes (``inputs.prepare_case``), at most one case ahead; an error there is
that case's error, raised when the case's turn comes.
"""

import argparse
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a run's cases."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: INDEX must lie in 0..COUNT-1 and COUNT be >= 1"
            )

    def select(self, inputs: Sequence[tuple[str, Path]]) -> list[tuple[str, Path]]:
        """This shard's (case id, path) pairs: case i of the list sorted by id goes to i % count."""
        ordered = sorted(inputs, key=lambda item: (item[0], str(item[1])))
        return ordered[self.index :: self.count]

    def summary_name(self, name: str) -> str:
        """``statistics.csv`` -> ``statistics-shard<I>of<N>.csv`` when sharded, else unchanged."""
        if self.count == 1:
            return name
        stem, dot, suffix = name.partition(".")
        return f"{stem}-shard{self.index}of{self.count}{dot}{suffix}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"INDEX/COUNT"`` -> Shard; ValueError naming the option otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard {text}: expected INDEX/COUNT, e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise ValueError(f"--shard {text}: need COUNT >= 1 and 0 <= INDEX < COUNT")
    return Shard(index, count)


def run_shard(shard: str | None, distributed: bool) -> Shard:
    """The shard of this process: ``--shard``, else JAX's process index and count.

    Raises:
        ValueError: bad ``--shard``, or ``--shard`` in a run of several JAX processes.
    """
    import jax

    explicit = parse_shard(shard) if shard is not None else None
    if distributed:  # coordinator, count and id from the environment / SLURM
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"--distributed: jax.distributed.initialize() failed: {error}"
            ) from error
    count = jax.process_count()
    if explicit is not None and count > 1:
        raise ValueError(
            f"--shard {shard}: this is one of {count} JAX processes, which already split the "
            "cases; pass either --shard or --distributed"
        )
    return explicit or Shard(jax.process_index(), count)


def read_ahead(
    items: Sequence[T], prepare: Callable[[T], R], enabled: bool = True
) -> Iterator[tuple[T, Callable[[], R]]]:
    """``(item, outcome)`` in order; ``outcome()`` returns ``prepare(item)`` or raises its error.

    With ``enabled``, ``prepare`` of the next item runs in one background thread while the caller
    works on the current item: at most one item is prepared ahead. Without, ``outcome()`` calls
    ``prepare`` itself.
    """
    if not enabled:
        for item in items:
            yield item, functools.partial(prepare, item)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verse-jax-read") as pool:
        pending = pool.submit(prepare, items[0]) if items else None
        for i, item in enumerate(items):
            current = pending
            # Queued behind the current item in the single worker: it starts when that is ready.
            pending = pool.submit(prepare, items[i + 1]) if i + 1 < len(items) else None
            yield item, current.result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``predict``'s options of a run over many cases."""
    p.add_argument(
        "--shard",
        metavar="INDEX/COUNT",
        help="predict only the sorted inputs i with i %% COUNT == INDEX (scheduler array jobs); "
        "writes statistics-shard<INDEX>of<COUNT>.csv",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() and split the cases over the JAX processes",
    )
    p.add_argument(
        "--no-overlap-io",
        action="store_true",
        help="read and preprocess each case only when its turn comes (default: the next case "
        "is read in the background while the networks run)",
    )
