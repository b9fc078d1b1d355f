"""The worker process itself: start-up, graceful shutdown, and what its log may hold."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from typing import Any

import pytest

from bench.common import in_cgroup, remove_worker_cgroup, worker_cgroup
from tests.integration.worker import REPO, job_processes, mounts_under, run_worker, why_no_worker

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_worker_killing_running_jobs_and_removing_every_mount(
        signum: int) -> None:
    with run_worker("--max-concurrent", "2") as worker:
        job_id = worker.submit({"main.sh": "sleep 100 & sleep 100"}, {"timeout": 100})
        queued = worker.submit({"main.sh": "sleep 100"}, {"timeout": 100})
        worker.wait(job_id, until=("running",))
        deadline = time.monotonic() + 5
        while len(job_processes(worker)) < 3:
            assert time.monotonic() < deadline, job_processes(worker)
            time.sleep(0.05)
        everything = worker.children()
        assert len(worker.mounts()) >= 3  # the state tmpfs and one per job
        worker.process.send_signal(signum)
        assert worker.stop() == 0, worker.log()
        assert worker.mounts() == []
        assert [pid for pid in everything if os.path.exists(f"/proc/{pid}")] == []
        assert f"job {job_id}" in worker.log() and f"job {queued}" in worker.log()
        assert "Traceback" not in worker.log(), worker.log()


def test_the_log_names_job_ids_but_holds_no_job_content() -> None:
    marker = f"MARKER{uuid.uuid4().hex}"
    with run_worker() as worker:
        code = (f"import sys\nprint('{marker} out')\nprint('{marker} err', file=sys.stderr)\n"
                f"open('{marker}.txt', 'w').write('x')\n")
        job_id = worker.submit({"main.py": code},
                               {"args": [marker], "env": {"SECRET": marker}, "stdin": marker})
        status = worker.wait(job_id)
        assert status["status"] == "completed"
        assert marker in worker.get(f"/logs/{job_id}").json()["stdout"]
        assert worker.get(f"/download/{job_id}/{marker}.txt").status == 200
        assert worker.get(f"/download/{job_id}/{marker}.missing").status == 404
        assert worker.get(f"/{marker}").status == 404
        assert worker.get(f"/health?nonce={marker}").status == 200
        bad = worker.post_json("/submit", {"manifest": {"entrypoint": f"{marker}.py"},
                                           "files": {"a.py": ""}})
        assert bad.status == 400
        failing = worker.submit({"main.py": f"import {marker}"})
        assert worker.wait(failing)["status"] == "failed"
        assert worker.get(f"/download/{job_id}").status == 200
        worker.stop()
        log = worker.log()
    assert job_id in log and failing in log
    assert marker not in log, [line for line in log.splitlines() if marker in line]
    assert urllib.parse.quote(marker) not in log


def test_a_worker_that_cannot_listen_exits_non_zero_and_leaves_no_mount() -> None:
    reason = why_no_worker()
    if reason is not None:
        pytest.skip(reason)
    with socket.socket() as taken, tempfile.TemporaryDirectory() as scratch:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = os.path.join(scratch, "state")
        cgroup = worker_cgroup(f"lifecycle-{os.path.basename(scratch)}")
        done = subprocess.run(
            in_cgroup([sys.executable, "-m", "sandrun", "serve", "--state-dir", state,
                       "--listen", f"127.0.0.1:{port}"], cgroup),
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        remove_worker_cgroup(cgroup)
        assert done.returncode != 0
        assert "Address already in use" in done.stderr
        assert mounts_under(state) == []


def test_a_state_dir_left_mounted_by_a_crashed_worker_is_cleaned_and_resized(
        tmp_path: Any) -> None:
    reason = why_no_worker()
    if reason is not None:
        pytest.skip(reason)
    state = str(tmp_path / "state")
    os.makedirs(state)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", state], check=True)
    try:
        stale = os.path.join(state, "jobs", "job-stale")
        os.makedirs(stale)
        with run_worker("--max-upload-mb", "5", state_dir=state) as worker:
            assert not os.path.exists(stale)
            assert "1 stale job directories removed" in worker.log()
            # A 3 MB upload spools through the state tmpfs: it was resized from 1 MB.
            reply = worker.post_multipart("/submit", {"manifest": '{"entrypoint": "a.sh"}'},
                                          [("a.sh", b"wc -c < big"), ("big", b"\0" * 3_000_000)])
            assert reply.status == 200, reply.body
            job_id = reply.json()["job_id"]
            assert worker.wait(job_id)["status"] == "completed"
            assert worker.get(f"/logs/{job_id}").json()["stdout"].strip() == "3000000"
    finally:
        if mounts_under(state):
            subprocess.run(["umount", "-l", state], check=False)


@pytest.mark.timeout(60)
def test_a_second_worker_on_the_same_state_directory_refuses_to_start_and_harms_nothing() -> None:
    with run_worker() as first:
        job_id = first.submit({"main.py": "import time\ntime.sleep(2)\nprint('still here')\n"})
        cgroup = worker_cgroup(f"second-{os.path.basename(first.state_dir)}-{os.getpid()}")
        second = subprocess.run(
            in_cgroup([sys.executable, "-m", "sandrun", "serve", "--state-dir",
                       first.state_dir, "--listen", "127.0.0.1:0"], cgroup),
            cwd=REPO, capture_output=True, text=True, timeout=30)
        remove_worker_cgroup(cgroup)
        assert second.returncode != 0
        assert f"another worker is using {first.state_dir}" in second.stderr + second.stdout
        status = first.wait(job_id)
        assert status["status"] == "completed"
        assert "still here" in first.get(f"/logs/{job_id}").json()["stdout"]
