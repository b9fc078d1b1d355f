"""The coordinator's Prometheus metrics (``GET /metrics``, or the ``--metrics-listen`` port).

A ``CollectorRegistry`` of its own (never the library's global one).  Per
worker, labelled by its name in workers.json (or its endpoint): whether it is
healthy, the round trip of its last health check, its running and queued jobs
(as that check said), the jobs routed to it, answers of worker_lost for its
jobs, and submissions it refused.  For the pool: bytes of accepted submissions,
submissions refused by kind, and open WebSocket relays.  No label holds a job id
or a client address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from coordinator.registry import WorkerRegistry

# The classic text format, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REFUSAL_KINDS = ("cpu_quota", "hourly_limit", "concurrency_limit", "no_worker",
                 "worker_rate_limit")


class _PoolCollector(Collector):
    """Health, round-trip time and load of every configured worker, read when scraped."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily("sandrun_coordinator_worker_healthy",
                                    "1 when the worker passed its last health check",
                                    labels=["worker"])
        rtt = GaugeMetricFamily("sandrun_coordinator_worker_rtt_seconds",
                                "Round trip of the worker's last health check",
                                labels=["worker"])
        running = GaugeMetricFamily("sandrun_coordinator_jobs_running",
                                    "Jobs running on each worker, as its last health check said",
                                    labels=["worker"])
        queued = GaugeMetricFamily("sandrun_coordinator_jobs_queued",
                                   "Jobs queued on each worker, as its last health check said",
                                   labels=["worker"])
        for state in self.registry.workers():
            label = [state.entry.label]
            healthy.add_metric(label, 1.0 if state.healthy else 0.0)
            if state.rtt_seconds is not None:
                rtt.add_metric(label, state.rtt_seconds)
            if state.load is not None:
                running.add_metric(label, state.load.active_jobs)
                queued.add_metric(label, state.load.queued_jobs)
        yield from (healthy, rtt, running, queued)


class CoordinatorMetrics:
    """The coordinator's counters and gauges, in a registry of their own."""

    def __init__(self, registry: WorkerRegistry,
                 open_streams: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_PoolCollector(registry))
        self.routed = Counter("sandrun_coordinator_jobs_routed",
                              "Submissions a worker accepted", ["worker"], registry=r)
        self.lost = Counter("sandrun_coordinator_worker_lost_answers",
                            "Answers of worker_lost: requests for a job whose worker was gone",
                            ["worker"], registry=r)
        self.worker_refused = Counter(
            "sandrun_coordinator_worker_refusals",
            "Submissions a worker refused (429, 503) or could not be sent",
            ["worker"], registry=r)
        self.uploaded = Counter("sandrun_coordinator_upload_bytes",
                                "Request body bytes of submissions a worker accepted",
                                registry=r)
        self.refusals = Counter("sandrun_coordinator_refusals",
                                "Submissions the coordinator refused, by kind", ["kind"],
                                registry=r)
        for kind in REFUSAL_KINDS:
            self.refusals.labels(kind)
        self.streams = Gauge("sandrun_coordinator_websocket_streams_open",
                             "Live-output WebSocket relays open now", registry=r)
        if open_streams is not None:
            self.streams.set_function(open_streams)

    def refused(self, reason: str | None) -> None:
        """A pool-quota refusal, by the limit its reason names (``quota.decide``)."""
        text = reason or ""
        self.refusals.labels("cpu_quota" if text.startswith("CPU") else
                             "hourly_limit" if text.startswith("Hourly") else
                             "concurrency_limit").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
