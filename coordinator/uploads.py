"""Request bodies at the coordinator: capped, spooled to RAM, never parsed.

The coordinator only forwards ``/submit`` bodies, so it never parses them:
twisted.web's own multipart parsing (into memory) is switched off by hiding
the content type (``sandrun.httpjson.RawBodyRequest``, as in the worker), which
``content_type`` gives back for forwarding.
A ``Content-Length`` over the limit is answered 413 before the body is read;
a chunked body is cut off with 413 as soon as it passes the limit.  A body
sent to a route that takes none, or past the budget of upload bytes in
flight per client address and in all, is refused before it is read
(``sandrun.connections``): what waits in the spool directory is bounded.  Bodies
up to 1 MiB stay in memory; larger ones go to an unlinked file in the spool
directory (``/dev/shm`` by default, so job content never reaches a disk), and
are sent to a worker from there, again if that worker refuses.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

from sandrun.connections import BodyRoutes, UploadBudget
from sandrun.httpjson import RawBodyRequest

IN_MEMORY_BYTES = 1024 * 1024


def default_spool_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class SpoolingRequest(RawBodyRequest):
    max_body_bytes = 100 * 1000 * 1000
    spool_dir: str | None = None

    _received = 0
    _chunked = False

    def gotLength(self, length: int | None) -> None:
        self.content = tempfile.SpooledTemporaryFile(  # type: ignore[assignment]  # noqa: SIM115
            max_size=IN_MEMORY_BYTES, dir=self.spool_dir)  # closed with the request
        if length is not None and length > self.max_body_bytes:
            self._refuse()
            return
        self._chunked = length is None
        self.refuse_early(length)  # a body where none is taken; over the in-flight budget

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._refuse()
            return
        if self._chunked and not self.take_budget(len(data)):
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self.answer(413, {"error": "Upload too large",
                          "details": f"the limit is {self.max_body_bytes} bytes"})


def request_factory(max_body_bytes: int, spool_dir: str | None,
                    body_routes: BodyRoutes | None = None,
                    upload_budget: UploadBudget | None = None) -> Any:
    """A ``Site.requestFactory`` with these limits (``sandrun.connections``)."""

    class Request(SpoolingRequest):
        pass

    Request.max_body_bytes = max_body_bytes
    Request.spool_dir = spool_dir
    Request.body_routes = body_routes
    Request.upload_budget = upload_budget
    return Request



def independent_reader(body: Any) -> Any:
    """A new reader of a spooled body, with its own position: several copies of one
    submission (a job's replicas) can then be sent at the same time.

    A spooled file is reopened through ``/proc/self/fd`` (a new open file
    description of the same unlinked file: no copy; one still in memory is
    first moved to the spool directory, which ``fileno`` does); a plain
    in-memory body is copied.  The caller closes it.
    """
    try:
        fd = body.fileno()
    except (AttributeError, io.UnsupportedOperation, OSError):
        body.seek(0)
        return io.BytesIO(body.read())
    body.flush()
    return open(f"/proc/self/fd/{fd}", "rb")  # the caller closes it
