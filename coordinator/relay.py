"""A worker's answer body streamed into a client's request, with back-pressure.

The worker's connection is the client request's producer: while the client's
buffers are full, the coordinator stops reading from the worker (and the
worker, which writes only while its transport wants data, holds back too).
What passes may be rewritten on the way (``rewrite.LineRewriter``,
``members.MemberRelay``: ``feed`` and ``end``).
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as Interface

from twisted.internet import defer
from twisted.internet.interfaces import IProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request

from coordinator.worker_client import BadWorkerResponse


class Rewriter(Interface):
    """Turns the worker's bytes into the client's; ``BadWorkerResponse`` ends the relay."""

    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


_DONE = Failure(ResponseDone())


class _Relay(Protocol):
    """Copies a response body into a request; the worker's transport is the producer."""

    def __init__(self, request: Request, done: defer.Deferred[None],
                 rewriter: Rewriter | None = None) -> None:
        self.request = request
        self.done = done
        self.rewriter = rewriter
        self.failed = False
        self.registered = False

    def connectionMade(self) -> None:
        # The transport (the worker connection) is paused whenever the client's
        # buffers are full and resumed when they drain: nothing piles up here.
        assert IProducer.providedBy(self.transport)
        self.request.registerProducer(self.transport, True)
        self.registered = True

    def dataReceived(self, data: bytes) -> None:
        if self.failed:
            return
        if self.rewriter is not None:
            try:
                data = self.rewriter.feed(data)
            except BadWorkerResponse:
                self.failed = True
                self.unregister()  # before the caller ends the request
                self.done.errback()
                self.abort()
                return
        if data:
            self.request.write(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:  # type: ignore[override]
        self.unregister()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            if self.rewriter is not None:
                try:
                    rest = self.rewriter.end()
                except BadWorkerResponse:
                    self.done.errback()
                    return
                if rest:
                    self.request.write(rest)
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def unregister(self) -> None:
        if self.registered:
            self.registered = False
            if not getattr(self.request, "_disconnected", False):  # gone with the client
                self.request.unregisterProducer()

    def abort(self) -> None:
        worker: Any = self.transport
        if worker is not None:
            worker.stopProducing()


def relay(response: Any, request: Request,
          rewriter: Rewriter | None = None) -> defer.Deferred[None]:
    """Stream ``response``'s body into ``request``; fires when all of it was written.

    Cancelling (Klein does when the client disconnects) aborts the worker side.
    """
    protocol: list[_Relay] = []
    done: defer.Deferred[None] = defer.Deferred(lambda d: protocol[0].abort())
    protocol.append(_Relay(request, done, rewriter))
    response.deliverBody(protocol[0])
    return done
