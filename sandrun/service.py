"""The worker's composition root: build the collaborators, listen, return a service."""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import server

from sandrun import identity as ident
from sandrun.api.app import WorkerAPI
from sandrun.api.uploads import request_factory
from sandrun.config import WorkerConfig
from sandrun.jobs.manager import JobManager
from sandrun.jobs.ratelimit import RateLimiter, parse_trusted_proxies
from sandrun.jobs.storage import Storage
from sandrun.sandbox.supervisor import Sandbox

log = Logger()


def instance_name(state_dir: str) -> str:
    """The cgroup directory of this worker: distinct per state directory."""
    return "sandrun-" + hashlib.sha256(state_dir.encode()).hexdigest()[:12]


class WorkerService(service.MultiService):
    """Storage, sandbox, job manager and HTTP API, started and stopped in order."""

    def __init__(self, reactor: Any, config: WorkerConfig) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        parse_trusted_proxies(config.trusted_proxies)  # a bad entry fails at start
        self.identity = ident.WorkerIdentity.load(config.worker_key) if config.worker_key \
            else None
        self.storage = Storage(config.state_dir, config.limits.job_dir_mb * 1024 * 1024,
                               config.storage_bytes)
        self.sandbox = Sandbox(reactor, config.state_dir + "/sandbox",
                               instance_name(config.state_dir), config.max_concurrent)
        self.limiter = RateLimiter(config.quotas)
        self.manager = JobManager(reactor, self.sandbox, self.storage, config, self.limiter,
                                  self.identity)
        self.api = WorkerAPI(self.manager, config, self.identity)
        self.site = server.Site(self.api.resource())
        self.site.displayTracebacks = False
        self.port: Any = None

    @defer.inlineCallbacks
    def startService(self) -> Any:
        stale = self.storage.start()
        self.site.requestFactory = request_factory(self.config.limits, self.storage.uploads_dir)
        yield self.sandbox.start()
        self.manager.start()
        self.port = yield serverFromString(self.reactor, self.config.listen).listen(self.site)
        log.info("sandrun worker listening on {address} (worker id {worker_id}, "
                 "{stale} stale job directories removed)", address=self.port.getHost(),
                 worker_id=self.manager.worker_id, stale=stale)
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        if self.port is not None:
            yield self.port.stopListening()
        self.manager.stop()
        self.sandbox.stop()
        self.storage.stop()
