"""What the coordinator knows about each worker right now.

All of it is soft state, rebuilt by the first health round after a start:
whether each worker is healthy and authenticated, the load it last reported
(and signed), and how many jobs this coordinator has sent it since.  Nothing
here is needed to answer for a job dispatched before a restart; the job id
carries the worker (see ``jobids.py``).

A worker is one of:

- *unchecked*: configured, no health answer yet.  Not routed to, but
  requests for its jobs are still tried (a just-restarted coordinator must
  still answer for them);
- *healthy*: its last check was answered, signed by its key, and healthy;
- *down*: its last check (or a request) failed.  Its jobs report
  ``failed``/``worker_lost``;
- *draining* (any of the above): removed from workers.json by a reload.  No
  new jobs; its existing jobs stay reachable for ``drain_seconds``.  A
  removed worker that never proved its key and was never sent a job has
  none to reach and is forgotten at once (so a reload that fixes a wrong key
  leaves one entry);
- *suspended* (any of the above): it disagreed with other replicas of a job
  ``max_disagreements`` times (``consensus.py``).  No new jobs until an
  operator re-admits it: a SIGHUP reload with its key still listed;
- *open*: not in workers.json but enrolled by proving its key
  (``--open-enrollment``, ``enrollment.py``).  It only ever gets extra
  replicas of jobs whose first replica went to a listed worker.

Reputation (``agreements``, ``disagreements``, ``unresolved``, ``lost_jobs``) is counted per
worker from the consensus of replicated jobs and from jobs it lost; like
everything here it is soft state, and a coordinator restart starts it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from coordinator.config import WorkerEntry

log = Logger()

DownListener = Callable[["WorkerState"], None]


@dataclass(frozen=True)
class Load:
    """A worker's load as it signed it in its health answer."""

    active_jobs: int
    queued_jobs: int
    capacity: int  # jobs it runs at once
    queue_capacity: int | None = None  # jobs it queues beyond those; None: not reported
    # The GPUs it can lend to jobs, as sandrun.gpuwire describes them; () if none.
    gpus: tuple[dict[str, Any], ...] = ()

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"active_jobs": self.active_jobs,
                                "queued_jobs": self.queued_jobs, "capacity": self.capacity,
                                "queue_capacity": self.queue_capacity}
        if self.gpus:
            body["gpus"] = [dict(g) for g in self.gpus]
        return body


@dataclass
class WorkerState:
    entry: WorkerEntry
    healthy: bool = False
    authenticated: bool = False
    checked: bool = False  # at least one health check has finished
    load: Load | None = None
    last_check: float | None = None  # when the last check finished
    last_error: str | None = None  # why the last check failed; None when it passed
    rtt_seconds: float | None = None  # round trip of the last health check that was answered
    recovered_at: float | None = None  # when it last went from down to healthy
    started_at: float | None = None  # the worker's own start time, if it reports one
    draining_since: float | None = None
    dispatched_total: int = 0  # jobs sent to it by this coordinator, ever
    dispatched_at_check: int = 0  # dispatched_total when the last good check was sent
    checking: bool = False
    drain_rate: float = 0.0  # jobs a second it finished lately (smoothed over checks)
    open: bool = False  # enrolled by its key, not listed in workers.json
    agreements: int = 0  # replicated jobs where its result agreed with the reference
    disagreements: int = 0  # ... where it did not (ever, this coordinator process)
    strikes: int = 0  # disagreements since it was last admitted
    unresolved: int = 0  # ... where no replica could be taken as right (no strike)
    lost_jobs: int = 0  # jobs it took and then lost (went down or restarted)
    suspended_since: float | None = None  # strikes reached the threshold

    @property
    def worker_id(self) -> str:
        return self.entry.worker_id

    @property
    def down(self) -> bool:
        """Known to be unusable: checked (or tried) and failed."""
        return self.checked and not self.healthy

    @property
    def routable(self) -> bool:
        return self.healthy and self.draining_since is None and self.suspended_since is None

    @property
    def dispatched_since_check(self) -> int:
        # An undone dispatch may take the total below the mark of a later check.
        return max(0, self.dispatched_total - self.dispatched_at_check)

    @property
    def effective_load(self) -> int:
        """Jobs it has or will have: what it reported plus what was sent since."""
        reported = self.load.active_jobs + self.load.queued_jobs if self.load else 0
        return reported + self.dispatched_since_check

    def as_json(self, iso: Callable[[float | None], str | None],
                drain_seconds: float = 3600.0) -> dict[str, Any]:
        from coordinator.scheduling import job_limit  # scheduling reads this module

        draining = self.draining_since is not None
        return {
            "worker_id": self.worker_id, "name": self.entry.name,
            "endpoint": self.entry.endpoint, "tag": self.entry.tag,
            "max_concurrent_jobs": self.entry.max_concurrent_jobs,
            "job_limit": job_limit(self),
            "healthy": self.healthy, "authenticated": self.authenticated,
            "routable": self.routable, "open": self.open,
            "load": self.load.as_json() if self.load else None,
            "dispatched_since_check": self.dispatched_since_check,
            "draining": draining,
            "draining_since": iso(self.draining_since),
            "drain_ends_at": iso(self.draining_since + drain_seconds)
            if self.draining_since is not None else None,
            "last_check": iso(self.last_check), "last_error": self.last_error,
            "reputation": {"agreements": self.agreements,
                           "disagreements": self.disagreements,
                           "strikes": self.strikes, "unresolved": self.unresolved,
                           "lost_jobs": self.lost_jobs,
                           "suspended": self.suspended_since is not None,
                           "suspended_since": iso(self.suspended_since)},
        }


