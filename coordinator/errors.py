"""The coordinator's errors: the worker's ``APIError`` (``sandrun.httpjson``), and its 404."""

from __future__ import annotations

from sandrun.httpjson import APIError


def not_found(details: str = "no job with that id (it may have expired)") -> APIError:
    return APIError(404, "Job not found", details)
