"""Hostile clients against a real worker (and a real coordinator): each attack is contained.

One test per case of ``docs/security.md`` "Hostile clients" this module covers.
Each asserts the contained outcome, not only the refusal:

- the attack is refused with a 4xx in the contract's JSON, within a generous bound;
- ``/health`` answers within 1 s throughout (probed every 50 ms from another
  address; a containment bound, not a benchmark: unprotected, these attacks held
  it for tens of seconds);
- the worker's resident memory and its state tmpfs (where uploads are spooled)
  stay within a stated bound and come back;
- the attacker's quota is returned and the next ordinary job completes.

Runs as root (a real ``sandrun serve``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, Self

import pytest

from tests import hostile_archives as ha
from tests.bodies import tar_bytes
from tests.integration.test_coordinator_pool import CoordinatorProcess, keygen, wait_for
from tests.integration.worker import Response, Worker, multipart, request, run_worker

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.0.2"
PROBE = "127.0.0.3"
CLIENT = "127.0.0.4"
HEALTH_BOUND = 1.0  # seconds: the slowest /health answer allowed while an attack runs
RSS_BOUND_KIB = 60 * 1024  # how much the worker's RSS may grow across one attack
REFUSAL_BOUND = 15.0  # seconds: a generous bound on how long a refusal may take


class HealthProbe:
    """GET /health every 50 ms from its own address while an attack runs; the slowest answer."""

    def __init__(self, url: str, source: str = PROBE) -> None:
        self.url, self.source = url, source
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                reply = request(self.url, path="/health", source=self.source, timeout=5)
                if reply.status != 200:
                    self.failures.append(f"status {reply.status}")
            except OSError as e:
                self.failures.append(repr(e))
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(0.05)

    def check(self) -> None:
        assert self.latencies, "the probe never ran"
        assert not self.failures, self.failures[:5]
        assert max(self.latencies) < HEALTH_BOUND, sorted(self.latencies)[-5:]


def state_used_bytes(worker: Worker) -> int:
    """Bytes in use on the worker's state tmpfs (spooled uploads; job mounts are apart)."""
    st = os.statvfs(worker.state_dir)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# Small caps, so that each attack reaches them cheaply.
PER_IP_CONNECTIONS = 20
MAX_CONNECTIONS = 60
HEADER_TIMEOUT = 2.0
IDLE_TIMEOUT = 4.0
MIN_UPLOAD_RATE = 1000  # bytes a second, after UPLOAD_GRACE (longer than the idle timeout)
UPLOAD_GRACE = 5.0
UPLOAD_MB = 40
RATE_FLAGS = ("--min-upload-rate", str(MIN_UPLOAD_RATE), "--upload-grace", str(UPLOAD_GRACE))
WORKER_FLAGS = ("--max-concurrent", "2", "--max-active-per-ip", "2", "--jobs-per-hour", "1000",
                "--cpu-quota", "1000", "--max-connections", str(MAX_CONNECTIONS),
                "--max-connections-per-ip", str(PER_IP_CONNECTIONS),
                "--header-timeout", str(HEADER_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT),
                "--max-upload-mb", str(UPLOAD_MB), "--max-inflight-upload-mb-per-ip",
                str(UPLOAD_MB), "--max-inflight-upload-mb", str(3 * UPLOAD_MB), *RATE_FLAGS)


@pytest.fixture(scope="module")
def scratch() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sandrun-hostile-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def worker_key(scratch: str) -> tuple[str, str]:
    """(key file, worker id) for the worker, so that a coordinator can front it."""
    path = os.path.join(scratch, "worker.pem")
    return path, keygen(path)


@pytest.fixture(scope="module")
def worker(worker_key: tuple[str, str]) -> Iterator[Worker]:
    with run_worker(*WORKER_FLAGS, "--worker-key", worker_key[0],
                    "--trusted-proxy", "127.0.0.1") as w:
        yield w


@pytest.fixture
def contained(worker: Worker) -> Iterator[None]:
    """After the test: the worker is unharmed, the attacker's quota whole, a job completes."""
    rss = worker.rss_kib()
    spooled = state_used_bytes(worker)
    yield
    assert worker.rss_kib() - rss < RSS_BOUND_KIB, (rss, worker.rss_kib())
    assert state_used_bytes(worker) - spooled < 4 * 1024 * 1024
    quota = worker.get("/stats", source=ATTACKER).json()["your_quota"]
    assert quota["active_jobs"] == 0 and quota["can_submit"], quota
    job = worker.submit({"main.py": "print('still here')"}, source=CLIENT)
    status = worker.wait(job, 60)
    assert status["status"] == "completed", status
    assert worker.get(f"/logs/{job}").json()["stdout"] == "still here\n"