class WorkerRegistry:
    """The configured workers (plus draining and open ones), keyed by worker id."""

    def __init__(self, entries: tuple[WorkerEntry, ...], drain_seconds: float = 3600.0,
                 max_disagreements: int = 3) -> None:
        self._workers: dict[str, WorkerState] = {}
        self._by_tag: dict[str, WorkerState] = {}
        self._down_listeners: list[DownListener] = []
        self.drain_seconds = drain_seconds
        self.max_disagreements = max_disagreements  # strikes that suspend a worker
        self.cursor = 0  # rotates the order ties are broken in (scheduling.py)
        self.replace(entries, now=0.0)

    # -- reading -------------------------------------------------------------

    def workers(self) -> list[WorkerState]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def by_tag(self, tag: str) -> WorkerState | None:
        return self._by_tag.get(tag)

    def healthy(self) -> list[WorkerState]:
        """Every healthy worker, draining ones included (they still hold jobs)."""
        return [w for w in self._workers.values() if w.healthy]

    def routable(self) -> list[WorkerState]:
        return [w for w in self._workers.values() if w.routable]

    def restarted_after(self, state: WorkerState, dispatched_at: float) -> bool:
        """Whether ``state`` went away and came back after a job was sent to it.

        Then a 404 for that job means the worker lost it.  Known from the
        worker's own ``started_at`` when its health answer carries one, and
        otherwise from what this coordinator saw (so not across its restart).
        """
        if state.started_at is not None and dispatched_at < state.started_at:
            return True
        return state.recovered_at is not None and dispatched_at <= state.recovered_at

    # -- writing -------------------------------------------------------------

    def replace(self, entries: tuple[WorkerEntry, ...], now: float) -> dict[str, list[str]]:
        """Apply a new workers.json: add, update, and start draining removed workers.

        A worker that stays keeps its health and load; one whose endpoint
        changed is unchecked until its next health check.  Returns the labels
        added, removed and changed, for the log.  A suspended worker that is
        still listed is re-admitted.
        """
        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        wanted = {e.worker_id: e for e in entries}
        for worker_id, state in list(self._workers.items()):
            if worker_id in wanted or state.open or state.draining_since is not None:
                continue
            changes["removed"].append(state.entry.label)
            if state.dispatched_total == 0 and not state.authenticated:
                # Never proved its key (a wrong worker_id?) and no job of ours is on it:
                # nothing to keep reachable.
                self._forget(state)
            else:
                state.draining_since = now
        for entry in entries:
            known = self._workers.get(entry.worker_id)
            if known is None:
                self._workers[entry.worker_id] = WorkerState(entry)
                changes["added"].append(entry.label)
                continue
            state = known
            if state.open:
                state.open = False  # now listed: a full member
                changes["added"].append(entry.label)
            if state.suspended_since is not None:
                state.suspended_since = None
                state.strikes = 0
                changes["changed"].append(entry.label)
                log.info("worker {worker} re-admitted", worker=entry.label)
            elif state.entry != entry or state.draining_since is not None:
                changes["changed"].append(entry.label)
            if state.entry.endpoint != entry.endpoint:
                state.healthy = state.authenticated = state.checked = False
                state.load = None
                state.last_error = "endpoint changed; not checked yet"
            state.entry = entry
            state.draining_since = None
        self._by_tag = {s.entry.tag: s for s in self._workers.values()}
        return changes

    def expire_drained(self, now: float) -> list[str]:
        """Forget workers that have drained for ``drain_seconds``; returns their labels."""
        gone = [s for s in self._workers.values() if s.draining_since is not None
                and now >= s.draining_since + self.drain_seconds]
        for state in gone:
            self._forget(state)
        return [s.entry.label for s in gone]

    def _forget(self, state: WorkerState) -> None:
        del self._workers[state.worker_id]
        if self._by_tag.get(state.entry.tag) is state:
            del self._by_tag[state.entry.tag]

    def enroll(self, entry: WorkerEntry) -> WorkerState:
        """Add (or update) an open worker that proved its key; it is unchecked until checked."""
        state = self._workers.get(entry.worker_id)
        if state is None:
            state = self._workers[entry.worker_id] = WorkerState(entry, open=True)
            self._by_tag[entry.tag] = state
        elif state.open and state.entry.endpoint != entry.endpoint:
            state.entry = entry
            state.healthy = state.authenticated = state.checked = False
            state.load = None
            self._by_tag[entry.tag] = state
        return state

    def forget_open(self, state: WorkerState) -> None:
        """Drop an open worker (its proof failed, or it is down and room is needed)."""
        if state.open and self._workers.get(state.worker_id) is state:
            self._forget(state)

    def open_workers(self) -> list[WorkerState]:
        return [w for w in self._workers.values() if w.open]

    def configured(self) -> list[WorkerState]:
        """The workers listed in workers.json now (not draining, not open)."""
        return [w for w in self._workers.values()
                if not w.open and w.draining_since is None]

    # -- reputation ------------------------------------------------------------------

    def record_agreement(self, state: WorkerState) -> None:
        state.agreements += 1

    def record_disagreement(self, state: WorkerState, now: float) -> None:
        """One more strike; at ``max_disagreements`` the worker is suspended."""
        state.disagreements += 1
        state.strikes += 1
        if state.strikes >= self.max_disagreements and state.suspended_since is None:
            state.suspended_since = now
            log.warn("worker {worker} suspended after {count} disagreements with other "  # noqa: G010
                     "replicas; a reload with its key still listed re-admits it",
                     worker=state.entry.label, count=state.strikes)

    def record_unresolved(self, state: WorkerState) -> None:
        state.unresolved += 1

    def record_lost(self, state: WorkerState) -> None:
        state.lost_jobs += 1

    def note_dispatch(self, state: WorkerState) -> None:
        state.dispatched_total += 1

    def undo_dispatch(self, state: WorkerState) -> None:
        """The worker did not take the job after all."""
        state.dispatched_total -= 1

    def check_started(self, state: WorkerState) -> int:
        """A health check was sent; returns the dispatch count it will account for."""
        state.checking = True
        return state.dispatched_total

    def record_pass(self, state: WorkerState, load: Load, now: float,
                    dispatched_before: int, started_at: float | None = None) -> None:
        """A health check answered, signed by the right key, healthy."""
        state.checking = False
        if state.down:
            state.recovered_at = now
            log.info("worker {worker} is back", worker=state.entry.label)
        if state.load is not None and state.last_check is not None and now > state.last_check:
            # Jobs it had, plus those sent between the two checks, less those it has now.
            sent = max(0, dispatched_before - state.dispatched_at_check)
            before = state.load.active_jobs + state.load.queued_jobs
            finished = max(0, before + sent - load.active_jobs - load.queued_jobs)
            rate = finished / (now - state.last_check)
            state.drain_rate = rate if state.drain_rate == 0.0 \
                else (state.drain_rate + rate) / 2
        state.checked = state.healthy = state.authenticated = True
        state.load = load
        state.last_check, state.last_error = now, None
        state.started_at = started_at
        # Jobs sent before the check was sent are in the reported load now.
        state.dispatched_at_check = max(state.dispatched_at_check, dispatched_before)

    def record_failure(self, state: WorkerState, error: str, now: float,
                       authenticated: bool = False) -> None:
        """A health check, or a request, failed: out of the pool at once."""
        state.checking = False
        state.last_check, state.last_error = now, error
        state.authenticated = authenticated
        self.mark_down(state, error)

    def mark_down(self, state: WorkerState, error: str) -> None:
        was_up = state.healthy or not state.checked
        state.checked = True
        state.healthy = False
        state.last_error = error
        if was_up:
            log.warn("worker {worker} is out of the pool: {error}",  # noqa: G010
                     worker=state.entry.label,
                     error=error)
            for listener in list(self._down_listeners):
                listener(state)

    def on_down(self, listener: DownListener) -> None:
        """Call ``listener(state)`` whenever a worker goes down."""
        self._down_listeners.append(listener)
