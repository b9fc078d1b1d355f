"""Hostile HTTP input and hostile archives against a real worker, over a real socket.

Every case gets a clear 4xx, leaves no file outside (or inside) the job area,
and the worker keeps serving: each test checks ``/health`` afterwards.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.worker import Worker, multipart, run_worker

pytestmark = pytest.mark.timeout(120)
UPLOAD_LIMIT = 2_000_000  # --max-upload-mb 2


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker("--max-upload-mb", "2", "--output-cap-mb", "1", "--max-active-per-ip", "50",
                    "--jobs-per-hour", "1000", "--cpu-quota", "1000") as w:
        yield w


@pytest.fixture(autouse=True)
def still_serving(worker: Worker) -> Iterator[None]:
    yield
    assert worker.healthy(), worker.log()[-3000:]
    assert no_job_data(worker), os.listdir(os.path.join(worker.state_dir, "jobs"))


def no_job_data(worker: Worker, within: float = 2.0) -> bool:
    """No job directory and no spooled upload is left (every case here is refused)."""
    deadline = time.monotonic() + within
    while True:
        jobs = os.listdir(os.path.join(worker.state_dir, "jobs"))
        uploads = os.listdir(os.path.join(worker.state_dir, "uploads"))
        if not jobs and not uploads:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def raw_exchange(worker: Worker, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, half-close, return everything the worker answers before closing."""
    with socket.create_connection((worker.host, worker.port), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_and_json(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


# -- HTTP input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                 id="one-huge-header"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\n"
                 + b"".join(b"X-H%d: v\r\n" % i for i in range(600)) + b"\r\n",
                 id="too-many-headers"),
    pytest.param(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n",
                 id="non-numeric-content-length"),
    pytest.param(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                 id="negative-content-length"),
    pytest.param(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                 b"Content-Length: 4\r\n\r\nabcd", id="conflicting-content-lengths"),
    pytest.param(b"POST /submit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\nabc\r\n0\r\n\r\n", id="malformed-chunked"),
    pytest.param(b"GARBAGE\r\n\r\n", id="bad-request-line"),
    pytest.param(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="huge-path"),
])
def test_malformed_http_is_a_json_400_and_the_worker_keeps_serving(
        worker: Worker, request_bytes: bytes) -> None:
    status, body = status_and_json(raw_exchange(worker, request_bytes))
    assert status == 400
    assert body["error"] == "Bad request"


def test_a_path_that_is_not_utf8_is_a_json_400(worker: Worker) -> None:
    reply = worker.get("/status/job-%ff%fe")
    assert reply.status == 400 and reply.json()["error"] == "Invalid URL"
    assert reply.header("access-control-allow-origin") == "*"


def test_malformed_multipart_is_400(worker: Worker) -> None:
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.py\"\r\n\r\nx"
    reply = worker.request("POST", "/submit", body,
                           {"Content-Type": "multipart/form-data; boundary=xyz"})
    assert reply.status == 400 and "multipart" in reply.json()["details"]


