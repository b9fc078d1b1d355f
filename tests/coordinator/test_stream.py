"""The WebSocket relay over real loopback sockets, against a scripted worker stream.

The scripted worker speaks the stream contract: replay frames, then close 1000 when
the job ended or 4404 for an unknown job; ``job-dies...`` drops the connection
without a close handshake, as a killed worker does; ``job-hangs...`` keeps the
stream open forever, as a wedged worker does.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

import pytest
import pytest_twisted
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer, endpoints, reactor, task
from twisted.web import server

from coordinator.config import CoordinatorConfig, WorkerEntry
from coordinator.jobids import encode_job_id
from coordinator.proxy import CoordinatorAPI
from coordinator.registry import Load, WorkerRegistry
from coordinator.worker_client import WorkerClient
from sandrun.identity import WorkerIdentity
from tests.timing import scaled

KNOWN = "job-" + "k" * 24
DIES = "job-dies" + "d" * 20
HANGS = "job-hangs" + "h" * 19
FLOOD = "job-flood" + "f" * 19
FLOOD_FRAMES, FLOOD_FRAME_BYTES = 200, 100 * 1024


class ScriptedWorker(WebSocketServerProtocol):
    paths: ClassVar[list[str]] = []

    def onConnect(self, request: Any) -> None:
        self.path = request.path
        self.fmt = (request.params.get("format") or [None])[0]
        ScriptedWorker.paths.append(request.path + (f"?format={self.fmt}" if self.fmt else ""))

    def onOpen(self) -> None:
        if KNOWN in self.path:
            if self.fmt == "json":
                for frame in ({"type": "output", "stream": "stdout", "data": "a"},
                              {"type": "done", "status": "completed", "reason": "completed"}):
                    self.sendMessage(json.dumps(frame).encode())
            else:
                self.sendMessage(b"a")
                self.sendMessage(b"b")
            self.sendClose(1000, "job completed")
        elif DIES in self.path:
            self.sendMessage(b"partial")
            reactor.callLater(0.05, self.transport.abortConnection)  # type: ignore[attr-defined]
        elif HANGS in self.path:
            self.sendMessage(b"x")
        elif FLOOD in self.path:
            for i in range(FLOOD_FRAMES):
                self.sendMessage(bytes([65 + i % 26]) * FLOOD_FRAME_BYTES, isBinary=True)
            self.sendClose(1000, "job completed")
        else:
            self.sendClose(4404, "job not found")


class Collector(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.frames.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback((code, reason))


@pytest.fixture
def setup() -> Any:
    return {}


@defer.inlineCallbacks
def start(worker_up: bool = True) -> Any:
    identity = WorkerIdentity.generate()
    factory = WebSocketServerFactory()
    factory.protocol = ScriptedWorker
    # Like the real worker's (5 s): time for a paused client to catch up before our close.
    factory.setProtocolOptions(closeHandshakeTimeout=30)
    worker_port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        factory)
    port = worker_port.getHost().port
    entry = WorkerEntry(identity.worker_id, f"http://127.0.0.1:{port}", 4, "w0")
    registry = WorkerRegistry((entry,))
    if worker_up:
        registry.record_pass(registry.workers()[0], Load(0, 0, 4), reactor.seconds(), 0)
    else:
        yield worker_port.stopListening()
    api = CoordinatorAPI(reactor, registry, WorkerClient(reactor, None), CoordinatorConfig())
    site = server.Site(api.resource())
    coordinator_port = yield endpoints.TCP4ServerEndpoint(reactor, 0,
                                                          interface="127.0.0.1").listen(site)
    return {"registry": registry, "entry": entry, "api": api,
            "ports": [worker_port, coordinator_port],
            "url": f"ws://127.0.0.1:{coordinator_port.getHost().port}"}


@defer.inlineCallbacks
def watch(env: dict[str, Any], worker_job: str, query: str = "",
          path: str = "/logs/{}/stream") -> Any:
    job_id = encode_job_id(env["entry"].tag, reactor.seconds(), worker_job)
    url = env["url"] + path.format(job_id) + query
    factory = WebSocketClientFactory(url)
    factory.protocol = Collector
    factory.frames, factory.opened, factory.closed = [], defer.Deferred(), defer.Deferred()
    port = int(env["url"].rsplit(":", 1)[1])
    yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return factory


@defer.inlineCallbacks
def stop(env: dict[str, Any]) -> Any:
    for port in env["ports"]:
        yield port.stopListening()


def closed(factory: Any, timeout: float = 5.0) -> defer.Deferred[Any]:
    d: defer.Deferred[Any] = factory.closed
    return d.addTimeout(timeout, reactor)


@pytest_twisted.inlineCallbacks
def test_frames_and_the_final_close_are_relayed_as_the_worker_sent_them() -> Any:
    env = yield start()
    try:
        ScriptedWorker.paths.clear()
        factory = yield watch(env, KNOWN)
        code, reason = yield closed(factory)
        assert factory.frames == [b"a", b"b"]
        assert (code, reason) == (1000, "job completed")
        assert ScriptedWorker.paths == [f"/logs/{KNOWN}/stream"]
        alias = yield watch(env, KNOWN, "?format=json", path="/stream/{}")
        yield closed(alias)
        assert [json.loads(f)["type"] for f in alias.frames] == ["output", "done"]
        assert ScriptedWorker.paths[-1] == f"/logs/{KNOWN}/stream?format=json"
    finally:
        yield stop(env)


@pytest_twisted.inlineCallbacks
def test_an_unknown_job_is_closed_with_4404() -> Any:
    env = yield start()
    try:
        unknown = yield watch(env, "job-" + "u" * 24)
        code, _ = yield closed(unknown)
        assert code == 4404
        # A malformed id never reaches a worker.
        factory = WebSocketClientFactory(env["url"] + "/logs/not-an-id/stream")
        factory.protocol = Collector
        factory.frames, factory.opened, factory.closed = [], defer.Deferred(), defer.Deferred()
        port = int(env["url"].rsplit(":", 1)[1])
        yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        code, _ = yield closed(factory)
        assert code == 4404
    finally:
        yield stop(env)


@pytest_twisted.inlineCallbacks
def test_a_worker_that_dies_mid_stream_ends_it_with_worker_lost() -> Any:
    env = yield start()
    try:
        text = yield watch(env, DIES)
        code, reason = yield closed(text)
        assert text.frames == [b"partial"] and (code, reason) == (1000, "worker_lost")
        as_json = yield watch(env, DIES, "?format=json")
        yield closed(as_json)
        last = json.loads(as_json.frames[-1])
        assert last["type"] == "done" and last["reason"] == "worker_lost"
    finally:
        yield stop(env)


@pytest_twisted.inlineCallbacks
def test_a_stream_from_a_worker_taken_out_of_the_pool_ends_with_worker_lost() -> Any:
    env = yield start()
    try:
        factory = yield watch(env, HANGS, "?format=json")
        yield factory.opened
        # The relay to the worker is open (polled: how long it takes depends on the machine).
        yield until(lambda: env["api"].streams.open_count() == 1, "the relay opened")
        env["registry"].mark_down(env["registry"].workers()[0], "health check failed")
        code, reason = yield closed(factory)
        assert (code, reason) == (1000, "worker_lost")
        assert json.loads(factory.frames[-1])["reason"] == "worker_lost"
        assert env["api"].streams.open_count() == 0
    finally:
        yield stop(env)


@pytest_twisted.inlineCallbacks
def test_a_stream_for_a_job_on_an_unreachable_worker_ends_at_once_with_worker_lost() -> Any:
    env = yield start(worker_up=False)
    try:
        factory = yield watch(env, KNOWN, "?format=json")
        code, reason = yield closed(factory)
        assert (code, reason) == (1000, "worker_lost")
        assert json.loads(factory.frames[-1])["reason"] == "worker_lost"
    finally:
        yield stop(env)


@defer.inlineCallbacks
def until(predicate: Any, what: str, within: float = 10.0) -> Any:
    """Poll ``predicate`` every 10 ms, without blocking the reactor, for up to ``within`` s."""
    deadline = time.monotonic() + scaled(within)
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        yield task.deferLater(reactor, 0.01, lambda: None)


def buffered(transport: Any) -> int:
    return len(transport.dataBuffer) + transport._tempDataLen


@pytest_twisted.inlineCallbacks
def test_a_client_that_reads_slowly_pauses_the_worker_instead_of_filling_our_memory() -> Any:
    env = yield start()
    try:
        factory = yield watch(env, FLOOD)
        reader = yield factory.opened
        reader.transport.pauseProducing()  # the client stops reading
        yield until(lambda: [c for clients in env["api"].streams._open.values()
                             for c in clients], "the relay opened")
        (relayed,) = [c for clients in env["api"].streams._open.values() for c in clients]
        # The worker connection gets paused (no longer read from) once the slack is full;
        # polled, since how soon depends on the machine.
        yield until(lambda: relayed.upstream is not None
                    and relayed.upstream.transport not in reactor.getReaders(),
                    "the worker connection paused")
        yield task.deferLater(reactor, 0.2, lambda: None)  # and it stays so
        assert relayed.upstream.transport not in reactor.getReaders()
        held = buffered(relayed.transport)
        # 20 MiB were sent by the worker; the coordinator holds about its 1 MiB of slack.
        assert held < 2 * 1024 * 1024, held
        reader.transport.resumeProducing()
        code, _ = yield closed(factory, timeout=20)
        assert code == 1000
        assert len(factory.frames) == FLOOD_FRAMES
        assert all(len(f) == FLOOD_FRAME_BYTES for f in factory.frames)
    finally:
        yield stop(env)
