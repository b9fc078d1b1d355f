"""A real worker for integration tests: ``sandrun serve`` in a subprocess, plus a tiny client.

Usage::

    from tests.integration.worker import run_worker

    with run_worker("--max-concurrent", "1") as worker:
        response = worker.post_json("/submit", {"manifest": {...}, "files": {...}})
        assert response.status == 200

``run_worker`` starts the worker as a child process on a free loopback port
(``--listen HOST:0``; the port is read from the worker's start-up line) with a
fresh state directory, waits until ``/health`` answers, and on exit stops it
with SIGTERM and asserts a clean shutdown: exit status 0 and no mount left
under the state directory.  The worker's log (stderr) is kept in a file:
``worker.log()``.

The client is ``http.client`` with an optional source address, so tests can
come from 127.0.0.2, 127.0.0.3, ... (all of 127/8 is loopback on Linux) and be
different clients to the worker's per-IP quotas.  Helpers build multipart
bodies and tar archives by hand, byte for byte, so malformed ones are easy too.

Needs root (the worker mounts tmpfs, makes cgroups and namespaces).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench.common import in_cgroup, remove_worker_cgroup, worker_cgroup
from tests.bodies import multipart, tar_bytes  # noqa: F401 - re-exported for the tests
from tests.contract import check_response
from tests.timing import scaled

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LISTENING = re.compile(r"sandrun worker listening on (\S+):(\d+) ")


def why_no_worker() -> str | None:
    """Why a real worker cannot run here (for ``pytest.skip``), or None."""
    if os.geteuid() != 0:
        return "a worker needs root: tmpfs mounts, cgroups, namespaces"
    return None


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def request(url: str, method: str = "GET", path: str = "/", body: bytes | None = None,
            headers: dict[str, str] | None = None, source: str | None = None,
            timeout: float = 30.0) -> Response:
    """One HTTP request on a new connection, optionally from ``source`` (an address)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port,
                                      timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        data = reply.read()
        merged: dict[str, str] = {}
        for name, value in reply.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return Response(reply.status, merged, data)
    finally:
        conn.close()


@dataclass
class Worker:
    """A running ``sandrun serve``; ``url`` is ``http://HOST:PORT``."""

    url: str
    host: str
    port: int
    pid: int
    state_dir: str
    log_path: str
    process: subprocess.Popen[bytes] = field(repr=False)

    # -- HTTP ----------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, source: str | None = None,
                timeout: float = 30.0) -> Response:
        response = request(self.url, method, path, body, headers, source, timeout)
        # Every answer a test sees is checked against the OpenAPI document.
        check_response("worker", method, path, response.status, response.header("content-type"),
                       response.body)
        return response

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Response:
        return self.request("DELETE", path, **kwargs)

    def post_json(self, path: str, document: Any, **kwargs: Any) -> Response:
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return self.request("POST", path, json.dumps(document).encode(), headers, **kwargs)

    def post_multipart(self, path: str, fields: dict[str, str] | None = None,
                       files: list[tuple[str, bytes]] | None = None,
                       **kwargs: Any) -> Response:
        body, content_type = multipart(fields or {}, files or [])
        headers = {"Content-Type": content_type, **kwargs.pop("headers", {})}
        return self.request("POST", path, body, headers, **kwargs)

    def submit(self, files: dict[str, str], manifest: dict[str, Any] | None = None,
               **kwargs: Any) -> str:
        """Submit a JSON-form job that must be accepted; returns its id."""
        response = self.post_json("/submit", {"manifest": manifest or {}, "files": files},
                                  **kwargs)
        assert response.status == 200, (response.status, response.body)
        job_id: str = response.json()["job_id"]
        return job_id

    def wait(self, job_id: str, timeout: float = 30.0,
             until: tuple[str, ...] = ("completed", "failed")) -> dict[str, Any]:
        """Poll ``/status`` until the job's status is one of ``until``; returns the status."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            response = self.get(f"/status/{job_id}")
            assert response.status == 200, (response.status, response.body)
            status: dict[str, Any] = response.json()
            if status["status"] in until:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {status['status']} after {timeout}s")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            return self.get("/health", timeout=5).status == 200
        except OSError:
            return False

    # -- the process -------------------------------------------------------------

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def mounts(self) -> list[str]:
        """Mount points at or beneath the state directory, as the kernel lists them."""
        return mounts_under(self.state_dir)

    def rss_kib(self, peak: bool = False) -> int:
        """The worker process's resident memory (VmRSS, or VmHWM with ``peak``), KiB."""
        key = "VmHWM:" if peak else "VmRSS:"
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise AssertionError(f"no {key} for pid {self.pid}")

    def children(self) -> list[int]:
        """Every descendant process of the worker (the launcher, jobs)."""
        found: list[int] = []
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
        return found

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait; returns the exit status (the caller checks it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"worker did not stop within {timeout}s:\n{self.log()}") \
                from None


