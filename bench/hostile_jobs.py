"""Hostile jobs: ``/health`` latency and worker RSS while each attack runs, against idle.

Starts ``sandrun serve --max-concurrent 2`` (quotas raised) and, for each attack of
``docs/security.md``'s "Hostile clients" rows 3, 4, 7-10, measures ``/health`` from
its own thread every 20 ms while the attack holds (p50, p99, max), the worker's
RSS before and during, and what the attack is about (state tmpfs growth, time to a
freed slot, CPU per wall second).  The idle row is the reference, measured in the
same run, first.

- ``unread_logs``: 20 ``GET /logs`` of a 2 x 10 MiB job (``\\x01``, 6 bytes a
  character as JSON), never read, held 3 s;
- ``slow_downloads``: 6 ``GET /download`` of a 20 MiB job, headers read, held 3 s;
- ``million_files``: a job creating files until its tmpfs' inode cap, then its DELETE;
- ``cpu_spin``: a job spinning two processes for 1.5 CPU-s each (capped at one core);
- ``cancel_fetch``: a job whose dependency fetch is large (``torch``), cancelled
  0.5 s into the fetch (needs a package index; skipped when the fetch fails fast).

Usage (as root): ``python3 bench/hostile_jobs.py``
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import RAISED_QUOTAS, Worker, percentile, print_table, write_json

HEALTH_INTERVAL = 0.02  # seconds between /health probes
HOLD = 3.0  # seconds an attack is held while /health is probed

TWO_TIMES_TEN_MIB = ("import os\nchunk = b'\\x01' * (1024 * 1024)\n"
                     "for _ in range(10):\n    os.write(1, chunk)\n    os.write(2, chunk)\n")
BIG_OUTPUT = "import os\nopen('/job/big.bin', 'wb').write(os.urandom(20 * 1024 * 1024))\n"
MANY_FILES = ("import os\nos.chdir('/job')\nn = 0\ntry:\n    while n < 1_000_000:\n"
              "        open(f'f{n}', 'w').close()\n        n += 1\nexcept OSError:\n    pass\n"
              "print(n)\n")
SPIN = ("import multiprocessing, time\n"
        "def spin():\n    while time.process_time() < 1.5:\n        pass\n"
        "if __name__ == '__main__':\n"
        "    ps = [multiprocessing.Process(target=spin) for _ in range(2)]\n"
        "    [p.start() for p in ps]\n    [p.join() for p in ps]\n")


class HealthProbe:
    """``/health`` round trips, each on a fresh connection, from a thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            client = self.worker.client(timeout=10)
            started = time.perf_counter()
            try:
                code, _ = client.request("GET", "/health")
                if code != 200:
                    self.failures += 1
            except OSError:
                self.failures += 1
            finally:
                client.close()
            self.times.append(time.perf_counter() - started)
            self._stop.wait(HEALTH_INTERVAL)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def row(self) -> dict[str, float]:
        ms = [t * 1000 for t in self.times]
        return {"health_p50_ms": percentile(ms, 50), "health_p99_ms": percentile(ms, 99),
                "health_max_ms": max(ms) if ms else float("nan"), "probes": len(ms),
                "health_failures": self.failures}


def finished_job(worker: Worker, files: dict[str, str],
                 manifest: dict[str, Any] | None = None) -> str:
    client = worker.client()
    try:
        code, doc = client.submit(manifest or {"entrypoint": "main.py"}, files)
        assert code == 200, (code, doc)
        client.wait(doc["job_id"], timeout=180)
        return str(doc["job_id"])
    finally:
        client.close()


