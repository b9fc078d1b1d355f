"""The coordinator's errors: the worker's ``APIError`` (``sandrun.httpjson``), its 404, and
``WorkerLost``."""

from __future__ import annotations

from sandrun.httpjson import APIError


def not_found(details: str = "no job with that id (it may have expired)") -> APIError:
    return APIError(404, "Job not found", details)


class WorkerLost(Exception):
    """The job's worker is gone; the message says how we know."""
