"""Rewrite a worker's streamed JSON answer while relaying it: ids and URLs, line by line.

A worker writes ``/logs`` and ``/outputs`` with the ``job_id`` member alone on
the first line and each ``/outputs`` entry on a line of its own
(``sandrun/api/sending.py``).  The coordinator gives the client its own job id
and download URLs without holding the answer: the first line is rewritten,
each entry line is parsed and rewritten (an entry is a few KB at most), and
every other byte, such as the string of a job's stdout, passes through as it
arrives.  A line longer than its cap is a bad answer, never a reason to buffer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from coordinator.worker_client import BadWorkerResponse

MAX_FIRST_LINE = 4096  # bytes: '{"job_id": "...",'
MAX_ENTRY_LINE = 256 * 1024  # bytes: one /outputs entry, its path escaped twice at worst
_FIRST = b'{"job_id": '

Entry = Callable[[dict[str, Any]], dict[str, Any]]


class LineRewriter:
    """Feed it the worker's bytes in order; it returns what to send on to the client."""

    def __init__(self, job_id: str, entry: Entry | None = None) -> None:
        self.job_id = job_id
        self.entry = entry  # rewrites each entry line; None: only the first line
        self._buffer = bytearray()
        self._first_done = False

    def feed(self, data: bytes) -> bytes:
        if self._first_done and self.entry is None:
            return data
        self._buffer += data
        out: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                limit = MAX_ENTRY_LINE if self._first_done else MAX_FIRST_LINE
                if len(self._buffer) > limit:
                    raise BadWorkerResponse("the worker's answer has a line beyond its cap")
                break
            line = bytes(self._buffer[:end + 1])
            del self._buffer[:end + 1]
            out.append(self._line(line))
            if self.entry is None:  # the rest passes through
                out.append(bytes(self._buffer))
                self._buffer.clear()
                break
        return b"".join(out)

    def end(self) -> bytes:
        """The bytes still held once the worker's answer ended (its last line)."""
        if not self._first_done:
            raise BadWorkerResponse("the worker's answer ended before its job_id")
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def _line(self, line: bytes) -> bytes:
        if not self._first_done:
            if not (line.startswith(_FIRST) and line.endswith(b",\n")):
                raise BadWorkerResponse("the worker's answer does not start with its job_id")
            self._first_done = True
            return _FIRST + json.dumps(self.job_id).encode() + b",\n"
        if self.entry is None or not line.startswith(b"{"):
            return line
        body = line.rstrip(b"\n")
        comma = body.endswith(b",")
        try:
            entry = json.loads(body[:-1] if comma else body)
        except ValueError:
            raise BadWorkerResponse("the worker's answer has an entry that is not JSON") from None
        if not isinstance(entry, dict):
            raise BadWorkerResponse("the worker's answer has an entry that is not an object")
        return json.dumps(self.entry(entry)).encode() + (b",\n" if comma else b"\n")
