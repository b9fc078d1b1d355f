"""Per-IP limits that hold across the whole pool, without a quota table of our own.

Every worker already keeps each client's quota (CPU-seconds this minute, jobs
queued or running, jobs this hour) and shows it in ``/stats`` as
``your_quota``, for whichever client the coordinator names in
X-Forwarded-For (workers trust the coordinator as a proxy).  So before a
submission the coordinator asks every healthy worker for that client's quota
and adds them up: the pool-wide usage is derived, never stored, and is the
same for a restarted coordinator or a second one.  A client therefore cannot
get more than its quota by landing on different workers.

Two submissions from one client through one coordinator are serialised (a
per-client lock held from the quota check until the worker answered), so
they cannot both pass on the same counts.  Two coordinators behind a load
balancer can still race by one job each; each worker's own limits bound that.

``retry_after`` is exact for concurrency's polling hint and an upper bound for
the time-based limits: the coordinator sees sums, not each submission's
time, so it reports the window's length (or a worker's own larger answer).

The client, and its key, are the worker's: ``sandrun.netaddr`` (X-Forwarded-For
believed only from the coordinator's own ``--trusted-proxy`` addresses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from coordinator.config import PoolQuota

CPU_WINDOW_SECONDS = 60
HOURLY_WINDOW_SECONDS = 3600
CONCURRENCY_RETRY_AFTER = 5
# Told with every 429: the quotas protect a public pool; its operator can lift them.
LIFT_QUOTA = ("The pool's operator can exempt trusted addresses (sandrun-coordinator "
              "--quota-exempt CIDR, and sandrun serve --quota-exempt on its workers) or raise "
              "the limits (--jobs-per-hour, --cpu-quota, --max-active-per-ip)")


# -- pool-wide usage -----------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """One client's usage summed over the workers that answered."""

    cpu_used: float = 0.0
    active_jobs: int = 0
    jobs_this_hour: int = 0
    worker_retry_after: int = 0  # the largest retry_after a worker itself gave

    @classmethod
    def total(cls, quotas: list[dict[str, Any]]) -> Usage:
        cpu, active, hourly, retry = 0.0, 0, 0, 0
        for q in quotas:
            cpu += _number(q.get("used"))
            active += int(_number(q.get("active_jobs")))
            hourly += int(_number(q.get("jobs_this_hour")))
            retry = max(retry, int(_number(q.get("retry_after"))))
        return cls(cpu, active, hourly, retry)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if math.isfinite(value) and value >= 0 else 0.0


@dataclass(frozen=True)
class PoolDecision:
    allowed: bool
    reason: str | None
    retry_after: int
    usage: Usage
    quota: PoolQuota

    def your_quota(self) -> dict[str, Any]:
        """The shape of ``/stats`` ``your_quota``, pool-wide."""
        q, u = self.quota, self.usage
        return {"used": round(u.cpu_used, 3), "limit": q.cpu_seconds_per_minute,
                "available": round(max(0.0, q.cpu_seconds_per_minute - u.cpu_used), 3),
                "active_jobs": u.active_jobs, "max_concurrent": q.max_active_jobs,
                "jobs_this_hour": u.jobs_this_hour, "hourly_limit": q.jobs_per_hour,
                "can_submit": self.allowed, "reason": self.reason,
                "retry_after": self.retry_after}

    def error_extra(self) -> dict[str, Any]:
        """The extra keys of a 429."""
        return {"reason": self.reason, "retry_after": self.retry_after,
                "cpu_available": round(max(0.0, self.quota.cpu_seconds_per_minute
                                           - self.usage.cpu_used), 3),
                "active_jobs": self.usage.active_jobs}


def decide(usage: Usage, quota: PoolQuota) -> PoolDecision:
    """May a client with ``usage`` submit one more job? Pure."""
    refusals: list[tuple[int, str]] = []
    if usage.cpu_used >= quota.cpu_seconds_per_minute:
        refusals.append((max(CPU_WINDOW_SECONDS, usage.worker_retry_after),
                         (f"CPU quota exhausted across the pool: {usage.cpu_used:.2f} of "
                          f"{quota.cpu_seconds_per_minute:g} CPU-seconds in the last minute")))
    if usage.jobs_this_hour >= quota.jobs_per_hour:
        refusals.append((max(HOURLY_WINDOW_SECONDS, usage.worker_retry_after),
                         (f"Hourly job limit reached across the pool: {usage.jobs_this_hour} "
                          f"of {quota.jobs_per_hour} jobs in the last hour")))
    if usage.active_jobs >= quota.max_active_jobs:
        refusals.append((CONCURRENCY_RETRY_AFTER,
                         (f"Too many active jobs across the pool: {usage.active_jobs} of "
                          f"{quota.max_active_jobs} jobs queued or running; retry when one "
                          "ends")))
    retry_after, reason = max(refusals, key=lambda r: r[0]) if refusals else (0, None)
    return PoolDecision(not refusals, reason, retry_after, usage, quota)


class ClientLocks:
    """One ``DeferredLock`` per client key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, defer.DeferredLock] = {}

    @defer.inlineCallbacks
    def run(self, key: str, f: Any, *args: Any, **kwargs: Any) -> Any:
        lock = self._locks.setdefault(key, defer.DeferredLock())
        yield lock.acquire()
        try:
            result = yield defer.maybeDeferred(f, *args, **kwargs)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)
        return result

    def __len__(self) -> int:
        return len(self._locks)
