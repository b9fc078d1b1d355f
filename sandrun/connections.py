"""Connection hygiene at the HTTP edge, the same for the worker and the coordinator.

A wire helper, like ``sandrun.httpjson``: Twisted and the standard library
(and ``sandrun.netaddr``), nothing else from Sandrun, so the coordinator
imports it too.  What one client can hold, and for how long:

- ``ConnectionCaps``: open connections per client address and in all
  (``twisted.protocols.policies.LimitConnectionsByPeer`` would wrap every
  connection's protocol, which hides TLS from the WebSocket upgrade, and it
  reads peers as tuples; counting at the site's ``buildProtocol`` does not).  Past either cap a new
  connection is answered at once with a JSON 429 (its address) or 503 (all)
  and closed, before a byte of its request is read.  The global cap stays
  below the process's descriptor limit (``RLIMIT_NOFILE``, whose soft value
  ``sandrun.daemon.raise_open_files_limit`` lifts to the hard one at start),
  with room kept for jobs and files;
- ``GuardedChannel``: a request's headers must be complete within
  ``header_timeout`` seconds of the connection, or of the first byte of a
  later request on it (a 408, then the connection closes: no slowloris),
  and twisted's idle
  timeout (the site's ``timeOut``) closes a connection that sends nothing
  for ``idle_timeout`` seconds, between requests or inside a body.  A body
  must keep coming at ``min_body_rate`` bytes a second on average, its first
  ``body_grace`` seconds free (a 408 otherwise): a body trickled a byte at a
  time, just inside the idle timeout, would hold its in-flight allowance and
  its connection for days;
  Malformed HTTP is a JSON 400, not a bare hang-up;
- ``UploadBudget``: request-body bytes in flight (being received or waiting
  to be handled) per client address and in all; a body that would pass either
  is refused from its headers (``Content-Length``) or, chunked, as soon as it
  passes, with a JSON 429 or 503;
- ``BodyRoutes``: from the router's own table, a body sent to a route that
  takes none (``POST /health``, a ``GET`` with a body, an unknown path) is
  answered 405, 413 or 404 before it is read.

Addresses listed in ``exempt`` (trusted proxies such as a coordinator, and
quota-exempt networks) have no per-address cap; the global caps hold for all.
The limits are a ``sandrun.daemon.ConnectionPolicy`` (stdlib only, so the
configurations that hold one do not import twisted.web).
"""

from __future__ import annotations

import time
import urllib.parse
from collections import Counter
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.web import http

from sandrun.daemon import ConnectionPolicy, connection_cap
from sandrun.httpjson import json_response
from sandrun.netaddr import address_in, client_key

__all__ = [
    "BodyRoutes",
    "ConnectionCaps",
    "GuardedChannel",
    "Refusal",
    "UploadBudget",
    "guard_site",
]

# An early answer to a request: (status, JSON body, extra headers).
Refusal = tuple[int, dict[str, Any], dict[str, str]]


def guard_site(site: Any, policy: ConnectionPolicy, reserve: int) -> ConnectionCaps:
    """Give ``site`` the policy's timeouts and connection caps; the caps, for logs and tests.

    ``site.protocol`` must be a ``GuardedChannel``; ``reserve`` descriptors are kept
    free of client connections (jobs' pipes, files, connections to workers).
    """
    site.timeOut = policy.idle_timeout
    site.protocol = type(site.protocol.__name__, (site.protocol,),
                         {"header_timeout": policy.header_timeout,
                          "min_body_rate": float(policy.min_upload_rate),
                          "body_grace": policy.upload_grace})
    caps = ConnectionCaps(connection_cap(policy.max_connections, reserve),
                          policy.max_connections_per_ip, policy.exempt)
    build = site.buildProtocol

    def buildProtocol(addr: Any) -> Any:
        counted, refusal = caps.admit(addr)
        if refusal is not None:
            return refusal
        protocol = build(addr)
        protocol.counted = counted
        return protocol

    site.buildProtocol = buildProtocol
    return caps


def _peer_host(address: Any) -> str:
    return str(getattr(address, "host", None) or "unix")


