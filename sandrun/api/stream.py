"""Live output over WebSocket: ``/logs/{job_id}/stream`` and its alias ``/stream/{job_id}``.

The protocol (``shared/spec/api.md``, "Live output (WebSocket)"), as served here:

- The handshake is an ordinary GET on the API's own port; a GET without
  ``Upgrade: websocket`` is a 426 JSON error, ``?format=`` other than ``text``
  or ``json`` a 400. Any ``Origin`` is accepted: the service is anonymous and
  public (CORS ``*`` everywhere), and the job id in the URL is the only secret,
  so a page on another origin learns nothing it did not already hold.
- After the handshake the server sends everything the job has printed so far
  and then each new chunk as the sandbox reads it, one frame per chunk, stdout
  and stderr in the order they arrived. Every subscriber sees every chunk
  exactly once, in order, however many there are and whenever they join.
- Text mode (the default): each frame is a text frame holding the chunk's
  bytes. Text frames must be UTF-8, so each stream is decoded incrementally:
  a character split across two reads is sent whole, and bytes that are not
  UTF-8 become U+FFFD, exactly as ``/logs`` reports them. Per stream, the
  frames joined equal ``/logs``' ``stdout`` or ``stderr`` text. The dependency
  install step's log (``/logs``' ``install``) is not the program's output and
  is left out of text mode.
- ``?format=json``: every frame is a JSON text frame. ``{"type": "status",
  "status"}`` when the subscriber first sees the job queued or running, and on
  each change; ``{"type": "output", "stream", "data"}`` per chunk (``data`` as
  in text mode; ``stream`` is ``stdout``, ``stderr`` or ``install``); after the last output ``{"type": "status", "status"}`` with
  the final status and ``{"type": "done", "status", "reason", "exit_code",
  "cpu_seconds", "memory_peak_bytes", "wall_time_ms"}``.
- Close codes: 1000 once the job has ended and everything was sent (reason
  ``job completed`` or ``job failed: <reason>``); 4404 for an unknown job, or
  when the job's data is deleted while the client watches (``DELETE``, which
  also cancels a running job, a full download, retention); 1008 for a
  subscriber that takes no data for ``stall_seconds`` while output waits;
  1001 (going away, reason ``worker shutting down``) for every subscriber
  when the worker shuts down, before its jobs are killed
  (``Subscribers.close_all``).
- Keepalive: the server pings every ``ping_interval`` seconds and drops a peer
  that does not answer within ``ping_timeout``. Messages from the client are
  read and thrown away, never buffered.

Flow control. A job's output is held once, in its ``JobLog`` (already capped
by the sandbox's output limit). A subscriber is a cursor into that log and a
push producer on its own connection: it writes frames only while the transport
asks for data, so what the worker buffers for one subscriber is at most the
transport's buffer (64 KiB) plus one frame, however far behind it is. A slow
reader therefore costs nothing and still gets everything; one whose send
buffer does not drain for ``stall_seconds`` (it reads less than 64 KiB in
that time, about 6 KB/s with the defaults) is dropped with 1008, so it
cannot pin the log of a finished or deleted job.

The autobahn side (its factory, protocol and resource) is ``websocket.py``,
imported by the first stream request rather than when the worker starts.
"""

from __future__ import annotations

import codecs
import importlib
import json
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from sandrun.httpjson import APIError, write_error
from sandrun.jobs.manager import JobManager
from sandrun.jobs.model import Job
from sandrun.wire import JobStatus

if TYPE_CHECKING:
    from sandrun.api.websocket import StreamProtocol

log = Logger()

CLOSE_DONE = 1000  # the job ended and everything was sent
CLOSE_GOING_AWAY = 1001  # the worker is shutting down
CLOSE_TOO_SLOW = 1008  # policy violation: the subscriber stopped taking data
CLOSE_NO_JOB = 4404  # unknown job, or deleted while watched


@dataclass(frozen=True)
class StreamSettings:
    """How the stream treats its clients; the defaults are what the worker serves.

    autobahn runs ``close_timeout`` and the ping timers on the global reactor
    with one-second resolution, rounding down: each is up to a second shorter
    than given. The stall and status checks run on the manager's reactor.
    """

    stall_seconds: float = 10.0  # seconds a subscriber may take no data while output waits
    close_timeout: float = 5.0  # seconds a client has to read our close frame and answer it
    ping_interval: float = 20.0  # seconds between keepalive pings; 0 disables them
    ping_timeout: float = 10.0  # seconds to wait for the pong before dropping the peer
    check_seconds: float = 0.25  # period of the status, deletion and stall checks


