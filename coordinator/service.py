"""The coordinator's composition root: build the collaborators, listen, return a service.

Start-up order: read workers.json (a bad file stops the start with the
message naming the entry), run one health round so a restarted coordinator
knows at once which workers are up, then listen, then check every
``health_interval`` seconds.  ``reload()`` (SIGHUP) re-reads workers.json:
a good file replaces the list (removed workers drain, see ``registry.py``)
and is checked at once; a bad one is refused and the old list stays.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.twisted import MetricsResource
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import server
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    _StandardEndpointFactory,
)
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from zope.interface import implementer

from coordinator.config import CoordinatorConfig, WorkersFileError, load_workers
from coordinator.health import HealthChecker
from coordinator.proxy import CoordinatorAPI
from coordinator.registry import WorkerRegistry
from coordinator.stream import StreamRelay
from coordinator.tls import load_trust_root
from coordinator.uploads import default_spool_dir, request_factory
from coordinator.worker_client import WorkerClient
from sandrun.connections import BodyRoutes, GuardedChannel, UploadBudget, guard_site
from sandrun.daemon import address_text

log = Logger()

CONNECT_TIMEOUT = 5.0  # seconds to open a TCP connection to a worker
MAX_CONNECTIONS_PER_WORKER = 32  # idle keep-alive connections kept per worker
# Seconds an idle keep-alive connection to a worker is kept: below the workers' idle
# timeout (--idle-timeout, 30 s by default), so the coordinator closes it first and never
# sends a submission down a connection the worker is closing.
IDLE_CONNECTION_SECONDS = 20
RESERVED_DESCRIPTORS = 512  # kept free of client connections: connections to workers, relays


class QuietSite(server.Site):
    """A Site that writes no access log: paths hold job ids, which are bearer secrets.

    Its channel has a header deadline and answers malformed HTTP in JSON
    (``sandrun.connections.GuardedChannel``).
    """

    noisy = False
    protocol = GuardedChannel  # type: ignore[assignment]

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        # TCP_NODELAY towards clients too: twisted.web writes a response's head and body
        # separately, and Nagle would hold the body for the client's delayed ACK.
        protocol = super().buildProtocol(addr)
        make_connection = protocol.makeConnection

        def no_delay(transport: Any) -> None:
            set_no_delay = getattr(transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            make_connection(transport)

        protocol.makeConnection = no_delay
        return protocol


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per connection to a worker


@implementer(IAgentEndpointFactory)
class _NoDelayEndpoints:
    """Connections to workers with TCP_NODELAY.

    Twisted's HTTP client writes a request's head and body separately; with Nagle's
    algorithm on, the second write waits for the worker's delayed ACK (up to 40 ms
    on Linux) whenever the first is still unacknowledged, which under load added
    tens of milliseconds to most submissions.
    """

    def __init__(self, reactor: Any, trust_root: Any = None) -> None:
        self._default = _StandardEndpointFactory(
            reactor, BrowserLikePolicyForHTTPS(trustRoot=trust_root), CONNECT_TIMEOUT, None)

    def endpointForURI(self, uri: Any) -> Any:
        return _NoDelay(self._default.endpointForURI(uri))


class _NoDelay:
    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Any:
        def no_delay(protocol: Any) -> Any:
            set_no_delay = getattr(protocol.transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            return protocol

        return self._endpoint.connect(factory).addCallback(no_delay)


def http_client(reactor: Any, trust_root: Any = None) -> tuple[Any, HTTPConnectionPool]:
    """A treq client with a persistent connection pool to the workers.

    ``trust_root``: what https:// workers' certificates must chain to (see
    ``coordinator.tls``); None for the system's trust store.
    """
    import treq.client

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory  # the documented way to quieten it
    pool.maxPersistentPerHost = MAX_CONNECTIONS_PER_WORKER
    pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
    pool.retryAutomatically = True  # idempotent requests retry once on a stale connection
    agent = Agent.usingEndpointFactory(reactor, _NoDelayEndpoints(reactor, trust_root),
                                       pool=pool)
    return treq.client.HTTPClient(agent), pool  # type: ignore[arg-type]


def metrics_site(registry: Any) -> server.Site:
    """The ``--metrics-listen`` site: ``/metrics`` only, in the text exposition format."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    site = server.Site(root)
    site.noisy = False
    return site


class CoordinatorService(service.MultiService):
    """Registry, health checks and HTTP API, started and stopped in order."""

    def __init__(self, reactor: Any, config: CoordinatorConfig, http: Any = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        entries = load_workers(config.workers_path)
        self.registry = WorkerRegistry(entries, drain_seconds=config.drain_seconds,
                                       max_disagreements=config.max_disagreements)
        self.pool: HTTPConnectionPool | None = None
        trust_root = load_trust_root(config.worker_cacert) if config.worker_cacert else None
        if http is None:
            http, self.pool = http_client(reactor, trust_root)
        self.client = WorkerClient(reactor, http)
        self.health = HealthChecker(reactor, self.registry, self.client,
                                    config.health_interval, config.health_timeout,
                                    config.max_clock_skew)
        self.streams = StreamRelay(reactor, self.registry, trust_root)
        self.api = CoordinatorAPI(reactor, self.registry, self.client, config, self.streams,
                                  refresh=self.health.check_now)
        self.metrics_site = metrics_site(self.api.metrics.registry)
        self.metrics_port: Any = None
        self.site = QuietSite(self.api.resource())
        self.site.displayTracebacks = False
        spool = config.spool_dir if config.spool_dir is not None else default_spool_dir()
        policy = config.connections
        self.site.requestFactory = request_factory(
            config.max_upload_bytes, spool, BodyRoutes(CoordinatorAPI.app.url_map),
            UploadBudget(policy.max_inflight_upload_bytes,
                         policy.max_inflight_upload_bytes_per_ip, policy.exempt))
        self.connections = guard_site(self.site, policy, reserve=RESERVED_DESCRIPTORS)
        self.port: Any = None

    @defer.inlineCallbacks
    def startService(self) -> Any:
        yield self.health.check_all()
        self.port = yield serverFromString(self.reactor, self.config.listen).listen(self.site)
        if self.config.metrics_listen is not None:
            try:
                self.metrics_port = yield serverFromString(
                    self.reactor, self.config.metrics_listen).listen(self.metrics_site)
            except BaseException:
                yield self.port.stopListening()
                raise
        healthy = len(self.registry.healthy())
        log.info("sandrun coordinator listening on {address}: {healthy} of {total} workers "
                 "healthy", address=address_text(self.port.getHost()), healthy=healthy,
                 total=len(self.registry.workers()))
        self.health.start(now=False)
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        self.health.stop()
        if self.port is not None:
            yield self.port.stopListening()
        if self.metrics_port is not None:
            yield self.metrics_port.stopListening()
        if self.pool is not None:
            yield self.pool.closeCachedConnections()

    def reload(self) -> bool:
        """Re-read workers.json; False (old list kept) when the file is refused."""
        try:
            entries = load_workers(self.config.workers_path)
        except WorkersFileError as e:
            log.error("workers.json reload refused, keeping the old list: {error}", error=str(e))
            return False
        changes = self.registry.replace(entries, self.reactor.seconds())
        log.info("workers.json reloaded: {count} workers; added {added}, removed (draining) "
                 "{removed}, changed {changed}", count=len(entries), added=changes["added"],
                 removed=changes["removed"], changed=changes["changed"])
        self.health.check_all()
        return True
