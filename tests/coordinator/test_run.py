"""POST /run, GET /status?wait= and GET /runtimes through the coordinator, in memory.

Real worker apps and the real coordinator app on one ``Clock`` (``fakes.Pool``);
a job whose code says HOLD runs until the test finishes it.
"""

from __future__ import annotations

import json
from typing import Any

from coordinator.config import PoolQuota
from coordinator.jobids import decode_job_id
from tests.contract import check_response
from tests.coordinator.fakes import LOUD_STDERR, LOUD_STDOUT, Pool

HOLD = "HOLD  # runs until the test finishes it"


def ready(tmp_path: Any, count: int = 2, **kwargs: Any) -> Pool:
    pool = Pool(str(tmp_path), count, **kwargs)
    pool.check()
    return pool


def body(code: str) -> bytes:
    return json.dumps({"manifest": {"entrypoint": "main.py", "outputs": ["*.txt"]},
                       "files": {"main.py": code}}).encode()


def run(pool: Pool, code: str, query: str = "", client: str = "192.0.2.10") -> Any:
    return pool.begin("POST", "/run" + query, body(code),
                      {"Content-Type": "application/json", "X-Forwarded-For": client})


def worker_jobs(pool: Pool) -> list[str]:
    return [j for w in pool.workers for j in w.manager.jobs]


