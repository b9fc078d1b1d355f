"""Live output over WebSocket against a real worker, real jobs and real sockets.

The worker is ``sandrun serve`` in a subprocess (``tests/integration/worker.py``);
clients are the ``websockets`` library's sync client, one thread each, and, for
the client that never reads, a raw socket that does the handshake by hand.
Needs root, like every real worker.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.integration.worker import Worker, run_worker

MiB = 1024 * 1024
GENEROUS_QUOTAS = ("--max-active-per-ip", "50", "--jobs-per-hour", "1000",
                   "--cpu-quota", "1000")

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """One worker for the module, with room for a 50 MB job and many jobs per client."""
    with run_worker("--output-cap-mb", "64", *GENEROUS_QUOTAS) as w:
        yield w


def ws_url(worker: Worker, path: str) -> str:
    return f"ws://{worker.host}:{worker.port}{path}"


def submit_python(worker: Worker, code: str) -> str:
    return worker.submit({"main.py": code}, {"entrypoint": "main.py", "timeout": 60})


@dataclass
class Received:
    """What one client saw: each message with its arrival time, then the close."""

    messages: list[tuple[float, str]] = field(default_factory=list)
    code: int | None = None
    reason: str | None = None
    error: BaseException | None = None

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]


def receive(url: str, into: Received, opened: threading.Event | None = None) -> None:
    """Read one stream to its close (run in a thread)."""
    try:
        with connect(url, max_size=None, compression=None, open_timeout=10) as ws:
            if opened is not None:
                opened.set()
            while True:
                message = ws.recv(timeout=30)
                into.messages.append((time.time(), str(message)))
    except ConnectionClosed as closed:
        if closed.rcvd is not None:
            into.code, into.reason = closed.rcvd.code, closed.rcvd.reason
    except BaseException as e:
        into.error = e


def start_receiving(url: str) -> tuple[Received, threading.Thread]:
    into, opened = Received(), threading.Event()
    thread = threading.Thread(target=receive, args=(url, into, opened), daemon=True)
    thread.start()
    assert opened.wait(10), into.error
    return into, thread


def finish(into: Received, thread: threading.Thread, timeout: float = 30) -> Received:
    thread.join(timeout)
    assert not thread.is_alive(), "the stream did not close"
    assert into.error is None, repr(into.error)
    return into


# -- live, late, many -----------------------------------------------------------------------

# The first line waits for the client's handshake: a worker's first stream imports
# autobahn (sandrun/api/stream.py), 0.1-0.3 s on this host, or more under load.
TICKER = """
import time
time.sleep(1.0)
for i in range(12):
    print(i, repr(time.time()), flush=True)
    time.sleep(0.2)
