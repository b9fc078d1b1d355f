"""A real pool: one coordinator and three real workers (each its own key and state
directory) on loopback ports, plus an impostor, all as separate processes.

- The impostor is a real worker whose workers.json entry lists a public key it does
  not hold (it runs with its own key): it must never be used, and ``/pool`` says why.
- Each worker runs 2 jobs and queues 2 more (``--max-concurrent``, ``--queue-size``),
  so the pool holds 12; the coordinator
  checks health every second with a 0.5 s timeout, so "two health intervals" is 2 s.
- A worker is killed with SIGKILL mid-job: the job must report ``worker_lost``
  within two intervals; the worker is started again on the same state directory
  (which removes the mounts the killed one left) and port, and must come back.
- The coordinator is restarted: it must still answer for the jobs it dispatched.
- SIGHUP: a malformed workers.json is refused naming the entry; a good one is applied.

Runs as root (workers mount tmpfs and make cgroups).  About 30 s.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from bench.common import in_cgroup, remove_worker_cgroup, worker_cgroup
from coordinator.jobids import decode_job_id
from tests.contract import check_response
from tests.integration.worker import REPO, Response, mounts_under, request, why_no_worker
from tests.timing import scaled

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The coordinator's --health-interval in these tests (and its --health-timeout half of it),
# longer on a slow machine (tests/timing), where a worker takes longer to answer.
INTERVAL = scaled(1.0)
WORKER_FLAGS = ("--max-concurrent", "2", "--queue-size", "2", "--trusted-proxy", "127.0.0.1",
                "--cpu-quota", "100000", "--max-active-per-ip", "100000",
                "--jobs-per-hour", "100000")
POOL_FLAGS = ("--health-interval", str(INTERVAL), "--health-timeout", str(INTERVAL / 2),
              "--cpu-quota", "100000", "--max-active-per-ip", "100000",
              "--jobs-per-hour", "100000")

pytestmark = pytest.mark.skipif(why_no_worker() is not None, reason=why_no_worker() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Any, within: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + scaled(within)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(step)


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@dataclass
class Process:
    """A child process with its output in a log file."""

    argv: list[str]
    log_path: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO, env=environment())

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"no exit {timeout} s after SIGTERM:\n{self.log()}")
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class PoolWorker(Process):
    def __init__(self, name: str, scratch: str, key_path: str) -> None:
        self.name, self.port = name, free_port()
        self.state_dir = os.path.join(scratch, f"{name}-state")
        # cgroup v2: a cgroup of its own, as its systemd unit would give it.
        self.cgroup = worker_cgroup(f"{os.path.basename(scratch)}-{name}")
        super().__init__(in_cgroup([sys.executable, "-m", "sandrun", "serve", "--state-dir",
                                    self.state_dir, "--listen", f"127.0.0.1:{self.port}",
                                    "--worker-key", key_path, *WORKER_FLAGS], self.cgroup),
                         os.path.join(scratch, f"{name}.log"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            return request(self.url, path="/health", timeout=2).status == 200
        except OSError:
            return False

    def wait_healthy(self) -> None:
        wait_for(lambda: self.healthy() or not self.running(), 30, f"{self.name} healthy")
        assert self.running(), self.log()

    def mounts(self) -> list[str]:
        return mounts_under(self.state_dir)


def checked(path: str, response: Response, method: str = "GET") -> Response:
    """A coordinator's answer, checked against its OpenAPI document."""
    check_response("coordinator", method, path, response.status,
                   response.header("content-type"), response.body)
    return response


