"""Talking to workers over HTTP: requests with timeouts, and failures in plain words.

Every request goes through one treq ``HTTPClient`` (production: an ``Agent``
with a persistent connection pool; tests: in-memory agents around real
worker apps).  Responses are unbuffered so downloads can be streamed; JSON
bodies are read with a cap.

Failures are sorted by what they mean for a submission:

- ``WorkerUnreachable``: the worker was never reached, or the connection
  died before any response (connection refused, DNS, reset, the request could
  not be sent).  A submission that fails this way is sent to the next worker,
  and the worker is taken out of the pool at once;
- ``WorkerTimeout``: no response in time.  The worker may still be working on
  it, so a submission is *not* retried elsewhere (it could run twice).
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer, task
from twisted.internet import error as ierror
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web._newclient import RequestNotSent
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

# A /status document: its output_files (up to 10,000 paths) and the signed text that
# repeats them.  /logs and /outputs are never read whole (coordinator/members.py).
MAX_JSON_BYTES = 64 * 1024 * 1024
# Any other answer a worker gives: an error, /submit's, DELETE's (a few hundred bytes).
MAX_SMALL_JSON_BYTES = 1024 * 1024

_UNREACHABLE = (
    ierror.ConnectError,  # includes ConnectionRefusedError and connect timeouts
    ierror.DNSLookupError,
    ierror.ConnectionLost,
    ierror.ConnectionDone,
    webclient.ResponseNeverReceived,
    webclient.RequestTransmissionFailed,
    RequestNotSent,
)


class WorkerUnreachable(Exception):
    """The worker could not be reached, or dropped the connection before answering."""


class WorkerTimeout(Exception):
    """The worker did not answer in time."""


class BadWorkerResponse(Exception):
    """The worker answered something that is not what the contract says."""


def describe(failure: Failure) -> str:
    """A short, log-safe description of why a request to a worker failed."""
    value = failure.value
    if isinstance(value, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, ierror.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(value, (ierror.TCPTimedOutError, ierror.TimeoutError)):
        return "connection timed out"
    if isinstance(value, ierror.ConnectError):
        return f"cannot connect: {value.osError or value.__class__.__name__}"
    if isinstance(value, webclient.ResponseNeverReceived):
        tls = next((_tls_error(r.value) for r in value.reasons if _tls_error(r.value)), None)
        return f"TLS handshake failed: {tls}" if tls else "connection closed before a response"
    if isinstance(value, webclient.RequestTransmissionFailed):
        return "connection lost while sending the request"
    return value.__class__.__name__


def _tls_error(error: BaseException) -> str | None:
    """OpenSSL's reason for a failed handshake (``certificate verify failed``), or None."""
    try:
        from OpenSSL import SSL
    except ImportError:
        return None
    if not isinstance(error, SSL.Error):
        return None
    reasons = [entry[-1] for entry in (error.args[0] if error.args else [])
               if isinstance(entry, tuple) and entry]
    return "; ".join(str(r) for r in reasons) or "OpenSSL error"


@implementer(IBodyProducer)
class SpoolBodyProducer:
    """Sends a seekable file from its start, without closing it (it may be sent again).

    ``FileBodyProducer`` closes its file when done, which would make retrying
    a submission on the next worker impossible.
    """

    def __init__(self, f: Any, cooperator: Any = task, read_size: int = 64 * 1024) -> None:
        f.seek(0, 2)
        self.length = f.tell()
        f.seek(0)
        self._producer = webclient.FileBodyProducer(_Unclosable(f), cooperator, read_size)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        return self._producer.startProducing(consumer)

    def pauseProducing(self) -> None:
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class _Unclosable:
    def __init__(self, f: Any) -> None:
        self._f = f

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._f.read(size)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position: int = self._f.seek(offset, whence)
        return position

    def tell(self) -> int:
        position: int = self._f.tell()
        return position

    def close(self) -> None:
        pass


class WorkerClient:
    """HTTP requests to workers; ``http`` is a treq ``HTTPClient``."""

    def __init__(self, reactor: Any, http: Any, cooperator: Any = task) -> None:
        self.reactor = reactor
        self.http = http
        self.cooperator = cooperator  # schedules sending upload bodies

    def body(self, f: Any) -> SpoolBodyProducer:
        """A producer that sends ``f`` from its start (again for each try)."""
        return SpoolBodyProducer(f, self.cooperator)

    def request(self, method: str, url: str, timeout: float,
                headers: dict[bytes, list[bytes]] | None = None,
                data: Any = None) -> defer.Deferred[Any]:
        """An unbuffered treq response; fails with ``WorkerUnreachable`` or ``WorkerTimeout``.

        ``timeout`` covers connecting, sending the body and receiving the
        response headers, not reading the body.
        """
        d: defer.Deferred[Any] = self.http.request(
            method, url, headers=headers, data=data, unbuffered=True, allow_redirects=False)
        timed_out = []

        def on_timeout(result: Any, limit: float) -> Any:
            timed_out.append(True)
            return result

        d.addTimeout(timeout, self.reactor, onTimeoutCancel=on_timeout)
        # Cancelled by us (our client went away): not a worker that cannot be reached.
        cancelled: list[bool] = []

        def cancel(_: defer.Deferred[Any]) -> None:
            cancelled.append(True)
            d.cancel()

        def translate(failure: Failure) -> Failure:
            if cancelled:
                return Failure(defer.CancelledError())
            if timed_out or failure.check(defer.TimeoutError):
                raise WorkerTimeout(f"no answer within {timeout:g} s")
            if failure.check(*_UNREACHABLE):
                raise WorkerUnreachable(describe(failure))
            return failure

        answer: defer.Deferred[Any] = defer.Deferred(cancel)
        d.addErrback(translate).chainDeferred(answer)
        return answer

    @defer.inlineCallbacks
    def get_json(self, url: str, timeout: float,
                 headers: dict[bytes, list[bytes]] | None = None) -> Any:
        """``(status code, parsed JSON body)``; the body must be JSON."""
        response = yield self.request("GET", url, timeout, headers=headers)
        body = yield read_json(response)
        return response.code, body

    @defer.inlineCallbacks
    def health(self, endpoint: str, nonce: str, timeout: float) -> Any:
        """``(status code, body)`` of ``/health?nonce=...``, the whole exchange within ``timeout``."""
        d = self.get_json(f"{endpoint}/health?nonce={nonce}", timeout)
        # Reading the body counts too: a worker that sends headers and stalls is not healthy.
        timed_out: list[bool] = []

        def on_timeout(result: Any, limit: float) -> Any:
            timed_out.append(True)
            return result

        d.addTimeout(timeout, self.reactor, onTimeoutCancel=on_timeout)
        try:
            result = yield d
        except (defer.TimeoutError, defer.CancelledError):
            if timed_out:
                raise WorkerTimeout(f"no answer within {timeout:g} s") from None
            raise
        return result


@defer.inlineCallbacks
def read_body(response: Any, limit: int = MAX_JSON_BYTES) -> Any:
    """The whole body, refusing one over ``limit`` bytes."""
    chunks: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > limit:
            raise BadWorkerResponse(f"the worker's answer is over {limit} bytes")
        chunks.append(data)

    yield treq.collect(response, collect)
    return b"".join(chunks)


@defer.inlineCallbacks
def read_json(response: Any, limit: int = MAX_JSON_BYTES) -> Any:
    body = yield read_body(response, limit)
    try:
        return json.loads(body)
    except ValueError:
        raise BadWorkerResponse(
            f"the worker answered HTTP {response.code} with a body that is not JSON") from None