DEFAULT_SETTINGS = StreamSettings()


class Subscribers:
    """The open stream connections of one worker, so that shutdown can close them cleanly."""

    def __init__(self, clock: Any) -> None:  # IReactorTime
        self.clock = clock
        self.live: set[StreamProtocol] = set()
        self._emptied: list[defer.Deferred[None]] = []

    def __len__(self) -> int:
        return len(self.live)

    def add(self, protocol: StreamProtocol) -> None:
        self.live.add(protocol)

    def discard(self, protocol: StreamProtocol) -> None:
        self.live.discard(protocol)
        if not self.live:
            waiters, self._emptied = self._emptied, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "worker shutting down",
                  grace: float = 2.0) -> defer.Deferred[None]:
        """Send every subscriber a close frame; fires once all connections are gone, or
        after ``grace`` seconds (a client that never answers is autobahn's to drop)."""
        for protocol in list(self.live):
            protocol.going_away(code, reason)
        done: defer.Deferred[None] = defer.Deferred()
        if not self.live:
            done.callback(None)
            return done
        self._emptied.append(done)

        def give_up() -> None:
            if not done.called:
                done.callback(None)

        timer = self.clock.callLater(grace, give_up)

        def cancel_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        return done.addCallback(cancel_timer)


def stream_resource(manager: JobManager, job_id: str, request: IRequest,
                    settings: StreamSettings = DEFAULT_SETTINGS,
                    subscribers: Subscribers | None = None
                    ) -> IResource | defer.Deferred[IResource]:
    """The resource that answers one stream request: the WebSocket, or a JSON error.

    ``subscribers`` tracks the connection while it is open (for ``close_all``).
    The WebSocket comes once ``websocket.py`` is imported (see ``_websocket``).
    """
    fmt = request.args.get(b"format", [b"text"])[0]
    if fmt not in (b"text", b"json"):
        return cast(IResource, _ErrorResource(APIError(400, "Invalid format",
                                                       "format is text or json")))
    asked = (request.getHeader(b"upgrade") or b"").lower()
    if b"websocket" not in (token.strip() for token in asked.split(b",")):
        return cast(IResource, _ErrorResource(
            APIError(426, "Upgrade required", "this endpoint speaks WebSocket (RFC 6455)"),
            {b"Upgrade": b"websocket"}, b"Upgrade Required"))

    def upgrade(websocket: ModuleType) -> IResource:
        return cast(IResource, websocket.StreamResource(
            websocket.StreamFactory(manager, job_id, fmt == b"json", settings, subscribers)))

    return _websocket(manager.reactor).addCallback(upgrade)


_WEBSOCKET = "sandrun.api.websocket"
_websocket_module: ModuleType | None = None


def _websocket(reactor: Any) -> defer.Deferred[ModuleType]:
    """``sandrun.api.websocket``: imported by the first stream, not when the worker starts.

    autobahn and the cryptography its package imports are about 12 MB of memory that
    a worker no one watches need not hold.  The first import takes 0.1-0.2 s of
    Python; in a thread of the reactor's pool it only shares the GIL, rather than
    stopping the reactor (and every job's output) for that long.
    """
    if _websocket_module is not None:
        return defer.succeed(_websocket_module)

    def loaded(module: ModuleType) -> ModuleType:
        global _websocket_module
        _websocket_module = module
        return module

    return threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                     importlib.import_module, _WEBSOCKET).addCallback(loaded)