class _Refused(Protocol):
    """Writes one JSON answer to a connection over a cap, and closes it."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.answer)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass  # the request is never read


class _Open:
    """One open connection, as the caps count it."""

    __slots__ = ("closed", "transport")

    def __init__(self) -> None:
        self.transport: Any = None  # set when the connection is made
        self.closed = False

    def live(self) -> bool:
        # A connection handed to a WebSocket protocol no longer reports to its channel;
        # its transport still says when it is gone.
        return not self.closed and not (self.transport is not None
                                        and getattr(self.transport, "disconnected", False))


class ConnectionCaps:
    """Counts open connections per client address and in all; refuses past the caps.

    Used by a site's ``buildProtocol`` (see ``guard_site``): a connection over a cap
    gets a protocol that writes one JSON answer and closes, never an HTTP channel.
    """

    def __init__(self, max_total: int, max_per_ip: int, exempt: tuple[str, ...] = ()) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.exempt = exempt
        self._by_key: dict[str, list[_Open]] = {}
        self._count = 0
        self.refused = 0  # connections refused so far (for logs and tests)

    @property
    def total(self) -> int:
        self._prune_all()
        return self._count

    @property
    def per_ip(self) -> dict[str, int]:
        self._prune_all()
        return {key: len(entries) for key, entries in self._by_key.items()}

    def admit(self, addr: Any) -> tuple[_Open | None, Protocol | None]:
        """(what to track, None) for a connection let in; (None, the refusal) otherwise."""
        host = _peer_host(addr)
        key = client_key(host)
        if self._count >= self.max_total:
            self._prune_all()
        if self._count >= self.max_total:
            self.refused += 1
            return None, _Refused(json_response(503, {
                "error": "Too many connections", "retry_after": 1,
                "details": f"the server holds {self.max_total} connections, its limit"},
                {"Retry-After": "1"}))
        entries = self._by_key.setdefault(key, [])
        if len(entries) >= self.max_per_ip:
            self._prune(key)
            entries = self._by_key.setdefault(key, [])
        if len(entries) >= self.max_per_ip and not address_in(host, self.exempt):
            self.refused += 1
            return None, _Refused(json_response(429, {
                "error": "Too many connections", "retry_after": 1,
                "details": f"at most {self.max_per_ip} open connections per client address"},
                {"Retry-After": "1"}))
        entry = _Open()
        entries.append(entry)
        self._count += 1
        return entry, None

    def _prune(self, key: str) -> None:
        entries = self._by_key.get(key, [])
        alive = [e for e in entries if e.live()]
        self._count -= len(entries) - len(alive)
        if alive:
            self._by_key[key] = alive
        else:
            self._by_key.pop(key, None)

    def _prune_all(self) -> None:
        for key in list(self._by_key):
            self._prune(key)


def _cancel(call: Any) -> None:
    """Cancel a delayed call (or None) if it is still pending."""
    if call is not None and call.active():
        call.cancel()


class GuardedChannel(http.HTTPChannel):
    """twisted's HTTP/1.1 channel with a header deadline and JSON answers to bad requests."""

    header_timeout: float | None = 10.0
    # A body's least average rate, bytes a second, after its first body_grace seconds.
    min_body_rate: float = 0.0
    body_grace: float = 10.0
    _header_call: Any = None
    _body_call: Any = None
    _body_started = 0.0
    _body_bytes = 0
    _in_request = False  # headers complete, answer not yet finished
    counted: _Open | None = None  # this connection in the site's ConnectionCaps

    def connectionMade(self) -> None:
        if self.counted is not None:
            self.counted.transport = self.transport
        super().connectionMade()
        self._arm_header_timer()

    def dataReceived(self, data: bytes) -> None:
        if not self._in_request:
            self._arm_header_timer()
        elif self._body_call is not None:
            self._body_bytes += len(data)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._in_request = True
        self._disarm_header_timer()
        self._arm_body_clock()  # disarmed at once when there is no body
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._disarm_body_clock()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Between requests the idle timeout holds (a kept-alive connection may rest, as a
        # coordinator's pooled ones do); the next request's first byte starts its deadline.
        self._in_request = False
        super().requestDone(request)

    def connectionLost(self, reason: Any = None) -> None:
        if self.counted is not None:
            self.counted.closed = True
        self._disarm_header_timer()
        self._disarm_body_clock()
        super().connectionLost(reason)

    def _arm_header_timer(self) -> None:
        if self._header_call is None and self.header_timeout:
            self._header_call = self.callLater(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        _cancel(self._header_call)
        self._header_call = None

    def _headers_too_slow(self) -> None:
        self._header_call = None
        if self.transport is None:
            return
        self.transport.write(json_response(408, {
            "error": "Request timeout",
            "details": f"a request's headers must arrive within {self.header_timeout:g} s"}))
        self._close_soon()

    def _arm_body_clock(self) -> None:
        if self.min_body_rate > 0:
            self._body_started = self._now()
            self._body_bytes = 0
            self._body_call = self.callLater(self.body_grace + 1.0, self._check_body_rate)

    def _disarm_body_clock(self) -> None:
        _cancel(self._body_call)
        self._body_call = None

    def _now(self) -> float:
        clock = getattr(self.callLater, "__self__", None)  # the reactor, or a test's Clock
        return float(clock.seconds()) if clock is not None else time.monotonic()

    def _check_body_rate(self) -> None:
        self._body_call = None
        if self.transport is None:
            return
        elapsed = self._now() - self._body_started
        if self._body_bytes >= self.min_body_rate * (elapsed - self.body_grace):
            self._body_call = self.callLater(1.0, self._check_body_rate)
            return
        document = {
            "error": "Request timeout",
            "details": f"a request's body must arrive at {self.min_body_rate:g} bytes a second "
                       f"or more after its first {self.body_grace:g} s; this one brought "
                       f"{self._body_bytes} bytes in {elapsed:.0f} s"}
        request = self.requests[-1] if self.requests else None
        if request is not None and hasattr(request, "answer"):
            request.answer(408, document)  # also releases its in-flight allowance
        else:
            self.transport.write(json_response(408, document))
        self._close_soon()

    def _close_soon(self) -> None:
        # The answer goes out if the client reads it; a client that does not is cut off.
        assert self.transport is not None
        self.transport.loseConnection()
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self.transport is not None:
            self.transport.write(json_response(400, {
                "error": "Bad request",
                "details": "malformed HTTP: request line, headers (too many or too large), "
                           "Content-Length or chunked encoding"}))
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or header over MAX_LENGTH: twisted would just hang up.
        self._respondToBadRequestAndDisconnect()


class UploadBudget:
    """Request-body bytes in flight, per client address and in all."""

    def __init__(self, total: int, per_ip: int, exempt: tuple[str, ...] = ()) -> None:
        self.total_limit = total
        self.per_ip_limit = per_ip
        self.exempt = exempt
        self.per_ip: Counter[str] = Counter()
        self.total = 0

    def reserve(self, host: str, nbytes: int) -> Refusal | None:
        """Take ``nbytes`` for a body from ``host``; the refusal when that is too many."""
        key = client_key(host)
        if self.total + nbytes > self.total_limit:
            return (503, {"error": "Too many uploads", "retry_after": 5,
                          "details": f"uploads in progress hold {self.total} of the "
                                     f"{self.total_limit} bytes the server takes at once"},
                    {"Retry-After": "5"})
        if self.per_ip[key] + nbytes > self.per_ip_limit and not address_in(host, self.exempt):
            return (429, {"error": "Too many uploads", "retry_after": 5,
                          "details": f"uploads from this address in progress hold "
                                     f"{self.per_ip[key]} of the {self.per_ip_limit} bytes "
                                     "one address may send at once"},
                    {"Retry-After": "5"})
        self.total += nbytes
        self.per_ip[key] += nbytes
        return None

    def release(self, host: str, nbytes: int) -> None:
        key = client_key(host)
        self.total -= nbytes
        self.per_ip[key] -= nbytes
        if self.per_ip[key] <= 0:
            del self.per_ip[key]


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyRoutes:
    """Which requests may carry a body, from a Klein app's werkzeug ``Map``.

    The path is decoded as twisted.web and Klein decode it (each segment
    unquoted), so ``/%73ubmit`` is ``/submit`` here as it is to the router.
    """

    def __init__(self, url_map: Any) -> None:
        self._adapter = url_map.bind("localhost")

    def route(self, method: bytes, raw_path: bytes) -> tuple[str | None, int]:
        """(endpoint, 0) for a route, or (None, 404 or 405)."""
        from werkzeug.exceptions import MethodNotAllowed, NotFound
        from werkzeug.routing import RequestRedirect

        path = raw_path.split(b"?", 1)[0]
        try:
            decoded = b"/".join(urllib.parse.unquote_to_bytes(part)
                                for part in path.split(b"/")).decode("utf-8")
        except UnicodeDecodeError:
            return None, 404
        try:
            endpoint, _ = self._adapter.match(decoded, method=method.decode("latin-1"))
        except MethodNotAllowed as e:
            # Only the catch-all preflight route (OPTIONS) matched: no such path.
            return None, 404 if set(e.valid_methods or ()) <= {"OPTIONS"} else 405
        except (NotFound, RequestRedirect):
            return None, 404
        return str(endpoint), 0

    def refusal(self, method: bytes, raw_path: bytes) -> Refusal | None:
        """The answer to a body sent where none is taken; None where a body is taken."""
        _, status = self.route(method, raw_path)
        if status == 404:
            return 404, {"error": "Not found", "details": "no such endpoint"}, {}
        if status == 405:
            return 405, {"error": "Method not allowed", "details": "see the API documentation"}, {}
        if method.decode("latin-1") in _BODY_METHODS:
            return None
        return 413, {"error": "Request body not allowed",
                     "details": "this endpoint takes no request body"}, {}