class CoordinatorProcess(Process):
    def __init__(self, scratch: str, workers_path: str, flags: tuple[str, ...] = POOL_FLAGS,
                 name: str = "coordinator") -> None:
        self.port = free_port()
        super().__init__([sys.executable, "-m", "coordinator", "--workers", workers_path,
                          "--listen", f"127.0.0.1:{self.port}", *flags],
                         os.path.join(scratch, f"{name}.log"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_and_wait(self) -> None:
        self.start()

        def up() -> bool:
            assert self.running(), self.log()
            try:
                return request(self.url, path="/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(up, 30, "coordinator healthy")

    # -- the client ----------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> Response:
        return checked(path, request(self.url, path=path, **kwargs))

    def submit(self, code: str, outputs: list[str] | None = None) -> Response:
        manifest: dict[str, Any] = {"entrypoint": "main.py"}
        if outputs is not None:
            manifest["outputs"] = outputs
        body = json.dumps({"manifest": manifest, "files": {"main.py": code}}).encode()
        return checked("/submit", request(self.url, "POST", "/submit", body,
                                          {"Content-Type": "application/json"}), "POST")

    def accepted(self, code: str, outputs: list[str] | None = None) -> str:
        reply = self.submit(code, outputs)
        assert reply.status == 200, (reply.status, reply.body, self.get("/pool").body,
                                     self.log()[-3000:])
        job_id: str = reply.json()["job_id"]
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        reply = self.get(f"/status/{job_id}")
        assert reply.status == 200, (reply.status, reply.body)
        result: dict[str, Any] = reply.json()
        return result

    def wait(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status(job_id))["status"] in ("completed", "failed")
                        and s, timeout, f"{job_id} finished")

    def pool(self) -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in self.get("/pool").json()["workers"]}


@dataclass
class Pool:
    scratch: str
    workers: dict[str, PoolWorker]
    impostor: PoolWorker
    coordinator: CoordinatorProcess
    workers_path: str
    entries: list[dict[str, Any]]

    def worker_of(self, job_id: str) -> PoolWorker:
        tag = job_id.split(".")[0]
        name = next(w["name"] for w in self.coordinator.get("/pool").json()["workers"]
                    if w["tag"] == tag)
        return self.workers[name]

    def write_workers(self, entries: list[Any]) -> None:
        with open(self.workers_path + ".new", "w") as f:
            json.dump(entries, f)
        os.replace(self.workers_path + ".new", self.workers_path)


def keygen(path: str) -> str:
    out = subprocess.run([sys.executable, "-m", "sandrun", "keygen", "--out", path],
                         check=True, capture_output=True, cwd=REPO, env=environment())
    return out.stdout.decode().strip()


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    scratch = tempfile.mkdtemp(prefix="sandrun-pool-")
    workers: dict[str, PoolWorker] = {}
    entries: list[dict[str, Any]] = []
    for name in ("w1", "w2", "w3"):
        key = os.path.join(scratch, f"{name}.pem")
        worker_id = keygen(key)
        workers[name] = PoolWorker(name, scratch, key)
        entries.append({"name": name, "worker_id": worker_id,
                        "endpoint": workers[name].url, "max_concurrent_jobs": 2})
    # The impostor holds its own key; workers.json lists a public key whose private half
    # it never had (as if it copied a real worker's public key).
    impostor = PoolWorker("impostor", scratch, os.path.join(scratch, "impostor.pem"))
    keygen(os.path.join(scratch, "impostor.pem"))
    victim = keygen(os.path.join(scratch, "victim.pem"))
    os.unlink(os.path.join(scratch, "victim.pem"))
    entries.append({"name": "impostor", "worker_id": victim, "endpoint": impostor.url,
                    "max_concurrent_jobs": 2})
    workers_path = os.path.join(scratch, "workers.json")
    coordinator = CoordinatorProcess(scratch, workers_path)
    result = Pool(scratch, workers, impostor, coordinator, workers_path, entries)
    result.write_workers(entries)
    everyone = [*workers.values(), impostor]
    try:
        for worker in everyone:
            worker.start()
        for worker in everyone:
            worker.wait_healthy()
        coordinator.start_and_wait()
        yield result
        assert coordinator.stop() == 0, coordinator.log()
        for worker in everyone:
            assert worker.stop() == 0, worker.log()
            assert worker.mounts() == [], worker.mounts()
    finally:
        for process in [coordinator, *everyone]:
            if process.running():
                process.kill()
        for worker in everyone:
            for point in reversed(worker.mounts()):
                subprocess.run(["umount", "-l", point], check=False)
            remove_worker_cgroup(worker.cgroup)
        shutil.rmtree(scratch, ignore_errors=True)


SLEEP = "import time\ntime.sleep({})\nprint('slept')\n"


def test_the_three_workers_are_authenticated_and_the_impostor_is_refused(pool: Pool) -> None:
    listed = pool.coordinator.pool()
    for name in ("w1", "w2", "w3"):
        assert listed[name]["healthy"] and listed[name]["authenticated"], listed[name]
        assert listed[name]["last_error"] is None
    impostor = listed["impostor"]
    assert impostor["healthy"] is False and impostor["authenticated"] is False
    assert "another worker" in impostor["last_error"]
    assert pool.impostor.healthy()  # it is up and answering; it just is not who it says


def test_twelve_quick_submissions_are_all_queued_and_only_a_full_pool_answers_503(
        pool: Pool) -> None:
    # Six run and six wait in the workers' queues; one client address throughout.
    jobs = [pool.coordinator.accepted(SLEEP.format(3)) for _ in range(12)]
    placed = sorted(pool.worker_of(j).name for j in jobs)
    assert placed == ["w1"] * 4 + ["w2"] * 4 + ["w3"] * 4
    full = pool.coordinator.submit(SLEEP.format(0))
    assert full.status == 503 and full.json()["retry_after"] >= 1
    assert full.header("retry-after") is not None
    for job in jobs:
        assert pool.coordinator.wait(job)["status"] == "completed"
    assert "queued" not in pool.impostor.log()  # never given a job


def test_status_outputs_download_and_live_output_through_the_coordinator(pool: Pool) -> None:
    import websockets.exceptions
    import websockets.sync.client

    code = ("import time\nfor i in range(3):\n    print('line', i, flush=True)\n"
            "    time.sleep(0.3)\n"
            "open('data.bin', 'wb').write(bytes(range(256)) * 40000)\n")
    job = pool.coordinator.accepted(code, outputs=["data.bin"])
    frames: list[dict[str, Any]] = []
    ws_url = pool.coordinator.url.replace("http", "ws") + f"/logs/{job}/stream?format=json"
    with websockets.sync.client.connect(ws_url, open_timeout=10) as ws:
        for message in ws:
            frames.append(json.loads(message))
        close_code = ws.close_code
    assert close_code == 1000
    output = "".join(f["data"] for f in frames if f["type"] == "output")
    assert output == "line 0\nline 1\nline 2\n"
    assert frames[-1]["type"] == "done" and frames[-1]["status"] == "completed"
    status = pool.coordinator.status(job)
    assert status["job_id"] == job and status["signature_verified"] is True
    expected = hashlib.sha256(bytes(range(256)) * 40000).hexdigest()
    assert status["output_files"]["data.bin"]["sha256"] == expected
    files = pool.coordinator.get(f"/outputs/{job}").json()["files"]
    assert [f["download_url"] for f in files] == [f"/download/{job}/data.bin"]
    one = pool.coordinator.get(files[0]["download_url"])
    assert one.status == 200 and hashlib.sha256(one.body).hexdigest() == expected
    assert one.header("content-length") == str(256 * 40000)
    everything = pool.coordinator.get(f"/download/{job}")
    with tarfile.open(fileobj=io.BytesIO(everything.body)) as tar:
        member = tar.extractfile("data.bin")
        assert member is not None and hashlib.sha256(member.read()).hexdigest() == expected
    # A full download deletes the job on its worker; an unknown job's stream is 4404.
    assert pool.coordinator.get(f"/status/{job}").status == 404
    with websockets.sync.client.connect(ws_url, open_timeout=10) as ws:
        with pytest.raises(websockets.exceptions.ConnectionClosedError) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


def test_run_long_polls_and_runtimes_through_the_coordinator(pool: Pool) -> None:
    body = json.dumps({"manifest": {"entrypoint": "main.py", "outputs": ["*.txt"]},
                       "files": {"main.py": "import time\ntime.sleep(0.3)\nprint('ran')\n"
                                            "open('r.txt', 'w').write('x')\n"}}).encode()
    reply = request(pool.coordinator.url, "POST", "/run", body,
                    {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["status"] == "completed" and doc["stdout"] == "ran\n"
    assert doc["signature_verified"] is True
    (output,) = doc["outputs"]
    assert pool.coordinator.get(output["download_url"]).body == b"x"
    # A long poll ends with the job, well before its 30 s.
    job = pool.coordinator.accepted("import time\ntime.sleep(0.5)\n")
    started = time.monotonic()
    status = pool.coordinator.get(f"/status/{job}?wait=30", timeout=40).json()
    assert status["status"] == "completed" and time.monotonic() - started < 20
    runtimes = pool.coordinator.get("/runtimes").json()["runtimes"]
    assert "python3" in {r["interpreter"] for r in runtimes}


def test_a_multipart_upload_with_an_archive_passes_through_intact(pool: Pool) -> None:
    from tests.integration.worker import multipart, tar_bytes

    archive = tar_bytes({"main.py": "import data\nprint(data.VALUE * 2)\n",
                         "data.py": "VALUE = 21\n"})
    body, kind = multipart({"manifest": json.dumps({"entrypoint": "main.py"})},
                           [("job.tar.gz", archive)])
    reply = request(pool.coordinator.url, "POST", "/submit", body, {"Content-Type": kind})
    assert reply.status == 200, reply.body
    job = reply.json()["job_id"]
    assert pool.coordinator.wait(job)["status"] == "completed"
    assert pool.coordinator.get(f"/logs/{job}").json()["stdout"] == "42\n"
    text = pool.coordinator.get(f"/logs/{job}", headers={"Accept": "text/plain"})
    assert text.body == b"42\n" and text.header("content-type").startswith("text/plain")
    bad = request(pool.coordinator.url, "POST", "/submit", b"{", {"Content-Type":
                                                                 "application/json"})
    assert bad.status == 400


def test_a_worker_killed_mid_job_gives_worker_lost_and_comes_back_after_a_restart(
        pool: Pool) -> None:
    job = pool.coordinator.accepted(SLEEP.format(60))
    victim = pool.worker_of(job)
    wait_for(lambda: pool.coordinator.status(job)["status"] == "running", 10, "running")
    victim.kill()
    killed_at = time.monotonic()
    # Health checks alone (no request touches the dead worker meanwhile) take it out.
    wait_for(lambda: not pool.coordinator.pool()[victim.name]["healthy"], 2 * INTERVAL + 1,
             "the dead worker out of the pool", step=0.02)
    status = pool.coordinator.status(job)
    lost_after = time.monotonic() - killed_at
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "worker_lost"
    assert lost_after <= 2 * INTERVAL, lost_after
    assert pool.coordinator.get(f"/logs/{job}").json()["reason"] == "worker_lost"
    # New jobs go elsewhere meanwhile.
    other = pool.coordinator.accepted(SLEEP.format(0))
    assert pool.worker_of(other).name != victim.name
    # The same state directory: the new worker removes what the killed one left mounted
    # (its state tmpfs and the running job's tmpfs).
    victim.start()
    victim.wait_healthy()
    assert victim.mounts() == [victim.state_dir]
    wait_for(lambda: pool.coordinator.pool()[victim.name]["healthy"], 2 * INTERVAL + 1,
             "the restarted worker back in the pool")
    assert pool.coordinator.status(job)["execution_metadata"]["reason"] == "worker_lost"
    jobs = [pool.coordinator.accepted(SLEEP.format(1)) for _ in range(3)]
    assert victim.name in {pool.worker_of(j).name for j in jobs}
    for j in [other, *jobs]:
        assert pool.coordinator.wait(j)["status"] == "completed"


def test_sandrun_run_through_the_coordinator_exits_70_in_one_line_when_its_worker_dies(
        pool: Pool, tmp_path: Any) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(60)\n")
    env = dict(os.environ, SANDRUN_URL=pool.coordinator.url,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ran = subprocess.Popen([sys.executable, "-m", "sandrun", "run", str(script)], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert ran.stderr is not None
    first = ran.stderr.readline()
    found = re.search(r"sandrun: job (\S+) ", first)
    assert found, first
    job = found.group(1)
    victim = pool.worker_of(job)
    wait_for(lambda: pool.coordinator.status(job)["status"] == "running", 10, "running")
    victim.kill()
    try:
        code = ran.wait(scaled(30))
        said = first + ran.stderr.read()
        assert code == 70, said
        # What it said: queued (running), then lost, in one line; no error of its own.
        lines = [line for line in said.splitlines() if not line.endswith(("queued", "running"))]
        assert len(lines) == 1 and lines[0].startswith(
            f"sandrun: job {job} was lost with its worker (it died or restarted)"), said
        assert "Traceback" not in said and "410" not in said
    finally:
        victim.start()
        victim.wait_healthy()
        wait_for(lambda: pool.coordinator.pool()[victim.name]["healthy"], 2 * INTERVAL + 1,
                 "the restarted worker back in the pool")


def test_a_restarted_coordinator_still_serves_status_and_downloads(pool: Pool) -> None:
    job = pool.coordinator.accepted("open('out.txt', 'w').write('kept')\n", outputs=["out.txt"])
    assert pool.coordinator.wait(job)["status"] == "completed"
    assert pool.coordinator.stop() == 0
    pool.coordinator.start_and_wait()
    status = pool.coordinator.status(job)
    assert status["status"] == "completed" and status["signature_verified"] is True
    assert pool.coordinator.get(f"/download/{job}/out.txt").body == b"kept"


def test_sighup_refuses_a_malformed_file_and_applies_a_good_one(pool: Pool) -> None:
    coordinator = pool.coordinator
    broken = [*pool.entries, {"name": "typo", "worker_id": "not-a-key",
                              "endpoint": "http://127.0.0.1:1"}]
    pool.write_workers(broken)
    coordinator.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in coordinator.log(), 10, "the refusal logged")
    assert "entry 4 (typo)" in coordinator.log()
    assert coordinator.running()
    assert set(coordinator.pool()) == {"w1", "w2", "w3", "impostor"}
    # Drop w3 and the impostor: w3 drains (its jobs stay reachable), the impostor is gone
    # from routing too.
    running = coordinator.accepted(SLEEP.format(2))
    pool.write_workers([e for e in pool.entries if e["name"] in ("w1", "w2")])
    coordinator.signal(signal.SIGHUP)
    wait_for(lambda: coordinator.pool()["w3"]["draining"], 10, "w3 draining")
    jobs = [coordinator.accepted(SLEEP.format(0)) for _ in range(3)]
    assert {pool.worker_of(j).name for j in jobs} <= {"w1", "w2"}
    assert coordinator.wait(running)["status"] == "completed"
    for job in jobs:
        assert coordinator.wait(job)["status"] == "completed"
    pool.write_workers(pool.entries)
    coordinator.signal(signal.SIGHUP)
    wait_for(lambda: not coordinator.pool()["w3"]["draining"], 10, "w3 back")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_big_download_to_a_slow_client_is_streamed_not_buffered(pool: Pool) -> None:
    size = 64 * 1024 * 1024
    job = pool.coordinator.accepted(
        f"open('big.bin', 'wb').write(bytes(range(256)) * {size // 256})\n",
        outputs=["big.bin"])
    assert pool.coordinator.wait(job)["status"] == "completed"
    assert pool.coordinator.proc is not None
    pid = pool.coordinator.proc.pid
    before = rss_kib(pid)
    with socket.create_connection(("127.0.0.1", pool.coordinator.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /download/{job}/big.bin HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\n\r\n".encode())
        first = sock.recv(1024 * 1024)
        time.sleep(1.5)  # the client stalls; the worker must be paused, not drained into RAM
        held = rss_kib(pid) - before
        digest = hashlib.sha256()
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        received = len(body)
        digest.update(body)
        while chunk := sock.recv(1024 * 1024):
            received += len(chunk)
            digest.update(chunk)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
    print(f"coordinator RSS grew by {held} KiB while a client stalled on a 64 MiB download")
    assert held < 16 * 1024, f"the coordinator grew by {held} KiB during a 64 MiB download"


def test_twenty_unread_logs_through_the_coordinator_keep_its_rss_bounded(pool: Pool) -> None:
    code = ("import os\nchunk = b'\\x01' * (1024 * 1024)\n"
            "for _ in range(10):\n    os.write(1, chunk)\n    os.write(2, chunk)\n")
    job = pool.coordinator.accepted(code)
    assert pool.coordinator.wait(job, timeout=60)["status"] in ("completed", "failed")
    assert pool.coordinator.proc is not None
    pid = pool.coordinator.proc.pid
    before = rss_kib(pid)
    sockets = []
    try:
        for _ in range(20):  # each answer is ~120 MB of JSON; none is read
            sock = socket.create_connection(("127.0.0.1", pool.coordinator.port), timeout=30)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(f"GET /logs/{job} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sockets.append(sock)
        time.sleep(2.0)
        held = rss_kib(pid) - before
    finally:
        for sock in sockets:
            sock.close()
    print(f"coordinator RSS grew by {held} KiB with 20 unread /logs answers")
    assert held < 150 * 1024, held
    logs = pool.coordinator.get(f"/logs/{job}", timeout=60).json()
    assert logs["job_id"] == job
    assert logs["stdout"] == "\x01" * (10 * 1024 * 1024) == logs["stderr"]
    listing = pool.coordinator.get(f"/outputs/{job}").json()
    assert listing["job_id"] == job
    assert all(f["download_url"].startswith(f"/download/{job}/") for f in listing["files"])


LOUD_STDOUT = bytes(range(256)) * 40_000  # 10,240,000 bytes, under the 10 MiB cap
LOUD_STDERR_BYTES = 10_000_000  # of "\x01": 60 MB of JSON
LOUD = ("import os\n"
        "out = bytes(range(256)) * 40_000\n"
        "for i in range(0, len(out), 1 << 20):\n    os.write(1, out[i:i + (1 << 20)])\n"
        f"os.write(2, b'\\x01' * {LOUD_STDERR_BYTES})\n"
        "open('r.txt', 'w').write('done')\n")


def test_run_through_the_coordinator_relays_20_mb_of_output_exactly_with_bounded_memory(
        pool: Pool) -> None:
    """A /run answer of ~100 MB of JSON (over the 64 MiB the coordinator once read whole,
    then a 502), byte for byte; four such answers unread cost the coordinator little."""
    assert pool.coordinator.proc is not None
    pid = pool.coordinator.proc.pid
    body = json.dumps({"manifest": {"entrypoint": "main.py", "outputs": ["*.txt"]},
                       "files": {"main.py": LOUD}}).encode()
    before = rss_kib(pid)
    clients = []
    try:
        for _ in range(4):
            conn = http.client.HTTPConnection("127.0.0.1", pool.coordinator.port, timeout=120)
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            conn.request("POST", "/run", body, {"Content-Type": "application/json"})
            clients.append(conn)
        # Every job ends and its answer begins; nobody reads.
        time.sleep(scaled(6.0))
        held = rss_kib(pid) - before
        answers = []
        for conn in clients:
            reply = conn.getresponse()
            assert reply.status == 200
            answers.append(reply.read())
    finally:
        for conn in clients:
            conn.close()
    print(f"coordinator RSS grew by {held} KiB with 4 unread /run answers of "
          f"{len(answers[0]) // 1024} KiB each")
    assert held < 100 * 1024, held
    expected_stdout = LOUD_STDOUT.decode("utf-8", "replace")
    for raw in answers:
        check_response("coordinator", "POST", "/run", 200, "application/json", raw)
        doc = json.loads(raw)
        assert doc["status"] == "completed", doc["execution_metadata"]
        assert doc["stdout"] == expected_stdout
        assert doc["stderr"] == "\x01" * LOUD_STDERR_BYTES
        assert doc["truncated"] == {"stdout": False, "stderr": False}
        assert doc["signature_verified"] is True and doc["kept"] is True
        (output,) = doc["outputs"]
        assert output["download_url"] == f"/download/{doc['job_id']}/r.txt"
    # Byte for byte the strings the worker wrote in its own /logs.
    job = json.loads(answers[0])["job_id"]
    ref = decode_job_id(job)
    assert ref is not None
    worker_logs = request(pool.worker_of(job).url, path=f"/logs/{ref.worker_job_id}",
                          timeout=60).body
    for name, after in (("stdout", "stderr"), ("stderr", "install")):
        start = worker_logs.index(f'"{name}": "'.encode())
        end = worker_logs.index(f'",\n"{after}": '.encode(), start)
        assert len(worker_logs[start:end + 1]) > 10_000_000
        assert worker_logs[start:end + 1] in answers[0]
    assert pool.coordinator.get(output["download_url"]).body == b"done"


def test_a_second_coordinator_answers_for_the_first_and_per_ip_limits_hold_pool_wide(
        pool: Pool) -> None:
    # Another coordinator on the same workers.json, as behind a load balancer, with the
    # default per-IP limit of 2 jobs queued or running anywhere in the pool.
    second = CoordinatorProcess(pool.scratch, pool.workers_path,
                                ("--health-interval", str(INTERVAL)), name="second")
    second.start_and_wait()
    try:
        job = pool.coordinator.accepted("print('from the first')\n")
        assert pool.coordinator.wait(job)["status"] == "completed"
        assert second.status(job)["signature_verified"] is True
        body = json.dumps({"manifest": {"entrypoint": "main.py"},
                           "files": {"main.py": SLEEP.format(2)}}).encode()
        headers = {"Content-Type": "application/json"}
        client = "127.0.0.7"  # its own address: its own quota
        first = [request(second.url, "POST", "/submit", body, headers, source=client)
                 for _ in range(2)]
        assert [r.status for r in first] == [200, 200]
        placed = {pool.worker_of(r.json()["job_id"]).name for r in first}
        assert len(placed) == 2  # on two different workers, each far under its own limit
        third = request(second.url, "POST", "/submit", body, headers, source=client)
        assert third.status == 429, third.body
        assert "across the pool" in third.json()["reason"]
        assert request(second.url, "POST", "/submit", body, headers,
                       source="127.0.0.8").status == 200
        for reply in first:
            assert second.wait(reply.json()["job_id"])["status"] == "completed"
    finally:
        assert second.stop() == 0, second.log()
