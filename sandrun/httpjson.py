"""JSON answers with CORS, as the worker and the coordinator both give them.

A wire helper, like ``sandrun.wire``: it imports only the standard library and
Twisted, nothing else from Sandrun, so the coordinator may import it too.  The
bodies are the contract's (``shared/spec/api.md``): ``{"error", "details",
...}``, with ``Retry-After`` on a 429 or 503 that says when to retry, and every
answer readable from a browser page (``Access-Control-Allow-Origin: *``).

``RawBodyRequest`` is the request class both build on: twisted.web never parses
its body (the worker parses uploads as a stream, the coordinator forwards them),
and it can be answered before its body is read (``answer``), for a refusal that
the headers alone decide.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from twisted.web import http, server
from twisted.web.iweb import IRequest


class APIError(Exception):
    """An answer other than success: status, short message, details, extra keys."""

    def __init__(self, status: int, error: str, details: str = "", **extra: Any) -> None:
        super().__init__(error)
        self.status, self.error, self.details, self.extra = status, error, details, extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "details": self.details, **self.extra}


def cors(request: IRequest) -> None:
    request.setHeader(b"Access-Control-Allow-Origin", b"*")


def write_json(request: IRequest, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    cors(request)
    return json.dumps(value).encode()


def write_error(request: IRequest, error: APIError) -> bytes:
    if error.status in (429, 503) and "retry_after" in error.extra:
        request.setHeader(b"Retry-After", str(error.extra["retry_after"]).encode())
    return write_json(request, error.body(), error.status)


def preflight(request: IRequest) -> bytes:
    """The answer to a CORS preflight (``OPTIONS`` on any path): every method the API has."""
    cors(request)
    request.setHeader(b"Access-Control-Allow-Methods", b"GET, POST, DELETE, OPTIONS")
    request.setHeader(b"Access-Control-Allow-Headers", b"Content-Type, Accept")
    request.setHeader(b"Access-Control-Max-Age", b"86400")
    request.setResponseCode(204)
    return b""


def no_route(request: IRequest, valid_methods: Iterable[str] | None = None) -> bytes:
    """404 for a path no route has; 405 for a method its route lacks.

    ``valid_methods`` is the router's list for a path that exists (werkzeug's
    ``MethodNotAllowed.valid_methods``).  When only the catch-all preflight route
    matched (``OPTIONS`` alone), the path does not exist: 404.
    """
    if set(valid_methods or ()) <= {"OPTIONS"}:
        return write_error(request, APIError(404, "Not found", "no such endpoint"))
    return write_error(request, APIError(405, "Method not allowed", "see the API documentation"))


_PHRASES = {429: b"Too Many Requests"}  # not in twisted.web.http.RESPONSES


def json_response(status: int, document: dict[str, Any],
                  headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP response, for writing straight to the transport; the connection closes."""
    body = json.dumps(document).encode()
    phrase = http.RESPONSES.get(status, _PHRASES.get(status, b"Error"))
    extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in (headers or {}).items())
    return (b"HTTP/1.1 %d " % status + phrase + b"\r\nContent-Type: application/json\r\n"
            b"Access-Control-Allow-Origin: *\r\nConnection: close\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class RawBodyRequest(server.Request):
    """A request whose body twisted.web leaves alone, and which may be answered early.

    twisted.web would parse a multipart or form body into ``args``, whole and in
    memory; the Content-Type is hidden from it (as ``application/octet-stream``)
    and kept in ``original_content_type`` (read it with ``content_type``).
    """

    original_content_type: bytes | None = None
    _refused = False
    # Set by a site's request factory (``sandrun.connections``): which routes take a
    # body (``BodyRoutes``), and the budget of body bytes in flight (``UploadBudget``).
    body_routes: Any = None
    upload_budget: Any = None
    _reserved = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # twisted.web's own switch for that parsing, off: then it does not parse the
        # Content-Type either (with the email package, a measurable share of a small request).
        super().__init__(channel, *args, parsePOSTFormSubmission=False, **kwargs)

    def refuse_early(self, length: int | None) -> bool:
        """From the headers alone: refuse a body its route does not take, or one over the
        in-flight budget.  ``length`` is None for a chunked body.  True when answered."""
        if length == 0:
            return False
        command = getattr(self.channel, "_command", None)
        path = getattr(self.channel, "_path", None)
        routes = type(self).body_routes
        if routes is not None and command is not None and path is not None:
            refusal = routes.refusal(command, path)
            if refusal is not None:
                self.answer(*refusal)
                return True
        return length is not None and not self.take_budget(length)

    def take_budget(self, nbytes: int) -> bool:
        """Count ``nbytes`` more of this body against the budget; False (answered) if over."""
        budget = type(self).upload_budget
        if budget is None or nbytes <= 0:
            return True
        host = str(getattr(self.getClientAddress(), "host", None) or "unix")
        refusal = budget.reserve(host, nbytes)
        if refusal is not None:
            self.answer(*refusal)
            return False
        if not self._reserved:
            def release(result: Any) -> None:
                budget.release(host, self._reserved)
                self._reserved = 0

            self.notifyFinish().addBoth(release)
        self._reserved += nbytes
        return True

    def answer(self, status: int, document: dict[str, Any],
               headers: dict[str, str] | None = None) -> None:
        """Answer at once and close; the rest of the body is never read."""
        self._refused = True
        # No "100 Continue" after the answer (twisted sends it after gotLength).
        self.requestHeaders.removeHeader(b"expect")
        transport: Any = self.channel.transport if self.channel else None
        if transport is not None:
            transport.write(json_response(status, document, headers))
            transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        types = self.requestHeaders.getRawHeaders(b"content-type")
        if types:
            self.original_content_type = types[0]
            self.requestHeaders.setRawHeaders(b"content-type", [b"application/octet-stream"])
        super().requestReceived(command, path, version)


def content_type(request: Any) -> bytes | None:
    """The client's Content-Type, whether or not ``RawBodyRequest`` hid it."""
    original = getattr(request, "original_content_type", None)
    if original:
        return bytes(original)
    value = request.getHeader(b"content-type")
    return value.encode("latin-1") if isinstance(value, str) else value
