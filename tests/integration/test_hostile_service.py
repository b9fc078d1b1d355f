"""Hostile clients against a real worker (and a real coordinator): each attack is contained.

One test per case of ``docs/security.md`` "Hostile clients" this module covers.
Each asserts the contained outcome, not only the refusal:

- the attack is refused with a 4xx in the contract's JSON, within a generous bound;
- ``/health`` answers within 1 s throughout (probed every 50 ms from another
  address; a containment bound, not a benchmark: unprotected, these attacks held
  it for tens of seconds);
- the worker's resident memory and its state tmpfs (where uploads are spooled)
  stay within a stated bound and come back;
- the attacker's quota is returned and the next ordinary job completes.

Runs as root (a real ``sandrun serve``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import hostile_archives as ha
from tests.integration.worker import Response, Worker, request, run_worker

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.0.2"
PROBE = "127.0.0.3"
CLIENT = "127.0.0.4"
HEALTH_BOUND = 1.0  # seconds: the slowest /health answer allowed while an attack runs
RSS_BOUND_KIB = 60 * 1024  # how much the worker's RSS may grow across one attack
REFUSAL_BOUND = 15.0  # seconds: a generous bound on how long a refusal may take


class HealthProbe:
    """GET /health every 50 ms from its own address while an attack runs; the slowest answer."""

    def __init__(self, url: str, source: str = PROBE) -> None:
        self.url, self.source = url, source
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                reply = request(self.url, path="/health", source=self.source, timeout=5)
                if reply.status != 200:
                    self.failures.append(f"status {reply.status}")
            except OSError as e:
                self.failures.append(repr(e))
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(0.05)

    def check(self) -> None:
        assert self.latencies, "the probe never ran"
        assert not self.failures, self.failures[:5]
        assert max(self.latencies) < HEALTH_BOUND, sorted(self.latencies)[-5:]


def state_used_bytes(worker: Worker) -> int:
    """Bytes in use on the worker's state tmpfs (spooled uploads; job mounts are apart)."""
    st = os.statvfs(worker.state_dir)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker("--max-concurrent", "2", "--max-active-per-ip", "2",
                    "--jobs-per-hour", "1000", "--cpu-quota", "1000") as w:
        yield w


@pytest.fixture
def contained(worker: Worker) -> Iterator[None]:
    """After the test: the worker is unharmed, the attacker's quota whole, a job completes."""
    rss = worker.rss_kib()
    spooled = state_used_bytes(worker)
    yield
    assert worker.rss_kib() - rss < RSS_BOUND_KIB, (rss, worker.rss_kib())
    assert state_used_bytes(worker) - spooled < 4 * 1024 * 1024
    quota = worker.get("/stats", source=ATTACKER).json()["your_quota"]
    assert quota["active_jobs"] == 0 and quota["can_submit"], quota
    job = worker.submit({"main.py": "print('still here')"}, source=CLIENT)
    status = worker.wait(job, 60)
    assert status["status"] == "completed", status
    assert worker.get(f"/logs/{job}").json()["stdout"] == "still here\n"


def refused_upload(worker: Worker, archive: bytes, name: str = "evil.tgz") -> dict[str, Any]:
    started = time.monotonic()
    reply = worker.post_multipart("/submit", {"manifest": '{"entrypoint": "main.py"}'},
                                  [(name, archive)], source=ATTACKER)
    assert time.monotonic() - started < REFUSAL_BOUND
    return refused(reply, 400, "Invalid upload")


def refused(reply: Response, status: int, error: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:500])
    assert reply.header("content-type") == "application/json"
    body: dict[str, Any] = reply.json()
    assert body["error"] == error, body
    return body


# -- rows 1 and 2: archives that hurt the parser ------------------------------------------------


def test_a_sparse_map_claiming_millions_of_entries_is_a_quick_400_and_costs_the_worker_nothing(
        worker: Worker, contained: None) -> None:
    bomb = ha.sparse_map_bomb(4_000_000)
    assert len(bomb) < 64 * 1024  # small on the wire: the cost was all on the worker
    with HealthProbe(worker.url) as probe:
        body = refused_upload(worker, bomb)
    assert body["member"] == "evil.tgz"
    assert "GNU sparse members are not accepted" in body["details"]
    probe.check()


def test_a_truncated_sparse_map_is_a_400_naming_the_problem_not_a_500(
        worker: Worker, contained: None) -> None:
    body = refused_upload(worker, ha.truncated_sparse_map())
    assert "GNU sparse" in body["details"]


def test_a_truncated_archive_is_a_400_saying_so(worker: Worker, contained: None) -> None:
    body = refused_upload(worker, ha.truncated_member())
    assert "truncated archive" in body["details"]


def test_six_64_kib_all_digit_pax_headers_do_not_stall_health(
        worker: Worker, contained: None) -> None:
    archive = ha.digit_pax_headers(6, 64 * 1024)
    assert len(archive) < 4096
    with HealthProbe(worker.url) as probe:
        body = refused_upload(worker, archive)
        assert "an extended header of 65536 bytes" in body["details"]
        body = refused_upload(worker, ha.digit_run_pax_header())
        assert "digits" in body["details"]
    probe.check()


def test_uploads_are_parsed_in_a_child_process_not_in_the_worker(
        worker: Worker, contained: None) -> None:
    """The fork server is the worker's child; each submission forks one short-lived child."""
    servers = [pid for pid in worker.children() if "sandrun.api.unpacker" in _cmdline(pid)]
    assert len(servers) == 1, [(pid, _cmdline(pid)) for pid in worker.children()]
    job = worker.submit({"main.py": "print(1)"}, source=CLIENT)
    assert worker.wait(job, 60)["status"] == "completed"
    assert [pid for pid in worker.children()
            if "sandrun.api.unpacker" in _cmdline(pid)] == servers  # no child left behind


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\x00", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
