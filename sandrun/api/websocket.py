"""The WebSocket side of ``/logs/{job_id}/stream``: autobahn's factory, protocol and
resource, around a ``stream.Subscriber``.

The protocol itself is documented in ``stream.py``.  Apart because autobahn
(whose package imports its WAMP modules and with them cryptography) costs a
worker about 12 MB of memory: ``stream.stream_resource`` imports this module
for the first stream, so a worker no one watches never loads it.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.web.iweb import IRequest

from sandrun.api.stream import (
    CLOSE_GOING_AWAY,
    CLOSE_NO_JOB,
    CLOSE_TOO_SLOW,
    StreamSettings,
    Subscriber,
    Subscribers,
)
from sandrun.jobs.manager import JobManager

__all__ = ["StreamFactory", "StreamProtocol", "StreamResource"]


class StreamFactory(WebSocketServerFactory):
    """One per request: it carries the job id and format to the protocol."""

    def __init__(self, manager: JobManager, job_id: str, json_frames: bool,
                 settings: StreamSettings, subscribers: Subscribers | None = None) -> None:
        super().__init__(reactor=manager.reactor)
        self.manager, self.job_id, self.json_frames = manager, job_id, json_frames
        self.settings, self.subscribers = settings, subscribers
        self.setProtocolOptions(
            webStatus=False,
            allowedOrigins=["*"],  # anonymous public service; see stream.py's docstring
            autoPingInterval=settings.ping_interval, autoPingTimeout=settings.ping_timeout,
            closeHandshakeTimeout=settings.close_timeout)


class StreamProtocol(WebSocketServerProtocol):  # type: ignore[misc]
    factory: StreamFactory
    subscriber: Subscriber | None = None

    def onOpen(self) -> None:
        factory = self.factory
        job = factory.manager.get(factory.job_id)
        if job is None or job.deleted:
            self.close(CLOSE_NO_JOB, "job not found")
            return
        self.subscriber = Subscriber(self, job, factory.json_frames, factory.settings,
                                     factory.manager.reactor)
        if factory.subscribers is not None:
            factory.subscribers.add(self)
        self.subscriber.start()

    def onMessageFrameData(self, payload: bytes) -> None:
        # Nothing a client says changes what it is sent: drop its data as it
        # arrives rather than collect a message of any size. (autobahn's
        # maxMessagePayloadSize would also cap what we send.)
        pass

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.factory.subscribers is not None:
            self.factory.subscribers.discard(self)

    def going_away(self, code: int, reason: str) -> None:
        """Shutdown: stop sending the job's output and close."""
        if self.subscriber is not None:
            self.subscriber.close(code, reason)
        else:
            self.close(code, reason)

    def close(self, code: int, reason: str) -> None:
        if code in (CLOSE_GOING_AWAY, CLOSE_TOO_SLOW):
            # autobahn's sendClose only lets applications use 1000 and 3000-4999;
            # 1001 and 1008 are the codes the protocol defines for these, so send the
            # frame as is.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123])
        else:
            self.sendClose(code, reason)


StreamFactory.protocol = StreamProtocol  # type: ignore[assignment]


class StreamResource(WebSocketResource):  # type: ignore[misc]
    def render(self, request: IRequest) -> Any:
        result = super().render(request)
        # The (empty) body of the upgrade request was spooled to the worker's
        # tmpfs; the request object lives on until garbage collection, the file
        # need not.
        request.content.close()
        return result
