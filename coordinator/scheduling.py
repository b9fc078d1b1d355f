"""Which worker takes the next job: pure functions over the registry's states.

A worker's *limit* is how many jobs (running or queued) the coordinator
will have on it: the slots it runs at once plus its queue, both as it signed
them in its last health answer (``capacity`` and ``queue_capacity``).  A
workers.json ``max_concurrent_jobs`` replaces the worker's own ``capacity``
there (an operator may want less of a machine); the queue is always added,
so a pool never refuses a job that one of its workers would have queued.

Least loaded first, load meaning the jobs a worker has or is about to have:
the active and queued jobs it signed in its last health answer, plus the jobs
this coordinator sent it since that check was sent (``effective_load``).
Loads are compared as a fraction of each worker's limit, so a worker with
twice the room takes twice the jobs.  Ties go round-robin from a rotating
cursor, so an idle pool spreads jobs instead of piling onto the first worker
listed.

A worker that is not ``routable`` (down, unchecked, draining, or suspended
for disagreeing with other replicas; see ``registry.py``) gets nothing, and an
*open* worker (enrolled without being in workers.json) only ever gets an
extra replica of a job whose first replica went to a listed worker.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from coordinator.registry import WorkerState

# Bounds of the retry_after of a 503 from a full pool, seconds.
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 60


def job_limit(state: WorkerState) -> int:
    """The most jobs (running or queued) this worker should hold."""
    load = state.load
    running = state.entry.max_concurrent_jobs
    if running is None:
        running = load.capacity if load is not None else 0
    queue = load.queue_capacity if load is not None and load.queue_capacity is not None else 0
    return running + queue


def has_room(state: WorkerState) -> bool:
    return state.effective_load < job_limit(state)


def rank_workers(workers: Sequence[WorkerState], cursor: int = 0,
                 exclude: Collection[str] = (), open_ok: bool = False) -> list[WorkerState]:
    """Routable workers with room, best first; ``exclude`` holds worker ids already tried.

    Open (enrolled) workers are candidates only with ``open_ok``.
    """
    count = len(workers)
    candidates = [(index, w) for index, w in enumerate(workers)
                  if w.routable and w.worker_id not in exclude and has_room(w)
                  and (open_ok or not w.open)]

    def key(item: tuple[int, WorkerState]) -> tuple[float, int, int]:
        index, w = item
        return (w.effective_load / max(job_limit(w), 1), w.effective_load,
                (index - cursor) % max(count, 1))

    return [w for _, w in sorted(candidates, key=key)]


def pick_worker(workers: Sequence[WorkerState], cursor: int = 0,
                exclude: Collection[str] = (), open_ok: bool = False) -> WorkerState | None:
    """The worker the next job should go to, or None when none can take it."""
    ranked = rank_workers(workers, cursor, exclude, open_ok)
    return ranked[0] if ranked else None


def free_slots(workers: Sequence[WorkerState]) -> int:
    """How many more jobs the pool would take now."""
    return sum(max(0, job_limit(w) - w.effective_load) for w in workers if w.routable)


def drain_retry_after(workers: Sequence[WorkerState], fallback: float) -> int:
    """Seconds until a full pool likely has room again: one job at the pool's drain rate.

    The drain rate is the jobs per second the routable workers finished
    lately (``WorkerState.drain_rate``, from their signed loads); with none
    measured yet, ``fallback`` (the health interval) is the answer.
    """
    rate = sum(w.drain_rate for w in workers if w.routable)
    seconds = 1.0 / rate if rate > 0 else fallback
    return int(min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, math.ceil(seconds))))
