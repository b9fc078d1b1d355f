"""A job's result in one answer (``POST /run``) and waiting for a job's end (``?wait=``).

``POST /run`` takes the same bodies as ``/submit`` and answers once the job has
ended: the final ``/status`` document plus ``stdout`` and ``stderr`` (as
``/logs`` gives them, capped by the worker's output cap, with ``truncated``),
the ``outputs`` listing as ``/outputs`` gives it, and ``kept``: whether the job
stays for download under the usual retention (``?keep=0`` deletes it once
answered; its download URLs are then null).

``GET /status/{id}?wait=S`` is a long poll: answered when the job is finished
or after ``S`` seconds (at most ``MAX_WAIT_SECONDS``), whichever comes first.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer

from sandrun.api.sending import Text
from sandrun.httpjson import APIError
from sandrun.jobs.model import Job

MAX_WAIT_SECONDS = 60.0  # the longest a long poll is held; a larger ?wait= is cut to this
_TRUE = (b"1", b"true", b"yes")
_FALSE = (b"0", b"false", b"no")

Args = Mapping[bytes, list[bytes]]


def wait_arg(args: Args | None) -> float:
    """``?wait=S`` in seconds, capped at ``MAX_WAIT_SECONDS``; 0 without it."""
    values = (args or {}).get(b"wait")
    if not values:
        return 0.0
    try:
        seconds = float(values[0])
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise APIError(400, "Invalid wait",
                       f"wait is a number of seconds, 0 to {MAX_WAIT_SECONDS:g}", field="wait")
    return min(seconds, MAX_WAIT_SECONDS)


def keep_arg(args: Args | None) -> bool:
    """``?keep=0`` (or ``false``, ``no``) deletes a ``/run`` job once answered."""
    values = (args or {}).get(b"keep")
    if not values:
        return True
    value = values[0].lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise APIError(400, "Invalid keep", "keep is 1 or 0 (true or false)", field="keep")


def job_ended(job: Job, clock: Any, timeout: float | None = None,
              on_cancel: Callable[[], object] | None = None) -> defer.Deferred[bool]:
    """Fires True once ``job`` is finished, or False after ``timeout`` seconds.

    Cancelling it (Klein does when the client goes away) stops listening and
    calls ``on_cancel``.  Nothing is left on the job or the clock once it fired.
    """
    timer: list[Any] = []

    def stop_listening() -> None:
        if on_end in job.end_listeners:
            job.end_listeners.remove(on_end)
        if timer and timer[0].active():
            timer[0].cancel()

    def cancelled(_: defer.Deferred[bool]) -> None:
        stop_listening()
        if on_cancel is not None:
            on_cancel()

    d: defer.Deferred[bool] = defer.Deferred(cancelled)

    def on_end(_: Job) -> None:
        stop_listening()
        if not d.called:
            d.callback(True)

    def expired() -> None:
        stop_listening()
        if not d.called:
            d.callback(False)

    if job.finished:
        d.callback(True)
        return d
    job.end_listeners.append(on_end)
    if timeout is not None:
        timer.append(clock.callLater(timeout, expired))
    return d


def output_listing(job: Job, kept: bool = True) -> list[dict[str, Any]]:
    """The job's outputs as ``/outputs`` lists them (no URL when the job is not kept)."""
    return [{"path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256,
             "mime_type": o.mime_type,
             "download_url": f"/download/{job.id}/{urllib.parse.quote(o.path)}"
             if kept else None}
            for o in job.outputs]


def run_document(status: dict[str, Any], job: Job, *, keep: bool) -> list[tuple[str, Any]]:
    """``POST /run``'s answer, member by member: the final status document, the output
    (streamed: ``sending.Text``, up to 3 x 10 MiB) and the outputs."""
    return [*status.items(), ("stdout", Text(job.log.pieces("stdout"))),
            ("stderr", Text(job.log.pieces("stderr"))),
            ("install", Text(job.log.pieces("install"))), ("truncated", dict(job.truncated)),
            ("outputs", output_listing(job, keep)), ("kept", keep)]
