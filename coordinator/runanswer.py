"""``POST /run``'s answer through the coordinator, written while it is read from the worker.

The answer is the shape ``POST /run`` has on a worker (README, ``POST /run``):
the job's final status document (as ``/status`` gives it: our job id,
``signature_verified``), then ``stdout`` and ``stderr`` (and ``truncated``)
from the worker's ``/logs``, ``outputs`` from its ``/outputs`` (our download
URLs, none when the job is not kept), and ``kept``.  The status document is
read whole (it must be, to verify its signature); the rest is relayed
member by member (``members.py``) with the worker paused while the client
lags (``relay.py``), so an answer costs the coordinator a bounded amount
however much the job printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.server import Request

from coordinator.members import Each, Keep, MemberRelay, Stream
from coordinator.relay import relay
from sandrun.httpjson import cors

# Members of our answer that come from the worker's /logs and /outputs, and ``kept``.
_OWN = ("stdout", "stderr", "truncated", "outputs", "kept")
_NOT_TRUNCATED = {"stdout": False, "stderr": False}


class RunAnswer:
    """One ``/run`` answer: ``start``, ``relay_logs``, ``relay_outputs``, then ``end``
    (or ``cut`` when the worker fails once it has begun)."""

    def __init__(self, request: Request, doc: dict[str, Any], keep: bool,
                 rewrite_entry: Callable[[Any], Any]) -> None:
        self.request = request
        self.doc = {name: value for name, value in doc.items() if name not in _OWN}
        self.keep = keep
        self.rewrite_entry = rewrite_entry
        self.started = False

    def start(self) -> None:
        """The status line, headers and the status document's members."""
        self.started = True
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        cors(request)
        # The document's members, then ours: each ", name: value" (the job id is always
        # there, so the head is never "{}").
        request.write(json.dumps({"job_id": None, **self.doc}).encode()[:-1])

    async def relay_logs(self, response: Any) -> None:
        """``stdout``, ``stderr`` and ``truncated`` from the worker's ``/logs`` answer
        (None: there is none to read; empty output)."""
        members = MemberRelay({"stdout": Stream("stdout"), "stderr": Stream("stderr"),
                               "truncated": Keep()})
        if response is not None:
            await relay(response, self.request, members)
        for name in ("stdout", "stderr"):
            if name not in members.written:
                self._member(name, "")
        truncated = members.kept.get("truncated")
        self._member("truncated", truncated if isinstance(truncated, dict)
                     else dict(_NOT_TRUNCATED))

    async def relay_outputs(self, response: Any) -> None:
        """``outputs``: the ``files`` of the worker's ``/outputs`` answer, rewritten."""
        members = MemberRelay({"files": Each("outputs", self.rewrite_entry)})
        if response is not None:
            await relay(response, self.request, members)
        if "outputs" not in members.written:
            self._member("outputs", [])

    def end(self) -> None:
        self._member("kept", self.keep)
        self.request.write(b"}")

    def cut(self) -> None:
        """End the answer unfinished: the client sees a broken answer, never a wrong one."""
        transport = getattr(self.request, "transport", None)
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.request.loseConnection()

    def _member(self, name: str, value: Any) -> None:
        self.request.write(b", " + json.dumps(name).encode() + b": " + json.dumps(value).encode())