def refused_upload(worker: Worker, archive: bytes, name: str = "evil.tgz") -> dict[str, Any]:
    started = time.monotonic()
    reply = worker.post_multipart("/submit", {"manifest": '{"entrypoint": "main.py"}'},
                                  [(name, archive)], source=ATTACKER)
    assert time.monotonic() - started < REFUSAL_BOUND
    return refused(reply, 400, "Invalid upload")


def refused(reply: Response, status: int, error: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:500])
    assert reply.header("content-type") == "application/json"
    body: dict[str, Any] = reply.json()
    assert body["error"] == error, body
    return body


# -- rows 1 and 2: archives that hurt the parser ------------------------------------------------


def test_a_sparse_map_claiming_millions_of_entries_is_a_quick_400_and_costs_the_worker_nothing(
        worker: Worker, contained: None) -> None:
    bomb = ha.sparse_map_bomb(4_000_000)
    assert len(bomb) < 64 * 1024  # small on the wire: the cost was all on the worker
    with HealthProbe(worker.url) as probe:
        body = refused_upload(worker, bomb)
    assert body["member"] == "evil.tgz"
    assert "GNU sparse members are not accepted" in body["details"]
    probe.check()


def test_a_truncated_sparse_map_is_a_400_naming_the_problem_not_a_500(
        worker: Worker, contained: None) -> None:
    body = refused_upload(worker, ha.truncated_sparse_map())
    assert "GNU sparse" in body["details"]


def test_a_truncated_archive_is_a_400_saying_so(worker: Worker, contained: None) -> None:
    body = refused_upload(worker, ha.truncated_member())
    assert "truncated archive" in body["details"]


def test_six_64_kib_all_digit_pax_headers_do_not_stall_health(
        worker: Worker, contained: None) -> None:
    archive = ha.digit_pax_headers(6, 64 * 1024)
    assert len(archive) < 4096
    with HealthProbe(worker.url) as probe:
        body = refused_upload(worker, archive)
        assert "an extended header of 65536 bytes" in body["details"]
        body = refused_upload(worker, ha.digit_run_pax_header())
        assert "digits" in body["details"]
    probe.check()


def unpacker_servers(worker: Worker) -> list[int]:
    return [pid for pid in worker.children() if "sandrun.api.unpacker" in _cmdline(pid)]


def test_archives_are_parsed_in_a_child_process_not_in_the_worker(
        worker: Worker, contained: None) -> None:
    """The fork server is the worker's child; each archive upload forks one short-lived child."""
    servers = unpacker_servers(worker)
    assert len(servers) == 1, [(pid, _cmdline(pid)) for pid in worker.children()]
    reply = worker.post_multipart("/submit", {"manifest": '{"entrypoint": "main.py"}'},
                                  [("job.tgz", tar_bytes({"main.py": "print(1)"}))],
                                  source=CLIENT)
    assert reply.status == 200, reply.body
    assert worker.wait(reply.json()["job_id"], 60)["status"] == "completed"
    assert unpacker_servers(worker) == servers  # no child left behind


@pytest.fixture
def fork_server_stopped(worker: Worker) -> Iterator[int]:
    """The fork server stopped (SIGSTOP): a submission sent to it would get no answer."""
    (server,) = unpacker_servers(worker)
    os.kill(server, signal.SIGSTOP)
    try:
        yield server
    finally:
        os.kill(server, signal.SIGCONT)


HOSTILE_JSON = [
    (b"[" * 200_000, "nested too deeply"),
    (b'{"manifest": {"timeout": ' + b"9" * 200_000 + b'}, "files": {"a.py": ""}}',
     "Exceeds the limit"),
    (b'{"files": {"a.py": "\xff\xfe"}}', "not valid UTF-8"),
    (b'{"files": {"a.py": ""}, "files": {"b.py": ""}}', "duplicate key"),
    (b'{"manifest": {"timeout": Infinity}, "files": {"a.py": ""}}', "Infinity is not allowed"),
]


