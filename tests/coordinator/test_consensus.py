"""Replicated jobs: placement on distinct workers, the consensus of their signed results,
and the reputation each worker earns from it (in memory, real worker apps)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.consensus import Ledger, Outcome, ReplicaReport, judge
from sandrun.identity import WorkerIdentity, sign_result, verify_signature
from tests.coordinator.fakes import Pool, endpoint

HOLD = "HOLD"


def ready(tmp_path: Any, count: int = 3, **kwargs: Any) -> Pool:
    pool = Pool(str(tmp_path), count, **kwargs)
    pool.check()
    return pool


def replicated(pool: Pool, replicas: int, code: str = "print(1)",
               client: str = "192.0.2.10") -> str:
    return pool.submit(code, client, {"entrypoint": "main.py", "replicas": replicas})


def reputation(pool: Pool, index: int) -> dict[str, Any]:
    entry: dict[str, Any] = pool.pool_entry(index)["reputation"]
    return entry


# -- the verdict, pure -------------------------------------------------------------------

RESULT = {"job_id": "job-x", "job_hash": "a" * 64, "status": "completed",
          "reason": "completed", "exit_code": 0, "cpu_seconds": 0.1,
          "memory_peak_bytes": 1, "wall_time_ms": 2.0,
          "finished_at": "2026-01-01T00:00:00.000Z", "outputs": {"out.txt": "b" * 64},
          "stdout_sha256": "c" * 64, "stderr_sha256": "d" * 64}


def report(seed: int, listed: bool = True, **changes: Any) -> ReplicaReport:
    identity = WorkerIdentity.from_seed(bytes([seed]) * 32)
    result = dict(RESULT, worker_id=identity.worker_id, **changes)
    signed, signature = sign_result(identity, result)
    status = {"job_id": result["job_id"], "status": result["status"],
              "finished_at": result["finished_at"], "job_hash": result["job_hash"],
              "execution_metadata": {k: result[k] for k in (
                  "cpu_seconds", "memory_peak_bytes", "wall_time_ms", "exit_code", "reason",
                  "stdout_sha256", "stderr_sha256")},
              "output_files": {p: {"sha256": h} for p, h in result["outputs"].items()},
              "worker_metadata": {"worker_id": identity.worker_id, "signed": signed,
                                  "signature": signature}}
    return ReplicaReport(identity.worker_id, listed, "job-x", status=status)


def test_equal_signed_results_agree_even_when_their_timings_differ() -> None:
    verdict = judge([report(1), report(2, wall_time_ms=99.0, cpu_seconds=3.0), report(3)])
    assert verdict.outcome == Outcome.AGREED and len(verdict.agreeing) == 3


@pytest.mark.parametrize("changes, fields", [
    ({"stdout_sha256": "e" * 64}, ["stdout_sha256"]),
    ({"outputs": {"out.txt": "f" * 64}}, ["outputs"]),
    ({"exit_code": 1, "status": "failed", "reason": "exit_nonzero"},
     ["status", "reason", "exit_code"]),
    ({"job_hash": "0" * 64}, ["job_hash"]),
])
def test_one_differing_replica_is_outvoted_and_named(changes: dict[str, Any],
                                                      fields: list[str]) -> None:
    odd = report(3, **changes)
    verdict = judge([report(1), report(2), odd])
    assert verdict.outcome == Outcome.DISAGREED
    assert verdict.disagreeing == (odd.worker_id,) and len(verdict.agreeing) == 2
    assert list(verdict.differing) == fields


def test_a_disagreement_nobody_can_settle_blames_nobody() -> None:
    a, b = report(1), report(2, stdout_sha256="e" * 64)
    verdict = judge([a, b])
    assert verdict.outcome == Outcome.DISAGREED
    assert verdict.agreeing == () and verdict.disagreeing == ()
    assert set(verdict.unresolved) == {a.worker_id, b.worker_id}
    # Three different answers (a job that prints random numbers): no strike for anyone.
    three = judge([report(1), report(2, stdout_sha256="e" * 64),
                   report(3, stdout_sha256="f" * 64)])
    assert three.disagreeing == () and len(three.unresolved) == 3


def test_open_workers_never_outvote_a_listed_one() -> None:
    listed = report(1)
    opens = [report(2, listed=False, exit_code=7), report(3, listed=False, exit_code=7)]
    verdict = judge([listed, *opens])
    assert verdict.outcome == Outcome.DISAGREED
    assert verdict.agreeing == (listed.worker_id,)
    assert set(verdict.disagreeing) == {o.worker_id for o in opens}


def test_a_result_whose_signature_does_not_verify_is_a_disagreement() -> None:
    forged = report(3)
    assert forged.status is not None
    forged.status["worker_metadata"]["signature"] = report(4).status["worker_metadata"][  # type: ignore[index]
        "signature"]
    verdict = judge([report(1), report(2), forged])
    assert verdict.outcome == Outcome.DISAGREED and verdict.unsigned == (forged.worker_id,)
    assert verdict.disagreeing == (forged.worker_id,)


def test_unfinished_replicas_are_pending_and_a_lost_one_ends_it() -> None:
    running = ReplicaReport("w", True, "job-x", status={"status": "running"})
    assert judge([report(1), running]).outcome == Outcome.PENDING
    lost = ReplicaReport("w", True, "job-x", lost="gone")
    assert judge([report(1), lost, running]).outcome == Outcome.LOST


def test_the_ledger_counts_a_job_once_and_stays_bounded() -> None:
    ledger = Ledger(capacity=2)
    assert ledger.first_time("a") and not ledger.first_time("a")
    ledger.first_time("b")
    ledger.first_time("c")
    assert ledger.first_time("a")  # forgotten: the oldest went first


# -- through the coordinator ------------------------------------------------------------


def test_three_replicas_run_on_three_workers_and_agree(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = replicated(pool, 3)
    assert sorted(pool.workers_for(job)) == [0, 1, 2]
    status = pool.get(f"/status/{job}").json()
    assert status["job_id"] == job and status["status"] == "completed"
    assert status["signature_verified"] is True
    consensus = status["consensus"]
    assert consensus["outcome"] == "agreed" and consensus["agreed"] is True
    assert len(consensus["agreeing"]) == 3 and consensus["replicas"] == 3
    for result in consensus["results"]:  # every replica checks out with its own key alone
        assert verify_signature(result["worker_id"], result["signed"].encode(),
                                result["signature"])
        assert json.loads(result["signed"])["stdout_sha256"] == \
            status["execution_metadata"]["stdout_sha256"]
    assert pool.get(f"/outputs/{job}").status == 200
    pool.get(f"/status/{job}")  # polled again: counted once
    assert [reputation(pool, i)["agreements"] for i in range(3)] == [1, 1, 1]


def test_a_replicated_job_is_running_until_every_replica_has_finished(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = replicated(pool, 2, HOLD)
    first, second = pool.workers_for(job)
    pool.workers[first].sandbox.holding()[0].finish()
    status = pool.get(f"/status/{job}").json()
    assert status["status"] == "running" and status["consensus"]["agreed"] is None
    pool.workers[second].sandbox.holding()[0].finish()
    assert pool.get(f"/status/{job}").json()["consensus"]["agreed"] is True


@pytest.mark.parametrize("tamper, field", [
    ("stdout", "stdout_sha256"), ("output", "outputs"), ("exit_code", "exit_code")])
def test_a_worker_that_alters_its_result_is_caught_even_though_it_signs_it(
        tmp_path: Any, tamper: str, field: str) -> None:
    pool = ready(tmp_path)
    pool.workers[2].sandbox.tamper = tamper
    job = replicated(pool, 3)
    status = pool.get(f"/status/{job}").json()
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "replica_disagreement"
    assert field in status["execution_metadata"]["message"]
    assert status["output_files"] == {} and status["signature_verified"] is False
    consensus = status["consensus"]
    assert consensus["agreed"] is False and field in consensus["differing"]
    assert consensus["disagreeing"] == [pool.identities[2].worker_id]  # type: ignore[union-attr]
    # Each replica's own signature is still valid: the fault is in what it signed.
    assert all(r["signature_verified"] for r in consensus["results"])
    refused = pool.get(f"/outputs/{job}")
    assert refused.status == 409 and refused.json()["reason"] == "replica_disagreement"
    assert pool.get(f"/download/{job}/out.txt").status == 409
    assert [reputation(pool, i)["disagreements"] for i in range(3)] == [0, 0, 1]
    assert [reputation(pool, i)["agreements"] for i in range(3)] == [1, 1, 0]


def test_past_the_threshold_a_disagreeing_worker_gets_no_jobs_until_readmitted(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, 4, max_disagreements=2)
    pool.workers[3].sandbox.tamper = "stdout"
    caught = 0
    for i in range(12):
        job = replicated(pool, 3, client=f"192.0.2.{i}")
        if 3 in pool.workers_for(job):
            assert pool.get(f"/status/{job}").json()["consensus"]["agreed"] is False
            caught += 1
        else:
            assert pool.get(f"/status/{job}").json()["consensus"]["agreed"] is True
        if caught == 2:
            break
    assert caught == 2
    entry = pool.pool_entry(3)
    assert entry["reputation"]["suspended"] is True and entry["routable"] is False
    assert entry["healthy"] is True  # it answers health checks; it is just not trusted
    pool.check()
    later = [replicated(pool, 3, client=f"192.0.2.{50 + i}") for i in range(4)]
    assert all(3 not in pool.workers_for(j) for j in later)
    # The operator reloads workers.json with its key still listed: it is back.
    pool.registry.replace(pool.entries, pool.clock.seconds())
    entry = pool.pool_entry(3)
    assert entry["reputation"]["suspended"] is False and entry["routable"] is True
    assert entry["reputation"]["disagreements"] == 2 and entry["reputation"]["strikes"] == 0


def test_more_replicas_than_the_pool_allows_is_400_and_leaves_no_job(tmp_path: Any) -> None:
    pool = ready(tmp_path, 3, max_replicas=2)
    reply = pool.post_submit(manifest={"entrypoint": "main.py", "replicas": 3})
    assert reply.status == 400 and reply.json()["field"] == "replicas"
    assert all(not w.manager.jobs for w in pool.workers)


def test_more_replicas_than_workers_is_503_and_cancels_the_copies_placed(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    reply = pool.post_submit(HOLD, manifest={"entrypoint": "main.py", "replicas": 3})
    assert reply.status == 503 and "3 distinct workers" in reply.json()["details"]
    assert all(not w.sandbox.holding() for w in pool.workers)


def test_a_lost_replica_fails_the_job_and_counts_against_its_worker(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = replicated(pool, 3, HOLD)
    gone = pool.workers_for(job)[1]
    pool.network.down.add(endpoint(gone).split("//")[1])
    pool.check()
    status = pool.get(f"/status/{job}").json()
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "worker_lost"
    assert status["consensus"]["outcome"] == "lost"
    pool.get(f"/status/{job}")
    assert reputation(pool, gone)["lost_jobs"] == 1


def test_deleting_a_replicated_job_deletes_every_replica(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = replicated(pool, 3, HOLD)
    assert pool.request("DELETE", f"/jobs/{job}").status == 200
    assert all(not w.sandbox.holding() for w in pool.workers)


def run_replicated(pool: Pool, replicas: int, query: str = "") -> Any:
    document = {"manifest": {"entrypoint": "main.py", "outputs": ["*.txt"],
                             "replicas": replicas}, "files": {"main.py": "print(1)"}}
    return pool.reply(pool.begin("POST", "/run" + query, json.dumps(document).encode(),
                                 {"Content-Type": "application/json",
                                  "X-Forwarded-For": "192.0.2.10"}))


def test_run_of_a_replicated_job_answers_the_consensus_with_the_result(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    doc = run_replicated(pool, 2, "?keep=false").json()
    assert doc["status"] == "completed" and doc["consensus"]["agreed"] is True
    assert doc["stdout"] == "hello\n" and [o["path"] for o in doc["outputs"]] == ["out.txt"]
    assert all(not w.manager.jobs for w in pool.workers)  # every replica deleted


def test_run_of_a_disagreeing_job_hands_out_no_outputs(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    pool.workers[1].sandbox.tamper = "output"
    doc = run_replicated(pool, 2).json()
    assert doc["status"] == "failed" and doc["outputs"] == []
    assert doc["execution_metadata"]["reason"] == "replica_disagreement"


# -- sandrun verify on the coordinator's answer ------------------------------------------


def verify_file(tmp_path: Any, doc: dict[str, Any], worker_id: str | None = None) -> int:
    from sandrun.identity import verify_main

    path = tmp_path / "status.json"
    path.write_text(json.dumps(doc))
    return verify_main(str(path), worker_id)


def test_sandrun_verify_checks_every_replicas_signature_and_their_agreement(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pool = ready(tmp_path / "pool")
    doc = pool.get(f"/status/{replicated(pool, 3)}").json()
    assert verify_file(tmp_path, doc) == 0
    assert capsys.readouterr().out.startswith("valid: 3 replicas agree")
    one_of_them = doc["consensus"]["results"][1]["worker_id"]
    assert verify_file(tmp_path, doc, one_of_them) == 0
    assert verify_file(tmp_path, doc, WorkerIdentity.generate().worker_id) == 76
    # A replica's signed text altered (another stdout) no longer verifies.
    forged = json.loads(json.dumps(doc))
    result = forged["consensus"]["results"][2]
    result["signed"] = result["signed"].replace(
        json.loads(result["signed"])["stdout_sha256"], "0" * 64)
    capsys.readouterr()
    assert verify_file(tmp_path, forged) == 76
    assert "replica 3's signature does not verify" in capsys.readouterr().out
    # The document's own result must be the replicas' one.
    shown = json.loads(json.dumps(doc))
    shown["execution_metadata"]["exit_code"] = 1
    assert verify_file(tmp_path, shown) == 76
    assert "differs from the replicas' result in exit_code" in capsys.readouterr().out


def test_sandrun_verify_refuses_a_disagreement_though_each_signature_is_valid(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pool = ready(tmp_path / "pool")
    pool.workers[1].sandbox.tamper = "output"
    doc = pool.get(f"/status/{replicated(pool, 3)}").json()
    assert verify_file(tmp_path, doc) == 76
    assert "differ in outputs" in capsys.readouterr().out
    single = pool.get(f"/status/{pool.submit()}").json()
    assert verify_file(tmp_path, single) == 2  # not a consensus: --worker-id is needed


def test_a_long_poll_of_a_replicated_job_ends_when_every_replica_has_ended(
        tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = replicated(pool, 2, HOLD)
    first, second = pool.workers_for(job)
    d = pool.begin("GET", f"/status/{job}?wait=45")
    pool.workers[first].sandbox.holding()[0].finish()
    pool.clock.advance(10)
    assert not pool.answered(d)  # one replica still runs
    pool.workers[second].sandbox.holding()[0].finish()
    doc = pool.reply(d).json()
    assert doc["status"] == "completed" and doc["consensus"]["agreed"] is True


def test_a_replica_that_cannot_be_placed_for_a_timeout_cancels_the_copies_placed(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    stalled = endpoint(1).split("//")[1]
    real = pool.network.request

    def stall(method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        if stalled.encode() in uri and uri.endswith(b"/submit"):
            from twisted.internet import defer

            return defer.Deferred()  # never answers: the submit times out
        return real(method, uri, headers, body)

    pool.network.request = stall  # type: ignore[method-assign,assignment]
    d = pool.begin("POST", "/submit", json.dumps(
        {"manifest": {"entrypoint": "main.py", "replicas": 2},
         "files": {"main.py": HOLD}}).encode(),
        {"Content-Type": "application/json", "X-Forwarded-For": "192.0.2.10"})
    pool.clock.advance(pool.config.submit_timeout + 1)
    reply = pool.reply(d)
    assert reply.status == 504
    # The first copy went to worker 0 and was deleted there.
    assert (b"POST", b"/submit") in pool.workers[0].requests
    assert any(m == b"DELETE" for m, _ in pool.workers[0].requests)
    assert all(not w.sandbox.holding() for w in pool.workers)


def test_a_job_that_is_not_deterministic_fails_but_gets_no_worker_suspended(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, max_disagreements=1)
    for worker, tamper in zip(pool.workers, (None, "stdout", "output"), strict=True):
        worker.sandbox.tamper = tamper  # three different, honestly signed results
    status = pool.get(f"/status/{replicated(pool, 3)}").json()
    assert status["execution_metadata"]["reason"] == "replica_disagreement"
    assert status["consensus"]["disagreeing"] == [] and len(status["consensus"]["unresolved"]) == 3
    assert [reputation(pool, i)["unresolved"] for i in range(3)] == [1, 1, 1]
    assert not any(reputation(pool, i)["suspended"] for i in range(3))