@pytest.mark.parametrize("body,field", [
    (b'{"manifest": {"entrypoint": "a.py", "timeout": 999999}, "files": {"a.py": ""}}',
     "timeout"),
    (b'{"manifest": {"entrypoint": "a.py", "memory_mb": "lots"}, "files": {"a.py": ""}}',
     "memory_mb"),
    (b'{"manifest": {"entrypoint": "a.py", "colour": 1}, "files": {"a.py": ""}}', "colour"),
    (b'{"manifest": {"entrypoint": "../a.py"}, "files": {"a.py": ""}}', "entrypoint"),
    (b'{"manifest": {"entrypoint": "a\\u0000.py"}, "files": {"a.py": ""}}', "entrypoint"),
    (b'{"manifest": {"entrypoint": "\\udcff.py"}, "files": {"a.py": ""}}', "entrypoint"),
    (b'not json', "body"),
])
def test_a_bad_manifest_over_http_is_400_naming_the_field(worker: Worker, body: bytes,
                                                         field: str) -> None:
    reply = worker.request("POST", "/submit", body, {"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == field


def test_a_manifest_form_field_that_is_not_json_is_400(worker: Worker) -> None:
    reply = worker.post_multipart("/submit", {"manifest": "{nope"}, [("a.py", b"")])
    assert reply.status == 400 and reply.json()["field"] == "manifest"


def test_an_unknown_content_type_is_415(worker: Worker) -> None:
    reply = worker.request("POST", "/submit", b"print(1)", {"Content-Type": "text/plain"})
    assert reply.status == 415


# -- 413 -----------------------------------------------------------------------------------------


def test_an_over_limit_content_length_is_413_before_any_body_is_sent(worker: Worker) -> None:
    _, content_type = multipart({}, [("a.py", b"")])
    with socket.create_connection((worker.host, worker.port), timeout=5) as sock:
        sock.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     + content_type.encode() + b"\r\nContent-Length: 500000000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        started = time.monotonic()
        raw = b""
        while chunk := sock.recv(65536):  # the worker answers and closes; no body was sent
            raw += chunk
    assert time.monotonic() - started < 3
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]  # no "100 Continue" before it
    _, answer = status_and_json(raw)
    assert answer["error"] == "Upload too large"
    assert str(UPLOAD_LIMIT) in answer["details"]


def test_a_chunked_body_is_cut_off_with_413_once_past_the_limit(worker: Worker) -> None:
    _, content_type = multipart({}, [])
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection((worker.host, worker.port), timeout=5) as sock:
        sock.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     + content_type.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 50 * UPLOAD_LIMIT:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            raw = sock.recv(65536)
        except ConnectionResetError:
            raw = b""
    # The worker stopped reading soon after the limit, far before the client gave up.
    assert sent < 10 * UPLOAD_LIMIT, sent
    if raw:  # the answer can be lost to the reset of a connection closed mid-upload
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]


def test_an_upload_just_over_the_limit_with_a_real_body_is_413(worker: Worker) -> None:
    body, content_type = multipart({"manifest": '{"entrypoint": "a.py"}'},
                                   [("a.py", b""), ("big.bin", b"\0" * UPLOAD_LIMIT)])
    with socket.create_connection((worker.host, worker.port), timeout=5) as sock:
        sock.sendall(b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     + content_type.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n")
        time.sleep(0.2)  # the answer comes from the headers alone
        raw = sock.recv(65536)
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    assert status_and_json(raw)[1]["details"].endswith(f"Content-Length is {len(body)}")


# -- archives (security.md) ----------------------------------------------------------------------


def tar_with(*members: tuple[tarfile.TarInfo, bytes | None], gz: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as tar:
        job = tarfile.TarInfo("job.json")
        manifest = b'{"entrypoint": "a.py"}'
        job.size = len(manifest)
        tar.addfile(job, io.BytesIO(manifest))
        entry = tarfile.TarInfo("a.py")
        tar.addfile(entry, io.BytesIO(b""))
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "",
           data: bytes | None = b"boom") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data if kind == tarfile.REGTYPE else None


ESCAPE = f"sandrun-escape-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("members,named", [
    pytest.param([member(f"../../../../../../tmp/{ESCAPE}")],
                 f"../../../../../../tmp/{ESCAPE}", id="dotdot"),
    pytest.param([member(f"/tmp/{ESCAPE}")], f"/tmp/{ESCAPE}", id="absolute"),
    pytest.param([member("link", tarfile.SYMTYPE, "/tmp"), member(f"link/{ESCAPE}")], "link",
                 id="symlink-then-through-it"),
    pytest.param([member("hard", tarfile.LNKTYPE, "/etc/passwd")], "hard", id="hardlink"),
    pytest.param([member("null", tarfile.CHRTYPE)], "null", id="char-device"),
    pytest.param([member("disk", tarfile.BLKTYPE)], "disk", id="block-device"),
    pytest.param([member("fifo", tarfile.FIFOTYPE)], "fifo", id="fifo"),
    pytest.param([member("a.py")], "a.py", id="duplicate"),
])
def test_an_archive_attack_is_400_naming_the_member_and_writes_nothing_outside(
        worker: Worker, members: list[tuple[tarfile.TarInfo, bytes | None]],
        named: str) -> None:
    reply = worker.post_multipart("/submit", files=[("job.tar.gz", tar_with(*members))])
    assert reply.status == 400, reply.body
    body = reply.json()
    assert body["member"] == named, body
    assert not os.path.exists(f"/tmp/{ESCAPE}")
    assert not os.path.exists(os.path.join(worker.state_dir, ESCAPE))


