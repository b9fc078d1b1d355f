"""The registry: reloads that keep state and drain removed workers, and restart detection."""

from __future__ import annotations

from coordinator.config import WorkerEntry
from coordinator.registry import Load, WorkerRegistry, WorkerState
from sandrun.identity import WorkerIdentity

IDS = [WorkerIdentity.from_seed(bytes([i + 1]) * 32).worker_id for i in range(3)]


def entry(i: int, port: int = 8443, limit: int = 4) -> WorkerEntry:
    return WorkerEntry(IDS[i], f"http://10.0.0.{i + 1}:{port}", limit, f"w{i}")


def passed(reg: WorkerRegistry, state: WorkerState, now: float = 1.0) -> None:
    reg.record_pass(state, Load(0, 0, 4), now, state.dispatched_total)


def test_a_reload_keeps_the_health_of_workers_that_stay() -> None:
    reg = WorkerRegistry((entry(0), entry(1)))
    for state in reg.workers():
        passed(reg, state)
    changes = reg.replace((entry(0, limit=8), entry(1)), now=2.0)
    assert changes == {"added": [], "removed": [], "changed": ["w0"]}
    a = reg.get(IDS[0])
    assert a is not None and a.healthy and a.entry.max_concurrent_jobs == 8


def test_a_worker_whose_endpoint_changed_is_unchecked_until_its_next_check() -> None:
    reg = WorkerRegistry((entry(0),))
    passed(reg, reg.workers()[0])
    reg.replace((entry(0, port=9999),), now=2.0)
    state = reg.workers()[0]
    assert not state.healthy and not state.down and state.entry.endpoint.endswith(":9999")


def test_a_removed_worker_drains_then_is_forgotten_and_can_come_back() -> None:
    reg = WorkerRegistry((entry(0), entry(1)))
    for state in reg.workers():
        passed(reg, state)
    changes = reg.replace((entry(1),), now=10.0)
    assert changes["removed"] == ["w0"]
    removed = reg.get(IDS[0])
    assert removed is not None and removed.draining_since == 10.0
    assert not removed.routable and removed in reg.healthy()  # still reachable for its jobs
    assert reg.by_tag(entry(0).tag) is removed
    assert reg.expire_drained(10.0 + 3599) == []
    reg.replace((entry(0), entry(1)), now=20.0)  # re-added before it expired
    assert removed.draining_since is None and removed.routable
    reg.replace((entry(1),), now=30.0)
    assert reg.expire_drained(30.0 + 3600) == ["w0"]
    assert reg.get(IDS[0]) is None and reg.by_tag(entry(0).tag) is None


def test_down_listeners_hear_each_transition_once() -> None:
    reg = WorkerRegistry((entry(0),))
    heard: list[str] = []
    reg.on_down(lambda s: heard.append(s.entry.label))
    state = reg.workers()[0]
    passed(reg, state)
    reg.record_failure(state, "connection refused", 2.0)
    reg.record_failure(state, "connection refused", 3.0)
    assert heard == ["w0"] and state.last_error == "connection refused"
    passed(reg, state, now=4.0)
    assert state.recovered_at == 4.0
    reg.mark_down(state, "request failed")
    assert heard == ["w0", "w0"]


def test_a_worker_that_came_back_after_a_job_was_sent_lost_that_job() -> None:
    reg = WorkerRegistry((entry(0),))
    state = reg.workers()[0]
    passed(reg, state, now=100.0)
    assert not reg.restarted_after(state, 150.0)  # the first pass is not a recovery
    reg.record_failure(state, "gone", 200.0)
    passed(reg, state, now=210.0)
    assert reg.restarted_after(state, 150.0)
    assert not reg.restarted_after(state, 211.0)


def test_a_worker_reporting_its_start_time_tells_restarts_across_coordinator_restarts() -> None:
    reg = WorkerRegistry((entry(0),))
    state = reg.workers()[0]
    reg.record_pass(state, Load(0, 0, 4), 500.0, 0, started_at=400.0)
    assert reg.restarted_after(state, 399.0)
    assert not reg.restarted_after(state, 401.0)


def test_an_undone_dispatch_never_makes_the_load_negative() -> None:
    reg = WorkerRegistry((entry(0),))
    state = reg.workers()[0]
    reg.note_dispatch(state)
    before = reg.check_started(state)
    reg.undo_dispatch(state)
    reg.record_pass(state, Load(0, 0, 4), 1.0, before)
    assert state.dispatched_since_check == 0 and state.effective_load == 0
