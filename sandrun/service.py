"""The worker's composition root: build the collaborators, listen, return a service."""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from sandrun import identity as ident
from sandrun.announce import Announcer
from sandrun.api.app import WorkerAPI
from sandrun.api.unpacker import Unpacker
from sandrun.api.uploads import WorkerSite, request_factory
from sandrun.config import WorkerConfig
from sandrun.connections import BodyRoutes, UploadBudget, guard_site
from sandrun.environments import DependencyCache, Environments, Registry
from sandrun.jobs.gpus import GpuPool, discover
from sandrun.jobs.manager import JobManager
from sandrun.jobs.ratelimit import RateLimiter
from sandrun.jobs.storage import Storage
from sandrun.netaddr import parse_trusted_proxies
from sandrun.sandbox.supervisor import Sandbox

log = Logger()


def instance_name(state_dir: str) -> str:
    """The cgroup directory of this worker: distinct per state directory."""
    return "sandrun-" + hashlib.sha256(state_dir.encode()).hexdigest()[:12]


def metrics_site(registry: Any) -> server.Site:
    """The ``--metrics-listen`` site: ``/metrics`` only, in the text exposition format."""
    # Imported here: it brings twisted.web.wsgi, which a worker without the flag never uses.
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    site = server.Site(root)
    site.noisy = False
    return site


def _listen_url(host: Any) -> str:
    """``http://HOST:PORT`` of the listening socket (give --advertise for a wildcard one)."""
    address = getattr(host, "host", "127.0.0.1")
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{getattr(host, 'port', 0)}"


class WorkerService(service.MultiService):
    """Storage, sandbox, job manager and HTTP API, started and stopped in order."""

    def __init__(self, reactor: Any, config: WorkerConfig) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        parse_trusted_proxies(config.trusted_proxies)  # a bad entry fails at start
        parse_trusted_proxies(config.quotas.exempt)
        parse_trusted_proxies(config.metrics_allow)
        self.identity = ident.WorkerIdentity.load(config.worker_key) if config.worker_key \
            else None
        self.storage = Storage(config.state_dir, config.limits.job_dir_mb * 1024 * 1024,
                               job_dir_inodes=config.limits.job_dir_inodes,
                               total_bytes=config.storage_bytes)
        self.sandbox = Sandbox(reactor, config.state_dir + "/sandbox",
                               instance_name(config.state_dir), config.max_concurrent,
                               allow_unlimited_swap=config.allow_unlimited_swap)
        self.limiter = RateLimiter(config.quotas)
        self.environments = Environments(Registry(config.env_dir),
                                         DependencyCache(config.deps_dir,
                                                         max_total_bytes=config.deps_cache_bytes))
        self.gpus = GpuPool()
        self.manager = JobManager(reactor, self.sandbox, self.storage, config, self.limiter,
                                  self.identity, environments=self.environments,
                                  gpus=self.gpus)
        self.unpacker = Unpacker(config.limits)  # uploads are parsed in its children
        self.api = WorkerAPI(self.manager, config, self.identity,
                             environments=self.environments.describe,
                             unpack=self.unpacker.parse)
        self.manager.metrics.watch(stored=self.storage.used_bytes)
        self.metrics_site = metrics_site(self.manager.metrics.registry) \
            if config.metrics_listen is not None else None
        self.metrics_port: Any = None
        self.site = WorkerSite(self.api.resource())
        self.site.displayTracebacks = False
        self.port: Any = None
        # Header deadline, idle timeout, connection caps; descriptors kept for jobs' pipes.
        self.connections = guard_site(self.site, config.connections,
                                      reserve=64 + 16 * config.max_concurrent)
        self.announcer: Announcer | None = None
        self._started: list[str] = []  # what stopService must undo, in start order

    @defer.inlineCallbacks
    def startService(self) -> Any:
        """Mount storage, start the launcher, then listen; undo it all if a step fails."""
        try:
            stale = self.storage.start()
            self._started.append("storage")
            self.unpacker.start()
            self._started.append("unpacker")
            policy = self.config.connections
            self.site.requestFactory = request_factory(
                self.config.limits, self.storage.uploads_dir, self.api.early_refusal,
                BodyRoutes(WorkerAPI.app.url_map),
                UploadBudget(policy.max_inflight_upload_bytes,
                             policy.max_inflight_upload_bytes_per_ip, policy.exempt))
            self._started.append("sandbox")
            yield self.sandbox.start()
            yield self._find_gpus()
            self.manager.start()
            self.api.runtime_list.start()  # asks each interpreter its version, in a thread
            self._started.append("manager")
            self.port = yield serverFromString(self.reactor, self.config.listen).listen(
                self.site)
            if self.metrics_site is not None:  # made exactly when --metrics-listen is given
                self.metrics_port = yield serverFromString(
                    self.reactor, self.config.metrics_listen).listen(self.metrics_site)
        except BaseException:
            if self.port is not None:
                yield self.port.stopListening()
                self.port = None
            yield self._undo()
            raise
        host = self.port.getHost()
        log.info("sandrun worker listening on {host}:{port} (worker id {worker_id}, "
                 "{stale} stale job directories removed)", host=getattr(host, "host", host),
                 port=getattr(host, "port", ""), worker_id=self.manager.worker_id, stale=stale)
        log.info("connections: at most {total} ({per_ip} per client address), headers within "
                 "{header:g} s, idle {idle:g} s; uploads in flight at most {inflight} bytes "
                 "({inflight_ip} per address)", total=self.connections.max_total,
                 per_ip=policy.max_connections_per_ip, header=policy.header_timeout,
                 idle=policy.idle_timeout, inflight=policy.max_inflight_upload_bytes,
                 inflight_ip=policy.max_inflight_upload_bytes_per_ip)
        if self.config.join and self.identity is not None:
            self.announcer = Announcer(self.reactor, self.config.join, self.identity.worker_id,
                                       self.config.advertise or _listen_url(host))
            self.announcer.start()
        super().startService()

    @defer.inlineCallbacks
    def _find_gpus(self) -> Any:
        """Discover the GPUs (NVML, in a thread)."""
        self.gpus.inventory = yield self.manager.blocking(discover, None,
                                                          self.config.gpu_dev_dir)
        for problem in self.gpus.inventory.problems:
            log.info("GPUs: {problem}", problem=problem)
        log.info("GPUs: {count} found", count=len(self.gpus.inventory.gpus))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop listening, close live streams (1001), kill every job, remove every mount."""
        yield super().stopService()
        if self.announcer is not None:
            self.announcer.stop()
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        if self.metrics_port is not None:
            yield self.metrics_port.stopListening()
            self.metrics_port = None
        # Before the jobs end: a watcher learns the worker is going away, not that its
        # job was deleted.
        yield self.api.streams.close_all(1001, "worker shutting down")
        yield self._undo()
        log.info("sandrun worker stopped")

    @defer.inlineCallbacks
    def _undo(self) -> Any:
        if "manager" in self._started:
            # Killed jobs report back before the launcher is told to go.
            yield self.manager.stop()
        if "sandbox" in self._started:
            self.sandbox.stop()
        if "unpacker" in self._started:
            self.unpacker.stop()
        if "storage" in self._started:
            self.storage.stop()
        self._started.clear()