def gzip_members(*parts: bytes) -> bytes:
    out = []
    for part in parts:
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        out.append(c.compress(part) + c.flush())
    return b"".join(out)


def test_a_decompression_bomb_is_400_before_it_is_written(worker: Worker) -> None:
    head = b""
    for name, data in (("job.json", b'{"entrypoint": "a.py"}'), ("a.py", b"")):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        head += info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)
    bomb_info = tarfile.TarInfo("bomb.bin")
    bomb_info.size = 600 * 1024 * 1024  # over the 500 MB limit after decompression
    head += bomb_info.tobuf(format=tarfile.GNU_FORMAT)
    zeros = gzip_members(b"\0" * (1 << 20))  # one MiB of zeros, 1 kB compressed
    bomb = gzip_members(head) + zeros * 600 + gzip_members(b"\0" * 1024)
    assert len(bomb) < UPLOAD_LIMIT
    started = time.monotonic()
    reply = worker.post_multipart("/submit", files=[("bomb.tar.gz", bomb)])
    assert reply.status == 400, reply.body
    assert reply.json()["member"] == "bomb.bin"
    assert time.monotonic() - started < 10


def test_a_hundred_thousand_members_are_refused(worker: Worker) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("")
        for i in range(100_000):
            info.name = f"f{i}"
            tar.addfile(info)
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    archive = c.compress(out.getvalue()) + c.flush()
    assert len(archive) < UPLOAD_LIMIT
    reply = worker.post_multipart("/submit", {"manifest": '{"entrypoint": "f0"}'},
                                  [("many.tar.gz", archive)])
    assert reply.status == 400
    assert "10000" in reply.json()["details"]


# -- memory ------------------------------------------------------------------------------------


def test_output_written_a_byte_at_a_time_does_not_grow_the_worker(worker: Worker) -> None:
    before = worker.rss_kib()
    job_id = worker.submit({"main.py": "import os\nwhile True:\n    os.write(1, b'x')\n"},
                           {"timeout": 30})
    status = worker.wait(job_id)
    assert status["execution_metadata"]["reason"] == "output_limit"
    growth_mib = (worker.rss_kib() - before) / 1024
    # Each read of the pipe as a Python object of its own would be over 10 MiB here
    # (and ten times that at the default cap), kept for as long as the job is.
    assert growth_mib < 4, f"the worker's RSS grew by {growth_mib:.1f} MiB"
    logs = worker.get(f"/logs/{job_id}").json()
    assert logs["stdout"] == "x" * (1 << 20) and logs["truncated"]["stdout"] is True
    assert worker.delete(f"/jobs/{job_id}").status == 200


@pytest.mark.timeout(120)
def test_a_100_mb_upload_is_streamed_and_the_worker_stays_small() -> None:
    with run_worker("--max-upload-mb", "100") as worker:
        baseline = worker.rss_kib(peak=True)
        big = os.urandom(1 << 20) * 94  # 94 MiB: incompressible in spirit, cheap to make
        reply = worker.post_multipart("/submit", {"manifest": '{"entrypoint": "main.sh"}'},
                                      [("main.sh", b"wc -c < big.bin"), ("big.bin", big)],
                                      timeout=120)
        assert reply.status == 200, reply.body
        status = worker.wait(reply.json()["job_id"])
        assert status["status"] == "completed"
        assert worker.get(f"/logs/{status['job_id']}").json()["stdout"].strip() == str(len(big))
        del big
        growth_mib = (worker.rss_kib(peak=True) - baseline) / 1024
        assert growth_mib < 40, f"the worker's peak RSS grew by {growth_mib:.0f} MiB"
