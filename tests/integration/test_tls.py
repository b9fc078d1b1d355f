"""TLS end to end: a worker and a coordinator listening on ``ssl:`` endpoints, the
coordinator trusting workers only through ``--worker-cacert``.

The test makes its own CA and certificates (``cryptography``): the worker's and
the coordinator's for ``localhost`` and 127.0.0.1, signed by the pool's CA; a
second CA the worker's certificate does not chain to.  Real processes, real
jobs, over https:// and wss:// only.

Runs as root (the worker mounts tmpfs and makes cgroups).  About 15 s.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.test_coordinator_pool import (
    CoordinatorProcess,
    PoolWorker,
    free_port,
    keygen,
    wait_for,
)
from tests.integration.worker import why_no_worker

pytestmark = pytest.mark.skipif(why_no_worker() is not None, reason=why_no_worker() or "")
POOL_FLAGS = ("--health-interval", "0.5", "--health-timeout", "2")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(directory: str, name: str) -> tuple[str, Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    path = os.path.join(directory, f"{name}.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: str, name: str, ca_key: Any,
                     ca_cert: x509.Certificate) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1 signed by the CA; (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = (os.path.join(directory, f"{name}.{kind}") for kind in ("crt", "key"))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def ssl_listen(port: int, cert: str, key: str) -> str:
    return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def https(port: int, cafile: str, method: str = "GET", path: str = "/",
          body: bytes | None = None) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json"} if body else {})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


@dataclass
class TLSPool:
    scratch: str
    ca: str
    other_ca: str
    worker: PoolWorker
    worker_id: str
    cert: str
    key: str


@pytest.fixture(scope="module")
def tls_pool() -> Iterator[TLSPool]:
    scratch = tempfile.mkdtemp(prefix="sandrun-tls-")
    os.chmod(scratch, 0o755)
    ca, ca_key, ca_cert = make_ca(scratch, "pool-ca")
    other_ca, _, _ = make_ca(scratch, "other-ca")
    cert, key = make_server_cert(scratch, "worker", ca_key, ca_cert)
    worker_key = os.path.join(scratch, "w.pem")
    worker_id = keygen(worker_key)
    worker = PoolWorker("tls-worker", scratch, worker_key)
    listen = worker.argv.index("--listen") + 1
    worker.argv[listen] = ssl_listen(worker.port, cert, key)
    worker.start()
    try:
        wait_for(lambda: _healthy(worker.port, ca) or not worker.running(), 30,
                 "worker healthy over https")
        assert worker.running(), worker.log()
        yield TLSPool(scratch, ca, other_ca, worker, worker_id, cert, key)
        assert worker.stop() == 0, worker.log()
    finally:
        if worker.running():
            worker.kill()
        for point in reversed(worker.mounts()):
            subprocess.run(["umount", "-l", point], check=False)
        from bench.common import remove_worker_cgroup

        remove_worker_cgroup(worker.cgroup)
        shutil.rmtree(scratch, ignore_errors=True)


def _healthy(port: int, cafile: str) -> bool:
    try:
        return https(port, cafile, path="/health")[0] == 200
    except OSError:
        return False


def _answers(port: int, cafile: str) -> bool:
    try:
        return https(port, cafile, path="/pool")[0] == 200
    except OSError:
        return False


def coordinator(pool: TLSPool, name: str, cacert: str) -> CoordinatorProcess:
    workers = os.path.join(pool.scratch, f"{name}-workers.json")
    with open(workers, "w") as f:
        json.dump([{"name": "w", "worker_id": pool.worker_id,
                    "endpoint": f"https://localhost:{pool.worker.port}"}], f)
    process = CoordinatorProcess(pool.scratch, workers, POOL_FLAGS + ("--worker-cacert", cacert),
                                 name=name)
    listen = process.argv.index("--listen") + 1
    process.port = free_port()
    process.argv[listen] = ssl_listen(process.port, pool.cert, pool.key)
    process.start()
    wait_for(lambda: _answers(process.port, pool.ca) or not process.running(), 30,
             f"{name} answering over https")
    assert process.running(), process.log()
    return process


def test_the_worker_answers_only_tls_with_its_certificate(tls_pool: TLSPool) -> None:
    assert https(tls_pool.worker.port, tls_pool.ca, path="/health")[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        https(tls_pool.worker.port, tls_pool.other_ca, path="/health")
    plain = http.client.HTTPConnection("127.0.0.1", tls_pool.worker.port, timeout=5)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/health")
        plain.getresponse().read()
    plain.close()


def test_a_coordinator_trusting_the_pool_ca_runs_jobs_on_an_https_worker_and_streams_wss(
        tls_pool: TLSPool) -> None:
    import websockets.sync.client

    process = coordinator(tls_pool, "trusting", tls_pool.ca)
    try:
        wait_for(lambda: https(process.port, tls_pool.ca, path="/pool")[1]["workers"][0]
                 ["healthy"], 20, "the https worker healthy in /pool")
        code = "import time\nfor i in range(3):\n    print('tls', i, flush=True)\n" \
               "    time.sleep(0.2)\n"
        body = json.dumps({"manifest": {"entrypoint": "main.py"},
                           "files": {"main.py": code}}).encode()
        status, answer = https(process.port, tls_pool.ca, "POST", "/submit", body)
        assert status == 200, answer
        job = answer["job_id"]
        context = ssl.create_default_context(cafile=tls_pool.ca)
        frames = []
        with websockets.sync.client.connect(
                f"wss://localhost:{process.port}/logs/{job}/stream?format=json",
                ssl=context, open_timeout=10) as ws:
            for message in ws:
                frames.append(json.loads(message))
        output = "".join(f["data"] for f in frames if f["type"] == "output")
        assert output == "tls 0\ntls 1\ntls 2\n", frames
        assert frames[-1]["type"] == "done" and frames[-1]["status"] == "completed"
        assert https(process.port, tls_pool.ca, path=f"/status/{job}")[1]["status"] \
            == "completed"
        assert process.stop() == 0, process.log()
    finally:
        if process.running():
            process.kill()


def test_a_coordinator_with_another_ca_never_uses_the_worker_and_says_why(
        tls_pool: TLSPool) -> None:
    process = coordinator(tls_pool, "distrusting", tls_pool.other_ca)
    try:
        def reason() -> str:
            entry = https(process.port, tls_pool.ca, path="/pool")[1]["workers"][0]
            assert not entry["healthy"], entry
            return str(entry.get("last_error") or entry.get("reason") or "")

        why = wait_for(reason, 20, "a reason in /pool")
        assert "certificate" in why.lower() or "ssl" in why.lower(), why
        body = json.dumps({"manifest": {"entrypoint": "main.py"},
                           "files": {"main.py": "print(1)"}}).encode()
        assert https(process.port, tls_pool.ca, "POST", "/submit", body)[0] == 503
        assert process.stop() == 0, process.log()
    finally:
        if process.running():
            process.kill()


def test_a_bad_cacert_file_stops_the_coordinator_with_one_line(tls_pool: TLSPool) -> None:
    bogus = os.path.join(tls_pool.scratch, "not-a-cert.pem")
    with open(bogus, "w") as f:
        f.write("hello\n")
    process = CoordinatorProcess(tls_pool.scratch, os.path.join(tls_pool.scratch, "x.json"),
                                 ("--worker-cacert", bogus), name="bogus")
    with open(os.path.join(tls_pool.scratch, "x.json"), "w") as f:
        f.write("[]")
    process.start()
    assert process.proc is not None
    assert process.proc.wait(30) != 0
    log = process.log().strip()
    expected = f"sandrun-coordinator: cannot start: --worker-cacert {bogus}: no PEM certificate in it"
    assert log.splitlines() == [expected], log


def test_the_sandrun_command_trusts_a_worker_through_cacert_or_ssl_cert_file_or_insecure(
        tls_pool: TLSPool, tmp_path: Any) -> None:
    import sys

    from tests.integration.worker import REPO

    script = tmp_path / "hi.py"
    script.write_text("print('over tls')\n")
    url = f"https://localhost:{tls_pool.worker.port}"
    base = {k: v for k, v in os.environ.items() if k not in ("SANDRUN_URL", "SSL_CERT_FILE")}
    base["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")

    def sandrun(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandrun", "--server", url, *argv],
                              env={**base, **env}, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, check=False)

    untrusted = sandrun("run", str(script))
    assert untrusted.returncode == 69 and untrusted.stderr.count("\n") == 1, untrusted.stderr
    assert "certificate" in untrusted.stderr and "--cacert" in untrusted.stderr
    for ran in (sandrun("--cacert", tls_pool.ca, "run", str(script)),
                sandrun("run", str(script), SSL_CERT_FILE=tls_pool.ca),
                sandrun("run", str(script), "--insecure")):
        assert ran.returncode == 0 and ran.stdout == "over tls\n", ran.stderr
