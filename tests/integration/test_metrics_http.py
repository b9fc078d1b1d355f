"""Prometheus metrics of a real worker: a known mix of real jobs, then ``/metrics``.

The worker runs real sandboxed jobs (one completes, one times out, one runs out of
memory) and refuses a submission over the client's concurrency quota; the counters
it exposes must equal that mix, read back with prometheus_client's own parser.
"""

from __future__ import annotations

import socket
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.worker import request, run_worker

HOG = "x = bytearray(400 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])\n"


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_counters_equal_a_known_mix_of_real_jobs() -> None:
    with run_worker("--max-active-per-ip", "1") as worker:
        # While the sleeper runs, this client's one active job is spent: a 429.
        slow = worker.submit({"main.py": "import time\ntime.sleep(30)\n"}, {"timeout": 1})
        refused = worker.post_json("/submit", {"files": {"main.py": "print(1)"}})
        assert refused.status == 429, refused.body
        assert worker.wait(slow)["execution_metadata"]["reason"] == "timeout"
        completed = worker.submit({"main.py": "print('hello')"})
        assert worker.wait(completed)["execution_metadata"]["reason"] == "completed"
        hog = worker.submit({"main.py": HOG}, {"memory_mb": 64})
        assert worker.wait(hog)["execution_metadata"]["reason"] == "memory_limit"
        reply = worker.get("/metrics")
        assert reply.status == 200
        assert (reply.header("content-type") or "").startswith("text/plain; version=0.0.4")
        text = reply.body.decode()
        for reason, count in (("completed", 1), ("timeout", 1), ("memory_limit", 1),
                              ("exit_nonzero", 0), ("sandbox_error", 0)):
            assert metric(text, "sandrun_jobs_finished_total", reason=reason) == count, reason
        assert metric(text, "sandrun_refusals_total", kind="concurrency_limit") == 1
        assert metric(text, "sandrun_sandbox_setup_failures_total") == 0
        # Three real launches, each well under the timeout; real CPU time was used.
        assert metric(text, "sandrun_job_launch_seconds_count") == 3
        assert 0 < metric(text, "sandrun_job_launch_seconds_sum") < 3
        assert metric(text, "sandrun_job_duration_seconds_count") == 3
        assert metric(text, "sandrun_job_cpu_seconds_total") > 0
        assert metric(text, "sandrun_upload_bytes_total") > 0
        assert metric(text, "sandrun_stored_bytes") >= 0
        assert metric(text, "sandrun_jobs_running") == 0
        assert completed not in text and "hello" not in text


def test_metrics_listen_moves_the_metrics_off_the_api_port() -> None:
    port = free_port()
    with run_worker("--metrics-listen", f"127.0.0.1:{port}") as worker:
        assert worker.get("/metrics").status == 404
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = request(f"http://127.0.0.1:{port}", path="/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline, "the metrics port never answered"
                time.sleep(0.1)
        assert reply.status == 200
        assert metric(reply.body.decode(), "sandrun_jobs_finished_total",
                      reason="completed") == 0
