"""Independent host jobs (phantom cases, stage-cache cases) spread over worker processes.

Each job's result depends on its arguments only, so the output is the same for any number of
workers. Workers are started with ``spawn``: the caller may be a training script holding JAX's
threads, which ``fork`` would copy in an undefined state.
"""

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(num_jobs: int, *, min_jobs_per_worker: int = 4, max_workers: int = 8) -> int:
    """One worker per available core, at most ``max_workers``, with at least
    ``min_jobs_per_worker`` jobs each (starting a process costs about a job); 1: no processes."""
    return max(1, min(available_cores(), max_workers, int(num_jobs) // min_jobs_per_worker))


def map_in_processes(fn: Callable, jobs: Iterable[tuple], workers: int) -> Iterator:
    """``fn(*job)`` for each job, results in job order; ``workers == 1`` runs in this process.

    ``fn`` must be a module-level function and the jobs picklable (``spawn``).
    """
    jobs = list(jobs)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(*job)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(int(workers), mp_context=context) as pool:
        yield from pool.map(fn, *zip(*jobs, strict=True))
