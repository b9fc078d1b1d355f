"""What both clients (``sync.py``, ``txclient.py``) make of a call, apart from moving bytes.

The server's URL and the job endpoints' paths, how a JSON answer is read, and
``wait``'s polling schedule.  Pure stdlib, no I/O: each client brings its own
HTTP and its own clock.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

from sandrun.client.errors import ProtocolError, WaitTimeoutError
from sandrun.client.models import Job
from sandrun.client.pack import safe_relative_path

__all__ = [
    "DEFAULT_URL",
    "Polling",
    "default_port",
    "json_answer",
    "output_path",
    "parse_server_url",
    "segment",
    "server_url_from_env",
    "stream_url",
]

DEFAULT_URL = "http://127.0.0.1:8443"


def server_url_from_env(explicit: str | None = None) -> str:
    """``explicit``, else ``$SANDRUN_URL``, else the default worker address."""
    return explicit or os.environ.get("SANDRUN_URL") or DEFAULT_URL


def parse_server_url(server_url: str | None) -> tuple[str, urllib.parse.SplitResult]:
    """The server's URL (``server_url_from_env``, no trailing ``/``) and its parts.

    Raises ``ValueError`` unless it is ``http://`` or ``https://`` with a host.
    """
    url = server_url_from_env(server_url).rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{url!r}: the server URL must be http:// or https://")
    return url, parsed


def default_port(parsed: urllib.parse.SplitResult) -> int:
    """The URL's port, else the scheme's."""
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def segment(value: str) -> str:
    """A job id as one URL path segment: it can never add a segment or a query."""
    if not value:
        raise ValueError("a job id cannot be empty")
    return urllib.parse.quote(value, safe="")


def output_path(value: str) -> str:
    """An output path for a URL; one that could leave the job (``..``, absolute) is refused."""
    return urllib.parse.quote("/".join(safe_relative_path(value)), safe="/")


def stream_url(parsed: urllib.parse.SplitResult, job_id: str) -> str:
    """The WebSocket URL of a job's live output, as JSON frames."""
    scheme = "wss" if parsed.scheme == "https" else "ws"
    host = parsed.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    query = urllib.parse.urlencode({"format": "json"})
    return (f"{scheme}://{host}:{default_port(parsed)}{parsed.path.rstrip('/')}"
            f"/logs/{segment(job_id)}/stream?{query}")


def json_answer(status: int, body: bytes) -> Any:
    """A successful answer's JSON; ``ProtocolError`` when it is not JSON."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("Unexpected response",
                            f"HTTP {status} with a body that is not JSON: is this URL a "
                            "Sandrun worker or coordinator?") from None


LONG_POLL_SECONDS = 30.0  # how long one ``/status?wait=`` asks the server to hold


class Polling:
    """``wait``'s schedule: how long each ask may be held, and the pause after it.

    Each ask is a long poll (``/status?wait=S``): the server answers when the job
    ends or after ``S`` seconds (``hold``; never past ``timeout`` seconds from
    ``now``, None: no end), so a client learns of the end at once with one
    request per ``LONG_POLL_SECONDS``.  An ask the server answered well before
    ``S`` with the job unfinished (a server without long polls) is followed by a
    pause that starts at ``poll_interval`` seconds and grows 1.5 times each time
    up to ``max_interval``, as plain polling would be.
    """

    def __init__(self, job_id: str, timeout: float | None, now: float, *,
                 poll_interval: float, max_interval: float,
                 long_poll: float = LONG_POLL_SECONDS) -> None:
        self.job_id = job_id
        self.timeout = timeout
        self.deadline = None if timeout is None else now + timeout
        self.interval = poll_interval
        self.max_interval = max_interval
        self.long_poll = long_poll

    def hold(self, now: float) -> float:
        """Seconds the next ask may be held by the server (its ``?wait=``)."""
        if self.deadline is None:
            return self.long_poll
        return max(0.0, min(self.long_poll, self.deadline - now))

    def pause(self, job: Job, now: float, *, asked: float | None = None,
              held: float = 0.0) -> float:
        """The pause after ``job`` was seen unfinished; ``WaitTimeoutError`` once time is up.

        ``asked`` (when the ask was sent) and ``held`` (its ``?wait=``) tell a held
        long poll, after which the next ask goes at once, from an early answer.
        """
        if self.deadline is not None and now >= self.deadline:
            raise WaitTimeoutError("Wait timed out",
                                   f"{self.job_id} is still {job.status} after {self.timeout} s")
        if asked is not None and held > 0 and now - asked >= held / 2:
            return 0.0
        pause = self.interval if self.deadline is None else min(self.interval, self.deadline - now)
        self.interval = min(self.interval * 1.5, self.max_interval)
        return max(pause, 0.0)
