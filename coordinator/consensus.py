"""Redundant execution: judging the signed results of one job run on several workers.

A manifest's ``replicas: N`` makes the coordinator run the job on N distinct
workers (``replication.py``).  Each worker signs its own result
(``sandrun.identity.RESULT_FIELDS``); this module compares what they signed,
field by field in ``COMPARED``: the inputs (``job_hash``), how the job ended
(``status``, ``reason``, ``exit_code``), what it printed (``stdout_sha256``,
``stderr_sha256``) and every output file's hash (``outputs``).  Timings and
resource use are not compared: they differ between any two runs.

The verdict is unanimous or nothing:

- every replica finished, every signature verifies and every compared field
  is equal: *agreed*, and the answer is that result;
- anything else that has finished is a *disagreement*: the job is ``failed``
  with reason ``replica_disagreement``.  No answer is picked, not even by
  majority, because a majority of two colluding or equally broken workers is
  not evidence of a right answer;
- a replica whose worker was lost makes the job ``failed`` with
  ``worker_lost``: the others alone are not the consensus that was asked for.

Who is at fault in a disagreement decides whose reputation suffers.  The
*reference* is the group of replicas with equal results that holds a listed
(workers.json) worker and is a strict majority; failing that, the group of
every listed replica when they all agree with each other (so an open worker
can never out-vote a listed one, and its disagreeing with one costs only the
open worker).  Replicas outside the reference count a disagreement (a strike
towards suspension), those in it an agreement.  Without a reference (every
replica differs, or two listed ones split evenly) nobody can tell which is
right and nobody is blamed: each counts an *unresolved* disagreement, which
is shown but is no strike.  Otherwise a client could get honest workers
suspended just by asking for replicas of a job that prints random numbers.
A replica whose signature does not verify is always to blame.

A job that is not deterministic (time, randomness, thread scheduling in its
output) disagrees with itself; asking for replicas of one is the user's
choice.
"""

from __future__ import annotations

import enum
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sandrun.identity import CONSENSUS_FIELDS, verify_result
from sandrun.wire import JobStatus, canonical_json

COMPARED = CONSENSUS_FIELDS  # the signed fields replicas must agree on
_FINISHED = (JobStatus.COMPLETED.value, JobStatus.FAILED.value)


class Outcome(str, enum.Enum):
    PENDING = "pending"  # some replica is still queued or running
    AGREED = "agreed"
    DISAGREED = "disagreed"
    LOST = "lost"  # some replica's worker is gone


@dataclass(frozen=True)
class ReplicaReport:
    """What one replica's worker said about its copy of the job."""

    worker_id: str
    listed: bool  # in workers.json (not an open worker)
    worker_job_id: str
    status: dict[str, Any] | None = None  # the worker's /status document, its own job id
    lost: str | None = None  # why the worker is gone, when it is

    @property
    def finished(self) -> bool:
        return self.status is not None and self.status.get("status") in _FINISHED

    def signed(self) -> dict[str, Any] | None:
        """The result this worker signed, when its signature verifies; else None."""
        if self.status is None or not verify_result(self.status, self.worker_id):
            return None
        metadata = self.status.get("worker_metadata")
        text = metadata.get("signed") if isinstance(metadata, dict) else None
        try:
            claimed = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            return None
        return claimed if isinstance(claimed, dict) else None

    def as_json(self) -> dict[str, Any]:
        """This replica in a ``consensus`` block: enough to check its signature offline."""
        metadata = self.status.get("worker_metadata") if self.status else None
        metadata = metadata if isinstance(metadata, dict) else {}
        return {"worker_id": self.worker_id, "listed": self.listed,
                "job_id": self.worker_job_id,
                "status": self.status.get("status") if self.status else None,
                "lost": self.lost,
                "signed": metadata.get("signed"), "signature": metadata.get("signature"),
                "signature_verified": self.signed() is not None}


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    agreeing: tuple[str, ...] = ()  # worker ids in the reference (all of them when agreed)
    disagreeing: tuple[str, ...] = ()  # worker ids blamed: outside it, or unsigned
    unresolved: tuple[str, ...] = ()  # worker ids in a disagreement nobody can settle
    lost: tuple[str, ...] = ()
    differing: tuple[str, ...] = ()  # compared fields that are not the same everywhere
    unsigned: tuple[str, ...] = ()  # worker ids whose result does not verify

    @property
    def final(self) -> bool:
        return self.outcome != Outcome.PENDING

    def message(self) -> str:
        if self.outcome == Outcome.LOST:
            return f"{len(self.lost)} replica(s) lost their worker; no consensus"
        parts = []
        if self.differing:
            parts.append("the replicas' signed results differ in " + ", ".join(self.differing))
        if self.unsigned:
            parts.append(f"{len(self.unsigned)} replica(s) sent a result that does not "
                         "verify under their key")
        return "; ".join(parts) or "the replicas agree"


def compared(result: dict[str, Any]) -> str:
    """The canonical text of the fields replicas must agree on."""
    return canonical_json({name: result.get(name) for name in COMPARED})


def judge(reports: list[ReplicaReport]) -> Verdict:
    """The consensus of ``reports``; pure."""
    lost = tuple(r.worker_id for r in reports if r.lost is not None)
    if lost:
        return Verdict(Outcome.LOST, lost=lost)
    if not all(r.finished for r in reports):
        return Verdict(Outcome.PENDING)
    groups: dict[str, list[ReplicaReport]] = {}
    unsigned: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    for report in reports:
        signed = report.signed()
        if signed is None:
            unsigned.append(report.worker_id)
            continue
        results[report.worker_id] = signed
        groups.setdefault(compared(signed), []).append(report)
    everyone = tuple(r.worker_id for r in reports)
    if not unsigned and len(groups) == 1:
        return Verdict(Outcome.AGREED, agreeing=everyone)
    differing = tuple(name for name in COMPARED
                      if len({canonical_json(r.get(name)) for r in results.values()}) > 1)
    reference = _reference(reports, list(groups.values()))
    agreeing = tuple(r.worker_id for r in reference)
    if reference:
        disagreeing = tuple(w for w in everyone if w not in agreeing)
        unresolved: tuple[str, ...] = ()
    else:
        disagreeing = tuple(unsigned)
        unresolved = tuple(w for w in everyone if w not in unsigned)
    return Verdict(Outcome.DISAGREED, agreeing=agreeing, disagreeing=disagreeing,
                   unresolved=unresolved, differing=differing, unsigned=tuple(unsigned))


def _reference(reports: list[ReplicaReport],
               groups: list[list[ReplicaReport]]) -> list[ReplicaReport]:
    """The replicas taken to be right in a disagreement; empty when none can be."""
    with_listed = [g for g in groups if any(r.listed for r in g)]
    for group in with_listed:
        if 2 * len(group) > len(reports):
            return group
    listed = [r for r in reports if r.listed]
    for group in with_listed:
        if all(any(r is member for member in group) for r in listed):
            return group
    return []


@dataclass
class Ledger:
    """Which replicated jobs have been counted in the workers' reputation already.

    A final verdict is reached on every ``/status`` of a finished job; it is
    counted once.  Soft state, bounded to the ``capacity`` most recent jobs:
    after a restart (or for a job older than those) a verdict may be counted
    again.
    """

    capacity: int = 100_000
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def first_time(self, job_id: str) -> bool:
        if job_id in self._seen:
            return False
        self._seen[job_id] = None
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True