def test_a_small_json_submission_is_parsed_without_the_fork_server(
        worker: Worker, contained: None, fork_server_stopped: int) -> None:
    job = worker.submit({"main.py": "print(1)"}, source=CLIENT, timeout=10)
    assert worker.wait(job, 60)["status"] == "completed"
    reply = worker.post_json("/run?keep=0", {"files": {"main.py": "print(2)"}}, source=CLIENT,
                             timeout=30)
    assert reply.status == 200 and reply.json()["stdout"] == "2\n", reply.body[:500]


@pytest.mark.parametrize(("body", "words"), HOSTILE_JSON,
                         ids=["deep-nesting", "huge-integer", "invalid-utf8", "duplicate-key",
                              "infinity"])
def test_hostile_small_json_is_a_400_naming_the_problem_and_health_holds(
        worker: Worker, contained: None, fork_server_stopped: int, body: bytes,
        words: str) -> None:
    with HealthProbe(worker.url) as probe:
        for path in ("/submit", "/run"):
            reply = worker.request("POST", path, body, {"Content-Type": "application/json"},
                                   source=ATTACKER, timeout=10)
            answer = refused(reply, 400, "Invalid manifest")
            assert answer["field"] == "body" and words in answer["details"], answer
    probe.check()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\x00", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# -- raw sockets: requests whose bodies are never sent -------------------------------------------


