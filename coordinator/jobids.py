"""Job ids the coordinator hands to clients, and how a worker is found from one.

A coordinator job id is three dot-separated parts::

    <worker tag>.<dispatch time>.<worker job id>
    k7q2m4xa.tj3k2a1.job-hv5ur-G4Ha5KdCVQU-3hxVAF

- the *worker tag*: 8 characters of base32(sha256(worker_id)), so it names
  the worker by its public key, not by its place in workers.json (reordering
  or editing the file never re-routes an id);
- the *dispatch time*: whole seconds since the epoch, base 36, by the
  coordinator's clock when it sent the job;
- the *worker job id*: exactly what the worker returned, 144 random bits.
  It stays the bearer secret: the tag and the time are public facts (anyone
  can hash a public key), so the id is exactly as unguessable as the
  worker's own.

Why encode instead of remember or ask around.  The issue asks for a
coordinator that keeps no job state a restart would lose, and that a second
coordinator behind a load balancer can answer for the first one's jobs.
Three designs do that:

1. *Encode the worker in the id* (this module).  Routing a request is one
   dictionary lookup and one request to one worker; it works across
   restarts and across coordinators with the same workers.json; and because
   the worker is known even when it is down, "that worker is gone" can be
   answered as ``failed``/``worker_lost`` with no durable state.  The cost:
   the client sees an id that differs from the one the worker signed, so
   ``/status`` through the coordinator rewrites ``job_id`` (the worker's own
   is kept in ``worker_metadata.job_id``; see ``proxy.py``), and a worker that
   leaves workers.json for good takes its ids with it (a SIGHUP reload keeps
   removed workers reachable while they drain).
2. *Fan out on a miss* (ask every healthy worker, cache the answer): ids stay
   the worker's, but every unknown id costs N requests, which lets anyone
   amplify traffic N-fold with made-up ids, and a job on a dead worker is
   indistinguishable from a job that never existed, so ``worker_lost`` could
   not be told after a coordinator restart.
3. *A shared job table*: durable state, which the issue rules out.

A job run on several workers (``replicas``, see ``consensus.py``) gets the
ids of all its copies joined by ``~``, the first replica's first::

    k7q2m4xa.tj3k2a1.job-...~b3nq5zte.tj3k2a1.job-...~...

so a replicated job too is answered with no job table: ``/status`` asks
every replica's worker and judges their signed results; logs, outputs and
downloads come from the first replica, which always ran on a listed worker.

The dispatch time lets a ``404`` from a worker that restarted after the job
was sent be reported as ``worker_lost`` rather than "not found" (see
``WorkerRegistry.restarted_after``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

TAG_LENGTH = 8  # base32 characters: 40 bits, checked for collisions at load

_TAG = re.compile(rf"[a-z2-7]{{{TAG_LENGTH}}}")
_TIME = re.compile(r"[0-9a-z]{1,9}")
# The worker's ids are ``job-`` and url-safe base64; allow any url-safe token
# of a sane length so a worker may change its format without breaking this.
_WORKER_JOB_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
REPLICA_SEPARATOR = "~"
MAX_REPLICA_REFS = 16  # sandrun.jobs.manifest.MAX_REPLICAS


def worker_tag(worker_id: str) -> str:
    """The short, stable name of a worker inside job ids."""
    digest = hashlib.sha256(worker_id.encode("ascii")).digest()
    return base64.b32encode(digest).decode("ascii")[:TAG_LENGTH].lower()


@dataclass(frozen=True)
class JobRef:
    """What a coordinator job id says: which worker, when, and the worker's id."""

    tag: str
    dispatched_at: int  # seconds since the epoch, coordinator clock
    worker_job_id: str

    def encode(self) -> str:
        return f"{self.tag}.{_base36(self.dispatched_at)}.{self.worker_job_id}"


def encode_job_id(tag: str, dispatched_at: float, worker_job_id: str) -> str:
    """The id a client gets for ``worker_job_id`` sent to the worker with ``tag``."""
    if not _WORKER_JOB_ID.fullmatch(worker_job_id):
        raise ValueError("the worker returned a job id that is not a url-safe token")
    return JobRef(tag, max(0, int(dispatched_at)), worker_job_id).encode()


def decode_job_id(job_id: str) -> JobRef | None:
    """The parts of a coordinator job id, or None when it is not one."""
    parts = job_id.split(".")
    if len(parts) != 3:
        return None
    tag, when, worker_job_id = parts
    if not (_TAG.fullmatch(tag) and _TIME.fullmatch(when)
            and _WORKER_JOB_ID.fullmatch(worker_job_id)):
        return None
    return JobRef(tag, int(when, 36), worker_job_id)


def encode_replicas(refs: list[JobRef]) -> str:
    """The id of a job run as ``refs`` (first replica first)."""
    return REPLICA_SEPARATOR.join(ref.encode() for ref in refs)


def decode_replicas(job_id: str) -> list[JobRef] | None:
    """The replicas a coordinator job id names (one for a job run once), or None."""
    parts = job_id.split(REPLICA_SEPARATOR)
    if len(parts) > MAX_REPLICA_REFS:
        return None
    refs = [decode_job_id(part) for part in parts]
    if any(ref is None for ref in refs):
        return None
    return [ref for ref in refs if ref is not None]


def _base36(value: int) -> str:
    if value == 0:
        return "0"
    digits = []
    while value:
        value, digit = divmod(value, 36)
        digits.append(_DIGITS[digit])
    return "".join(reversed(digits))
