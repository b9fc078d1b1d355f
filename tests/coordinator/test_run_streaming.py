"""POST /run through the coordinator over real loopback sockets: flow control end to end.

A scripted worker (twisted.web, the worker's own writers in ``sandrun.api.sending``)
takes the job and answers its ``/logs`` with 2 x 10 MiB of output that escapes to
~126 MB of JSON, counting what it has produced; the real coordinator (its production
HTTP client) sits between it and a client that can stop reading.  Whatever the client
does, the coordinator must hold no more than a little of that output.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest_twisted
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.protocol import Protocol
from twisted.web import resource, server
from twisted.web.client import Agent, FileBodyProducer, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from coordinator.config import CoordinatorConfig, WorkerEntry
from coordinator.proxy import CoordinatorAPI
from coordinator.registry import Load, WorkerRegistry
from coordinator.service import http_client
from coordinator.worker_client import WorkerClient
from sandrun.api import sending
from sandrun.identity import WorkerIdentity
from tests.contract import check_response
from tests.timing import scaled

MiB = 1024 * 1024
PIECE = b"\x01" * 65536  # 6 bytes of JSON each: the worst case of the worker's cap
PIECES = 160  # 10 MiB per stream
LOUD, BROKEN = "job-" + "l" * 24, "job-" + "b" * 24


class ScriptedWorker(resource.Resource):
    """What the coordinator asks of a worker for a /run, answered by the worker's writers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.produced = 0  # bytes of /logs output produced so far
        self.logs_producer: Any = None
        self.deleted: list[str] = []

    def render(self, request: Any) -> Any:
        path = request.path.decode()
        request.setHeader(b"Content-Type", b"application/json")
        if path == "/stats":
            return b"{}"
        if path == "/submit":
            job = BROKEN if b"BROKEN" in request.content.read() else LOUD
            return json.dumps({"job_id": job, "status": "queued", "position": 0}).encode()
        job = path.rsplit("/", 1)[1]
        if path.startswith("/status/"):
            return json.dumps({
                "job_id": job, "status": "completed", "queue_position": 0,
                "submitted_at": None, "started_at": None, "finished_at": None,
                "execution_metadata": {
                    "cpu_seconds": 0.1, "memory_peak_bytes": 4096, "wall_time_ms": 5.0,
                    "exit_code": 0, "signal": None, "reason": "completed",
                    "environment": None, "interpreter": "python3"},
                "job_hash": "0" * 64, "output_files": {},
                "worker_metadata": {"worker_id": None, "signature": None,
                                    "signed": None}}).encode()
        if path.startswith("/jobs/"):
            self.deleted.append(job)
            return json.dumps({"job_id": job, "status": "deleted"}).encode()
        if path.startswith("/outputs/"):
            head = {"job_id": job, "status": "completed", "total_files": 1}
            files = [{"path": "r.txt", "size_bytes": 1, "sha256": "1" * 64,
                      "mime_type": "text/plain", "download_url": f"/download/{job}/r.txt"}]
            return self.send(request, sending.listing_json(head, files))
        if path.startswith("/logs/"):
            if job == BROKEN:  # an answer that breaks off into something that is not JSON
                return b'{"job_id": "x",\n"stdout": "fine so far' + b"\x00" * 10 + b'"}'
            streams = {"stdout": self.output(), "stderr": self.output(), "install": []}
            answer = self.send(request, sending.logs_json(
                job, streams, {"stdout": True, "stderr": False}))
            self.logs_producer = request.producer
            return answer
        request.setResponseCode(404)
        return b'{"error": "Not found", "details": ""}'

    @staticmethod
    def send(request: Any, pieces: Any) -> Any:
        sent = sending.send_pieces(request, pieces)
        sent.addCallbacks(lambda _: request.finish(), lambda _: None)
        return server.NOT_DONE_YET

    def output(self) -> Any:
        for _ in range(PIECES):
            self.produced += len(PIECE)
            yield PIECE


