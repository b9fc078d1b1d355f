"""Per-IP quotas end to end: clients from different loopback addresses against a real worker.

All of 127.0.0.0/8 is loopback on Linux, so binding the client socket to
127.0.0.2, 127.0.0.3, ... makes each a different client to the worker.
127.0.0.5 is configured as a trusted proxy; no other address is.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.worker import Response, Worker, run_worker

pytestmark = pytest.mark.timeout(60)
SLEEPER = {"main.sh": "sleep 30"}
PROXY = "127.0.0.5"
EXEMPT = "127.0.0.9"  # --quota-exempt: no per-IP quota
EXEMPT_NETWORK = "10.9.0.0/16"  # --quota-exempt, reached through the trusted proxy


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker("--max-active-per-ip", "2", "--cpu-quota", "1", "--jobs-per-hour", "100",
                    "--max-concurrent", "8", "--queue-size", "50",
                    "--trusted-proxy", PROXY, "--quota-exempt", EXEMPT,
                    "--quota-exempt", EXEMPT_NETWORK) as w:
        yield w


@pytest.fixture(autouse=True)
def clean_up(worker: Worker) -> Iterator[list[str]]:
    """Jobs a test started and did not finish: cancelled afterwards."""
    started: list[str] = []
    yield started
    for job_id in started:
        worker.delete(f"/jobs/{job_id}")
    assert worker.healthy()


def submit(worker: Worker, source: str, files: dict[str, str] | None = None,
           manifest: dict[str, Any] | None = None,
           forwarded_for: str | None = None) -> Response:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return worker.post_json("/submit", {"manifest": manifest or {"timeout": 30},
                                        "files": files or SLEEPER},
                            source=source, headers=headers)


def accepted(response: Response, started: list[str]) -> str:
    assert response.status == 200, (response.status, response.body)
    job_id: str = response.json()["job_id"]
    started.append(job_id)
    return job_id


def refused(response: Response) -> dict[str, Any]:
    assert response.status == 429, (response.status, response.body)
    body: dict[str, Any] = response.json()
    assert body["error"] == "Rate limit exceeded"
    assert {"reason", "retry_after", "cpu_available", "active_jobs"} <= set(body)
    assert isinstance(body["retry_after"], int) and body["retry_after"] >= 1
    assert response.header("retry-after") == str(body["retry_after"])
    assert response.header("access-control-allow-origin") == "*"
    return body


def quota(worker: Worker, source: str, forwarded_for: str | None = None) -> dict[str, Any]:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    result: dict[str, Any] = worker.get("/stats", source=source, headers=headers).json()
    return result["your_quota"]


def test_a_third_active_job_from_one_ip_is_429_while_another_ip_is_served(
        worker: Worker, clean_up: list[str]) -> None:
    first = accepted(submit(worker, "127.0.0.2"), clean_up)
    accepted(submit(worker, "127.0.0.2"), clean_up)
    body = refused(submit(worker, "127.0.0.2"))
    assert body["active_jobs"] == 2 and "2 of 2" in body["reason"]
    assert body["cpu_available"] <= 1
    accepted(submit(worker, "127.0.0.3"), clean_up)

    mine, theirs = quota(worker, "127.0.0.2"), quota(worker, "127.0.0.3")
    assert (mine["active_jobs"], mine["can_submit"], mine["max_concurrent"]) == (2, False, 2)
    assert mine["reason"] and mine["retry_after"] >= 1
    assert (theirs["active_jobs"], theirs["can_submit"]) == (1, True)
    assert quota(worker, "127.0.0.9")["active_jobs"] == 0

    assert worker.delete(f"/jobs/{first}").status == 200  # a slot frees at once
    accepted(submit(worker, "127.0.0.2"), clean_up)


def test_a_refused_submission_is_answered_from_its_headers_before_the_upload(
        worker: Worker, clean_up: list[str]) -> None:
    source = "127.0.0.10"
    accepted(submit(worker, source), clean_up)
    accepted(submit(worker, source), clean_up)
    with socket.create_connection((worker.host, worker.port), timeout=5,
                                  source_address=(source, 0)) as sock:
        sock.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n")  # and no body, ever
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 "), raw[:300]
    assert b"\r\nRetry-After: 5\r\n" in head
    answer = json.loads(body)
    assert answer["error"] == "Rate limit exceeded" and answer["active_jobs"] == 2
    assert answer["retry_after"] == 5


def test_a_forged_forwarded_for_is_ignored_from_an_untrusted_peer(
        worker: Worker, clean_up: list[str]) -> None:
    accepted(submit(worker, "127.0.0.4", forwarded_for="198.51.100.1"), clean_up)
    accepted(submit(worker, "127.0.0.4", forwarded_for="198.51.100.2"), clean_up)
    refused(submit(worker, "127.0.0.4", forwarded_for="198.51.100.3"))
    assert quota(worker, "127.0.0.4", forwarded_for="198.51.100.9")["active_jobs"] == 2


def test_a_forwarded_for_is_honoured_from_the_trusted_proxy(
        worker: Worker, clean_up: list[str]) -> None:
    accepted(submit(worker, PROXY, forwarded_for="198.51.100.10"), clean_up)
    accepted(submit(worker, PROXY, forwarded_for="198.51.100.10"), clean_up)
    refused(submit(worker, PROXY, forwarded_for="198.51.100.10"))
    # Another client behind the same proxy has its own quota, and so does the proxy itself.
    accepted(submit(worker, PROXY, forwarded_for="198.51.100.11"), clean_up)
    accepted(submit(worker, PROXY), clean_up)
    assert quota(worker, PROXY, forwarded_for="198.51.100.10")["active_jobs"] == 2
    assert quota(worker, PROXY, forwarded_for="198.51.100.11")["active_jobs"] == 1
    # A client cannot pose as the proxy's other clients by prepending addresses.
    refused(submit(worker, PROXY, forwarded_for="203.0.113.7, 198.51.100.10"))


def test_the_slot_is_released_however_a_job_ends(worker: Worker, clean_up: list[str]) -> None:
    source = "127.0.0.8"
    endings: list[tuple[dict[str, str], dict[str, Any], str]] = [
               ({"main.sh": "exit 0"}, {}, "completed"),
               ({"main.sh": "exit 3"}, {}, "failed"),
               ({"main.sh": "sleep 30"}, {"timeout": 1}, "failed"),
               ({"spin.py": "while True:\n    pass\n"}, {"cpu_seconds": 0.3}, "failed")]
    for files, manifest, outcome in endings:
        job_id = accepted(submit(worker, source, files, manifest or {"timeout": 30}), clean_up)
        assert worker.wait(job_id)["status"] == outcome
        assert quota(worker, source)["active_jobs"] == 0
    job_id = accepted(submit(worker, source), clean_up)
    worker.wait(job_id, until=("running",))
    worker.delete(f"/jobs/{job_id}")
    assert quota(worker, source)["active_jobs"] == 0


@pytest.mark.timeout(120)
def test_cpu_is_charged_while_a_job_runs_and_retry_after_is_honoured(
        worker: Worker, clean_up: list[str]) -> None:
    source = "127.0.0.6"
    spinner = accepted(submit(worker, source, {"spin.py": "while True:\n    pass\n"}),
                       clean_up)
    deadline = time.monotonic() + 20
    while quota(worker, source)["can_submit"]:
        assert time.monotonic() < deadline, "CPU was never charged"
        time.sleep(0.1)
    assert worker.get(f"/status/{spinner}").json()["status"] == "running"
    body = refused(submit(worker, source, {"a.sh": "true"}))
    assert "CPU" in body["reason"] and body["cpu_available"] == 0
    accepted(submit(worker, "127.0.0.7", {"a.sh": "true"}), clean_up)  # another IP: fine

    worker.delete(f"/jobs/{spinner}")
    time.sleep(0.5)  # its final CPU figure is charged when it ends
    body = refused(submit(worker, source, {"a.sh": "true"}))
    refused_at = time.monotonic()
    retry_after = body["retry_after"]
    assert 50 <= retry_after <= 61, body  # the CPU left the 60 s window
    time.sleep(max(0.0, refused_at + retry_after - 2 - time.monotonic()))
    refused(submit(worker, source, {"a.sh": "true"}))
    time.sleep(max(0.0, refused_at + retry_after + 0.2 - time.monotonic()))
    accepted(submit(worker, source, {"a.sh": "true"}), clean_up)


def test_an_exempt_address_or_network_is_never_refused_and_a_refusal_says_how_to_lift_it(
        worker: Worker, clean_up: list[str]) -> None:
    for _ in range(4):  # twice --max-active-per-ip
        accepted(submit(worker, EXEMPT), clean_up)
    mine = quota(worker, EXEMPT)
    assert mine["exempt"] is True and mine["can_submit"] is True
    for _ in range(3):  # a client behind the trusted proxy, in the exempt network
        accepted(submit(worker, PROXY, forwarded_for="10.9.3.4"), clean_up)
    assert quota(worker, PROXY, forwarded_for="10.9.3.4")["exempt"] is True

    other = "127.0.0.10"
    assert quota(worker, other)["exempt"] is False
    accepted(submit(worker, other), clean_up)
    accepted(submit(worker, other), clean_up)
    body = refused(submit(worker, other))
    assert "Too many active jobs" in body["details"]
    assert "--quota-exempt" in body["details"]  # how an operator lifts it
