"""One error type for the HTTP API, and the one table that maps domain errors to it."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

from sandrun.environments import EnvironmentUnavailable
from sandrun.jobs.manager import QueueFull, RateLimited
from sandrun.jobs.manifest import ManifestError
from sandrun.jobs.storage import StorageFull
from sandrun.jobs.workspace import OutputNotFound, UploadError


class APIError(Exception):
    def __init__(self, status: int, error: str, details: str = "", **extra: Any) -> None:
        super().__init__(error)
        self.status, self.error, self.details, self.extra = status, error, details, extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "details": self.details, **self.extra}


def to_api_error(exc: BaseException) -> APIError:
    """Map a domain exception to its HTTP form; unknown ones are a 500 with no internals."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ManifestError):
        return APIError(400, "Invalid manifest", f"{exc.field}: {exc.message}", field=exc.field)
    if isinstance(exc, EnvironmentUnavailable):  # unknown, or not built on this worker
        return APIError(400, "Invalid manifest", exc.details, field="environment")
    if isinstance(exc, UploadError):
        return APIError(400, "Invalid upload", f"{exc.member}: {exc.message}",
                        member=exc.member)
    if isinstance(exc, RateLimited):
        d = exc.decision
        return APIError(429, "Rate limit exceeded", d.reason or "", reason=d.reason,
                        retry_after=d.retry_after, cpu_available=d.cpu_available,
                        active_jobs=d.active_jobs)
    if isinstance(exc, QueueFull):
        return APIError(503, "Queue full", exc.details, retry_after=exc.retry_after)
    if isinstance(exc, StorageFull):
        return APIError(503, "Storage full", str(exc), retry_after=30)
    if isinstance(exc, OutputNotFound):
        return APIError(404, "Output not found",
                        "no output with that path matches the job's outputs")
    return APIError(500, "Internal error", "the worker could not handle this request")


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
