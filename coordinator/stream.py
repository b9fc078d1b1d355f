"""Live output through the coordinator: a WebSocket relay to the job's worker.

The client's WebSocket (autobahn server side) is accepted at once; the relay
then opens the worker's ``/logs/{worker job id}/stream`` (autobahn client
side, same ``format`` query) and forwards every frame as it came, text or
binary, and then the worker's close code (1000 when the job ended, 4404 for
an unknown job).  Frames that arrive before the worker side is open are not
lost: the worker replays everything the job printed on connect.

When the worker goes away instead (its connection drops without a close
handshake, it cannot be reached, or a health check takes it out of the pool
while a stream is open) the client is told the job ended with
``worker_lost``: in ``?format=json`` a last ``{"type": "done", "status":
"failed", "reason": "worker_lost", ...}`` frame, then close code 1000 with
reason ``worker_lost``.  Nothing waits forever on a dead worker.

Flow control is end to end (``_Valve``): a client that falls more than 1 MiB
behind pauses the coordinator's reads from the worker, and the worker (which
writes only while its transport wants data) holds back too; so a stream costs
the coordinator about 1 MiB at most, however slow its client.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import endpoints
from twisted.internet.interfaces import IPushProducer
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from coordinator.jobids import JobRef
from coordinator.registry import WorkerRegistry, WorkerState

log = Logger()

WORKER_LOST = "worker_lost"
NOT_FOUND_CODE = 4404
CONNECT_TIMEOUT = 10.0


def lost_frame() -> bytes:
    return json.dumps({"type": "done", "status": "failed", "reason": WORKER_LOST,
                       "exit_code": None, "cpu_seconds": None, "memory_peak_bytes": None,
                       "wall_time_ms": None}).encode()


class ClientSide(WebSocketServerProtocol):
    """The client's connection to the coordinator."""

    relay: StreamRelay
    worker: WorkerState | None
    ref: JobRef | None
    fmt: str | None

    upstream: UpstreamSide | None = None
    valve: _Valve | None = None
    closing = False
    done_seen = False

    def onOpen(self) -> None:
        if self.worker is None or self.ref is None:
            self.end(NOT_FOUND_CODE, "job not found")
            return
        if self.worker.down or self.relay.registry.restarted_after(self.worker,
                                                                  self.ref.dispatched_at):
            self.end_lost()
            return
        self.relay.opened(self)
        self.relay.connect_upstream(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass  # the stream is one-way; what a client sends is ignored

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closing = True
        self.unfollow()
        self.relay.closed(self)
        if self.upstream is not None:
            self.upstream.abandon()
            self.upstream = None

    # -- from the worker -------------------------------------------------------

    def relay_message(self, payload: bytes, is_binary: bool) -> None:
        if self.closing:
            return
        if self.fmt == "json" and not is_binary and b'"done"' in payload:
            try:
                self.done_seen = self.done_seen or json.loads(payload).get("type") == "done"
            except (ValueError, AttributeError):
                pass
        self.sendMessage(payload, is_binary)
        if self.valve is not None:
            self.valve.sent(len(payload))

    def follow(self, upstream: UpstreamSide) -> None:
        """Flow control: see ``_Valve``.  twisted.web's channel was this transport's
        producer until the WebSocket took the connection over; the valve replaces it."""
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        self.valve = _Valve(upstream)
        transport.registerProducer(self.valve, True)

    def unfollow(self) -> None:
        transport: Any = self.transport
        self.valve = None
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()

    def upstream_closed(self, clean: bool, code: int | None, reason: str | None) -> None:
        self.upstream = None
        self.unfollow()
        if not clean or code is None or code == 1006:
            # Not marked down here: the next health check decides whether the
            # worker itself is gone; this stream is over either way.
            if self.done_seen:  # the job's end arrived before the connection dropped
                self.end(1000, "job ended")
            else:
                self.end_lost()
        elif code == 1000 or 3000 <= code <= 4999:
            self.end(code, reason)
        else:
            self.end(1000, reason or f"worker closed with {code}")

    # -- ending ----------------------------------------------------------------

    def end_lost(self) -> None:
        if self.closing:
            return
        if self.fmt == "json" and not self.done_seen:
            self.sendMessage(lost_frame(), False)
        self.end(1000, WORKER_LOST)

    def end(self, code: int, reason: str | None) -> None:
        if self.closing:
            return
        self.closing = True
        self.unfollow()
        if self.upstream is not None:
            self.upstream.abandon()
            self.upstream = None
        self.sendClose(code, reason)


@implementer(IPushProducer)
class _Valve:
    """Pauses reading from the worker once a client lags by more than ``slack`` bytes.

    Registered as the producer of the client's connection: that transport
    calls ``pauseProducing`` when its buffer passes 64 KiB and
    ``resumeProducing`` once it has drained.  Between the two, the bytes
    relayed are counted, and past ``slack`` the worker connection stops being
    read, so the worker (which writes only while its transport wants data)
    holds back too.  The slack lets a briefly slow client catch up without
    stalling the worker, whose close handshake after the last frame must not
    wait on a paused reader; so the coordinator holds at most about
    ``slack`` + 64 KiB per stream, however far behind a client is.
    """

    def __init__(self, upstream: UpstreamSide, slack: int = 1024 * 1024) -> None:
        self.upstream = upstream
        self.slack = slack
        self.client_full = False
        self.lag = 0
        self.worker_paused = False

    def sent(self, size: int) -> None:
        if not self.client_full:
            return
        self.lag += size
        worker: Any = self.upstream.transport
        if self.lag > self.slack and not self.worker_paused and worker is not None:
            self.worker_paused = True
            worker.pauseProducing()

    def pauseProducing(self) -> None:
        if not self.client_full:  # called again on every write while the buffer is full
            self.client_full, self.lag = True, 0

    def resumeProducing(self) -> None:
        self.client_full, self.lag = False, 0
        worker: Any = self.upstream.transport
        if self.worker_paused and worker is not None:
            self.worker_paused = False
            worker.resumeProducing()

    def stopProducing(self) -> None:
        self.upstream.abandon()


class UpstreamSide(WebSocketClientProtocol):
    """The coordinator's connection to the worker, for one client."""

    downstream: ClientSide | None = None
    abandoned = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.downstream is not None:
            self.downstream.relay_message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        downstream, self.downstream = self.downstream, None
        if downstream is not None and not self.abandoned:
            downstream.upstream_closed(wasClean, code, reason)

    def abandon(self) -> None:
        """The client is gone (or was told): close the worker side quietly."""
        self.abandoned = True
        self.downstream = None
        if self.transport is not None:
            self.dropConnection(abort=True)


class StreamRelay:
    """Builds the per-request WebSocket resource and tracks open relays per worker."""

    def __init__(self, reactor: Any, registry: WorkerRegistry, trust_root: Any = None) -> None:
        self.reactor = reactor
        self.registry = registry
        self.trust_root = trust_root  # for wss:// to https:// workers; None: the system's
        self._open: dict[str, set[ClientSide]] = {}
        registry.on_down(self._worker_down)

    def resource(self, state: WorkerState | None, ref: JobRef | None,
                 fmt: str | None) -> WebSocketResource:
        factory = WebSocketServerFactory()
        factory.noisy = False
        relay = self

        class Protocol(ClientSide):
            pass

        Protocol.relay, Protocol.worker, Protocol.ref, Protocol.fmt = relay, state, ref, fmt
        factory.protocol = Protocol
        return WebSocketResource(factory)

    def open_count(self) -> int:
        return sum(len(s) for s in self._open.values())

    # -- bookkeeping -------------------------------------------------------------

    def opened(self, client: ClientSide) -> None:
        assert client.worker is not None
        self._open.setdefault(client.worker.worker_id, set()).add(client)

    def closed(self, client: ClientSide) -> None:
        if client.worker is not None:
            clients = self._open.get(client.worker.worker_id)
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self._open[client.worker.worker_id]

    def _worker_down(self, state: WorkerState) -> None:
        for client in list(self._open.pop(state.worker_id, ())):
            client.end_lost()

    # -- the worker side -----------------------------------------------------------

    def connect_upstream(self, client: ClientSide) -> None:
        assert client.worker is not None and client.ref is not None
        state = client.worker
        url = urlsplit(state.entry.endpoint)
        secure = url.scheme == "https"
        host, port = url.hostname or "", url.port or (443 if secure else 80)
        query = f"?{urlencode({'format': client.fmt})}" if client.fmt else ""
        path = f"/logs/{quote(client.ref.worker_job_id, safe='')}/stream{query}"
        ws_url = f"{'wss' if secure else 'ws'}://{url.netloc}{path}"
        factory = WebSocketClientFactory(ws_url)
        factory.noisy = False
        factory.protocol = UpstreamSide
        endpoint: Any
        if secure:
            endpoint = endpoints.SSL4ClientEndpoint(self.reactor, host, port,
                                                    optionsForClientTLS(
                                                        host, trustRoot=self.trust_root),
                                                    timeout=CONNECT_TIMEOUT)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(self.reactor, host, port,
                                                    timeout=CONNECT_TIMEOUT)

        def connected(upstream: UpstreamSide) -> None:
            if client.closing:
                upstream.abandon()
                return
            upstream.downstream = client
            client.upstream = upstream
            client.follow(upstream)

        def failed(failure: Any) -> None:
            if client.closing:
                return
            self.registry.mark_down(state, f"stream: {failure.getErrorMessage()}")
            client.end_lost()

        endpoint.connect(factory).addCallbacks(connected, failed)
