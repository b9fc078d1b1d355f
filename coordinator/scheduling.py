"""Which worker takes the next job: pure functions over the registry's states.

Least loaded first, load meaning the jobs a worker has or is about to have:
the active and queued jobs it signed in its last health answer, plus the jobs
this coordinator sent it since that check was sent (``effective_load``).  A
worker never gets more than its ``max_concurrent_jobs`` that way.  Loads are
compared as a fraction of ``max_concurrent_jobs``, so a worker configured for
8 takes twice the jobs of one configured for 4.  Ties go round-robin from a
rotating cursor, so an idle pool spreads jobs instead of piling onto the
first worker listed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from coordinator.registry import WorkerState


def has_room(state: WorkerState) -> bool:
    return state.effective_load < state.entry.max_concurrent_jobs


def rank_workers(workers: Sequence[WorkerState], cursor: int = 0,
                 exclude: Collection[str] = ()) -> list[WorkerState]:
    """Routable workers with room, best first; ``exclude`` holds worker ids already tried."""
    count = len(workers)
    candidates = [(index, w) for index, w in enumerate(workers)
                  if w.routable and w.worker_id not in exclude and has_room(w)]

    def key(item: tuple[int, WorkerState]) -> tuple[float, int, int]:
        index, w = item
        return (w.effective_load / w.entry.max_concurrent_jobs, w.effective_load,
                (index - cursor) % max(count, 1))

    return [w for _, w in sorted(candidates, key=key)]


def pick_worker(workers: Sequence[WorkerState], cursor: int = 0,
                exclude: Collection[str] = ()) -> WorkerState | None:
    """The worker the next job should go to, or None when none can take it."""
    ranked = rank_workers(workers, cursor, exclude)
    return ranked[0] if ranked else None


def free_slots(workers: Sequence[WorkerState]) -> int:
    """How many more jobs the pool would take now."""
    return sum(max(0, w.entry.max_concurrent_jobs - w.effective_load)
               for w in workers if w.routable)
