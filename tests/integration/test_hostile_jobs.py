"""Hostile jobs against a real worker: every attack is contained, and the worker serves on.

One ``sandrun serve`` (real sandbox, real sockets) with a single job slot, so
a slot that leaked would fail the very next job.  Every test asserts the
contained outcome: the slot and the client's quota returned (``/stats``), the
next ordinary job completing, ``/health`` answering within a generous 1 s
throughout (a containment bound, not a benchmark), and where memory is the
target, the worker's RSS within a stated bound.

The dependency tests fetch from the real package index (PyPI) on the host, as
``test_worker_environments.py`` does; installs inside the sandbox run with the
network off.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.worker import Worker, run_worker

pytestmark = pytest.mark.timeout(180)

HEALTH_BOUND_SECONDS = 1.0  # /health must answer within this throughout every attack
ORDINARY = {"main.py": "print('ordinary', 6 * 7)\n"}


@pytest.fixture(scope="module")
def deps_dir() -> Iterator[str]:
    scratch = tempfile.mkdtemp(prefix="sandrun-hostile-deps-")
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def worker(deps_dir: str) -> Iterator[Worker]:
    with run_worker("--max-concurrent", "1", "--max-active-per-ip", "4",
                    "--jobs-per-hour", "1000", "--cpu-quota", "1000",
                    "--deps-dir", deps_dir) as w:
        yield w


class HealthWatch:
    """Polls ``/health`` from a thread while an attack runs; records every answer."""

    def __init__(self, worker: Worker, interval: float = 0.05) -> None:
        self.worker = worker
        self.interval = interval
        self.answers: list[tuple[int, float]] = []  # (status or -1, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = self.worker.get("/health", timeout=5).status
            except OSError:
                status = -1
            self.answers.append((status, time.monotonic() - started))
            self._stop.wait(self.interval)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_held(self) -> None:
        assert self.answers, "no /health answer at all"
        worst = max(seconds for _, seconds in self.answers)
        assert all(status == 200 for status, _ in self.answers), self.answers
        assert worst < HEALTH_BOUND_SECONDS, f"/health took {worst:.2f} s"


def assert_worker_whole(worker: Worker) -> None:
    """No quota held for the tests' client, and an ordinary job completes."""
    deadline = time.monotonic() + 10
    while worker.get("/stats").json()["your_quota"]["active_jobs"] != 0:
        assert time.monotonic() < deadline, worker.get("/stats").json()
        time.sleep(0.05)
    job_id = worker.submit(ORDINARY, {"entrypoint": "main.py"})
    status = worker.wait(job_id, timeout=30)
    assert status["status"] == "completed", status
    assert worker.get(f"/logs/{job_id}").json()["stdout"] == "ordinary 42\n"
    health = worker.get("/health")
    assert health.status == 200 and health.json()["status"] == "healthy", health.body


# -- row 3: slots, the install step's variables, chown -----------------------------------------

DEEP_TREE = """
import os
os.chdir("/job")
for _ in range(1500):
    os.mkdir("d")
    os.chdir("d")
print("deep")
"""


def test_jobs_that_steer_their_installer_and_nest_deep_trees_leak_no_slot(
        worker: Worker) -> None:
    files = {"main.py": DEEP_TREE, "requirements.txt": "six==1.16.0\n"}
    # PIP_REQUIRE_VIRTUALENV would make the installer refuse to run, were it passed on.
    manifest = {"entrypoint": "main.py", "requirements": "requirements.txt",
                "env": {"PIP_REQUIRE_VIRTUALENV": "1", "PYTHONSTARTUP": "/job/main.py"}}
    with HealthWatch(worker) as watch:
        for _ in range(2):  # more than the worker's one slot
            job_id = worker.submit(files, manifest)
            status = worker.wait(job_id, timeout=120)
            logs = worker.get(f"/logs/{job_id}").json()
            assert status["status"] == "completed", (status, logs)
            assert "Successfully installed six-1.16.0" in logs["stdout"], logs
            assert logs["stdout"].endswith("deep\n")
    watch.assert_held()
    assert_worker_whole(worker)