def mounts_under(directory: str) -> list[str]:
    real = os.path.realpath(directory)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == real or point.startswith(real + "/"):
                found.append(point)
    return found


@contextlib.contextmanager
def run_worker(*extra_args: str, bind: str = "127.0.0.1", startup_timeout: float = 30.0,
               check_clean_exit: bool = True, state_dir: str | None = None) -> Iterator[Worker]:
    """Start ``sandrun serve`` on ``bind`` and a free port; stop it cleanly on exit.

    ``extra_args`` go to ``sandrun serve`` (``--max-concurrent 1``, quotas, a key).
    ``state_dir`` defaults to a fresh directory; give one to restart on old state.
    On leaving, unless the test stopped it itself, the worker gets SIGTERM and
    must exit 0 with no mount left under its state directory.
    """
    reason = why_no_worker()
    if reason is not None:
        import pytest

        pytest.skip(reason)
    scratch = tempfile.mkdtemp(prefix="sandrun-worker-")
    state_dir = state_dir or os.path.join(scratch, "state")
    log_path = os.path.join(scratch, "worker.log")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process: subprocess.Popen[bytes] | None = None
    worker: Worker | None = None
    # cgroup v2: a cgroup of its own, as its systemd unit would give it.
    cgroup = worker_cgroup(f"worker-{os.path.basename(scratch)}")
    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                in_cgroup([sys.executable, "-m", "sandrun", "serve", "--state-dir", state_dir,
                           "--listen", f"[{bind}]:0" if ":" in bind else f"{bind}:0",
                           *extra_args], cgroup),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                env=env)
        deadline = time.monotonic() + scaled(startup_timeout)
        while worker is None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                match = _LISTENING.search(f.read())
            if match:
                host, port = match.group(1), int(match.group(2))
                netloc = f"[{host}]" if ":" in host else host
                worker = Worker(f"http://{netloc}:{port}", host, port, process.pid, state_dir,
                                log_path, process)
            elif process.poll() is not None or time.monotonic() > deadline:
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    raise AssertionError(f"worker did not start (exit {process.poll()}):\n"
                                         f"{f.read()}")
            else:
                time.sleep(0.05)
        while not worker.healthy():
            if time.monotonic() > deadline:
                raise AssertionError(f"worker never healthy:\n{worker.log()}")
            time.sleep(0.05)
        yield worker
        if check_clean_exit:
            code = worker.stop()
            assert code == 0, f"worker exited {code}:\n{worker.log()}"
            assert worker.mounts() == [], worker.mounts()
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for point in reversed(mounts_under(state_dir)):  # only after a failed test
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        remove_worker_cgroup(cgroup)


def job_processes(worker: Worker) -> list[int]:
    """The worker's descendants that run as a sandbox uid (the jobs' processes)."""
    found = []
    for pid in worker.children():
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid != 0:
            found.append(pid)
    return found