"""


@pytest.mark.timeout(30)
def test_a_job_printing_every_200_ms_is_received_line_by_line_while_it_runs(
        worker: Worker) -> None:
    job_id = submit_python(worker, TICKER)
    got, thread = start_receiving(ws_url(worker, f"/logs/{job_id}/stream"))
    finish(got, thread)
    assert got.code == 1000 and got.reason == "job completed"
    assert [m.split()[0] for m in got.texts()] == [str(i) for i in range(12)]
    arrivals = [t for t, _ in got.messages]
    # Live, not at the end: the arrivals are spread over the run, 200 ms apart.
    assert arrivals[-1] - arrivals[0] > 11 * 0.2 * 0.8
    assert min(b - a for a, b in itertools.pairwise(arrivals)) > 0.1
    latencies = [t - float(m.split()[1]) for t, m in got.messages]
    p50, worst = statistics.median(latencies), max(latencies)
    print(f"\nstream latency over {len(latencies)} lines: p50 {p50 * 1000:.1f} ms, "
          f"max {worst * 1000:.1f} ms")
    assert min(latencies) >= 0
    assert p50 < 0.05 and worst < 0.1, latencies


@pytest.mark.timeout(30)
def test_a_late_joiner_gets_the_full_backlog_then_close_1000(worker: Worker) -> None:
    job_id = submit_python(worker, "import sys\n"
                                   "for i in range(500):\n"
                                   "    print('line', i)\n"
                                   "    if i % 100 == 0: print('err', i, file=sys.stderr)\n")
    assert worker.wait(job_id)["status"] == "completed"
    logs = worker.get(f"/logs/{job_id}?format=text").body.decode()
    assert logs.count("\n") == 505
    for path in (f"/logs/{job_id}/stream", f"/stream/{job_id}"):
        got = Received()
        receive(ws_url(worker, path), got)
        assert got.error is None, repr(got.error)
        assert (got.code, got.reason) == (1000, "job completed")
        assert "".join(got.texts()) == logs


@pytest.mark.timeout(40)
def test_ten_concurrent_subscribers_each_receive_the_identical_full_output(
        worker: Worker) -> None:
    job_id = submit_python(worker, "import time\n"
                                   "for i in range(40):\n"
                                   "    print('chunk', i, 'x' * i, flush=True)\n"
                                   "    time.sleep(0.02)\n")
    clients = [start_receiving(ws_url(worker, f"/logs/{job_id}/stream")) for _ in range(10)]
    results = [finish(got, thread) for got, thread in clients]
    expected = "".join(f"chunk {i} {'x' * i}\n" for i in range(40))
    assert worker.get(f"/logs/{job_id}?format=text").body.decode() == expected
    for got in results:
        assert got.code == 1000
        assert "".join(got.texts()) == expected


# -- JSON frames and the end ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_json_frames_end_with_a_done_frame_carrying_reason_and_exit_code(
        worker: Worker) -> None:
    job_id = submit_python(worker, "import sys, time\n"
                                   "time.sleep(0.2)\n"
                                   "print('to stdout', flush=True)\n"
                                   "print('to stderr', file=sys.stderr, flush=True)\n"
                                   "sys.exit(3)\n")
    got, thread = start_receiving(ws_url(worker, f"/logs/{job_id}/stream?format=json"))
    finish(got, thread)
    frames = [json.loads(m) for m in got.texts()]
    assert got.code == 1000 and got.reason == "job failed: exit_nonzero"
    assert frames[0] in ({"type": "status", "status": "queued"},
                         {"type": "status", "status": "running"})
    outputs = [(f["stream"], f["data"]) for f in frames if f["type"] == "output"]
    assert outputs == [("stdout", "to stdout\n"), ("stderr", "to stderr\n")]
    assert frames[-2] == {"type": "status", "status": "failed"}
    done = frames[-1]
    assert done["type"] == "done"
    assert (done["status"], done["reason"], done["exit_code"]) == ("failed", "exit_nonzero", 3)
    status = worker.get(f"/status/{job_id}").json()["execution_metadata"]
    for key in ("cpu_seconds", "memory_peak_bytes", "wall_time_ms"):
        assert done[key] == status[key] and done[key] > 0, key


@pytest.mark.timeout(60)
def test_output_over_the_cap_ends_with_output_limit_in_the_done_frame() -> None:
    with run_worker("--output-cap-mb", "1", *GENEROUS_QUOTAS) as small:
        job_id = submit_python(small, "import sys\n"
                                      "for _ in range(300):\n"
                                      "    sys.stdout.write('y' * 9999 + '\\n')\n")
        got, thread = start_receiving(ws_url(small, f"/stream/{job_id}?format=json"))
        finish(got, thread)
        frames = [json.loads(m) for m in got.texts()]
        streamed = "".join(f["data"] for f in frames if f["type"] == "output")
        assert len(streamed) == MiB  # exactly the cap, then the job was stopped
        assert set(streamed) == {"y", "\n"}
        assert frames[-1]["type"] == "done"
        assert (frames[-1]["status"], frames[-1]["reason"]) == ("failed", "output_limit")
        assert got.code == 1000


@pytest.mark.timeout(60)
def test_a_worker_shutting_down_closes_each_stream_with_1001_going_away() -> None:
    with run_worker(*GENEROUS_QUOTAS) as stopping:
        job_id = submit_python(stopping, "import time\nprint('up', flush=True)\n"
                                         "time.sleep(60)\n")
        stopping.wait(job_id, until=("running",))
        watchers = [start_receiving(ws_url(stopping, path)) for path in
                    (f"/logs/{job_id}/stream", f"/stream/{job_id}?format=json")]
        deadline = time.monotonic() + 10
        while not all(got.messages for got, _ in watchers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stopping.stop() == 0
        for got, thread in watchers:
            finish(got, thread)
            assert (got.code, got.reason) == (1001, "worker shutting down")
        assert watchers[0][0].texts() == ["up\n"]


@pytest.mark.timeout(30)
def test_an_unknown_job_is_closed_with_4404_and_a_plain_get_is_told_to_upgrade(
        worker: Worker) -> None:
    got = Received()
    receive(ws_url(worker, "/logs/job-doesnotexist/stream"), got)
    assert got.error is None, repr(got.error)
    assert (got.code, got.reason) == (4404, "job not found")
    assert got.messages == []
    response = worker.get("/stream/job-doesnotexist")
    assert response.status == 426
    assert response.header("upgrade") == "websocket"
    assert response.json()["error"] == "Upgrade required"


# -- a client that never reads ----------------------------------------------------------------

FIFTY_MB = """
import sys
line = b"z" * (1024 * 1024 - 1) + b"\\n"
for _ in range(50):
    sys.stdout.buffer.write(line)