def raw_answer(host: str, port: int, head: bytes, source: str | None = None,
               timeout: float = 5.0, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (and ``body``), read one answer: status, headers, body."""
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as s:
        s.sendall(head + body)
        return read_answer(s)


def read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without an answer: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if "content-length" in headers:
        while len(rest) < int(headers["content-length"]):
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(lines[0].split()[1]), headers, rest


def post_head(path: str, length: int, content_type: str = "application/octet-stream",
              method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- row 6: bodies refused before they are read --------------------------------------------------


@pytest.mark.parametrize(("method", "path", "status", "error"), [
    ("POST", "/health", 405, "Method not allowed"),
    ("POST", "/no/such/endpoint", 404, "Not found"),
    ("GET", "/status/job-abc", 413, "Request body not allowed"),
    ("DELETE", "/jobs/job-abc", 413, "Request body not allowed"),
])
def test_a_body_sent_where_none_is_taken_is_refused_from_its_headers(
        worker: Worker, contained: None, method: str, path: str, status: int,
        error: str) -> None:
    with HealthProbe(worker.url) as probe:
        for _ in range(3):  # three 30 MB bodies: none is read, none is spooled
            started = time.monotonic()
            code, headers, body = raw_answer(worker.host, worker.port,
                                             post_head(path, 30_000_000, method=method),
                                             source=ATTACKER)
            assert time.monotonic() - started < 2  # answered without waiting for the body
            assert code == status and json.loads(body)["error"] == error
            assert headers["content-type"] == "application/json"
    probe.check()


def test_an_encoded_submit_path_is_admitted_from_its_headers_like_submit(
        worker: Worker, contained: None) -> None:
    """``/%73ubmit`` is ``/submit``: a client over its quota is refused before its body."""
    busy = "127.0.0.6"
    jobs = [worker.submit({"main.sh": "sleep 30"}, {"timeout": 30}, source=busy)
            for _ in range(2)]
    try:
        code, _, body = raw_answer(worker.host, worker.port,
                                   post_head("/%73ubmit", 30_000_000, "multipart/form-data; boundary=b"),
                                   source=busy)
        assert code == 429 and json.loads(body)["error"] == "Rate limit exceeded"
    finally:
        for job in jobs:
            worker.delete(f"/jobs/{job}")


def test_a_second_big_parallel_upload_from_one_address_is_refused_before_its_body(
        worker: Worker, contained: None) -> None:
    spooled = state_used_bytes(worker)
    size = UPLOAD_MB * 10**6 * 3 // 4  # two of these pass the per-address budget
    first = socket.create_connection((worker.host, worker.port), source_address=(ATTACKER, 0))
    try:
        first.sendall(post_head("/submit", size, "multipart/form-data; boundary=b")
                      + b"--b\r\n" + b"x" * 1_000_000)
        time.sleep(0.3)
        code, headers, body = raw_answer(
            worker.host, worker.port, post_head("/submit", size, "multipart/form-data; boundary=b"),
            source=ATTACKER)
        assert code == 429, body
        assert json.loads(body)["error"] == "Too many uploads"
        assert headers["retry-after"] == "5"
        # Another address still has its own share.
        other = socket.create_connection((worker.host, worker.port),
                                         source_address=(CLIENT, 0))
        other.settimeout(1)
        other.sendall(post_head("/submit", size, "multipart/form-data; boundary=b"))
        with pytest.raises(socket.timeout):  # waiting for its body, not refused
            other.recv(100)
        other.close()
        assert state_used_bytes(worker) - spooled < 4 * 1024 * 1024
    finally:
        first.close()
    # The first upload's share comes back once its connection is gone.
    def submitted() -> Response | None:
        reply = worker.post_multipart("/submit", {"manifest": '{"entrypoint": "main.py"}'},
                                      [("main.py", b"print(1)")], source=ATTACKER)
        return reply if reply.status == 200 else None

    reply = wait_for(submitted, 10, "the first upload's share returned")
    assert worker.wait(reply.json()["job_id"], 60)["status"] == "completed"


# -- row 5: connections --------------------------------------------------------------------------


def test_connections_past_the_per_address_cap_are_refused_and_idle_ones_time_out(
        worker: Worker, contained: None) -> None:
    fds = open_fds(worker.pid)
    socks: list[socket.socket] = []
    answers: list[bytes] = []
    with HealthProbe(worker.url) as probe:
        try:
            for i in range(200):
                socks.append(socket.create_connection((worker.host, worker.port),
                                                      source_address=(ATTACKER, 0)))
                if i % 20 == 19:  # in bursts the accept queue (backlog 50) holds
                    time.sleep(0.05)
            # Each gets one answer: 429 at once past the cap, or 408 from the header
            # deadline for the ones let in, which never send a request.
            deadline = time.monotonic() + HEADER_TIMEOUT + 5
            for s in socks:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    answers.append(s.recv(200)[:12])
                except OSError:
                    answers.append(b"")
        finally:
            for s in socks:
                s.close()
    probe.check()
    # Every connection was answered; the exact split depends on how fast the kernel hands
    # them over (one let in frees its place at its 408), the cap itself is unit-tested.
    assert set(answers) <= {b"HTTP/1.1 429", b"HTTP/1.1 408"}, answers
    assert answers.count(b"HTTP/1.1 429") >= 200 - 3 * PER_IP_CONNECTIONS, answers
    wait_for(lambda: open_fds(worker.pid) <= fds + 2, 5, "the connections' descriptors freed")


def test_the_global_connection_cap_holds_and_frees_itself(worker: Worker,
                                                         contained: None) -> None:
    socks: list[socket.socket] = []
    try:
        for i in range(MAX_CONNECTIONS + 10):  # from many addresses, under each one's cap
            socks.append(socket.create_connection(
                (worker.host, worker.port), source_address=(f"127.0.1.{i % 8 + 1}", 0)))
        time.sleep(0.3)
        code, _, body = raw_answer(worker.host, worker.port,
                                   b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", source=PROBE)
        assert code == 503 and json.loads(body)["error"] == "Too many connections"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: worker.healthy(), HEADER_TIMEOUT + 3, "served again")


def test_the_worker_runs_with_its_soft_descriptor_limit_raised_to_the_hard_one(
        worker: Worker) -> None:
    with open(f"/proc/{worker.pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line
    assert "at most" in worker.log() and "per client address" in worker.log()


def test_a_slow_request_gets_408_within_the_header_deadline(worker: Worker) -> None:
    with socket.create_connection((worker.host, worker.port), timeout=10,
                                  source_address=(ATTACKER, 0)) as s:
        started = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a header line now and then, never the end
            time.sleep(0.5)
            s.sendall(b"X-Slow: 1\r\n")
        code, _, body = read_answer(s)
        assert code == 408 and json.loads(body)["error"] == "Request timeout"
        assert time.monotonic() - started < HEADER_TIMEOUT + 1.5


def test_a_body_that_stalls_is_cut_off_at_the_idle_timeout_and_its_share_returned(
        worker: Worker, contained: None) -> None:
    size = UPLOAD_MB * 10**6 * 3 // 4  # most of this address's in-flight share
    with socket.create_connection((worker.host, worker.port), timeout=15,
                                  source_address=(ATTACKER, 0)) as s:
        started = time.monotonic()
        s.sendall(post_head("/submit", size, "multipart/form-data; boundary=b") + b"--b\r\n")
        assert s.recv(100) == b""  # closed by the worker, with nothing to say
        assert IDLE_TIMEOUT - 0.5 < time.monotonic() - started < IDLE_TIMEOUT + 5
    # The share is back: a whole upload of the same size is taken (here refused only for
    # its body, which is not multipart, after it was read).
    reply = worker.request("POST", "/submit", b"x" * size,
                           {"Content-Type": "multipart/form-data; boundary=b"}, source=ATTACKER)
    assert reply.status == 400, reply.body


def trickle_until_answered(port: int, size: int) -> tuple[int, dict[str, Any], float]:
    """Send a body a byte every half second (inside the idle timeout, far below the least
    rate) until the server answers: (status, JSON body, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15,
                                  source_address=(ATTACKER, 0)) as s:
        started = time.monotonic()
        s.sendall(post_head("/submit", size, "multipart/form-data; boundary=b"))
        s.settimeout(0.5)
        for _ in range(60):
            try:
                data = s.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                s.sendall(b"x")
                continue
            assert data, "closed without an answer"
            break
        s.settimeout(15)
        code, _, body = read_answer(s)
        return code, json.loads(body), time.monotonic() - started


def test_a_body_trickled_below_the_least_rate_gets_408_and_its_share_returned(
        worker: Worker, contained: None) -> None:
    size = UPLOAD_MB * 10**6 * 3 // 4
    code, body, took = trickle_until_answered(worker.port, size)
    assert code == 408 and body["error"] == "Request timeout", body
    assert f"{MIN_UPLOAD_RATE} bytes a second" in body["details"]
    assert UPLOAD_GRACE < took < UPLOAD_GRACE + 5
    reply = worker.request("POST", "/submit", b"x" * size,
                           {"Content-Type": "multipart/form-data; boundary=b"}, source=ATTACKER)
    assert reply.status == 400, reply.body  # the share is back: the body was read, then refused


# -- the contract's JSON everywhere --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/download/job-abc//etc/passwd",
                                  "/download/job-abc/%2Fetc%2Fpasswd",
                                  "/status//job-abc"])
