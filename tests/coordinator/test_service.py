"""SIGHUP reload: a good file replaces the list without dropping jobs; a bad one is refused."""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.logger import formatEvent, globalLogPublisher

from coordinator.config import CoordinatorConfig, PoolQuota
from coordinator.service import CoordinatorService
from sandrun.identity import WorkerIdentity
from tests.coordinator.fakes import Pool

HOLD = "HOLD"


def write(path: Any, entries: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(entries))


def as_json(pool: Pool, indexes: list[int]) -> list[dict[str, Any]]:
    return [{"worker_id": pool.entries[i].worker_id, "endpoint": pool.entries[i].endpoint,
             "max_concurrent_jobs": pool.entries[i].max_concurrent_jobs,
             "name": pool.entries[i].name} for i in indexes]


def service_for(pool: Pool, workers_file: Any) -> CoordinatorService:
    """The real service (reload and all) over the pool's in-memory network."""
    config = CoordinatorConfig(workers_path=str(workers_file), trusted_proxies=("127.0.0.1",),
                               quotas=PoolQuota(1000.0, 100, 1000))
    service = CoordinatorService(pool.clock, config, http=HTTPClient(pool.network))
    service.client.cooperator = pool.cooperator
    pool.registry, pool.health, pool.api = service.registry, service.health, service.api
    pool.stub = StubTreq(service.api.resource())
    return service


def test_a_malformed_file_is_refused_naming_the_entry_and_the_old_list_stays(
        tmp_path: Any) -> None:
    pool = Pool(str(tmp_path / "pool"), 2)
    workers_file = tmp_path / "workers.json"
    write(workers_file, as_json(pool, [0, 1]))
    service = service_for(pool, workers_file)
    pool.check()
    messages: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        broken = as_json(pool, [0, 1]) + [{"worker_id": "nope", "endpoint": "http://x:1",
                                           "name": "typo"}]
        write(workers_file, broken)
        assert service.reload() is False
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("refused" in m and "entry 2 (typo)" in m for m in messages), messages
    assert [w["healthy"] for w in pool.pool()["workers"]] == [True, True]
    assert pool.post_submit().status == 200


def test_a_reload_adds_workers_and_drains_removed_ones_without_dropping_their_jobs(
        tmp_path: Any) -> None:
    pool = Pool(str(tmp_path / "pool"), 3)
    workers_file = tmp_path / "workers.json"
    write(workers_file, as_json(pool, [0, 1]))
    service = service_for(pool, workers_file)
    pool.check()
    jobs = [pool.submit(HOLD, client=f"192.0.2.{i}") for i in range(2)]
    on_worker_0 = next(j for j in jobs if pool.worker_for(j) == 0)
    write(workers_file, as_json(pool, [1, 2]))
    assert service.reload() is True
    pool.settle(service.health.check_all())
    listed = {w["name"]: w for w in pool.pool()["workers"]}
    assert listed["w0"]["draining"] is True and listed["w2"]["healthy"] is True
    # The removed worker gets no new jobs, but its running job is still served.
    new_jobs = [pool.submit(HOLD, client=f"192.0.2.{10 + i}") for i in range(4)]
    assert 0 not in {pool.worker_for(j) for j in new_jobs}
    assert pool.get(f"/status/{on_worker_0}").json()["status"] == "running"
    pool.workers[0].sandbox.holding()[0].finish()
    assert pool.get(f"/status/{on_worker_0}").json()["status"] == "completed"
    # After the drain period it is forgotten.
    pool.clock.advance(service.config.drain_seconds + 1)
    pool.check()
    assert "w0" not in {w["name"] for w in pool.pool()["workers"]}


def test_a_reload_that_fixes_a_wrong_key_leaves_one_entry_per_configured_worker(
        tmp_path: Any) -> None:
    pool = Pool(str(tmp_path / "pool"), 2)
    workers_file = tmp_path / "workers.json"
    write(workers_file, as_json(pool, [0, 1]))
    service = service_for(pool, workers_file)
    pool.check()
    pool.submit(HOLD, client="192.0.2.1")
    pool.submit(HOLD, client="192.0.2.2")
    wrong = as_json(pool, [0, 1])
    wrong[1]["worker_id"] = WorkerIdentity.generate().worker_id  # a typo'd key for w1
    write(workers_file, wrong)
    assert service.reload() is True
    pool.check()
    assert pool.post_submit(HOLD, client="192.0.2.3").status == 200  # w0 still takes jobs
    write(workers_file, as_json(pool, [0, 1]))
    assert service.reload() is True
    pool.check()
    listed = pool.pool()
    assert [w["name"] for w in listed["workers"]] == ["w0", "w1"]
    assert [w["healthy"] and not w["draining"] for w in listed["workers"]] == [True, True]
    assert listed["total"] == 2 and listed["draining"] == 0


def test_a_draining_worker_is_marked_with_when_it_started_and_when_it_ends(
        tmp_path: Any) -> None:
    pool = Pool(str(tmp_path / "pool"), 2)
    workers_file = tmp_path / "workers.json"
    write(workers_file, as_json(pool, [0, 1]))
    service = service_for(pool, workers_file)
    pool.check()
    jobs = [pool.submit(HOLD, client=f"192.0.2.{i}") for i in range(2)]
    assert {pool.worker_for(j) for j in jobs} == {0, 1}
    pool.clock.advance(60)
    write(workers_file, as_json(pool, [1]))
    assert service.reload() is True
    listed = pool.pool()
    w0 = next(w for w in listed["workers"] if w["name"] == "w0")
    assert w0["draining"] is True and w0["routable"] is False
    assert w0["draining_since"] == "2023-11-14T22:14:20.000Z"
    assert w0["drain_ends_at"] == "2023-11-14T23:14:20.000Z"  # --drain-seconds 3600
    assert listed["total"] == 1 and listed["draining"] == 1
