"""Per-client quotas: CPU-seconds per rolling minute, jobs at once, jobs per hour.

Pure bookkeeping: stdlib only, no Twisted, no clock of its own. Every method takes ``now``
(seconds, any monotonic origin) so the API layer passes ``reactor.seconds()`` and tests pass
plain numbers. Everything runs on the reactor thread, so ``try_acquire`` is atomic by being
synchronous; there is no lock.

The rules, per client key (see ``sandrun.netaddr.client_key``; ``QuotaConfig`` holds the numbers):

- CPU: at most ``cpu_seconds_per_minute`` CPU-seconds in a rolling 60 s window. CPU is charged
  as it is used: ``charge_cpu`` is called again and again with a running job's cumulative CPU,
  and the increment is recorded at ``now``. A sample counts while ``now < time + 60``.
  Increments within one wall-clock second are merged into one sample that keeps the latest
  time, so a sample may stay in the window up to 1 s longer than its first part strictly
  would (the error is in the client's disfavour, never in its favour) and a key holds at most
  about 61 samples.
- Concurrency: at most ``max_active_jobs`` jobs queued or running (``acquire`` .. ``release``).
- Hourly: at most ``jobs_per_hour`` accepted submissions in a rolling 3600 s window.

A refusal carries ``retry_after``, whole seconds, exact for the time-based rules: if nothing
else changes, the same check passes at ``now + retry_after`` and still fails at
``now + retry_after - 1``. Concurrency has no time-based answer (a slot frees when some job
ends), so it reports ``CONCURRENCY_RETRY_AFTER``. When several rules refuse, the one with the
largest ``retry_after`` is reported.

State stays bounded without a timer: ``check`` and ``try_acquire`` call ``expire`` at most
every ``sweep_interval`` seconds, and a key with no active job and no activity (submission,
CPU charge, release) for ``idle_reset_seconds`` is dropped and starts fresh. Reading
(``check``, ``quota``) never creates state, so probing with many addresses costs nothing.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field

from sandrun.config import QuotaConfig

CPU_WINDOW_SECONDS = 60.0
HOURLY_WINDOW_SECONDS = 3600.0
# Told to a client refused for having too many jobs at once. No clock says when one of its
# jobs will end, so this is a polling hint, not a promise.
CONCURRENCY_RETRY_AFTER = 5
# How often check/try_acquire sweep idle keys, seconds.
SWEEP_INTERVAL_SECONDS = 60.0
# Same-second merging keeps ~61 samples per key; this cap only matters if ``now`` jumps back.
MAX_CPU_SAMPLES = 128


# -- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether a client may submit now, and its quota as it stands."""

    allowed: bool
    reason: str | None  # which limit refused, with its numbers; None when allowed
    retry_after: int  # whole seconds until the same check passes; 0 when allowed
    cpu_used: float  # CPU-seconds charged in the last 60 s
    cpu_limit: float
    cpu_available: float  # max(0, cpu_limit - cpu_used)
    active_jobs: int  # queued or running
    max_concurrent: int
    jobs_this_hour: int  # accepted in the last 3600 s
    hourly_limit: int