def test_doubled_or_encoded_slashes_get_the_contracts_json_404(worker: Worker,
                                                               path: str) -> None:
    code, headers, body = raw_answer(
        worker.host, worker.port, f"GET {path} HTTP/1.1\r\nHost: evil.example\r\n"
                                  "Connection: close\r\n\r\n".encode())
    assert code == 404, (code, headers, body)
    assert headers["content-type"] == "application/json"
    assert "location" not in headers
    assert not ("content-length" in headers and "transfer-encoding" in headers), headers
    assert b"Not found" in body


# -- the same at the coordinator -----------------------------------------------------------------

POOL_FLAGS = ("--health-interval", "1", "--health-timeout", "0.5", "--cpu-quota", "100000",
              "--max-active-per-ip", "100000", "--jobs-per-hour", "100000",
              "--max-connections-per-ip", str(PER_IP_CONNECTIONS),
              "--header-timeout", str(HEADER_TIMEOUT), "--max-upload-mb", str(UPLOAD_MB),
              "--max-inflight-upload-mb-per-ip", str(UPLOAD_MB),
              "--max-inflight-upload-mb", str(3 * UPLOAD_MB), *RATE_FLAGS)


@pytest.fixture(scope="module")
def coordinator(worker: Worker, worker_key: tuple[str, str],
                scratch: str) -> Iterator[CoordinatorProcess]:
    workers_path = os.path.join(scratch, "workers.json")
    with open(workers_path, "w") as f:
        json.dump([{"name": "w1", "worker_id": worker_key[1], "endpoint": worker.url,
                    "max_concurrent_jobs": 2}], f)
    spool = os.path.join(scratch, "spool")
    os.mkdir(spool)
    # A tmpfs of its own, so that what the spool holds is measured exactly, apart from
    # whatever else writes to the host's disk meanwhile.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", spool],
                   check=True)
    process = CoordinatorProcess(scratch, workers_path, (*POOL_FLAGS, "--spool-dir", spool))
    try:
        process.start_and_wait()
        wait_for(lambda: process.pool()["w1"]["healthy"], 10, "the worker healthy to the pool")
        yield process
        assert process.stop() == 0, process.log()
    finally:
        if process.running():
            process.kill()
        subprocess.run(["umount", spool], check=True)


