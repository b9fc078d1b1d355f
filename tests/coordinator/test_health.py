"""Health checks: the signed challenge, impostors, and in/out of the pool at once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.health import judge_health
from coordinator.registry import Load
from sandrun.identity import WorkerIdentity, health_response
from tests.coordinator.fakes import Pool, endpoint

REAL = WorkerIdentity.from_seed(b"r" * 32)
OTHER = WorkerIdentity.from_seed(b"o" * 32)
NOW = 1_700_000_000.0
LOAD = {"active_jobs": 1, "queued_jobs": 2, "capacity": 4}


def answer(identity: WorkerIdentity, nonce: str = "n1", at: float = NOW,
           load: dict[str, Any] | None = None, status: str = "healthy") -> dict[str, Any]:
    body: dict[str, Any] = {"status": status, "worker_id": identity.worker_id,
                            "load": load or LOAD}
    body.update(health_response(identity, nonce, load or LOAD, at))
    return body


def test_a_fresh_answer_signed_by_the_configured_key_passes_with_the_signed_load() -> None:
    verdict = judge_health(200, answer(REAL), REAL.worker_id, "n1", NOW)
    assert verdict.ok and verdict.authenticated and verdict.error is None
    assert verdict.load == Load(1, 2, 4)


def test_the_unsigned_load_beside_the_signature_is_not_believed() -> None:
    body = answer(REAL)
    body["load"] = {"active_jobs": 0, "queued_jobs": 0, "capacity": 999}
    assert judge_health(200, body, REAL.worker_id, "n1", NOW).load == Load(1, 2, 4)


def test_an_impostor_that_copies_the_public_key_but_signs_with_its_own_is_rejected() -> None:
    body = answer(OTHER)
    forged = json.loads(body["signed"])
    forged["worker_id"] = REAL.worker_id  # claims to be the real worker
    body["signed"] = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    body["signature"] = OTHER.sign(body["signed"].encode())
    verdict = judge_health(200, body, REAL.worker_id, "n1", NOW)
    assert not verdict.ok and not verdict.authenticated
    assert "does not verify" in (verdict.error or "")


def test_a_worker_answering_with_another_key_is_rejected_and_named() -> None:
    verdict = judge_health(200, answer(OTHER), REAL.worker_id, "n1", NOW)
    assert not verdict.ok and "another worker" in (verdict.error or "")


def test_a_replayed_answer_to_an_old_nonce_is_rejected() -> None:
    verdict = judge_health(200, answer(REAL, nonce="old"), REAL.worker_id, "n1", NOW)
    assert not verdict.ok and "nonce" in (verdict.error or "")


def test_an_answer_from_a_clock_far_off_is_rejected() -> None:
    verdict = judge_health(200, answer(REAL, at=NOW - 120), REAL.worker_id, "n1", NOW)
    assert not verdict.ok and "off ours" in (verdict.error or "")


@pytest.mark.parametrize(("code", "body", "words"), [
    (500, {}, "HTTP 500"),
    (200, [], "not a JSON object"),
    (200, {"status": "healthy", "load": LOAD}, "not signed"),
    (200, {"signed": "[]", "signature": "x"}, "not a JSON object"),
])
def test_malformed_answers_fail_with_a_reason(code: int, body: Any, words: str) -> None:
    verdict = judge_health(code, body, REAL.worker_id, "n1", NOW)
    assert not verdict.ok and words in (verdict.error or "")


def test_an_authentic_worker_that_reports_itself_unhealthy_is_out_but_authenticated() -> None:
    verdict = judge_health(200, answer(REAL, status="draining"), REAL.worker_id, "n1", NOW)
    assert not verdict.ok and verdict.authenticated


def test_a_worker_whose_slots_are_lost_answers_503_and_is_out_with_its_problem_named(
) -> None:
    body = {**answer(REAL, status="unhealthy"), "problem": "1 sandbox slot(s) lost"}
    verdict = judge_health(503, body, REAL.worker_id, "n1", NOW)
    assert not verdict.ok and verdict.authenticated
    assert verdict.error == "worker reports status 'unhealthy': 1 sandbox slot(s) lost"


# -- against real worker apps --------------------------------------------------------


def test_every_real_worker_passes_and_pool_shows_its_load(tmp_path: Any) -> None:
    pool = Pool(str(tmp_path))
    pool.check()
    entries = pool.pool()["workers"]
    assert [(w["healthy"], w["authenticated"], w["last_error"]) for w in entries] == \
        [(True, True, None)] * 3
    assert entries[0]["load"] == {"active_jobs": 0, "queued_jobs": 0, "capacity": 2,
                                  "queue_capacity": 10}
    assert entries[0]["last_check"] == "2023-11-14T22:13:20.000Z"


def test_an_impostor_endpoint_is_never_used_and_pool_says_why(tmp_path: Any) -> None:
    real = WorkerIdentity.generate()
    impostor = WorkerIdentity.generate()
    # Worker 1 runs with the impostor's key, but workers.json lists the real public key.
    pool = Pool(str(tmp_path), 2, identities=[real, impostor],
                configured_ids=[real.worker_id, WorkerIdentity.generate().worker_id])
    pool.check()
    entry = pool.pool_entry(1)
    assert entry["healthy"] is False and entry["authenticated"] is False
    assert "another worker" in entry["last_error"]
    jobs = [pool.submit(client=f"192.0.2.{i}") for i in range(4)]
    assert {pool.worker_for(j) for j in jobs} == {0}
    assert not pool.workers[1].sandbox.runs


def test_a_worker_without_a_key_is_never_used_and_pool_says_why(tmp_path: Any) -> None:
    keyed = WorkerIdentity.generate()
    pool = Pool(str(tmp_path), 2, identities=[keyed, None],
                configured_ids=[keyed.worker_id, WorkerIdentity.generate().worker_id])
    pool.check()
    entry = pool.pool_entry(1)
    assert entry["healthy"] is False and "not signed" in entry["last_error"]


def test_a_failing_worker_is_out_at_once_and_back_when_it_passes(tmp_path: Any) -> None:
    pool = Pool(str(tmp_path), 2)
    pool.check()
    pool.network.down.add(endpoint(0).split("//")[1])
    pool.check()
    entry = pool.pool_entry(0)
    assert entry["healthy"] is False and entry["last_error"] == "connection refused"
    assert pool.get("/health").json()["workers"] == {"healthy": 1, "total": 2}
    pool.network.down.clear()
    pool.check()
    assert pool.pool_entry(0)["healthy"] is True
    assert pool.pool_entry(0)["last_error"] is None


def test_a_worker_that_never_answers_fails_after_the_timeout(tmp_path: Any) -> None:
    from twisted.internet import defer

    pool = Pool(str(tmp_path), 1)
    hung: list[defer.Deferred[Any]] = []

    class Hang:
        def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            hung.append(d)
            return d

    pool.client.http = Hang()
    round_ = pool.health.check_all()
    pool.clock.advance(1.9)
    assert not round_.called
    pool.clock.advance(0.2)
    assert round_.called
    entry = pool.registry.workers()[0]
    assert not entry.healthy and "no answer within 2 s" in (entry.last_error or "")
