"""The coordinator in front of real worker apps, in memory: routing, failover, proxying."""

from __future__ import annotations

import io
import tarfile
from typing import Any

from coordinator.config import PoolQuota
from coordinator.jobids import decode_job_id
from sandrun.config import QuotaConfig
from sandrun.identity import verify_result
from tests.coordinator.fakes import BIG_BYTES, Pool, endpoint

HOLD = "HOLD  # stays running until the test finishes it"


def netloc(index: int) -> str:
    return endpoint(index).split("//")[1]


def ready(tmp_path: Any, count: int = 3, **kwargs: Any) -> Pool:
    pool = Pool(str(tmp_path), count, **kwargs)
    pool.check()
    return pool


# -- routing -----------------------------------------------------------------------------


def test_jobs_go_to_the_least_loaded_worker_and_spread_over_an_idle_pool(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    jobs = [pool.submit(HOLD, client=f"192.0.2.{i}") for i in range(3)]
    assert sorted(pool.worker_for(j) for j in jobs) == [0, 1, 2]
    # Worker 0 finishes its job; after a check it is the least loaded one.
    for run in pool.workers[0].sandbox.holding():
        run.finish()
    pool.check()
    assert pool.worker_for(pool.submit(HOLD, client="192.0.2.9")) == 0


def test_a_pool_takes_every_job_its_workers_would_queue(tmp_path: Any) -> None:
    # Two workers that run 2 jobs each (listed with max_concurrent_jobs 2) and queue 10
    # more: the pool holds 24 jobs.  It used to answer 503 from the fifth on.
    pool = ready(tmp_path, 2, max_concurrent_jobs=2, queue_size=10)
    jobs = [pool.submit(HOLD, client=f"192.0.2.{i}") for i in range(24)]
    assert sorted(pool.worker_for(j) for j in jobs) == [0] * 12 + [1] * 12
    statuses = [pool.get(f"/status/{j}").json()["status"] for j in jobs]
    assert statuses.count("running") == 4 and statuses.count("queued") == 20
    assert pool.get("/stats").json()["system"]["free_slots"] == 0
    # Only now is every worker's queue full.
    assert pool.post_submit(HOLD, client="192.0.2.99").status == 503


def test_jobs_go_where_running_plus_queued_is_the_smallest_part_of_the_room(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, 2, queue_size=4)  # room for 2 + 4 on each
    for i in range(3):
        pool.submit(HOLD, client=f"192.0.2.{i}")
    pool.check()
    loads = [pool.pool_entry(i)["load"] for i in range(2)]
    assert sorted(w["active_jobs"] + w["queued_jobs"] for w in loads) == [1, 2]
    lighter = min(range(2), key=lambda i: loads[i]["active_jobs"] + loads[i]["queued_jobs"])
    assert pool.worker_for(pool.submit(HOLD, client="192.0.2.50")) == lighter
    assert pool.pool_entry(0)["job_limit"] == 6


def test_a_full_pool_answers_503_with_retry_after(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2, max_concurrent_jobs=1, queue_size=1)
    for i in range(4):
        pool.submit(HOLD, client=f"192.0.2.{i}")
    reply = pool.post_submit(HOLD, client="192.0.2.9")
    assert reply.status == 503
    # Nothing has finished yet, so no drain rate: the health interval.
    assert reply.json()["retry_after"] == 5 and reply.header("retry-after") == "5"


def test_a_full_pools_retry_after_comes_from_how_fast_it_drains(tmp_path: Any) -> None:
    pool = ready(tmp_path, 1, max_concurrent_jobs=1, queue_size=1)
    for _ in range(5):  # one job finishes every 4 s between health checks
        pool.submit(HOLD, client="192.0.2.1")
        pool.workers[0].sandbox.holding()[0].finish()
        pool.clock.advance(4)
        pool.check()
    pool.submit(HOLD, client="192.0.2.2")
    pool.submit(HOLD, client="192.0.2.3")
    reply = pool.post_submit(HOLD, client="192.0.2.4")
    assert reply.status == 503 and reply.json()["retry_after"] == 4


def test_stats_and_health_report_the_load_of_the_whole_pool(tmp_path: Any) -> None:
    pool = ready(tmp_path, 3, queue_size=5)
    for i in range(7):
        pool.submit(HOLD, client=f"192.0.2.{i}")
    pool.check()
    system = pool.get("/stats").json()["system"]
    assert system["active_jobs"] == 6 and system["queue_length"] == 1
    assert system["capacity"] == 6 and system["queue_capacity"] == 15
    assert system["free_slots"] == 21 - 7 and system["workers_healthy"] == 3
    load = pool.get("/health").json()["load"]
    assert load["active_jobs"] == 6 and load["queued_jobs"] == 1 and load["job_limit"] == 21


def test_a_pool_that_looks_full_is_rechecked_before_a_submission_is_refused(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, 2, max_concurrent_jobs=1, queue_size=1)
    first = pool.submit(HOLD, client="192.0.2.1")
    for i in range(2, 5):
        pool.submit(HOLD, client=f"192.0.2.{i}")
    pool.workers[pool.worker_for(first)].sandbox.holding()[0].finish()
    pool.clock.advance(1)
    # No health round has run since; the submission itself asks the workers again.
    again = pool.submit(HOLD, client="192.0.2.3")
    assert pool.worker_for(again) == pool.worker_for(first)


def test_no_healthy_worker_is_503_and_health_says_unhealthy(tmp_path: Any) -> None:
    pool = Pool(str(tmp_path), 2)
    pool.network.down.update({netloc(0), netloc(1)})
    pool.check()
    assert pool.post_submit().status == 503
    health = pool.get("/health")
    assert health.status == 503 and health.json()["status"] == "unhealthy"


def test_an_unreachable_worker_is_skipped_and_taken_out_of_the_pool(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    pool.network.down.add(netloc(0))  # dies between two health checks
    jobs = [pool.submit(HOLD, client=f"192.0.2.{i}") for i in range(2)]
    assert [pool.worker_for(j) for j in jobs] == [1, 1]
    entry = pool.pool_entry(0)
    assert entry["healthy"] is False and "connection refused" in entry["last_error"]
    assert pool.pool_entry(1)["dispatched_since_check"] == 2


def test_a_worker_that_refuses_with_503_is_skipped_for_the_next(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2, queue_size=0)  # queue_size 0: each worker refuses (503)
    reply = pool.post_submit()
    assert reply.status == 503
    assert reply.json()["error"] == "No worker available"
    submits = [w.requests.count((b"POST", b"/submit")) for w in pool.workers]
    assert submits == [1, 1]  # both were tried, once each


def test_a_bad_submission_is_answered_by_the_first_worker_and_not_retried(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    reply = pool.post_submit(manifest={"entrypoint": "main.py", "timeoutt": 5})
    assert reply.status == 400 and "timeoutt" in reply.body.decode()
    assert sum(w.requests.count((b"POST", b"/submit")) for w in pool.workers) == 1


def test_the_client_address_reaches_the_worker_as_forwarded_for(tmp_path: Any) -> None:
    pool = ready(tmp_path, 1)
    job = pool.submit(client="203.0.113.77")
    worker_job = decode_job_id(job).worker_job_id  # type: ignore[union-attr]
    assert pool.workers[0].manager.get(worker_job).client == "203.0.113.77"  # type: ignore[union-attr]


# -- pool-wide quotas ------------------------------------------------------------------------


def test_a_client_cannot_exceed_its_concurrency_by_spreading_over_workers(tmp_path: Any) -> None:
    # Each worker alone would take 2 jobs from this client; the pool takes 2 in all.
    pool = ready(tmp_path, 3, quotas=PoolQuota(100.0, 2, 100),
                 worker_quotas=QuotaConfig(100.0, 2, 100))
    first, second = pool.submit(HOLD), pool.submit(HOLD)
    assert pool.worker_for(first) != pool.worker_for(second)
    refused = pool.post_submit(HOLD)
    assert refused.status == 429
    body = refused.json()
    assert "across the pool" in body["reason"] and body["active_jobs"] == 2
    assert refused.header("retry-after") == "5"
    # Another client is not affected; and once a job ends the first client may submit again.
    assert pool.post_submit(HOLD, client="198.51.100.1").status == 200
    pool.workers[pool.worker_for(first)].sandbox.holding()[0].finish()
    assert pool.post_submit(HOLD).status == 200


def test_hourly_limit_counts_submissions_on_every_worker(tmp_path: Any) -> None:
    pool = ready(tmp_path, 3, quotas=PoolQuota(100.0, 100, 3))
    for _ in range(3):
        pool.submit()
        pool.check()
    reply = pool.post_submit()
    assert reply.status == 429 and "Hourly" in reply.json()["reason"]


def test_stats_show_the_clients_quota_summed_over_the_pool(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2, quotas=PoolQuota(100.0, 5, 100))
    pool.submit(HOLD)
    pool.submit(HOLD)
    stats = pool.get("/stats", headers={"X-Forwarded-For": "192.0.2.10"}).json()
    assert stats["your_quota"]["active_jobs"] == 2
    assert stats["your_quota"]["max_concurrent"] == 5 and stats["your_quota"]["can_submit"]
    assert stats["system"]["active_jobs"] == 2 and stats["system"]["capacity"] == 4
    other = pool.get("/stats", headers={"X-Forwarded-For": "192.0.2.99"}).json()
    assert other["your_quota"]["active_jobs"] == 0


# -- proxying one job ----------------------------------------------------------------------


def test_status_is_proxied_with_the_coordinator_id_and_a_verified_signature(
        tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = pool.submit()
    status = pool.get(f"/status/{job}").json()
    assert status["job_id"] == job and status["status"] == "completed"
    assert status["signature_verified"] is True
    worker_job = decode_job_id(job).worker_job_id  # type: ignore[union-attr]
    assert status["worker_metadata"]["job_id"] == worker_job
    # The document verifies offline once the worker's own id is put back.
    assert verify_result(dict(status, job_id=worker_job),
                         pool.identities[pool.worker_for(job)].worker_id)  # type: ignore[union-attr]


def test_a_result_that_does_not_verify_is_flagged(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = pool.submit()
    worker = pool.workers[pool.worker_for(job)]
    worker_job = decode_job_id(job).worker_job_id  # type: ignore[union-attr]
    worker.manager.get(worker_job).exit_code = 3  # type: ignore[union-attr]  # tampered
    assert pool.get(f"/status/{job}").json()["signature_verified"] is False
    running = pool.submit(HOLD)
    assert pool.get(f"/status/{running}").json()["signature_verified"] is False


def test_logs_outputs_and_downloads_are_proxied_with_rewritten_ids(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = pool.submit("BIG")
    logs = pool.get(f"/logs/{job}").json()
    assert logs["job_id"] == job and logs["stdout"] == "hello\n"
    text = pool.get(f"/logs/{job}?format=text")
    assert text.body == b"hello\n" and text.header("content-type").startswith("text/plain")
    outputs = pool.get(f"/outputs/{job}").json()
    assert outputs["job_id"] == job
    urls = {f["path"]: f["download_url"] for f in outputs["files"]}
    assert urls["out.txt"] == f"/download/{job}/out.txt"
    one = pool.get(urls["out.txt"])
    assert one.status == 200 and one.body == b"result"
    assert one.header("content-disposition").startswith("attachment")
    big = pool.get(urls["big.bin"])
    assert len(big.body) == BIG_BYTES and big.body[:4] == bytes([0, 1, 2, 3])
    everything = pool.get(f"/download/{job}")
    assert everything.header("content-type") == "application/gzip"
    assert job in everything.header("content-disposition")  # type: ignore[operator]
    with tarfile.open(fileobj=io.BytesIO(everything.body)) as tar:
        assert "out.txt" in tar.getnames()
    # A full download deletes the job on its worker.
    assert pool.get(f"/status/{job}").status == 404


def test_errors_from_the_worker_pass_through_with_the_coordinator_id(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    running = pool.submit(HOLD)
    early = pool.get(f"/download/{running}/out.txt")
    assert early.status == 409 and "not finished" in early.json()["error"]
    done = pool.submit()
    assert pool.get(f"/download/{done}/nope.txt").status == 404


def test_delete_cancels_the_job_on_its_worker(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = pool.submit(HOLD)
    reply = pool.request("DELETE", f"/jobs/{job}")
    assert reply.json() == {"job_id": job, "deleted": True, "cancelled": True}
    assert pool.get(f"/status/{job}").status == 404


def test_unknown_malformed_and_forged_ids_are_404(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    job = pool.submit()
    tag, when, secret = job.split(".")
    for bad in ["job-abc", "x.y.z", f"{tag}.{when}.job-{'A' * 24}",
                f"aaaaaaaa.{when}.{secret}"]:
        reply = pool.get(f"/status/{bad}")
        assert reply.status == 404, bad
        assert reply.json()["error"] == "Job not found"


# -- lost workers and restarts ---------------------------------------------------------------


def test_a_job_on_a_worker_that_died_reports_worker_lost(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    job = pool.submit(HOLD)
    index = pool.worker_for(job)
    pool.network.down.add(netloc(index))
    pool.check()
    status = pool.get(f"/status/{job}").json()
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "worker_lost"
    assert status["signature_verified"] is False and status["job_id"] == job
    for path in (f"/logs/{job}", f"/outputs/{job}", f"/download/{job}"):
        reply = pool.get(path)
        assert reply.status == 410 and reply.json()["reason"] == "worker_lost", path


def test_a_status_query_notices_a_dead_worker_before_the_next_health_check(
        tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    job = pool.submit(HOLD)
    pool.network.down.add(netloc(pool.worker_for(job)))
    status = pool.get(f"/status/{job}").json()
    assert status["execution_metadata"]["reason"] == "worker_lost"
    assert pool.pool_entry(pool.worker_for(job))["healthy"] is False


def test_a_worker_restarted_after_the_job_was_sent_reports_it_lost(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    job = pool.submit(HOLD)
    index = pool.worker_for(job)
    pool.network.down.add(netloc(index))
    pool.check()
    pool.workers[index].restart()  # a fresh process: the job is gone
    pool.network.down.clear()
    pool.clock.advance(5)
    pool.check()
    assert pool.pool_entry(index)["healthy"] is True
    status = pool.get(f"/status/{job}").json()
    assert status["execution_metadata"]["reason"] == "worker_lost"
    # A job sent after the restart is an ordinary job again.
    pool.clock.advance(1)
    later = pool.submit(client="192.0.2.50")
    assert pool.get(f"/status/{later}").json()["status"] == "completed"


def test_a_restarted_coordinator_still_answers_for_jobs_it_dispatched(tmp_path: Any) -> None:
    pool = ready(tmp_path)
    jobs = [pool.submit(client=f"192.0.2.{i}") for i in range(3)]
    pool.start_coordinator()  # nothing remembered, not even health
    for job in jobs:
        status = pool.get(f"/status/{job}").json()
        assert status["status"] == "completed" and status["signature_verified"] is True
    assert pool.get(f"/download/{jobs[0]}/out.txt").body == b"result"


# -- service endpoints ------------------------------------------------------------------------


def test_root_describes_the_coordinator_with_the_workers_limits(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    info = pool.get("/").json()
    assert info["service"] == "sandrun-coordinator" and info["status"] == "running"
    assert info["worker_id"] is None and info["workers"] == {"healthy": 2, "total": 2}
    assert info["limits"]["max_timeout"] == 3600
    assert info["limits"]["max_active_jobs_per_ip"] == 100


def test_environments_come_from_a_healthy_worker(tmp_path: Any) -> None:
    pool = ready(tmp_path, 2)
    envs = pool.get("/environments").json()
    assert "default" in envs["templates"]


def test_unknown_paths_are_404_json_and_preflight_works(tmp_path: Any) -> None:
    pool = ready(tmp_path, 1)
    assert pool.get("/nope").json()["error"] == "Not found"
    assert pool.request("POST", "/status/x").status == 405
    preflight = pool.request("OPTIONS", "/submit")
    assert preflight.status == 204
    assert preflight.header("access-control-allow-origin") == "*"


# -- streaming wiring -------------------------------------------------------------------------


def test_a_download_registers_the_worker_connection_as_the_clients_producer() -> None:
    from twisted.internet import defer
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone

    from coordinator.proxy import relay

    class Transport:
        paused = stopped = False

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False

        def stopProducing(self) -> None:
            self.stopped = True

    from twisted.internet.interfaces import IPushProducer
    from zope.interface import directlyProvides

    class Request:
        producer: Any = None

        def __init__(self) -> None:
            self.written: list[bytes] = []

        def registerProducer(self, producer: Any, streaming: bool) -> None:
            assert streaming
            self.producer = producer

        def unregisterProducer(self) -> None:
            self.producer = None

        def write(self, data: bytes) -> None:
            self.written.append(data)

    class Response:
        protocol: Any = None

        def deliverBody(self, protocol: Any) -> None:
            self.protocol = protocol

    transport, request, response = Transport(), Request(), Response()
    directlyProvides(transport, IPushProducer)
    done = relay(response, request)  # type: ignore[arg-type]
    response.protocol.makeConnection(transport)
    assert request.producer is transport  # the client's buffer pauses the worker
    response.protocol.dataReceived(b"abc")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert done.called and request.producer is None and request.written == [b"abc"]
    # A client that goes away aborts the worker side.
    transport2, response2 = Transport(), Response()
    directlyProvides(transport2, IPushProducer)
    d2 = relay(response2, Request())  # type: ignore[arg-type]
    response2.protocol.makeConnection(transport2)
    d2.cancel()
    d2.addErrback(lambda f: f.trap(defer.CancelledError))
    assert transport2.stopped


def test_an_exempt_client_passes_the_pool_quota_and_a_refusal_says_how_to_lift_it(
        tmp_path: Any) -> None:
    exempt = "198.51.100.0/24"
    pool = ready(tmp_path, 2, quotas=PoolQuota(100.0, 1, 100, exempt=(exempt,)),
                 worker_quotas=QuotaConfig(100.0, 1, 100, exempt=(exempt,)))
    for _ in range(3):  # three jobs at once where the quota allows one
        assert pool.post_submit(HOLD, client="198.51.100.7").status == 200
    pool.submit(HOLD)
    refused = pool.post_submit(HOLD)
    assert refused.status == 429
    assert "--quota-exempt" in refused.json()["details"]
