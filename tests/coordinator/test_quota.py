"""Pool-wide per-IP limits: the pure decision and per-client locks (the client address: test_netaddr)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from coordinator.config import PoolQuota
from coordinator.quota import ClientLocks, Usage, decide

QUOTA = PoolQuota(cpu_seconds_per_minute=10.0, max_active_jobs=2, jobs_per_hour=20)


def test_usage_sums_the_workers_answers_and_ignores_garbage() -> None:
    usage = Usage.total([
        {"used": 2.5, "active_jobs": 1, "jobs_this_hour": 3, "retry_after": 0},
        {"used": 1.0, "active_jobs": 1, "jobs_this_hour": 4, "retry_after": 7},
        {"used": "lots", "active_jobs": -5, "jobs_this_hour": None, "retry_after": True},
    ])
    assert usage == Usage(3.5, 2, 7, 7)


def test_a_client_under_every_limit_may_submit() -> None:
    decision = decide(Usage(9.9, 1, 19), QUOTA)
    assert decision.allowed and decision.reason is None and decision.retry_after == 0
    assert decision.your_quota()["available"] == 0.1


def test_active_jobs_anywhere_in_the_pool_count_against_the_concurrency_limit() -> None:
    decision = decide(Usage(0.0, 2, 2), QUOTA)
    assert not decision.allowed
    assert "2 of 2 jobs" in (decision.reason or "")
    assert decision.retry_after == 5
    assert decision.error_extra()["active_jobs"] == 2


def test_the_largest_wait_among_refusing_limits_is_reported() -> None:
    decision = decide(Usage(10.0, 2, 20), QUOTA)
    assert not decision.allowed
    assert decision.retry_after == 3600
    assert "Hourly" in (decision.reason or "")


def test_cpu_refusal_waits_at_most_the_window_or_a_workers_longer_answer() -> None:
    assert decide(Usage(12.0, 0, 0), QUOTA).retry_after == 60
    assert decide(Usage(12.0, 0, 0, worker_retry_after=90), QUOTA).retry_after == 90


def test_one_clients_submissions_run_one_at_a_time_and_locks_are_dropped() -> None:
    locks = ClientLocks()
    gates: list[defer.Deferred[None]] = [defer.Deferred(), defer.Deferred()]
    order: list[str] = []

    def work(name: str, gate: defer.Deferred[None]) -> defer.Deferred[Any]:
        order.append(f"start {name}")
        return gate.addCallback(lambda _: order.append(f"end {name}"))

    first = locks.run("a", work, "1", gates[0])
    second = locks.run("a", work, "2", gates[1])
    other = locks.run("b", lambda: "free")
    assert other.result == "free"  # another client is not held up
    assert order == ["start 1"]
    gates[0].callback(None)
    assert order == ["start 1", "end 1", "start 2"]
    gates[1].callback(None)
    assert first.called and second.called
    assert len(locks) == 0
