"""One error type for the coordinator's HTTP API, turned into the contract's JSON in one place."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request


class APIError(Exception):
    """An answer other than success: status, short message, details, extra keys."""

    def __init__(self, status: int, error: str, details: str = "", **extra: Any) -> None:
        super().__init__(error)
        self.status, self.error, self.details, self.extra = status, error, details, extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "details": self.details, **self.extra}


def cors(request: Request) -> None:
    request.setHeader(b"Access-Control-Allow-Origin", b"*")


def write_json(request: Request, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    cors(request)
    return json.dumps(value).encode()


def write_error(request: Request, error: APIError) -> bytes:
    if error.status in (429, 503) and "retry_after" in error.extra:
        request.setHeader(b"Retry-After", str(error.extra["retry_after"]).encode())
    return write_json(request, error.body(), error.status)


def not_found(details: str = "no job with that id (it may have expired)") -> APIError:
    return APIError(404, "Job not found", details)
