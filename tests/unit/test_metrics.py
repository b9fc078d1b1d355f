"""Prometheus metrics of the worker and the coordinator, in memory.

The real ``JobManager``, ``WorkerAPI`` and ``CoordinatorAPI`` with scripted
jobs (``worker_fakes``); the exposition is read back with prometheus_client's
own parser.  The same mix against a real worker is in
``tests/integration/test_metrics_http.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from coordinator.config import PoolQuota
from sandrun.config import QuotaConfig
from sandrun.jobs.metrics import WorkerMetrics
from sandrun.wire import Reason
from tests.coordinator.fakes import Pool, endpoint
from tests.coordinator.test_proxy import HOLD
from tests.unit.worker_fakes import Harness


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_counters_equal_a_known_mix_of_jobs_and_refusals(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=4,
                quotas=QuotaConfig(cpu_seconds_per_minute=100, max_active_jobs=3,
                                   jobs_per_hour=100))
    ids = [h.submit() for _ in range(3)]
    refused = h.post_json({"files": {"a.py": ""}})
    assert refused.status == 429
    h.clock.advance(2)
    h.run_of(ids[0]).finish(Reason.COMPLETED, cpu_seconds=0.25)
    h.run_of(ids[1]).finish(Reason.TIMEOUT, cpu_seconds=1.5)
    h.run_of(ids[2]).finish(Reason.MEMORY_LIMIT, cpu_seconds=0.25)
    reply = h.get("/metrics")
    assert reply.status == 200 and (reply.header("content-type") or "").startswith("text/plain")
    text = reply.body.decode()
    assert value(text, "sandrun_jobs_finished_total", reason="completed") == 1
    assert value(text, "sandrun_jobs_finished_total", reason="timeout") == 1
    assert value(text, "sandrun_jobs_finished_total", reason="memory_limit") == 1
    assert value(text, "sandrun_jobs_finished_total", reason="exit_nonzero") == 0
    assert value(text, "sandrun_refusals_total", kind="concurrency_limit") == 1
    assert value(text, "sandrun_refusals_total", kind="cpu_quota") == 0
    assert value(text, "sandrun_job_cpu_seconds_total") == 2.0
    assert value(text, "sandrun_job_duration_seconds_count") == 3
    assert value(text, "sandrun_job_duration_seconds_sum") == 6.0  # each ended 2 s in
    assert value(text, "sandrun_job_queue_wait_seconds_count") == 3
    assert value(text, "sandrun_upload_bytes_total") > 0
    assert value(text, "sandrun_jobs_running") == 0 and value(text, "sandrun_jobs_queued") == 0


def test_queued_and_running_gauges_follow_the_queue(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    first, _ = h.submit(), h.submit()
    text = h.get("/metrics").body.decode()
    assert value(text, "sandrun_jobs_running") == 1 and value(text, "sandrun_jobs_queued") == 1
    h.clock.advance(3)
    h.run_of(first).finish()
    text = h.get("/metrics").body.decode()
    assert value(text, "sandrun_jobs_running") == 1 and value(text, "sandrun_jobs_queued") == 0
    # The second job waited 3 s in the queue, the first none.
    assert value(text, "sandrun_job_queue_wait_seconds_sum") == 3.0


def test_a_sandbox_that_cannot_run_a_job_counts_as_a_setup_failure(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    h.run_of(h.submit()).finish(Reason.SANDBOX_ERROR)
    text = h.get("/metrics").body.decode()
    assert value(text, "sandrun_sandbox_setup_failures_total") == 1
    assert value(text, "sandrun_jobs_finished_total", reason="sandbox_error") == 1


def test_a_full_queue_and_full_storage_are_refusals_of_their_own_kind(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1, queue_size=1)
    h.submit()
    h.submit()
    assert h.post_json({"files": {"a.py": ""}}).status == 503
    h.storage.full = True
    h2 = Harness(str(tmp_path / "other"))
    h2.storage.full = True
    assert h2.post_json({"files": {"a.py": ""}}).status == 503
    assert value(h.get("/metrics").body.decode(), "sandrun_refusals_total", kind="queue_full") == 1
    assert value(h2.get("/metrics").body.decode(), "sandrun_refusals_total",
                 kind="storage_full") == 1


def test_two_workers_in_one_process_count_apart(tmp_path: Any) -> None:
    one, two = Harness(str(tmp_path / "a")), Harness(str(tmp_path / "b"))
    one.run_of(one.submit()).finish()
    assert value(one.get("/metrics").body.decode(), "sandrun_jobs_finished_total",
                 reason="completed") == 1
    assert value(two.get("/metrics").body.decode(), "sandrun_jobs_finished_total",
                 reason="completed") == 0


def test_no_label_holds_a_job_id_or_a_client_address(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    job_id = h.submit({"main.py": "print('secret-content')"})
    h.run_of(job_id).finish()
    text = h.get("/metrics").body.decode()
    assert {name for (_, pairs) in samples(text) for (name, _) in pairs} <= {"reason", "kind",
                                                                             "le"}
    assert job_id not in text and "secret" not in text and "127.0.0.1" not in text


def test_metrics_on_their_own_listener_are_not_on_the_api(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    h.api.config = replace(h.config, metrics_listen="tcp:9100:interface=127.0.0.1")
    reply = h.get("/metrics")
    assert reply.status == 404 and reply.json()["error"] == "Not found"


def test_metrics_on_the_api_are_only_for_allowed_addresses(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    h.api.config = replace(h.config, metrics_allow=("192.0.2.0/24",))
    assert h.get("/metrics").status == 404  # the test client is 127.0.0.1
    h.api.config = replace(h.config, metrics_allow=("127.0.0.1",))
    assert h.get("/metrics").status == 200


def test_a_fresh_metrics_object_starts_every_reason_at_zero() -> None:
    text = WorkerMetrics().exposition().decode()
    for reason in Reason:
        assert value(text, "sandrun_jobs_finished_total", reason=reason.value) == 0


# -- the coordinator -------------------------------------------------------------------------


def test_the_coordinator_counts_jobs_routed_lost_and_refused_per_worker(tmp_path: Any) -> None:
    pool = Pool(str(tmp_path), 2)
    pool.check()
    ids = [pool.post_submit(HOLD).json()["job_id"] for _ in range(4)]
    text = pool.get("/metrics").body.decode()
    routed = [value(text, "sandrun_coordinator_jobs_routed_total", worker=f"w{i}")
              for i in range(2)]
    assert sum(routed) == 4 and all(routed)
    assert value(text, "sandrun_coordinator_upload_bytes_total") > 4 * len("print(1)")
    assert value(text, "sandrun_coordinator_worker_healthy", worker="w0") == 1
    assert value(text, "sandrun_coordinator_worker_rtt_seconds", worker="w1") >= 0
    pool.check()  # the loads the workers report now: the four jobs, still running
    text = pool.get("/metrics").body.decode()
    assert sum(value(text, "sandrun_coordinator_jobs_running", worker=f"w{i}")
               for i in range(2)) == 4
    # Worker w1 goes away: its job's status is worker_lost, and it takes no more jobs.
    pool.network.down.add(endpoint(1).split("//")[1])
    lost = next(i for i in ids if pool.worker_for(i) == 1)
    assert pool.get(f"/status/{lost}").json()["execution_metadata"]["reason"] == "worker_lost"
    pool.check()
    text = pool.get("/metrics").body.decode()
    assert value(text, "sandrun_coordinator_worker_lost_answers_total", worker="w1") == 1
    assert value(text, "sandrun_coordinator_worker_healthy", worker="w1") == 0


def test_the_coordinator_counts_pool_quota_refusals_by_kind(tmp_path: Any) -> None:
    pool = Pool(str(tmp_path), 1, quotas=PoolQuota(1000.0, 1, 1000))
    pool.check()
    assert pool.post_submit(HOLD).status == 200
    assert pool.post_submit(HOLD).status == 429
    text = pool.get("/metrics").body.decode()
    assert value(text, "sandrun_coordinator_refusals_total", kind="concurrency_limit") == 1
    assert value(text, "sandrun_coordinator_refusals_total", kind="cpu_quota") == 0
