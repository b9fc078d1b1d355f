"""``sandrun serve --join URL``: announce this worker to a coordinator that takes open workers.

Every ``interval`` seconds (and once at start) the worker sends::

    POST URL/pool/join  {"worker_id": "<its public key>", "endpoint": "<its URL>"}

The coordinator answers only after it has challenged the endpoint with a
fresh nonce that this worker signs (its ``/health``), so joining proves the
key; see ``coordinator/enrollment.py``.  Announcing again keeps the worker
known to a coordinator that restarted (its pool is soft state).  A failed
announcement is logged and tried again at the next interval; it never stops
the worker.  The answer is not trusted for anything.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

ANNOUNCE_INTERVAL = 60.0  # seconds between announcements
ANNOUNCE_TIMEOUT = 30.0  # seconds for the coordinator's answer (it checks us meanwhile)


def join_url(coordinator: str) -> str:
    return coordinator.rstrip("/") + "/pool/join"


class Announcer:
    def __init__(self, reactor: Any, coordinator: str, worker_id: str, endpoint: str,
                 interval: float = ANNOUNCE_INTERVAL, http: Any = None) -> None:
        self.reactor = reactor
        self.url = join_url(coordinator)
        self.body = json.dumps({"worker_id": worker_id, "endpoint": endpoint}).encode()
        self.interval = interval
        self.http = http
        self.joined = False  # the last announcement was answered "enrolled" or "listed"
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        self._loop = task.LoopingCall(self.announce)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    @defer.inlineCallbacks
    def announce(self) -> Any:
        import treq

        http = self.http if self.http is not None else treq
        try:
            d = http.post(self.url, data=self.body,
                          headers={b"Content-Type": [b"application/json"]})
            d.addTimeout(ANNOUNCE_TIMEOUT, self.reactor)
            response = yield d
            text = yield response.content()
        except Exception as e:  # noqa: BLE001 - logged and tried again next interval
            self.joined = False
            log.warn("announcing to {url} failed: {error}",  # noqa: G010
                     url=self.url, error=e.__class__.__name__)
            return
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {}
        status = answer.get("status") if isinstance(answer, dict) else None
        self.joined = response.code == 200 and status in ("enrolled", "listed")
        if self.joined:
            log.info("announced to {url}: {status}", url=self.url, status=status)
        else:
            details = answer.get("details") if isinstance(answer, dict) else None
            log.warn("coordinator {url} refused this worker (HTTP {code}): {details}",  # noqa: G010
                     url=self.url, code=response.code, details=details)