class Site(server.Site):
    """Keeps the coordinator's client connections, to see what it holds for them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.append(channel)
        return channel


class Body(Protocol):
    """Collects a response body; ``hold`` stops reading until ``release``."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[Any] = defer.Deferred()

    def hold(self) -> None:
        # (Not in connectionMade: deliverBody resumes the connection after that.)
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def release(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(reason.value)  # (a Failure itself would be an errback)


@defer.inlineCallbacks
def start() -> Any:
    worker = ScriptedWorker()
    worker_port = yield endpoints.TCP4ServerEndpoint(
        reactor, 0, interface="127.0.0.1").listen(server.Site(worker))
    identity = WorkerIdentity.generate()
    entry = WorkerEntry(identity.worker_id, f"http://127.0.0.1:{worker_port.getHost().port}",
                        4, "w0")
    registry = WorkerRegistry((entry,))
    registry.record_pass(registry.workers()[0], Load(0, 0, 4), reactor.seconds(), 0)
    http, pool = http_client(reactor)
    api = CoordinatorAPI(reactor, registry, WorkerClient(reactor, http), CoordinatorConfig())
    site = Site(api.resource())
    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    return {"worker": worker, "site": site, "pool": pool, "ports": [worker_port, port],
            "url": f"http://127.0.0.1:{port.getHost().port}"}


@defer.inlineCallbacks
def stop(env: dict[str, Any]) -> Any:
    yield env["pool"].closeCachedConnections()
    for port in env["ports"]:
        yield port.stopListening()


def post_run(env: dict[str, Any], code: str, query: str = "") -> defer.Deferred[Any]:
    body = json.dumps({"manifest": {"entrypoint": "main.py"},
                       "files": {"main.py": code}}).encode()
    return Agent(reactor).request(
        b"POST", (env["url"] + "/run" + query).encode(),
        Headers({b"Content-Type": [b"application/json"]}), FileBodyProducer(io.BytesIO(body)))


def held(channel: Any) -> int:
    """What the coordinator holds for its client in user space (its transport's buffer)."""
    transport = channel._channel.transport  # (a _GenericHTTPChannelProtocol wraps it)
    return len(transport.dataBuffer) + transport._tempDataLen


@defer.inlineCallbacks
def until(predicate: Any, what: str, within: float = 20.0) -> Any:
    deadline = time.monotonic() + scaled(within)
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        yield task.deferLater(reactor, 0.01, lambda: None)


@defer.inlineCallbacks
def steady(read: Any, seconds: float = 0.5) -> Any:
    """Wait until ``read()`` stops changing for ``seconds``; its last value."""
    last = read()
    quiet_since = time.monotonic()
    deadline = quiet_since + scaled(30)
    while time.monotonic() - quiet_since < seconds:
        assert time.monotonic() < deadline, "never settled"
        yield task.deferLater(reactor, 0.05, lambda: None)
        now = read()
        if now != last:
            last, quiet_since = now, time.monotonic()
    return last


@pytest_twisted.inlineCallbacks
def test_a_run_client_that_stops_reading_pauses_the_worker_and_the_answer_is_exact() -> Any:
    env = yield start()
    try:
        worker = env["worker"]
        response = yield post_run(env, "print('loud')")
        assert response.code == 200
        body = Body()
        response.deliverBody(body)
        body.hold()
        # The client reads nothing: the worker's answer is paused (the coordinator stopped
        # reading it) long before its ~126 MB are out, and stays paused.
        yield until(lambda: worker.logs_producer is not None, "the worker answers /logs")
        produced = yield steady(lambda: worker.produced)
        assert produced < 2 * PIECES * len(PIECE) // 2, produced
        assert worker.logs_producer.paused
        (channel,) = env["site"].channels
        assert held(channel) < 2 * MiB, held(channel)
        body.release()
        yield body.done
        check_response("coordinator", "POST", "/run", 200, "application/json",
                       bytes(body.data))
        doc = json.loads(bytes(body.data))
        assert doc["stdout"] == doc["stderr"] == "\x01" * (PIECES * len(PIECE))
        assert doc["truncated"] == {"stdout": True, "stderr": False} and doc["kept"] is True
        assert doc["job_id"] != LOUD and doc["job_id"].endswith(LOUD)
        (output,) = doc["outputs"]
        assert output["download_url"] == f"/download/{doc['job_id']}/r.txt"
        assert worker.produced == 2 * PIECES * len(PIECE)
    finally:
        yield stop(env)


@pytest_twisted.inlineCallbacks
def test_a_run_client_that_goes_away_mid_answer_with_keep_0_still_has_its_job_deleted(
) -> Any:
    env = yield start()
    try:
        response = yield post_run(env, "print('loud')", "?keep=0")
        body = Body()
        response.deliverBody(body)
        body.hold()
        yield until(lambda: env["worker"].logs_producer is not None, "the worker answers")
        body.transport.stopProducing()  # type: ignore[union-attr]  # the client hangs up
        yield until(lambda: env["worker"].deleted == [LOUD], "the job deleted")
        assert env["worker"].produced < 2 * PIECES * len(PIECE)
    finally:
        yield stop(env)


@pytest_twisted.inlineCallbacks
def test_a_worker_whose_logs_break_mid_answer_cuts_the_clients_answer() -> Any:
    env = yield start()
    try:
        # The status line and the status document may be out by then: the connection is
        # cut, so that the client can tell its answer is not whole.
        try:
            response = yield post_run(env, "BROKEN")
        except ResponseNeverReceived:
            return
        assert response.code == 200
        body = Body()
        response.deliverBody(body)
        reason = yield body.done
        assert isinstance(reason, ResponseFailed), reason
        assert not body.data.endswith(b"}")
    finally:
        yield stop(env)
