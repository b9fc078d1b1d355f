"""A real worker that holds 4,000 finished jobs: it still runs a new one, and its figures hold.

A finished job keeps its tmpfs (a mount) for its retention time unless collected;
a busy worker whose clients never collect holds thousands.  Here 4,000 trivial
jobs (``sh``, ``exit 0``) are submitted and left; then:

- ``/stats`` counts 4,000 finished jobs held and a ``storage_used_bytes`` equal
  to what the test itself measures of every job's tmpfs and log;
- the mounts are in the worker's mount namespace but not in its launcher's (the
  namespace every new job's is copied from);
- a new job (``POST /run``) completes with its output;
- deleting 1,000 of them takes their bytes off the figure, and the worker stops
  cleanly (``run_worker`` checks that no mount is left).

Its timing is the benchmark's business (``bench/http.py --retain 4000``).
Needs root.  About 30-60 s on a 2-core machine.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from typing import Any

import pytest

from sandrun.jobs.storage import INODE_BYTES
from tests.integration.worker import Worker, mounts_under, run_worker

pytestmark = pytest.mark.timeout(600)

HELD = 4000
TRIVIAL = json.dumps({"manifest": {"entrypoint": "true.sh", "interpreter": "sh"},
                      "files": {"true.sh": "exit 0\n"}}).encode()


def submit_many(worker: Worker, count: int, threads: int = 8) -> list[str]:
    """``count`` jobs over ``threads`` keep-alive connections; their ids."""
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(share: int) -> None:
        conn = http.client.HTTPConnection(worker.host, worker.port, timeout=60)
        try:
            for _ in range(share):
                conn.request("POST", "/submit", TRIVIAL, {"Content-Type": "application/json"})
                reply = conn.getresponse()
                body = json.loads(reply.read())
                with lock:
                    if reply.status == 200:
                        ids.append(body["job_id"])
                    else:
                        errors.append(f"{reply.status} {body}")
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(count // threads,))
               for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors[:5]
    return ids


def system(worker: Worker) -> dict[str, Any]:
    result: dict[str, Any] = worker.get("/stats").json()["system"]
    return result


def measured_bytes(worker: Worker, ids: list[str]) -> int:
    """What the jobs hold, measured here: each tmpfs's pages and inodes, each log."""
    total = 0
    jobs = os.path.join(worker.state_dir, "jobs")
    for job_id in ids:
        st = os.statvfs(os.path.join(jobs, job_id))
        total += (st.f_blocks - st.f_bfree) * st.f_frsize
        total += (st.f_files - st.f_ffree) * INODE_BYTES
        total += os.lstat(os.path.join(jobs, job_id + ".log")).st_blocks * 512
    return total


def launcher_pid(worker: Worker) -> int:
    for pid in worker.children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sandrun.sandbox.launcher" in f.read():
                    return pid
        except OSError:
            continue
    raise AssertionError("no launcher")


def mounts_seen_by(pid: int, directory: str) -> list[str]:
    real = os.path.realpath(directory)
    with open(f"/proc/{pid}/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == real or p.startswith(real + "/")]


def test_a_worker_holding_4000_finished_jobs_runs_a_new_one_and_counts_right() -> None:
    with run_worker("--queue-size", str(HELD + 100), "--max-active-per-ip", "100000",
                    "--jobs-per-hour", "100000000", "--cpu-quota", "100000",
                    "--max-finished-jobs", str(HELD + 100)) as worker:
        started = time.monotonic()
        ids = submit_many(worker, HELD)
        assert len(ids) == HELD
        deadline = time.monotonic() + 300
        while (figures := system(worker))["finished_jobs_held"] < HELD:
            assert time.monotonic() < deadline, figures
            time.sleep(0.5)
        took = time.monotonic() - started
        assert figures["queue_length"] == 0 and figures["active_jobs"] == 0
        for job_id in ids[:: HELD // 20]:  # a sample: each ended right
            assert worker.get(f"/status/{job_id}").json()["status"] == "completed"

        # Every job's tmpfs is mounted where the worker is, none where its launcher is.
        assert len(mounts_under(os.path.join(worker.state_dir, "jobs"))) == HELD
        assert mounts_seen_by(launcher_pid(worker), os.path.join(worker.state_dir, "jobs")) == []

        # The running total is what the jobs hold, to the byte.
        assert figures["storage_used_bytes"] == measured_bytes(worker, ids) > 0

        # A new job runs as it would on an empty worker.
        reply = worker.post_json("/run?keep=0", {"files": {"main.sh": "echo still here\n"}})
        assert reply.status == 200, reply.body
        assert reply.json()["stdout"] == "still here\n"
        assert reply.json()["status"] == "completed"

        # Deleting a quarter takes exactly their share off the figure.
        gone, kept = ids[:1000], ids[1000:]
        for job_id in gone:
            assert worker.delete(f"/jobs/{job_id}").status == 200
        figures = system(worker)
        assert figures["finished_jobs_held"] == HELD - 1000
        assert figures["storage_used_bytes"] == measured_bytes(worker, kept)
        assert len(mounts_under(os.path.join(worker.state_dir, "jobs"))) == HELD - 1000
        print(f"\n{HELD} jobs run and held in {took:.1f} s")
