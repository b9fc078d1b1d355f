"""Open enrollment: workers not in workers.json join by proving their key, and only ever
run extra replicas next to a listed worker (in memory, real worker apps)."""

from __future__ import annotations

import json
from typing import Any

from sandrun.identity import WorkerIdentity
from tests.coordinator.fakes import Pool, Reply, endpoint


def pool_with_one_listed(tmp_path: Any, count: int = 3, **config: Any) -> Pool:
    identities = [WorkerIdentity.generate() for _ in range(count)]
    pool = Pool(str(tmp_path), count, identities=identities,  # type: ignore[arg-type]
                configured_ids=[identities[0].worker_id], open_enrollment=True, **config)
    pool.check()
    return pool


def host(index: int) -> str:
    return endpoint(index).split("//")[1].split(":")[0]


def join(pool: Pool, index: int, worker_id: str | None = None,
         source: str | None = None) -> Reply:
    identity = pool.identities[index]
    assert identity is not None
    body = {"worker_id": worker_id or identity.worker_id, "endpoint": endpoint(index)}
    return pool.request("POST", "/pool/join", json.dumps(body).encode(),
                        {"Content-Type": "application/json",
                         "X-Forwarded-For": source or host(index)})


def replicated(pool: Pool, replicas: int, client: str = "192.0.2.10") -> str:
    return pool.submit("print(1)", client, {"entrypoint": "main.py", "replicas": replicas})


def test_enrollment_is_off_unless_the_coordinator_allows_it(tmp_path: Any) -> None:
    identities = [WorkerIdentity.generate() for _ in range(2)]
    pool = Pool(str(tmp_path), 2, identities=identities,  # type: ignore[arg-type]
                configured_ids=[identities[0].worker_id])
    pool.check()
    reply = join(pool, 1)
    assert reply.status == 403 and reply.json()["error"] == "Open enrollment is off"
    assert [w["name"] for w in pool.pool()["workers"]] == ["w0"]


def test_a_worker_that_proves_its_key_joins_as_open(tmp_path: Any) -> None:
    pool = pool_with_one_listed(tmp_path)
    reply = join(pool, 1)
    assert reply.status == 200 and reply.json()["status"] == "enrolled"
    listed = pool.pool()
    (entry,) = (w for w in listed["workers"] if w["open"])
    assert entry["endpoint"] == endpoint(1) and entry["healthy"] and entry["authenticated"]
    assert listed["open"] == 1 and listed["total"] == 1  # total counts workers.json only
    assert join(pool, 1).status == 200  # announcing again changes nothing


def test_a_worker_may_only_enroll_its_own_address(tmp_path: Any) -> None:
    pool = pool_with_one_listed(tmp_path)
    reply = join(pool, 1, source="203.0.113.9")
    assert reply.status == 403 and reply.json()["error"] == "Endpoint not yours"
    assert pool.pool()["open"] == 0
    assert pool.workers[1].requests == []  # the coordinator never contacted it


def test_claiming_a_key_it_does_not_hold_fails_the_challenge_and_is_forgotten(
        tmp_path: Any) -> None:
    pool = pool_with_one_listed(tmp_path)
    reply = join(pool, 1, worker_id=WorkerIdentity.generate().worker_id)
    assert reply.status == 403 and reply.json()["error"] == "Key not proven"
    assert "another worker" in reply.json()["details"]
    assert pool.pool()["open"] == 0


def test_a_listed_key_joining_changes_nothing(tmp_path: Any) -> None:
    pool = pool_with_one_listed(tmp_path)
    reply = join(pool, 0)
    assert reply.status == 200 and reply.json()["status"] == "listed"
    assert [w["open"] for w in pool.pool()["workers"]] == [False]


def test_open_workers_get_no_single_jobs_and_never_a_first_replica(tmp_path: Any) -> None:
    pool = pool_with_one_listed(tmp_path)
    assert join(pool, 1).status == 200 and join(pool, 2).status == 200
    singles = [pool.submit("print(1)", f"192.0.2.{i}") for i in range(5)]
    assert {pool.worker_for(j) for j in singles} == {0}
    for i in range(4):
        placed = pool.workers_for(replicated(pool, 2, f"192.0.2.{20 + i}"))
        assert placed[0] == 0 and placed[1] in (1, 2)


def test_an_open_workers_result_counts_only_when_it_agrees_with_the_listed_one(
        tmp_path: Any) -> None:
    pool = pool_with_one_listed(tmp_path, 3, max_disagreements=1)
    assert join(pool, 1).status == 200 and join(pool, 2).status == 200
    pool.workers[1].sandbox.tamper = "stdout"
    pool.workers[2].sandbox.tamper = "stdout"  # two open workers agreeing on a lie
    job = replicated(pool, 3)
    status = pool.get(f"/status/{job}").json()
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "replica_disagreement"
    listed_id = pool.identities[0].worker_id  # type: ignore[union-attr]
    assert status["consensus"]["agreeing"] == [listed_id]
    open_entries = [w for w in pool.pool()["workers"] if w["open"]]
    assert all(w["reputation"]["suspended"] for w in open_entries)
    assert not any(w["reputation"]["suspended"] for w in pool.pool()["workers"]
                   if not w["open"])


def test_open_workers_are_capped_and_down_ones_make_room(tmp_path: Any) -> None:
    pool = pool_with_one_listed(tmp_path, 3, max_open_workers=1)
    assert join(pool, 1).status == 200
    refused = join(pool, 2)
    assert refused.status == 503
    pool.network.down.add(endpoint(1).split("//")[1])
    pool.check()
    assert join(pool, 2).status == 200
    assert [w["endpoint"] for w in pool.pool()["workers"] if w["open"]] == [endpoint(2)]