def held_requests(worker: Worker, path: str, count: int, read_headers: bool) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((worker.host, worker.port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        if read_headers:
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
        sockets.append(sock)
    return sockets


def state_used_mib(worker: Worker) -> float:
    st = os.statvfs(worker.state_dir)
    return (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20


@contextmanager
def measured(worker: Worker, name: str, rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    row: dict[str, Any] = {"attack": name, "rss_before_mib": worker.rss_kb()["worker"] / 1024}
    with HealthProbe(worker) as probe:
        yield row
        row["rss_during_mib"] = worker.rss_kb()["worker"] / 1024
    row.update(probe.row())
    rows.append(row)


def idle(worker: Worker, rows: list[dict[str, Any]]) -> None:
    with measured(worker, "idle", rows):
        time.sleep(HOLD)


def unread_logs(worker: Worker, rows: list[dict[str, Any]]) -> None:
    job = finished_job(worker, {"main.py": TWO_TIMES_TEN_MIB})
    with measured(worker, "unread_logs (20 x /logs of 2 x 10 MiB)", rows):
        sockets = held_requests(worker, f"/logs/{job}", 20, read_headers=False)
        time.sleep(HOLD)
    for sock in sockets:
        sock.close()
    worker.client().request("DELETE", f"/jobs/{job}")


def slow_downloads(worker: Worker, rows: list[dict[str, Any]]) -> None:
    job = finished_job(worker, {"main.py": BIG_OUTPUT})
    before = state_used_mib(worker)
    with measured(worker, "slow_downloads (6 x /download of 20 MiB)", rows) as row:
        sockets = held_requests(worker, f"/download/{job}", 6, read_headers=True)
        time.sleep(HOLD)
        row["state_tmpfs_growth_mib"] = state_used_mib(worker) - before
    for sock in sockets:
        sock.close()
    worker.client().request("DELETE", f"/jobs/{job}")


def million_files(worker: Worker, rows: list[dict[str, Any]]) -> None:
    job = finished_job(worker, {"main.py": MANY_FILES})
    with measured(worker, "million_files (DELETE of a job at its inode cap)", rows) as row:
        started = time.perf_counter()
        worker.client().request("DELETE", f"/jobs/{job}")
        row["delete_answer_ms"] = (time.perf_counter() - started) * 1000
        while os.path.exists(os.path.join(worker.state_dir, "jobs", job)):
            time.sleep(0.01)
        row["data_gone_ms"] = (time.perf_counter() - started) * 1000
        time.sleep(1.0)


def cpu_spin(worker: Worker, rows: list[dict[str, Any]]) -> None:
    with measured(worker, "cpu_spin (2 processes, cap 1 core)", rows) as row:
        client = worker.client()
        code, doc = client.submit({"entrypoint": "main.py"}, {"main.py": SPIN})
        status, _ = client.wait(doc["job_id"], timeout=120)
        meta = status["execution_metadata"]
        row["cpu_per_wall"] = meta["cpu_seconds"] / (meta["wall_time_ms"] / 1000)
        client.request("DELETE", f"/jobs/{doc['job_id']}")


def fetching(worker: Worker) -> bool:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            deps = (worker.state_dir + "-deps").encode()
            if b"download" in argv and any(a.startswith(deps) for a in argv):
                return True
    return False


def cancel_fetch(worker: Worker, rows: list[dict[str, Any]]) -> None:
    client = worker.client()
    code, doc = client.submit({"entrypoint": "main.py", "requirements": "requirements.txt"},
                              {"main.py": "print(1)\n", "requirements.txt": "torch==2.2.0\n"})
    job = doc["job_id"]
    deadline = time.monotonic() + 30
    while not fetching(worker):
        if time.monotonic() > deadline or client.status(job)["status"] != "running":
            print("cancel_fetch: skipped (no fetch under way)", flush=True)
            return
        time.sleep(0.02)
    time.sleep(0.5)
    with measured(worker, "cancel_fetch (DELETE 0.5 s into a large fetch)", rows) as row:
        started = time.perf_counter()
        client.request("DELETE", f"/jobs/{job}")
        while fetching(worker) or client.json("GET", "/health")[1]["load"]["active_jobs"]:
            time.sleep(0.01)
        row["slot_back_ms"] = (time.perf_counter() - started) * 1000
        time.sleep(1.0)


ATTACKS: list[Callable[[Worker, list[dict[str, Any]]], None]] = [
    idle, unread_logs, slow_downloads, million_files, cpu_spin, cancel_fetch]


def main() -> None:
    state = tempfile.mkdtemp(prefix="sandrun-bench-")
    worker = Worker(*RAISED_QUOTAS, "--max-concurrent", "2", "--deps-dir", state + "-deps",
                    state_dir=state)
    worker.start()
    rows: list[dict[str, Any]] = []
    try:
        for attack in ATTACKS:
            attack(worker, rows)
    finally:
        worker.stop()
        worker.remove_state_dir()
        shutil.rmtree(state + "-deps", ignore_errors=True)
    headers = ["attack", "health p50 ms", "p99 ms", "max ms", "RSS before MiB",
               "RSS during MiB", "detail"]
    details = ("state_tmpfs_growth_mib", "delete_answer_ms", "data_gone_ms", "cpu_per_wall",
               "slot_back_ms")
    table = [[r["attack"], r["health_p50_ms"], r["health_p99_ms"], r["health_max_ms"],
              r["rss_before_mib"], r["rss_during_mib"],
              ", ".join(f"{k}={r[k]:.2f}" for k in details if k in r)] for r in rows]
    idle_p99 = rows[0]["health_p99_ms"]
    print_table("/health while each attack holds (idle first: the reference)", headers, table,
                notes=["p99 ratio to idle: " + ", ".join(
                    f"{r['attack'].split()[0]} {r['health_p99_ms'] / idle_p99:.1f}x"
                    for r in rows[1:])])
    write_json("hostile_jobs", {"rows": rows})


if __name__ == "__main__":
    main()
