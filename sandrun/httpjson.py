"""JSON answers with CORS, as the worker and the coordinator both give them.

A wire helper, like ``sandrun.wire``: it imports only the standard library and
Twisted, nothing else from Sandrun, so the coordinator may import it too.  The
bodies are the contract's (``shared/spec/api.md``): ``{"error", "details",
...}``, with ``Retry-After`` on a 429 or 503 that says when to retry, and every
answer readable from a browser page (``Access-Control-Allow-Origin: *``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

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