@implementer(IPushProducer)
class Subscriber:
    """One client watching one job: a cursor into the job's log, sent as the transport drains.

    Everything runs on the reactor thread, and the log is append-only, so the
    cursor alone guarantees each chunk is sent once and in order: the log's
    listeners only say "there is more".
    """

    def __init__(self, protocol: StreamProtocol, job: Job, json_frames: bool,
                 settings: StreamSettings, clock: Any) -> None:  # clock: IReactorTime
        self.protocol, self.job, self.json_frames = protocol, job, json_frames
        self.settings, self.clock = settings, clock
        self.next_chunk = 0  # index in job.log.chunks of the next chunk to send
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace")
                         for name in ("stdout", "stderr", "install")}
        self.sent_status: JobStatus | None = None
        self.paused = False
        self.paused_since = 0.0
        self.stopped = False
        self.checker = task.LoopingCall(self.check)
        self.checker.clock = clock

    def start(self) -> None:
        assert self.protocol.transport is not None  # onOpen runs on a connected protocol
        # A connection's transport is also its consumer (ITCPTransport and TLS both are).
        transport = cast(IConsumer, self.protocol.transport)
        # twisted.web's HTTP channel registered itself when the connection was
        # HTTP; the connection is ours now, and so is its flow control.
        transport.unregisterProducer()
        transport.registerProducer(self, True)
        self.job.log.listeners.append(self.on_output)
        self.job.end_listeners.append(self.on_end)
        self.checker.start(self.settings.check_seconds, now=False)
        self.pump()

    def stop(self) -> None:
        """Unsubscribe; safe to call more than once."""
        if self.stopped:
            return
        self.stopped = True
        _discard(self.job.log.listeners, self.on_output)
        _discard(self.job.end_listeners, self.on_end)
        if self.checker.running:
            self.checker.stop()

    # -- IPushProducer: the transport says when it wants data ------------------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.paused_since = self.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.stop()

    # -- the job says something happened ----------------------------------------

    def on_output(self, stream: str, data: bytes) -> None:
        self.pump()

    def on_end(self, job: Job) -> None:
        self.pump()

    def check(self) -> None:
        """Periodically: a status change with no output, a deleted job, a stalled client."""
        if self.paused and not self.stopped and not self.job.deleted \
                and self.clock.seconds() - self.paused_since >= self.settings.stall_seconds:
            log.info("stream subscriber of {job_id} dropped: it took no data for {seconds} s",
                     job_id=self.job.id, seconds=self.settings.stall_seconds)
            self.close(CLOSE_TOO_SLOW,
                       f"too slow: took no data for {self.settings.stall_seconds:g} s")
            return
        self.pump()

    # -- sending ----------------------------------------------------------------------

    def pump(self) -> None:
        """Send what the transport will take: backlog, live chunks, and the end."""
        if self.stopped:
            return
        if self.job.deleted:
            self.close(CLOSE_NO_JOB, "job deleted")
            return
        chunks = self.job.log.chunks
        while not self.paused and not self.stopped:
            if self.next_chunk < len(chunks):
                self.send_status()
                stream, data = chunks[self.next_chunk]
                self.next_chunk += 1
                self.send_output(stream, self.decoders[stream].decode(data))
            elif self.job.finished:
                self.finish()
            else:
                self.send_status()
                return

    def finish(self) -> None:
        job = self.job
        for stream, decoder in self.decoders.items():
            # A character cut off by the end of the output is sent as U+FFFD.
            self.send_output(stream, decoder.decode(b"", final=True))
        reason = job.reason.value if job.reason else None
        if self.json_frames:
            meta = job.execution_metadata()
            self.send_json({"type": "status", "status": job.status.value})
            self.send_json({"type": "done", "status": job.status.value, "reason": reason,
                            "exit_code": meta["exit_code"],
                            "cpu_seconds": meta["cpu_seconds"],
                            "memory_peak_bytes": meta["memory_peak_bytes"],
                            "wall_time_ms": meta["wall_time_ms"]})
        text = "job completed" if job.status == JobStatus.COMPLETED else f"job failed: {reason}"
        self.close(CLOSE_DONE, text)

    def send_status(self) -> None:
        """A status frame when a queued or running status is new to this subscriber.

        A final status waits for ``finish``, so that it follows the last output.
        """
        status = self.job.status
        if self.json_frames and status != self.sent_status and not self.job.finished:
            self.sent_status = status
            self.send_json({"type": "status", "status": status.value})

    def send_output(self, stream: str, text: str) -> None:
        if not text:  # only the start of a character so far
            return
        if self.json_frames:
            self.send_json({"type": "output", "stream": stream, "data": text})
        elif stream != "install":  # text frames are the program's output as printed
            self.protocol.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_json(self, frame: dict[str, Any]) -> None:
        self.protocol.sendMessage(json.dumps(frame, ensure_ascii=False).encode("utf-8"),
                                  isBinary=False)

    def close(self, code: int, reason: str) -> None:
        self.stop()
        self.protocol.close(code, reason)


def _discard(listeners: list[Any], listener: Any) -> None:
    try:
        listeners.remove(listener)
    except ValueError:
        pass


class _ErrorResource(Resource):
    isLeaf = True

    def __init__(self, error: APIError, headers: dict[bytes, bytes] | None = None,
                 phrase: bytes | None = None) -> None:
        super().__init__()
        self.error, self.headers, self.phrase = error, headers or {}, phrase

    def render(self, request: IRequest) -> bytes:
        for name, value in self.headers.items():
            request.setHeader(name, value)
        body = write_error(request, self.error)
        if self.phrase:  # twisted.web has no phrase for 426
            request.setResponseCode(self.error.status, self.phrase)
        return body
