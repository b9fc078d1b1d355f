"""Least-loaded routing over the registry's states."""

from __future__ import annotations

from coordinator.config import WorkerEntry
from coordinator.registry import Load, WorkerRegistry, WorkerState
from coordinator.scheduling import free_slots, pick_worker, rank_workers
from sandrun.identity import WorkerIdentity


def registry(*limits: int) -> tuple[WorkerRegistry, list[WorkerState]]:
    entries = tuple(WorkerEntry(WorkerIdentity.from_seed(bytes([i + 1]) * 32).worker_id,
                                f"http://10.0.0.{i + 1}:8443", limit, f"w{i}")
                    for i, limit in enumerate(limits))
    reg = WorkerRegistry(entries)
    states = reg.workers()
    for state in states:
        reg.record_pass(state, Load(0, 0, 4), now=1.0, dispatched_before=0)
    return reg, states


def load(reg: WorkerRegistry, state: WorkerState, active: int, queued: int = 0) -> None:
    reg.record_pass(state, Load(active, queued, 4), now=2.0,
                    dispatched_before=state.dispatched_total)


def test_the_least_loaded_worker_is_picked() -> None:
    reg, (a, b, c) = registry(4, 4, 4)
    load(reg, a, 2)
    load(reg, b, 1)
    load(reg, c, 1, queued=2)
    assert pick_worker(reg.workers()) is b


def test_jobs_sent_since_the_last_check_count_as_load() -> None:
    reg, (a, b) = registry(4, 4)
    load(reg, a, 1)
    reg.note_dispatch(b)
    reg.note_dispatch(b)
    assert b.effective_load == 2
    assert pick_worker(reg.workers()) is a
    # A check sent after those dispatches accounts for them: they stop counting twice.
    load(reg, b, 2)
    assert b.dispatched_since_check == 0 and b.effective_load == 2


def test_a_worker_at_its_max_concurrent_jobs_gets_nothing_more() -> None:
    reg, (a, b) = registry(2, 4)
    load(reg, a, 0)
    load(reg, b, 3)
    reg.note_dispatch(a)
    reg.note_dispatch(a)
    assert pick_worker(reg.workers()) is b
    reg.note_dispatch(b)
    assert pick_worker(reg.workers()) is None
    assert free_slots(reg.workers()) == 0


def test_load_is_compared_as_a_fraction_of_each_workers_limit() -> None:
    reg, (small, big) = registry(2, 8)
    load(reg, small, 1)  # half full
    load(reg, big, 3)  # three eighths full
    assert pick_worker(reg.workers()) is big


def test_ties_rotate_with_the_cursor_so_an_idle_pool_spreads_jobs() -> None:
    reg, _ = registry(4, 4, 4)
    picks = [pick_worker(reg.workers(), cursor) for cursor in range(3)]
    assert [p.entry.name for p in picks if p] == ["w0", "w1", "w2"]


def test_unhealthy_draining_and_excluded_workers_are_skipped() -> None:
    reg, (a, b, c) = registry(4, 4, 4)
    reg.mark_down(a, "connection refused")
    b.draining_since = 5.0
    assert [w.entry.name for w in rank_workers(reg.workers())] == ["w2"]
    assert pick_worker(reg.workers(), exclude={c.worker_id}) is None