"""


class RawClient:
    """A WebSocket client by hand on a socket with a small receive buffer; it reads only when told."""

    def __init__(self, worker: Worker, path: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((worker.host, worker.port))
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\n"
                          b"Host: " + f"{worker.host}:{worker.port}".encode() + b"\r\n"
                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: " + key + b"\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)  # byte by byte: not one byte of the stream is taken
        assert head.startswith(b"HTTP/1.1 101 "), head

    def read_to_end(self) -> bytes:
        self.sock.settimeout(20)
        data = bytearray()
        try:
            while chunk := self.sock.recv(1 << 20):
                data += chunk
        except ConnectionResetError:
            pass
        self.sock.close()
        return bytes(data)


def frames_of(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in ``data``; stops at a partial one."""
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            (length,), at = struct.unpack("!H", data[at:at + 2]), at + 2
        elif length == 127:
            (length,), at = struct.unpack("!Q", data[at:at + 8]), at + 8
        if at + length > len(data):
            return
        yield opcode, data[at:at + length]
        at += length


class RssSampler(threading.Thread):
    def __init__(self, worker: Worker) -> None:
        super().__init__(daemon=True)
        self.worker, self.peak_kib, self.running = worker, 0, True

    def run(self) -> None:
        while self.running:
            self.peak_kib = max(self.peak_kib, self.worker.rss_kib())
            time.sleep(0.02)


@pytest.mark.timeout(60)
def test_a_client_that_never_reads_is_dropped_and_neither_the_job_nor_the_worker_suffers(
        worker: Worker) -> None:
    baseline_kib = worker.rss_kib()
    sampler = RssSampler(worker)
    sampler.start()
    job_id = submit_python(worker, "import time\ntime.sleep(0.5)\n" + FIFTY_MB)
    stalled = RawClient(worker, f"/logs/{job_id}/stream")
    reader_got, reader = start_receiving(ws_url(worker, f"/logs/{job_id}/stream"))
    started = time.monotonic()

    status = worker.wait(job_id, timeout=20)
    assert status["status"] == "completed"
    assert status["execution_metadata"]["wall_time_ms"] < 10_000
    # A client that reads gets all 50 MB and the end, while the other reads nothing.
    finish(reader_got, reader)
    assert reader_got.code == 1000
    received = "".join(reader_got.texts())
    assert len(received) == 50 * MiB and received.count("\n") == 50
    sampler.running = False
    sampler.join()
    growth_mb = (sampler.peak_kib - baseline_kib) / 1024
    print(f"\nworker RSS: {baseline_kib / 1024:.0f} MiB before, peak +{growth_mb:.0f} MiB "
          "with a 50 MiB job, one stalled and one reading subscriber")
    # The job's log (50 MiB) is held once; the stalled client adds its send buffer only.
    assert growth_mb < 100

    # Dropped after the stall limit (10 s) with 1008; its close frame waits behind
    # what was already in its socket, so read it all now.
    while f"stream subscriber of {job_id} dropped" not in worker.log():
        assert time.monotonic() - started < 20, "the stalled client was never dropped"
        time.sleep(0.1)
    assert f"stream subscriber of {job_id} dropped: it took no data for 10" in worker.log()
    data = stalled.read_to_end()
    frames = list(frames_of(data))
    assert frames and frames[-1][0] == 8, f"no close frame in {len(data)} bytes"
    code, reason = struct.unpack("!H", frames[-1][1][:2])[0], frames[-1][1][2:].decode()
    assert (code, reason) == (1008, "too slow: took no data for 10 s")
    streamed = b"".join(payload for opcode, payload in frames if opcode == 1)
    # What it got before the drop is a true prefix of the output, and only a little of it.
    assert 0 < len(streamed) < 10 * MiB
    assert hashlib.sha256(streamed).digest() == \
        hashlib.sha256(received[:len(streamed)].encode()).digest()