def _number(value: float) -> str:
    """10.0 -> "10", 10.333 -> "10.33": enough precision for a human reading a 429."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def _seconds_until(now: float, at: float) -> int:
    """The least whole n >= 1 with ``now + n >= at``; float rounding is corrected so the answer
    agrees with the comparisons the check itself makes."""
    n = max(1, math.ceil(at - now))
    while now + n < at:
        n += 1
    while n > 1 and now + n - 1 >= at:
        n -= 1
    return n


@dataclass(slots=True)
class _Sample:
    time: float  # latest time an increment was merged in; leaves the window at time + 60
    amount: float  # CPU-seconds


@dataclass
class _ClientState:
    last_activity: float
    samples: list[_Sample] = field(default_factory=list)
    # active job id -> cumulative CPU-seconds charged for it so far
    jobs: dict[str, float] = field(default_factory=dict)
    submissions: deque[float] = field(default_factory=deque)
    # Whether ``submissions`` is in time order (always, unless the clock went backwards):
    # then a check finds the window by bisection instead of sorting every submission.
    in_order: bool = True


def _cpu_usage(samples: list[_Sample], now: float, limit: float) -> tuple[float, float | None]:
    """CPU-seconds in the window at *now*, and when the sum first drops below *limit* (None if
    it already is). Sums run newest to oldest, so the sum computed later, when the oldest
    samples have left, is bit-for-bit a suffix sum computed here."""
    leaving = ((s.time + CPU_WINDOW_SECONDS, s.amount) for s in samples)
    window = sorted((pair for pair in leaving if now < pair[0]), key=lambda pair: pair[0])
    suffix = [0.0] * (len(window) + 1)
    for i in range(len(window) - 1, -1, -1):
        suffix[i] = window[i][1] + suffix[i + 1]
    if suffix[0] < limit:
        return suffix[0], None
    for i, (leaves, _) in enumerate(window):
        last_of_group = i + 1 == len(window) or window[i + 1][0] > leaves
        if last_of_group and suffix[i + 1] < limit:
            return suffix[0], leaves
    raise AssertionError("unreachable: the empty window is below a positive limit")


def _hourly_usage(submissions: deque[float], now: float, limit: int,
                  in_order: bool = False) -> tuple[int, float | None]:
    """Submissions in the window at *now*, and when their count first drops below *limit*.

    ``in_order``: the submissions are sorted, so the window is found by bisection (a busy
    client's thousands of submissions are not sorted again for every check)."""
    if in_order:
        first = bisect.bisect_right(submissions, now, key=lambda t: t + HOURLY_WINDOW_SECONDS)
        count = len(submissions) - first
        if count < limit:
            return count, None
        return count, submissions[first + count - limit] + HOURLY_WINDOW_SECONDS
    leaves = sorted(t + HOURLY_WINDOW_SECONDS for t in submissions)
    leaves = [at for at in leaves if now < at]
    if len(leaves) < limit:
        return len(leaves), None
    return len(leaves), leaves[len(leaves) - limit]


# -- the limiter ----------------------------------------------------------------------------


class RateLimiter:
    """Per-client quotas, keyed by ``client_key``."""

    def __init__(
        self, config: QuotaConfig | None = None, sweep_interval: float = SWEEP_INTERVAL_SECONDS
    ) -> None:
        config = config if config is not None else QuotaConfig()
        if config.cpu_seconds_per_minute <= 0:
            raise ValueError("cpu_seconds_per_minute must be positive")
        if config.max_active_jobs < 1 or config.jobs_per_hour < 1:
            raise ValueError("max_active_jobs and jobs_per_hour must be at least 1")
        if config.idle_reset_seconds <= 0:
            raise ValueError("idle_reset_seconds must be positive")
        self._config = config
        self._sweep_interval = sweep_interval
        self._last_sweep: float | None = None
        self._clients: dict[str, _ClientState] = {}

    # reading

    def check(self, key: str, now: float) -> Decision:
        """May *key* submit a job now? Creates no state."""
        self._maybe_sweep(now)
        return self._decide(self._live(key, now), now)

    def quota(self, key: str, now: float) -> dict[str, object]:
        """``/stats`` ``your_quota``; CPU figures in CPU-seconds, rounded to milliseconds."""
        d = self.check(key, now)
        return {
            "used": round(d.cpu_used, 3),
            "limit": d.cpu_limit,
            "available": round(d.cpu_available, 3),
            "active_jobs": d.active_jobs,
            "max_concurrent": d.max_concurrent,
            "jobs_this_hour": d.jobs_this_hour,
            "hourly_limit": d.hourly_limit,
            "can_submit": d.allowed,
            "reason": d.reason,
            "retry_after": d.retry_after,
        }

    def tracked_keys(self) -> int:
        """How many keys hold state (for tests and metrics)."""
        return len(self._clients)

    # writing

    def try_acquire(self, key: str, job_id: str, now: float) -> Decision:
        """``check``, then ``acquire`` if allowed. The decision describes the state before."""
        decision = self.check(key, now)
        if decision.allowed:
            self.acquire(key, job_id, now)
        return decision

    def acquire(self, key: str, job_id: str, now: float) -> None:
        """Record an accepted submission, unconditionally. Idempotent per job id."""
        state = self._writable(key, now)
        if job_id in state.jobs:
            return
        state.jobs[job_id] = 0.0
        if state.submissions and now < state.submissions[-1]:
            state.in_order = False  # the clock went backwards: sorted again at each check
        state.submissions.append(now)
        # Only the newest jobs_per_hour submissions can ever decide a check.
        while len(state.submissions) > self._config.jobs_per_hour:
            state.submissions.popleft()

    def charge_cpu(self, key: str, job_id: str, cpu_seconds_total: float, now: float) -> float:
        """Charge an active job's CPU use: *cpu_seconds_total* is its cumulative CPU time.

        Records the increment since the previous call at *now* and returns it. A total lower
        than the last one charges nothing; a job that is not active (never acquired, or
        released) is ignored, so late reports are not counted twice.
        """
        state = self._live(key, now)
        if state is None or job_id not in state.jobs:
            return 0.0
        state.last_activity = max(state.last_activity, now)
        increment = cpu_seconds_total - state.jobs[job_id]
        if not increment > 0:  # also refuses NaN
            return 0.0
        state.jobs[job_id] = cpu_seconds_total
        self._record_cpu(state, increment, now)
        return increment

    def release(
        self, key: str, job_id: str, now: float, cpu_seconds_total: float | None = None
    ) -> None:
        """The job ended, in any way. Charges its final *cpu_seconds_total* if given, then frees
        its slot and stops charging it. Releasing twice, or an unknown job, does nothing."""
        state = self._live(key, now)
        if state is None or job_id not in state.jobs:
            return
        if cpu_seconds_total is not None:
            self.charge_cpu(key, job_id, cpu_seconds_total, now)
        del state.jobs[job_id]
        state.last_activity = max(state.last_activity, now)

    def expire(self, now: float) -> int:
        """Drop every key with no active job and no activity for ``idle_reset_seconds``;
        returns how many were dropped."""
        self._last_sweep = now
        idle = [key for key, state in self._clients.items() if self._is_idle(state, now)]
        for key in idle:
            del self._clients[key]
        return len(idle)

    # internals

    def _is_idle(self, state: _ClientState, now: float) -> bool:
        return not state.jobs and now >= state.last_activity + self._config.idle_reset_seconds

    def _live(self, key: str, now: float) -> _ClientState | None:
        """The key's state, or None if it has none or has been idle long enough to start fresh
        (whether or not a sweep has run yet)."""
        state = self._clients.get(key)
        if state is not None and self._is_idle(state, now):
            del self._clients[key]
            return None
        return state

    def _writable(self, key: str, now: float) -> _ClientState:
        state = self._live(key, now)
        if state is None:
            state = self._clients[key] = _ClientState(last_activity=now)
        state.last_activity = max(state.last_activity, now)
        return state

    def _maybe_sweep(self, now: float) -> None:
        if self._last_sweep is None or not now < self._last_sweep + self._sweep_interval:
            self.expire(now)

    def _record_cpu(self, state: _ClientState, increment: float, now: float) -> None:
        samples = state.samples
        # Samples that have left the window can never count again.
        samples[:] = [s for s in samples if now < s.time + CPU_WINDOW_SECONDS]
        last = samples[-1] if samples else None
        if last is not None and math.floor(now) <= math.floor(last.time):
            last.amount += increment
            last.time = max(last.time, now)
        else:
            samples.append(_Sample(now, increment))
        while len(samples) > MAX_CPU_SAMPLES:
            # Only if the clock went backwards: fold the oldest into the next, which is later.
            oldest = samples.pop(0)
            samples[0].amount += oldest.amount
            samples[0].time = max(samples[0].time, oldest.time)

    def _decide(self, state: _ClientState | None, now: float) -> Decision:
        config = self._config
        cpu_limit = config.cpu_seconds_per_minute
        cpu_used, cpu_free_at = _cpu_usage(state.samples if state else [], now, cpu_limit)
        jobs_this_hour, hourly_free_at = _hourly_usage(
            state.submissions if state else deque(), now, config.jobs_per_hour,
            in_order=state.in_order if state else True)
        active = len(state.jobs) if state else 0
        if state is not None and not state.jobs:
            # An idle key is dropped at this time, which clears every rule at once.
            reset_at = state.last_activity + config.idle_reset_seconds
            cpu_free_at = None if cpu_free_at is None else min(cpu_free_at, reset_at)
            hourly_free_at = None if hourly_free_at is None else min(hourly_free_at, reset_at)

        refusals: list[tuple[int, str]] = []
        if cpu_free_at is not None:
            refusals.append((
                _seconds_until(now, cpu_free_at),
                f"CPU quota exceeded: {_number(cpu_used)} of {_number(cpu_limit)} CPU-seconds"
                f" used in the last {_number(CPU_WINDOW_SECONDS)} s",
            ))
        if hourly_free_at is not None:
            refusals.append((
                _seconds_until(now, hourly_free_at),
                f"Hourly job limit reached: {jobs_this_hour} of {config.jobs_per_hour} jobs"
                f" submitted in the last {_number(HOURLY_WINDOW_SECONDS)} s",
            ))
        if active >= config.max_active_jobs:
            refusals.append((
                CONCURRENCY_RETRY_AFTER,
                f"Too many active jobs: {active} of {config.max_active_jobs} jobs queued or"
                " running; retry when one ends",
            ))
        # max() keeps the first of equals: CPU, then hourly, then concurrency.
        retry_after, reason = max(refusals, key=lambda r: r[0]) if refusals else (0, None)
        return Decision(
            allowed=not refusals,
            reason=reason,
            retry_after=retry_after,
            cpu_used=cpu_used,
            cpu_limit=cpu_limit,
            cpu_available=max(0.0, cpu_limit - cpu_used),
            active_jobs=active,
            max_concurrent=config.max_active_jobs,
            jobs_this_hour=jobs_this_hour,
            hourly_limit=config.jobs_per_hour,
        )
