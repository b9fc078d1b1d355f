"""One ``.tar.gz`` of a job's outputs for ``GET /download/{id}``, made once per job.

Packing reads every output and compresses it: done for each request, a few
slow downloads of one large job would each cost a full pack's CPU time and a
full copy on the worker's tmpfs.  Here the first request packs (off the
reactor thread) into the job's pack file beside its tmpfs, counted in the
worker's storage and deleted with the job; requests meanwhile wait for that
one pack, and later ones send it again.  Each request reads the file through
its own descriptor, so a download that ends (and deletes the job) does not cut
off another one under way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

Blocking = Callable[..., "defer.Deferred[Any]"]
# Writes the pack of a job to a path (blocking); the path is renamed into place after.
Packer = Callable[[Any, str], None]

PARTIAL = ".part"


class PackOnce:
    """Packs a job's outputs at most once at a time, and keeps the result."""

    def __init__(self, blocking: Blocking, pack: Packer,
                 pack_path: Callable[[str], str], exists: Callable[[str], bool],
                 on_packed: Callable[[str], Any] = lambda job_id: None) -> None:
        self.blocking = blocking
        self.pack = pack
        self.pack_path = pack_path  # job id -> where its pack lives
        self.exists = exists  # whether the job still exists (else its pack is removed)
        self.on_packed = on_packed  # a pack was made for this job id: count it
        self._waiting: dict[str, list[defer.Deferred[str]]] = {}

    def get(self, job: Any) -> defer.Deferred[str]:
        """Fires with the path of the job's complete pack."""
        path = self.pack_path(job.id)
        if os.path.exists(path):
            return defer.succeed(path)
        waiter: defer.Deferred[str] = defer.Deferred()
        if job.id in self._waiting:
            self._waiting[job.id].append(waiter)
            return waiter
        self._waiting[job.id] = [waiter]
        d = self.blocking(self._pack_into_place, job, path)
        d.addBoth(self._done, job.id, path)
        return waiter

    def _pack_into_place(self, job: Any, path: str) -> None:
        partial = path + PARTIAL
        try:
            self.pack(job, partial)
            os.rename(partial, path)
        except BaseException:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
            raise

    def _done(self, result: Any, job_id: str, path: str) -> None:
        waiters = self._waiting.pop(job_id, [])
        if not isinstance(result, Failure):
            if self.exists(job_id):
                self.on_packed(job_id)
            else:
                try:  # deleted while it was packed: nobody would remove the pack
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(path)
