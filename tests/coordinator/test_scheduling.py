"""Least-loaded routing over the registry's states."""

from __future__ import annotations

from coordinator.config import WorkerEntry
from coordinator.registry import Load, WorkerRegistry, WorkerState
from coordinator.scheduling import (
    drain_retry_after,
    free_slots,
    job_limit,
    pick_worker,
    rank_workers,
)
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


def test_a_workers_queue_adds_to_its_limit_and_its_own_capacity_counts_when_unlisted() -> None:
    reg, (listed,) = registry(2)
    reg.record_pass(listed, Load(0, 0, 8, queue_capacity=10), now=2.0, dispatched_before=0)
    assert job_limit(listed) == 2 + 10  # workers.json's 2 replaces the signed 8
    unlisted = WorkerState(WorkerEntry(listed.worker_id, "http://10.0.0.9:1", None))
    unlisted.load = Load(0, 0, 8, queue_capacity=10)
    assert job_limit(unlisted) == 8 + 10


def test_a_full_pools_retry_after_is_one_job_at_its_drain_rate_within_bounds() -> None:
    reg, (a, b) = registry(4, 4)
    assert drain_retry_after(reg.workers(), fallback=5.0) == 5
    a.drain_rate, b.drain_rate = 0.1, 0.15  # 0.25 jobs a second in all
    assert drain_retry_after(reg.workers(), fallback=5.0) == 4
    a.drain_rate = 0.001
    b.drain_rate = 0.0
    assert drain_retry_after(reg.workers(), fallback=5.0) == 60
    a.drain_rate = 100.0
    assert drain_retry_after(reg.workers(), fallback=5.0) == 1


def test_the_drain_rate_is_measured_from_signed_loads_and_jobs_sent_between_checks() -> None:
    reg, (a,) = registry(4)
    reg.record_pass(a, Load(3, 0, 4), now=10.0, dispatched_before=0)
    reg.note_dispatch(a)
    reg.note_dispatch(a)
    # 3 held + 2 sent - 1 left = 4 finished in 10 s.
    reg.record_pass(a, Load(1, 0, 4), now=20.0, dispatched_before=a.dispatched_total)
    assert abs(a.drain_rate - 0.4) < 1e-9


def test_a_suspended_or_open_worker_is_not_picked_for_a_first_replica() -> None:
    reg, (a, b) = registry(4, 4)
    a.suspended_since = 1.0
    b.open = True
    assert pick_worker(reg.workers()) is None
    assert pick_worker(reg.workers(), open_ok=True) is b
