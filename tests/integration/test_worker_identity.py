"""Worker identity end to end: keygen, a signing worker, ``sandrun verify`` on its /status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sandrun import identity as ident
from tests.integration.worker import REPO, Worker, run_worker, why_no_worker

pytestmark = pytest.mark.timeout(60)


def sandrun(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandrun", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("key") / "worker.pem")
    made = sandrun("keygen", "--out", path)
    assert made.returncode == 0, made.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    return path, made.stdout.strip()


@pytest.fixture(scope="module")
def worker(key: tuple[str, str]) -> Iterator[Worker]:
    with run_worker("--worker-key", key[0]) as w:
        yield w


def verify(status: dict[str, Any], worker_id: str, tmp_path: Any) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"status-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(status))
    return sandrun("verify", str(path), "--worker-id", worker_id)


def test_the_worker_reports_its_id(worker: Worker, key: tuple[str, str]) -> None:
    assert worker.get("/").json()["worker_id"] == key[1]
    assert worker.get("/health").json()["worker_id"] == key[1]


def test_a_finished_jobs_status_verifies_with_the_cli_and_tampering_fails(
        worker: Worker, key: tuple[str, str], tmp_path: Any) -> None:
    job_id = worker.submit({"main.py": "open('r.txt', 'w').write('42')\nprint('ok')\n"},
                           {"outputs": ["r.txt"]})
    status = worker.wait(job_id)
    assert status["status"] == "completed"
    meta = status["worker_metadata"]
    assert meta["worker_id"] == key[1] and meta["signature"] and meta["signed"]
    signed = json.loads(meta["signed"])
    assert signed["job_id"] == job_id and signed["job_hash"] == status["job_hash"]
    assert signed["outputs"] == {"r.txt": status["output_files"]["r.txt"]["sha256"]}

    ok = verify(status, key[1], tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "valid", (ok.stdout, ok.stderr)

    def tampered(change: Any) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(status))
        change(copy)
        return copy

    for change in (
        lambda s: s["execution_metadata"].update(exit_code=1),
        lambda s: s.update(status="failed"),
        lambda s: s.update(job_id=s["job_id"][:-1] + "x"),
        lambda s: s.update(job_hash="0" * 64),
        lambda s: s["output_files"]["r.txt"].update(sha256="0" * 64),
        lambda s: s["execution_metadata"].update(cpu_seconds=0),
    ):
        bad = verify(tampered(change), key[1], tmp_path)
        assert bad.returncode == 76 and bad.stdout.startswith("INVALID"), bad.stdout
    other = ident.WorkerIdentity.generate().worker_id
    assert verify(status, other, tmp_path).returncode == 76


def test_health_with_a_nonce_is_signed(worker: Worker, key: tuple[str, str]) -> None:
    body = worker.get("/health?nonce=fresh-123").json()
    assert ident.verify_health(body, key[1], "fresh-123", time.time())
    assert not ident.verify_health(body, key[1], "fresh-124", time.time())


def test_without_a_key_the_worker_is_anonymous() -> None:
    with run_worker() as worker:
        assert worker.get("/").json()["worker_id"] is None
        health = worker.get("/health?nonce=n").json()
        assert health["worker_id"] is None and "signature" not in health
        status = worker.wait(worker.submit({"a.sh": "true"}))
        assert status["worker_metadata"] == {"worker_id": None, "signature": None,
                                             "signed": None}


def refused_start(key_path: str, tmp_path: Any) -> subprocess.CompletedProcess[str]:
    state = str(tmp_path / "state")
    done = sandrun("serve", "--state-dir", state, "--listen", "127.0.0.1:0",
                   "--worker-key", key_path, timeout=30)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert not os.path.ismount(state)
    return done


def test_a_world_readable_key_is_refused_at_start(key: tuple[str, str], tmp_path: Any) -> None:
    reason = why_no_worker()
    if reason is not None:
        pytest.skip(reason)
    loose = tmp_path / "loose.pem"
    with open(key[0], "rb") as f:
        loose.write_bytes(f.read())
    os.chmod(loose, 0o644)
    done = refused_start(str(loose), tmp_path)
    assert "worker key" in done.stderr and "readable" in done.stderr, done.stderr


def test_an_rsa_key_is_refused_at_start(tmp_path: Any) -> None:
    reason = why_no_worker()
    if reason is not None:
        pytest.skip(reason)
    rsa = tmp_path / "rsa.pem"
    made = subprocess.run(["openssl", "genpkey", "-algorithm", "rsa", "-pkeyopt",
                           "rsa_keygen_bits:1024", "-out", str(rsa)], capture_output=True,
                          check=False)
    if made.returncode != 0:
        pytest.skip("no openssl")
    os.chmod(rsa, 0o600)
    done = refused_start(str(rsa), tmp_path)
    assert "worker key" in done.stderr and "Ed25519" in done.stderr, done.stderr


def test_a_missing_key_is_refused_at_start(tmp_path: Any) -> None:
    reason = why_no_worker()
    if reason is not None:
        pytest.skip(reason)
    done = refused_start(str(tmp_path / "nope.pem"), tmp_path)
    assert "worker key" in done.stderr


def test_verify_fetches_a_job_id_from_the_server_and_checks_it(
        worker: Worker, key: tuple[str, str]) -> None:
    job_id = worker.submit({"main.py": "print('signed')\n"})
    assert worker.wait(job_id)["status"] == "completed"
    ok = sandrun("verify", job_id, "--worker-id", key[1], "--server", worker.url)
    assert ok.returncode == 0 and ok.stdout.strip() == "valid", (ok.stdout, ok.stderr)
    other = ident.WorkerIdentity.generate().worker_id
    wrong = sandrun("verify", job_id, "--worker-id", other, "--server", worker.url)
    assert wrong.returncode == 76 and wrong.stdout.startswith("INVALID"), wrong.stdout
    missing = sandrun("verify", "job-" + "A" * 24, "--worker-id", key[1], "--server", worker.url)
    assert missing.returncode == 1 and "cannot fetch" in missing.stderr
