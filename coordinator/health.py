"""Health checks: a signed challenge to every worker, in parallel, every few seconds.

Each check sends ``GET /health?nonce=N`` with a fresh 128-bit random nonce.
The worker passes only when, within the timeout, it answers 200 with a body
whose ``signed`` text

- is signed (``signature``) by the key in workers.json (``worker_id``): an
  impostor that copied the public key but not the private one fails here;
- names that worker and echoes this check's nonce: an old answer replayed
  fails here;
- carries a time within ``max_clock_skew`` of ours;

and ``status`` is ``"healthy"``.  The load is taken from the signed text, not
from the unsigned fields beside it.  One failure takes the worker out of the
pool at once; one pass brings it back.  ``/pool`` shows the reason of the
last failure in ``last_error``.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from coordinator.registry import Load, WorkerRegistry, WorkerState
from coordinator.worker_client import (
    BadWorkerResponse,
    WorkerClient,
    WorkerTimeout,
    WorkerUnreachable,
)
from sandrun.identity import verify_health, verify_signature

log = Logger()


@dataclass(frozen=True)
class Verdict:
    """What one health answer says about a worker."""

    ok: bool
    authenticated: bool
    error: str | None = None
    load: Load | None = None
    started_at: float | None = None


def judge_health(code: int, body: Any, worker_id: str, nonce: str, now: float,
                 max_skew: float = 60.0) -> Verdict:
    """Judge a ``/health?nonce=`` answer against the configured key; pure."""
    # 503: a worker that cannot run jobs (launcher gone, slots lost) says so, still signed.
    if code not in (200, 503):
        return Verdict(False, False, f"health check answered HTTP {code}")
    if not isinstance(body, dict):
        return Verdict(False, False, "health answer is not a JSON object")
    signed, signature = body.get("signed"), body.get("signature")
    if not isinstance(signed, str) or not isinstance(signature, str):
        return Verdict(False, False,
                       "health answer is not signed (is the worker running without "
                       "--worker-key?)")
    try:
        claimed = json.loads(signed)
    except ValueError:
        claimed = None
    if not isinstance(claimed, dict):
        return Verdict(False, False, "signed health text is not a JSON object")
    if claimed.get("worker_id") != worker_id:
        other = claimed.get("worker_id")
        shown = f"{other[:16]}..." if isinstance(other, str) else repr(other)
        return Verdict(False, False,
                       f"answered as another worker ({shown}), not the key in workers.json")
    if not verify_signature(worker_id, signed.encode("utf-8"), signature):
        return Verdict(False, False,
                       "signature does not verify under the public key in workers.json "
                       "(an impostor holding the public key only?)")
    if claimed.get("nonce") != nonce:
        return Verdict(False, False, "signed a different nonce (a replayed answer?)")
    at = claimed.get("time")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        return Verdict(False, False, "signed health text has no time")
    if abs(now - at) > max_skew:
        return Verdict(False, False,
                       f"worker clock is {at - now:+.0f} s off ours (more than {max_skew:g} s)")
    # Belt and braces: the library's own check must agree with ours.
    if not verify_health(body, worker_id, nonce, now, max_skew):
        return Verdict(False, False, "health answer does not verify")
    load = _load(claimed.get("load"))
    if load is None:
        return Verdict(False, True, "signed health text has no valid load")
    if body.get("status") != "healthy" or code != 200:
        problem = body.get("problem")
        why = f": {problem[:200]}" if isinstance(problem, str) else ""
        return Verdict(False, True, f"worker reports status {body.get('status')!r}{why}")
    started = claimed.get("started_at", body.get("started_at"))
    started_at = float(started) if isinstance(started, (int, float)) \
        and not isinstance(started, bool) and math.isfinite(started) else None
    return Verdict(True, True, None, load, started_at)


def _load(value: Any) -> Load | None:
    if not isinstance(value, dict):
        return None
    numbers = []
    for name in ("active_jobs", "queued_jobs", "capacity"):
        number = value.get(name)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            return None
        numbers.append(number)
    queue = value.get("queue_capacity")
    if queue is not None and (isinstance(queue, bool) or not isinstance(queue, int) or queue < 0):
        return None
    active, queued, capacity = numbers
    return Load(active, queued, capacity, queue_capacity=queue, gpus=_gpus(value.get("gpus")))


def _gpus(value: Any) -> tuple[dict[str, Any], ...]:
    """The GPUs a worker signed with its load; malformed entries are left out."""
    if not isinstance(value, list):
        return ()
    found = []
    for gpu in value[:64]:
        if not isinstance(gpu, dict):
            continue
        index, memory = gpu.get("index"), gpu.get("memory_bytes")
        if isinstance(index, bool) or not isinstance(index, int) \
                or isinstance(memory, bool) or not isinstance(memory, int):
            continue
        texts = {name: gpu.get(name) for name in ("name", "uuid", "compute_capability",
                                                  "cuda_version", "driver_version")}
        if not all(isinstance(t, str) and len(t) <= 200 for t in texts.values()):
            continue
        found.append({"index": index, "memory_bytes": memory, **texts,
                      "busy": gpu.get("busy") is True})
    return tuple(found)


class HealthChecker:
    """Checks every worker every ``interval`` seconds, all in parallel."""

    def __init__(self, reactor: Any, registry: WorkerRegistry, client: WorkerClient,
                 interval: float = 5.0, timeout: float = 2.0, max_skew: float = 60.0) -> None:
        self.reactor = reactor
        self.registry = registry
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.max_skew = max_skew
        self._loop = task.LoopingCall(self.check_all)
        self._loop.clock = reactor
        self._waiting: dict[str, list[defer.Deferred[None]]] = {}  # worker id -> callers

    def start(self, now: bool = True) -> None:
        self._loop.start(self.interval, now=now).addErrback(
            lambda f: log.failure("health loop stopped", f))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check_all(self) -> defer.Deferred[None]:
        """One round: every worker, in parallel."""
        for label in self.registry.expire_drained(self.reactor.seconds()):
            log.info("worker {worker} finished draining and is forgotten", worker=label)
        return self.check_now(self.registry.workers())

    def check_now(self, states: list[WorkerState]) -> defer.Deferred[None]:
        """Check these workers now; a check already under way is joined, not repeated."""
        waits: list[defer.Deferred[None]] = []
        starting: list[WorkerState] = []
        for state in states:
            waiting = self._waiting.get(state.worker_id)
            if waiting is None:
                waiting = self._waiting[state.worker_id] = []
                starting.append(state)
            waits.append(defer.Deferred())
            waiting.append(waits[-1])
        for state in starting:  # after the waiters are in place: a check may end at once
            self.check(state).addBoth(self._finished, state.worker_id)
        d = defer.DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def _finished(self, result: Any, worker_id: str) -> None:
        for waiter in self._waiting.pop(worker_id, []):
            waiter.callback(None)

    @defer.inlineCallbacks
    def check(self, state: WorkerState) -> Any:
        """Check one worker and record the verdict; never fails."""
        nonce = secrets.token_urlsafe(16)
        dispatched_before = self.registry.check_started(state)
        endpoint = state.entry.endpoint
        sent = self.reactor.seconds()
        try:
            code, body = yield self.client.health(endpoint, nonce, self.timeout)
            state.rtt_seconds = max(0.0, self.reactor.seconds() - sent)
        except (WorkerUnreachable, WorkerTimeout, BadWorkerResponse) as e:
            verdict = Verdict(False, False, str(e))
        except Exception as e:  # noqa: BLE001 - one worker's oddity must not stop the loop
            log.failure("health check of {worker} failed", worker=state.entry.label)
            verdict = Verdict(False, False, f"health check failed: {e.__class__.__name__}")
        else:
            verdict = judge_health(code, body, state.worker_id, nonce, self.reactor.seconds(),
                                   self.max_skew)
        now = self.reactor.seconds()
        if state.entry.endpoint != endpoint:
            # A reload moved the worker while we asked the old address: ignore this answer.
            state.checking = False
            return
        if verdict.ok:
            assert verdict.load is not None
            self.registry.record_pass(state, verdict.load, now, dispatched_before,
                                      verdict.started_at)
        else:
            self.registry.record_failure(state, verdict.error or "failed", now,
                                         verdict.authenticated)
