"""The live-output WebSocket (``sandrun/api/stream.py``) against a real listening port.

The server is the real Klein app (or ``stream_resource`` with short timeouts)
on 127.0.0.1, port 0; the job is a real ``Job`` whose log the test appends to,
as the sandbox would; the client is autobahn's Twisted client in the same
reactor. No sandbox, no root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq.testing
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from klein import Klein
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web import server
from twisted.web.iweb import IRequest

from sandrun.api.app import WorkerAPI
from sandrun.api.stream import StreamSettings, stream_resource
from sandrun.config import WorkerConfig
from sandrun.environments import Environments, Registry
from sandrun.jobs.manifest import Manifest
from sandrun.jobs.metrics import WorkerMetrics
from sandrun.jobs.model import Job
from sandrun.wire import JobStatus, Reason

reactor: Any = _reactor  # the global reactor, untyped (no mypy-zope here)
KiB = 1024
MiB = 1024 * KiB
FAST = StreamSettings(check_seconds=0.02)


# -- a job and a manager the test drives ----------------------------------------------------


def make_job(job_id: str = "job-test", status: JobStatus = JobStatus.RUNNING) -> Job:
    job = Job(id=job_id, manifest=Manifest(entrypoint="main.py", interpreter="python3"),
              client="198.51.100.7", base_dir="/nonexistent", job_hash="0" * 64,
              submitted_at=0.0)
    if status != JobStatus.QUEUED:
        job.move_to(JobStatus.RUNNING)
    return job


def end(job: Job, reason: Reason = Reason.COMPLETED, exit_code: int | None = 0) -> None:
    """What ``JobManager._end`` does to a job, as subscribers see it."""
    job.reason, job.exit_code = reason, exit_code
    job.cpu_seconds, job.memory_peak_bytes, job.wall_time_ms = 0.25, 12345678, 1500.5
    job.move_to(JobStatus.COMPLETED if reason == Reason.COMPLETED else JobStatus.FAILED)
    for listener in list(job.end_listeners):
        listener(job)


class FakeManager:
    """What the stream needs of ``JobManager``: ``get`` and ``reactor``."""

    blocking = None  # WorkerAPI's thread runner; no route here uses it
    environments = Environments(Registry("/nonexistent"))  # WorkerAPI's /environments

    def __init__(self, *jobs: Job) -> None:
        self.reactor = reactor
        self.jobs = {job.id: job for job in jobs}
        self.metrics = WorkerMetrics()  # WorkerAPI counts open streams in it

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)


class StreamOnly:
    """``stream_resource`` with chosen settings at ``/s/<job_id>``."""

    app = Klein()

    def __init__(self, manager: FakeManager, settings: StreamSettings) -> None:
        self.manager, self.settings = manager, settings

    @app.route("/s/<string:job_id>")
    def stream(self, request: IRequest, job_id: str) -> Any:
        return stream_resource(self.manager, job_id, request, self.settings)  # type: ignore


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Any]:
    """``serve(resource)`` listens on 127.0.0.1:0 and returns the port number."""
    ports: list[Any] = []

    def listen(resource: Any) -> int:
        port = reactor.listenTCP(0, server.Site(resource), interface="127.0.0.1")
        ports.append(port)
        return int(port.getHost().port)

    yield listen
    for port in ports:
        await port.stopListening()


def worker_api(manager: FakeManager) -> Any:
    return WorkerAPI(manager, WorkerConfig()).resource()  # type: ignore[arg-type]


def stream_only(manager: FakeManager, settings: StreamSettings = FAST) -> Any:
    return StreamOnly(manager, settings).app.resource()


# -- the client -------------------------------------------------------------------------------


class Client(WebSocketClientProtocol):  # type: ignore[misc]
    """Records every message; ``closed`` fires with (code, reason)."""

    transport: Any
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.binary = 0
        self.pings = 0
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.clean: bool | None = None  # whether the close handshake completed
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.binary += isBinary
        self.messages.append(payload.decode("utf-8"))

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.clean = wasClean
        if not self.closed.called:
            self.closed.callback((code, reason))

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.messages]


async def connect(port: int, path: str) -> Client:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = Client
    client = await dial(port, factory)
    await within(client.opened, 5)
    return client


async def dial(port: int, factory: WebSocketClientFactory) -> Client:
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client: Client = await endpoint.connect(factory)
    return client


async def within(d: defer.Deferred[Any], seconds: float) -> Any:
    return await d.addTimeout(seconds, reactor)


async def turn(seconds: float = 0.0) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def until(predicate: Any, seconds: float = 5.0, what: str = "condition") -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await turn(0.01)
    raise AssertionError(f"{what} not met within {seconds} s")


def subscribers(job: Job) -> int:
    return len(job.log.listeners)


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_a_subscriber_gets_the_backlog_then_each_live_chunk_then_close_1000(
        serve: Any) -> None:
    job = make_job()
    job.log.append("stdout", b"one\n")
    job.log.append("stderr", b"two\n")
    port = serve(worker_api(FakeManager(job)))
    client = await connect(port, f"/logs/{job.id}/stream")
    await until(lambda: len(client.messages) == 2, what="backlog")
    job.log.append("stdout", b"three\n")
    await until(lambda: len(client.messages) == 3, what="live chunk")
    job.log.append("stdout", b"four\n")
    end(job)
    code, reason = await within(client.closed, 5)
    assert client.messages == ["one\n", "two\n", "three\n", "four\n"]
    assert client.binary == 0
    assert (code, reason) == (1000, "job completed")
    assert subscribers(job) == 0 and job.end_listeners == []


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_the_alias_path_streams_the_same_and_a_failed_job_closes_with_its_reason(
        serve: Any) -> None:
    job = make_job()
    job.log.append("stdout", b"partial\n")
    end(job, Reason.OUTPUT_LIMIT, exit_code=None)
    port = serve(worker_api(FakeManager(job)))
    client = await connect(port, f"/stream/{job.id}")
    code, reason = await within(client.closed, 5)
    assert client.messages == ["partial\n"]
    assert (code, reason) == (1000, "job failed: output_limit")


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_an_unknown_job_is_accepted_then_closed_with_4404_on_both_paths(
        serve: Any) -> None:
    port = serve(worker_api(FakeManager()))
    for path in ("/logs/job-nope/stream", "/stream/job-nope?format=json"):
        client = await connect(port, path)
        code, reason = await within(client.closed, 5)
        assert (code, reason) == (4404, "job not found"), path
        assert client.messages == []


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_a_job_deleted_while_watched_closes_with_4404(serve: Any) -> None:
    job = make_job()
    port = serve(stream_only(FakeManager(job)))
    client = await connect(port, f"/s/{job.id}")
    job.deleted = True
    code, reason = await within(client.closed, 5)
    assert (code, reason) == (4404, "job deleted")
    assert subscribers(job) == 0


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_text_frames_reassemble_split_characters_and_replace_invalid_bytes(
        serve: Any) -> None:
    job = make_job()
    port = serve(worker_api(FakeManager(job)))
    client = await connect(port, f"/logs/{job.id}/stream")
    # "é" split across two reads of stdout, with a stderr chunk in between;
    # a lone 0xff; and a character cut off by the end of the output.
    for stream, data in [("stdout", b"caf\xc3"), ("stderr", b"warn\n"),
                         ("stdout", b"\xa9 \xff!"), ("stdout", b" \xe2\x82")]:
        job.log.append(stream, data)
    end(job)
    await within(client.closed, 5)
    assert client.messages == ["caf", "warn\n", "\u00e9 \ufffd!", " ", "\ufffd"]
    assert "".join(m for m in client.messages if m != "warn\n") == job.log.text("stdout")


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_json_frames_give_status_changes_output_and_a_final_done(serve: Any) -> None:
    job = make_job(status=JobStatus.QUEUED)
    port = serve(stream_only(FakeManager(job)))
    client = await connect(port, f"/s/{job.id}?format=json")
    await until(lambda: len(client.messages) == 1, what="queued status")
    job.move_to(JobStatus.RUNNING)  # noticed by the periodic check: nothing printed yet
    await until(lambda: len(client.messages) == 2, what="running status")
    job.log.append("stdout", b"out\n")
    job.log.append("stderr", b"err\n")
    end(job, Reason.EXIT_NONZERO, exit_code=3)
    code, _ = await within(client.closed, 5)
    assert code == 1000
    assert client.frames() == [
        {"type": "status", "status": "queued"},
        {"type": "status", "status": "running"},
        {"type": "output", "stream": "stdout", "data": "out\n"},
        {"type": "output", "stream": "stderr", "data": "err\n"},
        {"type": "status", "status": "failed"},
        {"type": "done", "status": "failed", "reason": "exit_nonzero", "exit_code": 3,
         "cpu_seconds": 0.25, "memory_peak_bytes": 12345678, "wall_time_ms": 1500.5},
    ]


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_a_late_json_subscriber_gets_the_backlog_before_the_final_status(
        serve: Any) -> None:
    job = make_job()
    job.log.append("stdout", b"a")
    end(job)
    port = serve(worker_api(FakeManager(job)))
    client = await connect(port, f"/logs/{job.id}/stream?format=json")
    code, _ = await within(client.closed, 5)
    assert code == 1000
    assert [f["type"] for f in client.frames()] == ["output", "status", "done"]
    assert client.frames()[1] == {"type": "status", "status": "completed"}


@pytest.mark.timeout(15)
@pytest_twisted.ensureDeferred
async def test_subscribers_joining_before_during_and_after_each_see_everything_once_in_order(
        serve: Any) -> None:
    job = make_job()
    port = serve(worker_api(FakeManager(job)))
    early = [await connect(port, f"/logs/{job.id}/stream") for _ in range(5)]
    expected = [f"line {i}\n" for i in range(300)]
    during: list[Client] = []
    for i, line in enumerate(expected):
        job.log.append("stdout" if i % 3 else "stderr", line.encode())
        if i % 60 == 30:
            during.append(await connect(port, f"/logs/{job.id}/stream"))
        elif i % 7 == 0:
            await turn()
    end(job)
    late = [await connect(port, f"/stream/{job.id}") for _ in range(5)]
    for client in early + during + late:
        code, _ = await within(client.closed, 5)
        assert code == 1000
        assert client.messages == expected
    assert len(during) == 5
    assert subscribers(job) == 0 and job.end_listeners == []


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_shutdown_closes_every_subscriber_with_1001_going_away_not_a_dropped_connection(
        serve: Any) -> None:
    running, finished = make_job("job-running"), make_job("job-finished")
    running.log.append("stdout", b"one\n")
    api = WorkerAPI(FakeManager(running, finished), WorkerConfig())  # type: ignore[arg-type]
    port = serve(api.resource())
    text = await connect(port, f"/logs/{running.id}/stream")
    as_json = await connect(port, f"/stream/{running.id}?format=json")
    await until(lambda: text.messages and len(as_json.messages) == 2, what="backlog")
    assert len(api.streams) == 2
    gone = api.streams.close_all(1001, "worker shutting down")
    for client in (text, as_json):
        assert await within(client.closed, 5) == (1001, "worker shutting down")
        assert client.clean is True  # a close handshake, not a dropped connection
    await within(gone, 5)
    assert len(api.streams) == 0 and subscribers(running) == 0
    assert running.end_listeners == []
    # The job's end (shutdown kills it next) reaches no one.
    running.log.append("stdout", b"two\n")
    end(running, Reason.SHUTDOWN, None)
    await turn(0.05)
    assert text.messages == ["one\n"]
    assert api.streams.close_all().called  # nobody left: done at once


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_close_all_gives_up_on_a_client_that_never_answers(serve: Any) -> None:
    job = make_job()
    api = WorkerAPI(FakeManager(job), WorkerConfig())  # type: ignore[arg-type]
    port = serve(api.resource())
    client = await connect(port, f"/logs/{job.id}/stream")
    await until(lambda: len(api.streams) == 1, what="subscribed")
    client.transport.pauseProducing()  # reads nothing more: never answers the close
    clock = task.Clock()
    api.streams.clock = clock
    gone = api.streams.close_all(1001, "worker shutting down", grace=2.0)
    await turn(0.05)
    assert not gone.called
    clock.advance(2.0)
    assert gone.called
    client.transport.resumeProducing()
    assert await within(client.closed, 5) == (1001, "worker shutting down")


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_away_is_unsubscribed(serve: Any) -> None:
    job = make_job()
    port = serve(worker_api(FakeManager(job)))
    clients = [await connect(port, f"/logs/{job.id}/stream") for _ in range(3)]
    await until(lambda: subscribers(job) == 3, what="three subscribers")
    clients[0].sendClose(1000)
    clients[1].transport.abortConnection()  # no close handshake at all
    await until(lambda: subscribers(job) == 1, what="two unsubscribed")
    assert len(job.end_listeners) == 1


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_stalled_subscriber_is_dropped_with_1008_while_the_others_get_everything(
        serve: Any) -> None:
    job = make_job()
    settings = StreamSettings(check_seconds=0.05, stall_seconds=0.5, close_timeout=10)
    port = serve(stream_only(FakeManager(job), settings))
    stalled = await connect(port, f"/s/{job.id}")
    reader = await connect(port, f"/s/{job.id}")
    stalled.transport.pauseProducing()  # the client stops reading its socket
    await until(lambda: subscribers(job) == 2, what="two subscribers")
    listeners: list[Any] = list(job.log.listeners)  # bound methods of the subscribers
    stalled_sub = next(sub for sub in (f.__self__ for f in listeners)
                       if sub.protocol.transport.getPeer().port
                       == stalled.transport.getHost().port)
    chunk = bytes(range(32, 127)) * 690  # 65,550 bytes of text
    total = 24 * MiB // len(chunk)
    most_buffered = 0
    for i in range(total):
        job.log.append("stdout", chunk)
        if i % 8 == 7:
            await turn()
            t = stalled_sub.protocol.transport
            if not stalled_sub.stopped:
                # Twisted's own write buffer for this connection (private fields).
                most_buffered = max(most_buffered,
                                    len(t.dataBuffer) - t.offset + t._tempDataLen)
    await until(lambda: stalled_sub.stopped, seconds=5, what="the stalled client dropped")
    assert subscribers(job) == 1
    # Far behind (the kernel holds a few MB at most), yet it never held more
    # than its transport buffer and one frame: the rest stayed in the log.
    assert 0 < most_buffered <= 64 * KiB + len(chunk) + 16
    end(job)
    code, _ = await within(reader.closed, 10)
    assert code == 1000
    assert len(reader.messages) == total
    assert hashlib.sha256("".join(reader.messages).encode()).digest() == \
        hashlib.sha256(chunk * total).digest()
    stalled.transport.resumeProducing()
    code, reason = await within(stalled.closed, 10)
    assert (code, reason) == (1008, "too slow: took no data for 0.5 s")
    assert 0 < len(stalled.messages) < total


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_a_stalled_client_of_a_finished_job_is_dropped_and_a_reading_one_is_not(
        serve: Any) -> None:
    job = make_job()
    for _ in range(200):
        job.log.append("stdout", b"x" * 65536)
    end(job)
    settings = StreamSettings(check_seconds=0.05, stall_seconds=0.5, close_timeout=10)
    port = serve(stream_only(FakeManager(job), settings))
    stalled = await connect(port, f"/s/{job.id}")
    stalled.transport.pauseProducing()
    await turn(1.0)
    reader = await connect(port, f"/s/{job.id}")
    assert (await within(reader.closed, 5))[0] == 1000
    assert len(reader.messages) == 200
    stalled.transport.resumeProducing()
    assert (await within(stalled.closed, 5))[0] == 1008


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_the_server_pings_and_drops_a_peer_that_never_answers(serve: Any) -> None:
    job = make_job()
    # autobahn's timers round down to whole seconds: a 2 s timeout is 1-2 s.
    settings = StreamSettings(check_seconds=0.05, ping_interval=1, ping_timeout=2)
    port = serve(stream_only(FakeManager(job), settings))
    answering = await connect(port, f"/s/{job.id}")
    silent = await connect(port, f"/s/{job.id}")
    silent.transport.pauseProducing()  # never reads the ping, so never answers it
    await until(lambda: subscribers(job) == 1, seconds=5, what="the silent peer dropped")
    assert answering.pings >= 1
    await until(lambda: answering.pings >= 3, seconds=4, what="three pings answered")
    assert not answering.closed.called and subscribers(job) == 1
    answering.sendClose(1000)
    await within(answering.closed, 5)


@pytest.mark.timeout(10)
@pytest_twisted.ensureDeferred
async def test_any_origin_may_subscribe(serve: Any) -> None:
    job = make_job()
    end(job)
    port = serve(worker_api(FakeManager(job)))
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/stream/{job.id}",
                                     origin="https://elsewhere.example")
    factory.protocol = Client
    client = await dial(port, factory)
    assert (await within(client.closed, 5))[0] == 1000


@pytest_twisted.ensureDeferred
async def test_a_plain_get_is_a_426_json_error_and_a_bad_format_a_400() -> None:
    job = make_job()
    http: Any = treq.testing.StubTreq(worker_api(FakeManager(job)))
    response = await http.get(f"http://worker/logs/{job.id}/stream")
    assert response.code == 426  # (the stub client drops the Upgrade header it also gets)
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert (await response.json())["error"] == "Upgrade required"
    response = await http.get(f"http://worker/stream/{job.id}?format=xml",
                              headers={"Upgrade": "websocket"})
    assert response.code == 400
    assert (await response.json())["error"] == "Invalid format"