def test_run_through_the_pool_answers_with_the_whole_result(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    reply = pool.reply(run(pool, "print(1)"))
    assert reply.status == 200, reply.body
    doc = reply.json()
    job_id = doc["job_id"]
    assert decode_job_id(job_id) is not None  # the coordinator's id, not the worker's
    assert doc["status"] == "completed" and doc["stdout"] == "hello\n" and doc["stderr"] == ""
    assert doc["truncated"] == {"stdout": False, "stderr": False}
    assert doc["signature_verified"] is True
    assert doc["kept"] is True
    (output,) = doc["outputs"]
    assert output["download_url"] == f"/download/{job_id}/out.txt"
    assert pool.get(output["download_url"]).body == b"result"


def test_run_through_the_pool_relays_megabytes_of_output_exactly_in_the_same_shape(
        tmp_path: Any) -> None:
    pool = ready(tmp_path)
    reply = pool.reply(run(pool, "LOUD"))
    assert reply.status == 200, reply.body[:200]
    check_response("coordinator", "POST", "/run", reply.status, reply.header("content-type"),
                   reply.body)
    doc = reply.json()
    job_id = doc["job_id"]
    status = pool.get(f"/status/{job_id}").json()
    # The status document as /status gives it, then the result's members, in this order.
    assert list(doc) == [*status, "stdout", "stderr", "truncated", "outputs", "kept"]
    assert {k: v for k, v in doc.items() if k in status} == status
    assert doc["stdout"] == LOUD_STDOUT.decode("utf-8", "replace")
    assert doc["stderr"] == LOUD_STDERR.decode()
    logs = pool.get(f"/logs/{job_id}").json()
    assert (doc["stdout"], doc["stderr"]) == (logs["stdout"], logs["stderr"])
    assert doc["truncated"] == logs["truncated"] == {"stdout": False, "stderr": False}
    assert doc["signature_verified"] is True and doc["kept"] is True
    (output,) = doc["outputs"]
    assert output["download_url"] == f"/download/{job_id}/out.txt"
    assert output == {**pool.get(f"/outputs/{job_id}").json()["files"][0]}
    # Byte for byte as the worker escaped it (json.dumps): passed through, not re-encoded.
    assert json.dumps(doc["stdout"]).encode() in reply.body


def test_run_through_the_pool_waits_by_long_polls_until_the_job_ends(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    d = run(pool, HOLD)
    (worker,) = (w for w in pool.workers if w.sandbox.holding())
    for _ in range(3):  # several long polls go by
        pool.clock.advance(30)
        assert not pool.answered(d)
    polls = [p for m, p in worker.requests if p.startswith(b"/status/")]
    assert len(polls) >= 3
    worker.sandbox.holding()[0].finish()
    doc = pool.reply(d).json()
    assert doc["status"] == "completed"


def test_run_with_keep_0_deletes_the_job_on_its_worker(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    doc = pool.reply(run(pool, "print(1)", "?keep=0")).json()
    assert doc["kept"] is False and doc["outputs"][0]["download_url"] is None
    assert worker_jobs(pool) == []
    assert pool.get(f"/status/{doc['job_id']}").status == 404


def test_run_with_a_bad_keep_is_400_and_sends_nothing(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    reply = pool.reply(run(pool, "print(1)", "?keep=perhaps"))
    assert reply.status == 400 and reply.json()["field"] == "keep"
    assert worker_jobs(pool) == []


def test_a_run_client_that_goes_away_has_its_job_deleted(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    d = run(pool, HOLD)
    (worker,) = (w for w in pool.workers if w.sandbox.holding())
    assert len(worker.manager.jobs) == 1
    d.addErrback(lambda _: None)
    d.cancel()
    pool.pump()
    assert worker.manager.jobs == {} and worker.sandbox.holding() == []
    assert [m for m, _ in worker.requests].count(b"DELETE") == 1


def test_run_refused_by_the_pool_quota_is_429(tmp_path: Any) -> None:
    pool = ready(tmp_path, quotas=PoolQuota(1000.0, 1, 1000))
    pool.submit(HOLD, client="192.0.2.7")
    reply = pool.reply(run(pool, "print(1)", client="192.0.2.7"))
    assert reply.status == 429 and reply.header("retry-after")
    assert len(worker_jobs(pool)) == 1


def test_run_into_a_full_pool_is_503(tmp_path: Any) -> None:
    pool = ready(tmp_path, 1, max_concurrent_jobs=1, queue_size=1)
    pool.submit(HOLD, client="192.0.2.1")
    pool.submit(HOLD, client="192.0.2.2")
    reply = pool.reply(run(pool, "print(1)", client="192.0.2.3"))
    assert reply.status == 503 and reply.json()["retry_after"] > 0


def test_a_run_whose_worker_is_lost_answers_worker_lost(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    d = run(pool, HOLD)
    index = next(i for i, w in enumerate(pool.workers) if w.sandbox.holding())
    pool.network.down.add(pool.entries[index].endpoint.split("//")[1])
    pool.clock.advance(30)  # the long poll ends; the next cannot connect
    doc = pool.reply(d).json()
    assert doc["status"] == "failed"
    assert doc["execution_metadata"]["reason"] == "worker_lost"


def test_a_long_poll_through_the_pool_ends_with_the_job(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job_id = pool.submit(HOLD)
    d = pool.begin("GET", f"/status/{job_id}?wait=45")
    pool.clock.advance(40)  # past the coordinator's usual request timeout (30 s)
    assert not pool.answered(d)
    pool.workers[pool.worker_for(job_id)].sandbox.holding()[0].finish()
    doc = pool.reply(d).json()
    assert doc["status"] == "completed" and doc["job_id"] == job_id


def test_a_long_poll_through_the_pool_ends_at_its_time(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job_id = pool.submit(HOLD)
    d = pool.begin("GET", f"/status/{job_id}?wait=5")
    pool.clock.advance(4.9)
    assert not pool.answered(d)
    pool.clock.advance(0.1)
    assert pool.reply(d).json()["status"] == "running"


def test_a_bad_wait_through_the_pool_is_400(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job_id = pool.submit(HOLD)
    reply = pool.get(f"/status/{job_id}?wait=later")
    assert reply.status == 400 and reply.json()["field"] == "wait"


def test_runtimes_come_from_a_healthy_worker(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    doc = pool.get("/runtimes").json()
    assert [r["interpreter"] for r in doc["runtimes"]] == ["python3"]
    assert doc["runtimes"][0]["version"] == "3.11.2"


def test_a_long_poll_client_that_goes_away_leaves_the_worker_healthy(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job_id = pool.submit(HOLD)
    d = pool.begin("GET", f"/status/{job_id}?wait=30")
    d.addErrback(lambda _: None)
    d.cancel()
    pool.pump()
    assert all(w["healthy"] for w in pool.pool()["workers"])
    assert pool.get(f"/status/{job_id}").json()["status"] == "running"


def test_run_with_keep_0_of_a_loud_job_answers_it_all_then_deletes_it(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    doc = pool.reply(run(pool, "LOUD", "?keep=0")).json()
    assert doc["stdout"] == LOUD_STDOUT.decode("utf-8", "replace") and doc["kept"] is False
    assert [o["download_url"] for o in doc["outputs"]] == [None]
    assert worker_jobs(pool) == []


def test_run_of_a_replicated_loud_job_relays_the_first_replicas_output(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    document = {"manifest": {"entrypoint": "main.py", "outputs": ["*.txt"], "replicas": 2},
                "files": {"main.py": "LOUD"}}
    reply = pool.reply(pool.begin("POST", "/run?keep=0", json.dumps(document).encode(),
                                  {"Content-Type": "application/json",
                                   "X-Forwarded-For": "192.0.2.10"}))
    doc = reply.json()
    assert doc["consensus"]["agreed"] is True and doc["status"] == "completed"
    assert doc["stdout"] == LOUD_STDOUT.decode("utf-8", "replace")
    assert doc["stderr"] == LOUD_STDERR.decode() and doc["kept"] is False
    assert [o["path"] for o in doc["outputs"]] == ["out.txt"]
    assert worker_jobs(pool) == []  # every replica deleted
