"""JSON answers with CORS, as the worker and the coordinator both give them.

A wire helper, like ``sandrun.wire``: it imports only the standard library and
Twisted, nothing else from Sandrun, so the coordinator may import it too.  The
bodies are the contract's (``shared/spec/api.md``): ``{"error", "details",
...}``, with ``Retry-After`` on a 429 or 503 that says when to retry, and every
answer readable from a browser page (``Access-Control-Allow-Origin: *``).
"""

from __future__ import annotations

import json
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
