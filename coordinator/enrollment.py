"""Open enrollment: a worker not in workers.json joins by proving it holds its key.

Off unless the coordinator runs with ``--open-enrollment``.  The protocol::

    POST /pool/join  {"worker_id": "<base64 public key>", "endpoint": "http://HOST:PORT"}

The coordinator adds the worker as *open* and at once sends it the same
health challenge as every listed worker (``health.py``: a fresh nonce, which
it must sign with the private key of ``worker_id``).  It answers 200 when the
worker passed, 403 naming the failure when it did not (and forgets it).  A
worker re-announces itself now and then (``sandrun serve --join``), so a
restarted coordinator learns its open workers again.

Limits, because anyone may call this:

- the endpoint's host must be the address the request came from (after
  ``--trusted-proxy``): a caller can only enroll itself, never make the
  coordinator probe a third party;
- at most ``--max-open-workers`` open workers; a join over that first
  forgets open workers that are down, then answers 503;
- a listed worker's key is answered "listed" and changes nothing.

What an open worker may do is decided elsewhere: it only gets extra replicas
of jobs whose first replica ran on a listed worker (``scheduling.py``), and
its result only counts when it agrees with the listed ones (``consensus.py``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from coordinator.config import CoordinatorConfig, WorkerEntry, is_public_key, normalise_endpoint
from coordinator.registry import WorkerRegistry, WorkerState
from sandrun.httpjson import APIError

log = Logger()

Refresh = Callable[[list[WorkerState]], defer.Deferred[None]]


class Enrollment:
    def __init__(self, registry: WorkerRegistry, config: CoordinatorConfig,
                 refresh: Refresh | None) -> None:
        self.registry = registry
        self.config = config
        self.refresh = refresh

    async def join(self, body: Any, address: str) -> dict[str, Any]:
        """Enroll the worker ``body`` names, from ``address``; the JSON answer."""
        if not self.config.open_enrollment or self.refresh is None:
            raise APIError(403, "Open enrollment is off",
                           "this coordinator only routes to the workers in its workers.json")
        entry = self.entry(body, address)
        known = self.registry.get(entry.worker_id)
        if known is not None and not known.open:
            return {"status": "listed", "worker_id": entry.worker_id}
        holder = self.registry.by_tag(entry.tag)
        if holder is not None and holder.worker_id != entry.worker_id:
            raise APIError(409, "Worker id clash",
                           "another worker's key has the same job-id tag; use another key")
        if known is None:
            self.make_room()
        state = self.registry.enroll(entry)
        await self.refresh([state])
        if not (state.healthy and state.authenticated):
            why = state.last_error or "it did not answer the health challenge"
            self.registry.forget_open(state)
            raise APIError(403, "Key not proven", f"the health challenge failed: {why}")
        log.info("open worker {endpoint} enrolled", endpoint=entry.endpoint)
        return {"status": "enrolled", "worker_id": entry.worker_id, "tag": entry.tag,
                "open": True, "health_interval": self.config.health_interval}

    def entry(self, body: Any, address: str) -> WorkerEntry:
        if not isinstance(body, dict) or set(body) - {"worker_id", "endpoint"}:
            raise APIError(400, "Invalid join request",
                           'a JSON object {"worker_id": ..., "endpoint": ...} and nothing else')
        worker_id, endpoint = body.get("worker_id"), body.get("endpoint")
        if not isinstance(worker_id, str) or not is_public_key(worker_id):
            raise APIError(400, "Invalid join request",
                           "worker_id must be the base64 of a 32-byte Ed25519 public key")
        normalised = normalise_endpoint(endpoint) if isinstance(endpoint, str) else None
        if normalised is None:
            raise APIError(400, "Invalid join request",
                           "endpoint must be http:// or https://, a host and an optional port")
        if not _same_host(normalised, address):
            raise APIError(403, "Endpoint not yours",
                           f"the endpoint's host must be the address this request came from "
                           f"({address})")
        return WorkerEntry(worker_id=worker_id, endpoint=normalised)

    def make_room(self) -> None:
        opens = self.registry.open_workers()
        if len(opens) < self.config.max_open_workers:
            return
        for state in opens:
            if not state.healthy:
                self.registry.forget_open(state)
        if len(self.registry.open_workers()) >= self.config.max_open_workers:
            raise APIError(503, "Pool full", "this coordinator takes no more open workers",
                           retry_after=60)


def _same_host(endpoint: str, address: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(address)
    except ValueError:
        return False  # a name: the caller's address is what it must show
