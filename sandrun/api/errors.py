"""The one table that maps the worker's domain errors to the HTTP API's one error type.

``APIError`` and its JSON form are ``sandrun.httpjson``'s, shared with the coordinator.
"""

from __future__ import annotations

from sandrun.environments import EnvironmentUnavailable
from sandrun.httpjson import APIError
from sandrun.jobs.manager import GpuUnavailable, QueueFull, RateLimited
from sandrun.jobs.manifest import ManifestError
from sandrun.jobs.storage import StorageFull
from sandrun.jobs.workspace import OutputNotFound, UploadError

# Told with every 429: the quotas protect a public worker; its operator can lift them.
LIFT_QUOTA = ("The worker's operator can exempt trusted addresses (sandrun serve --quota-exempt "
              "CIDR) or raise the limits (--jobs-per-hour, --cpu-quota, --max-active-per-ip)")


def to_api_error(exc: BaseException) -> APIError:
    """Map a domain exception to its HTTP form; unknown ones are a 500 with no internals."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, GpuUnavailable):  # "gpu": for a coordinator choosing another worker
        return APIError(400, "Invalid manifest", f"{exc.field}: {exc.message}", field=exc.field,
                        gpu=exc.request)
    if isinstance(exc, ManifestError):
        return APIError(400, "Invalid manifest", f"{exc.field}: {exc.message}", field=exc.field)
    if isinstance(exc, EnvironmentUnavailable):  # unknown, or not built on this worker
        return APIError(400, "Invalid manifest", exc.details, field="environment")
    if isinstance(exc, UploadError):
        return APIError(400, "Invalid upload", f"{exc.member}: {exc.message}",
                        member=exc.member)
    if isinstance(exc, RateLimited):
        d = exc.decision
        return APIError(429, "Rate limit exceeded", f"{d.reason or 'over quota'}. {LIFT_QUOTA}",
                        reason=d.reason,
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



def refusal_kind(exc: BaseException) -> str | None:
    """The kind of a refusal for quota or room (``sandrun_refusals_total``), or None."""
    if isinstance(exc, RateLimited):
        reason = exc.decision.reason or ""
        # The limiter names the limit that will take longest to free first.
        if reason.startswith("CPU"):
            return "cpu_quota"
        if reason.startswith("Hourly"):
            return "hourly_limit"
        return "concurrency_limit"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, StorageFull):
        return "storage_full"
    return None
