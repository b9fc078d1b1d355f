"""SIGHUP reload: a good file replaces the list without dropping jobs; a bad one is refused."""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.logger import formatEvent, globalLogPublisher

from coordinator.config import CoordinatorConfig, PoolQuota
from coordinator.service import CoordinatorService
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
