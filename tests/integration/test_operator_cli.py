"""The operator's commands as run from a shell: ``sandrun serve``, ``keygen``, the coordinator."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .worker import REPO, run_worker, why_no_worker

pytestmark = pytest.mark.timeout(60)


def command(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL,
                          check=False)


def test_serve_on_a_port_in_use_says_so_in_one_line_and_exits_1(tmp_path: Path) -> None:
    reason = why_no_worker()
    if reason is not None:
        pytest.skip(reason)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = command("sandrun", "serve", "--listen", f"127.0.0.1:{port}",
                       "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "sandrun:" in line]
    expected = f"sandrun: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert errors == [expected], done.stderr
    assert "Traceback" not in done.stderr


def test_the_coordinator_prints_its_version_like_the_worker() -> None:
    worker = command("sandrun", "--version")
    coordinator = command("coordinator", "--version")
    assert worker.returncode == coordinator.returncode == 0
    version = worker.stdout.split()[-1]
    assert coordinator.stdout.strip() == f"sandrun-coordinator {version}"


def test_keygen_show_prints_the_worker_id_of_an_existing_key(tmp_path: Path) -> None:
    path = str(tmp_path / "worker.pem")
    made = command("sandrun", "keygen", "--out", path)
    assert made.returncode == 0, made.stderr
    shown = command("sandrun", "keygen", "--show", path)
    assert shown.returncode == 0 and shown.stdout == made.stdout
    missing = command("sandrun", "keygen", "--show", str(tmp_path / "none.pem"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


_REPR = re.compile(r"object at 0x|IPv[46]Address\(|UNIXAddress\(|<[a-z_.]+\.[A-Z]\w+ ")


def test_the_workers_and_the_coordinators_logs_show_addresses_not_python_objects(
        tmp_path: Path) -> None:
    with run_worker() as worker:
        assert worker.get("/").status == 200
        log = worker.log()
    assert re.search(r"sandrun worker listening on 127\.0\.0\.1:\d+ ", log), log
    assert not _REPR.search(log), log

    workers = tmp_path / "workers.json"
    workers.write_text("[]")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--workers", str(workers),
         "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, cwd=REPO)
    try:
        assert coordinator.stdout is not None
        line = ""
        for line in coordinator.stdout:
            if "listening on" in line:
                break
    finally:
        coordinator.terminate()
        rest, _ = coordinator.communicate(timeout=20)
    assert f"sandrun coordinator listening on 127.0.0.1:{port}: 0 of 0 workers" in line, line
    assert not _REPR.search(line + rest), line + rest