def spooled_at(scratch: str) -> int:
    """Bytes in the coordinator's spool tmpfs (its uploads are unlinked: count blocks)."""
    st = os.statvfs(os.path.join(scratch, "spool"))
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def coordinator_rss_kib(coordinator: CoordinatorProcess) -> int:
    assert coordinator.proc is not None
    with open(f"/proc/{coordinator.proc.pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_through_the_coordinator_hostile_archives_leave_another_clients_job_running(
        coordinator: CoordinatorProcess, worker: Worker, contained: None) -> None:
    """Unprotected, the pax regex held the worker so long the pool took it for lost."""
    victim = coordinator.accepted("import time\ntime.sleep(3)\nprint('done')\n")
    rss = coordinator_rss_kib(coordinator)
    with HealthProbe(coordinator.url) as probe, HealthProbe(worker.url, CLIENT) as direct:
        for archive in (ha.digit_pax_headers(), ha.sparse_map_bomb()):
            body, kind = multipart({"manifest": '{"entrypoint": "main.py"}'},
                                   [("evil.tgz", archive)])
            reply = request(coordinator.url, "POST", "/submit", body,
                            {"Content-Type": kind}, source=ATTACKER)
            refused(reply, 400, "Invalid upload")
        status = coordinator.wait(victim, 60)
    probe.check()
    direct.check()
    assert status["status"] == "completed", status
    assert coordinator_rss_kib(coordinator) - rss < RSS_BOUND_KIB


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/health", 405), ("POST", "/no/such/endpoint", 404), ("GET", "/pool", 413)])
def test_the_coordinator_refuses_a_body_where_none_is_taken_before_spooling_it(
        coordinator: CoordinatorProcess, scratch: str, method: str, path: str,
        status: int) -> None:
    spooled = spooled_at(scratch)
    for _ in range(3):
        code, headers, body = raw_answer("127.0.0.1", coordinator.port,
                                         post_head(path, 30_000_000, method=method),
                                         source=ATTACKER)
        assert code == status and headers["content-type"] == "application/json", body
    assert spooled_at(scratch) - spooled < 1024 * 1024


def test_the_coordinator_refuses_a_second_big_parallel_upload_from_one_address(
        coordinator: CoordinatorProcess, scratch: str) -> None:
    size = UPLOAD_MB * 10**6 * 3 // 4
    spooled = spooled_at(scratch)
    with socket.create_connection(("127.0.0.1", coordinator.port),
                                  source_address=(ATTACKER, 0)) as first:
        first.sendall(post_head("/submit", size, "multipart/form-data; boundary=b")
                      + b"x" * 1_000_000)
        time.sleep(0.3)
        code, _, body = raw_answer("127.0.0.1", coordinator.port,
                                   post_head("/submit", size, "multipart/form-data; boundary=b"),
                                   source=ATTACKER)
        assert code == 429 and json.loads(body)["error"] == "Too many uploads"
        assert spooled_at(scratch) - spooled < 8 * 1024 * 1024


def test_the_coordinator_cuts_off_a_body_trickled_below_the_least_rate(
        coordinator: CoordinatorProcess, scratch: str) -> None:
    spooled = spooled_at(scratch)
    code, body, took = trickle_until_answered(coordinator.port, UPLOAD_MB * 10**6 // 2)
    assert code == 408 and body["error"] == "Request timeout", body
    assert UPLOAD_GRACE < took < UPLOAD_GRACE + 5
    assert spooled_at(scratch) - spooled < 1024 * 1024


def test_the_coordinator_caps_connections_per_address(coordinator: CoordinatorProcess) -> None:
    socks = []
    try:
        for _ in range(PER_IP_CONNECTIONS):
            socks.append(socket.create_connection(("127.0.0.1", coordinator.port),
                                                  source_address=(ATTACKER, 0)))
        time.sleep(0.3)
        code, _, body = raw_answer("127.0.0.1", coordinator.port,
                                   b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", source=ATTACKER)
        assert code == 429 and json.loads(body)["error"] == "Too many connections"
        assert request(coordinator.url, path="/health", source=PROBE).status == 200
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("path", ["/download/job-abc//etc/passwd",
                                  "/download/job-abc/%2Fetc%2Fpasswd", "/status//job-abc"])
def test_the_coordinator_answers_doubled_slashes_with_the_contracts_json_404(
        coordinator: CoordinatorProcess, path: str) -> None:
    code, headers, _ = raw_answer(
        "127.0.0.1", coordinator.port,
        f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode())
    assert code == 404 and headers["content-type"] == "application/json"
    assert "location" not in headers
