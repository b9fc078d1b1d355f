"""Faults against a real worker: a crash, a client that goes away, a full disk.

- The worker killed with SIGKILL while jobs run and clients submit: its launcher
  dies with it (PDEATHSIG) and so does every job (each is PID 1 of its own PID
  namespace, and the launcher's death kills it); what a crash cannot clean (the
  job tmpfs mounts, the job cgroups) is there until a worker starts again on the
  same state directory, which removes it and serves.
- A client that sends the headers of a 50 MB upload and 1 MB of its body, then
  closes: no job, no spool file, no tmpfs space and no mount remain.
- A job that fills its own tmpfs gets ``disk_limit`` (or ``exit_nonzero`` with
  ENOSPC in its stderr); a job running beside it is not touched.

The first uses ``bench.common.Worker`` (it can SIGKILL a worker and start another
on the same state directory); the others ``tests.integration.worker.run_worker``.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench.common import (
    RAISED_QUOTAS,
    Worker,
    job_processes,
    pid_alive,
    processes_mentioning,
    wait_for,
)
from tests.integration.worker import Worker as RunningWorker
from tests.integration.worker import run_worker
from tests.timing import scaled

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts real workers: needs root")

RAISED = ("--cpu-quota", "100000", "--max-active-per-ip", "100000",
          "--jobs-per-hour", "100000000")

SLEEPER = {"manifest": {"entrypoint": "sleep.sh", "interpreter": "sh", "timeout": 600},
           "files": {"sleep.sh": "exec sleep 600\n"}}
# A double-forked daemon in its own session, and a parent that ignores SIGTERM:
# nothing but the PID namespace's end takes both down.
DAEMONS = {"manifest": {"entrypoint": "d.sh", "interpreter": "sh", "timeout": 600},
           "files": {"d.sh": "trap '' TERM HUP\n(setsid sh -c 'sleep 600 & sleep 600' &)\n"
                             "sleep 600\n"}}
SPINNER = {"manifest": {"entrypoint": "spin.py", "timeout": 600},
           "files": {"spin.py": "while True:\n    pass\n"}}
TRIVIAL = {"manifest": {"entrypoint": "true.sh", "interpreter": "sh"},
           "files": {"true.sh": "exit 0\n"}}


# -- the worker killed mid-load --------------------------------------------------------------


@pytest.fixture
def crash_worker() -> Iterator[Worker]:
    w = Worker(*RAISED_QUOTAS, "--max-concurrent", "4").start()
    try:
        yield w
    finally:
        if w.proc is not None and w.proc.poll() is None:
            w.stop()
        w.remove_state_dir()


def keep_submitting(worker: Worker, stop: threading.Event, seen: list[int]) -> None:
    """A client that submits trivial jobs as fast as it can until the worker is gone."""
    client = worker.client(timeout=5)
    while not stop.is_set():
        try:
            code, answer = client.json("POST", "/submit", TRIVIAL)
            seen.append(code)
            if code == 200:
                client.status(answer["job_id"])
        except (OSError, RuntimeError):
            break
    client.close()


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_load_takes_its_jobs_along_and_a_restart_cleans_up_and_serves(
        crash_worker: Worker) -> None:
    worker = crash_worker
    client = worker.client()
    ids = []
    for job in (SLEEPER, DAEMONS, SPINNER, SLEEPER, SLEEPER, SPINNER, SLEEPER, SLEEPER):
        code, answer = client.json("POST", "/submit", job)
        assert code == 200, answer
        ids.append(answer["job_id"])
    stop = threading.Event()
    seen: list[int] = []
    submitters = [threading.Thread(target=keep_submitting, args=(worker, stop, seen))
                  for _ in range(2)]
    for t in submitters:
        t.start()
    deadline = time.monotonic() + 20
    while sum(client.status(i)["status"] == "running" for i in ids[:4]) < 4 \
            or len(job_processes(worker.instance)) < 6:
        assert time.monotonic() < deadline, "the first four jobs never all ran"
        time.sleep(0.05)
    while len(seen) < 20:  # the submitters are busy too
        assert time.monotonic() < deadline, f"the submitters got nowhere: {seen}"
        time.sleep(0.01)
    client.close()
    launcher = worker.launcher_pid()
    assert launcher is not None
    jobs_before = job_processes(worker.instance)
    assert any(name == "sleep" for _, _, name in jobs_before), jobs_before
    mine = {pid for pid, _ in processes_mentioning(worker.state_dir)}
    assert {worker.pid, launcher} <= mine, mine

    worker.kill()
    killed_at = time.monotonic()
    left = wait_for(lambda: [p for p in (launcher, *(p for p, _, _ in jobs_before))
                             if pid_alive(p)] + job_processes(worker.instance), within=1.0)
    assert left == [], f"alive 1 s after the worker's SIGKILL: {left}"
    # Nor any other process of that worker (the launcher's pre-forked spares).
    assert processes_mentioning(worker.state_dir) == []
    assert time.monotonic() - killed_at <= 1.5
    stop.set()
    for t in submitters:
        t.join(10)
    assert 200 in seen, seen

    # A crash leaves what only a worker can remove: job tmpfs mounts, and job cgroups
    # unless the dying launcher read the closed socket and removed them before its own
    # SIGKILL landed (a race, so their number is not asserted; their absence after the
    # restart is).
    stale_mounts = [m for m in worker.mounts() if m != worker.state_dir]
    assert len(stale_mounts) >= 8, stale_mounts

    restarted = Worker(*RAISED_QUOTAS, "--max-concurrent", "4",
                       state_dir=worker.state_dir).start()
    try:
        assert restarted.mounts() == [restarted.state_dir], restarted.mounts()
        assert restarted.job_cgroups() == []
        for sub in ("jobs", "uploads"):
            assert os.listdir(os.path.join(restarted.state_dir, sub)) == []
        assert job_processes(restarted.instance) == []
        client = restarted.client()
        for job_id in ids:
            code, _ = client.json("GET", f"/status/{job_id}")
            assert code == 404, job_id
        code, answer = client.json("POST", "/submit", TRIVIAL)
        assert code == 200, answer
        status, _ = client.wait(answer["job_id"], poll=0.01)
        assert status["execution_metadata"]["reason"] == "completed", status
        client.close()
    finally:
        assert restarted.stop() == 0, restarted.log_tail()
        worker.proc = restarted.proc
    assert restarted.mounts() == []
    assert restarted.job_cgroups() == []


# -- a client that goes away mid-upload ---------------------------------------------------------


def spool_fds(worker: RunningWorker) -> list[str]:
    """The worker's open files on its state tmpfs (spooled request bodies are unlinked)."""
    found = []
    for fd in os.listdir(f"/proc/{worker.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{worker.pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(worker.state_dir + "/"):
            found.append(target)
    return found


def used_kib(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


BOUNDARY = "sandrun-fault-boundary"
MULTIPART_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; "
                  "filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_that_disconnects_mid_upload_leaves_no_job_no_spool_file_and_no_mount(
        framing: str) -> None:
    source = "127.0.0.77"
    with run_worker(*RAISED) as worker:
        baseline = used_kib(worker.state_dir)
        body = MULTIPART_HEAD.encode() + os.urandom(1024 * 1024)
        head = ("POST /submit HTTP/1.1\r\nHost: sandrun\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n")
        if framing == "content-length":
            head += f"Content-Length: {50 * 1000 * 1000}\r\n\r\n"
            payload = body
        else:
            head += "Transfer-Encoding: chunked\r\n\r\n"
            payload = f"{len(body):x}\r\n".encode() + body + b"\r\n"
        sock = socket.create_connection((worker.host, worker.port),
                                        source_address=(source, 0))
        try:
            sock.sendall(head.encode() + payload)
            # The body is arriving: spooled to an unlinked file on the state tmpfs.
            grown = wait_for(lambda: used_kib(worker.state_dir) < baseline + 1000, within=5)
            assert not grown, "the first megabyte never reached the spool"
            assert spool_fds(worker), "no spool file while the upload was in flight"
        finally:
            sock.close()

        assert wait_for(lambda: spool_fds(worker), within=2.0) == []
        assert wait_for(lambda: used_kib(worker.state_dir) > baseline + 64, within=2.0) is False
        assert os.listdir(os.path.join(worker.state_dir, "uploads")) == []
        assert os.listdir(os.path.join(worker.state_dir, "jobs")) == []
        assert worker.mounts() == [os.path.realpath(worker.state_dir)]
        stats = worker.get("/stats", source=source).json()
        assert stats["your_quota"]["jobs_this_hour"] == 0, stats
        assert stats["system"]["queue_length"] == 0 and stats["system"]["active_jobs"] == 0
        # And the worker still takes uploads.
        job_id = worker.submit(TRIVIAL["files"], TRIVIAL["manifest"], source=source)
        assert worker.wait(job_id)["execution_metadata"]["reason"] == "completed"


# -- a full disk is the job's own problem -------------------------------------------------------


FILLER = """
import os, sys, time
path = sys.argv[1]
block = b"x" * (1 << 20)
written = 0
with open(path, "wb") as f:
    while True:
        try:
            f.write(block)
            f.flush()
        except OSError as e:
            print("stopped after", written >> 20, "MiB:", os.strerror(e.errno), file=sys.stderr)
            sys.exit(1)
        written += len(block)
"""

BYSTANDER = """
import os, time
data = os.urandom(1 << 20)
for where in ("/job/mine.bin", "/tmp/mine.bin"):
    with open(where, "wb") as f:
        f.write(data)
open("/job/started", "w").close()
time.sleep(float(os.environ["HOLD"]))
for where in ("/job/mine.bin", "/tmp/mine.bin"):
    with open(where, "rb") as f:
        assert f.read() == data, where
print("bystander ok")
"""


def iso_seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["/job/fill", "/tmp/fill", "/dev/shm/fill"])
def test_a_job_that_fills_its_disk_fails_alone_while_a_job_beside_it_completes(
        target: str) -> None:
    with run_worker(*RAISED, "--max-concurrent", "2") as worker:
        bystander = worker.submit({"b.py": BYSTANDER},
                                  {"entrypoint": "b.py", "env": {"HOLD": "3"}, "timeout": 60})
        deadline = time.monotonic() + 20
        while worker.get(f"/status/{bystander}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Memory above the tmpfs size: tmpfs pages count against the job's memory cgroup,
        # and this test is about the disk, not the memory limit.
        filler = worker.submit({"fill.py": FILLER},
                               {"entrypoint": "fill.py", "args": [target], "memory_mb": 1024,
                                "timeout": 60})
        # Listing and hashing its 512 MiB output (off the reactor) takes a while when slow.
        full = worker.wait(filler, timeout=scaled(60))
        logs = worker.get(f"/logs/{filler}").json()
        reason = full["execution_metadata"]["reason"]
        assert reason in ("disk_limit", "exit_nonzero"), (full, logs)
        assert "No space left on device" in logs["stderr"], logs
        if target.startswith("/job/"):
            assert reason == "disk_limit", full
            assert "stopped after 51" in logs["stderr"], logs  # 51x MiB of 512 MiB

        # The worker is not full: another job is accepted and runs while the full one's
        # data is still held.
        other = worker.submit(TRIVIAL["files"], TRIVIAL["manifest"])
        assert worker.wait(other)["execution_metadata"]["reason"] == "completed"

        done = worker.wait(bystander, timeout=scaled(30))
        out = worker.get(f"/logs/{bystander}").json()
        assert done["execution_metadata"]["reason"] == "completed", (done, out)
        assert out["stdout"] == "bystander ok\n", out
        # They really ran at the same time.
        assert iso_seconds(done["started_at"]) < iso_seconds(full["finished_at"])
        assert iso_seconds(full["started_at"]) < iso_seconds(done["finished_at"])

        assert worker.delete(f"/jobs/{filler}").status == 200
        assert worker.delete(f"/jobs/{bystander}").status == 200
        assert worker.delete(f"/jobs/{other}").status == 200
        deadline = time.monotonic() + 5  # unmounted off the reactor thread, right after
        while worker.mounts() != [os.path.realpath(worker.state_dir)]:
            assert time.monotonic() < deadline, worker.mounts()
            time.sleep(0.02)
