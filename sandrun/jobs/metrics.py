"""The worker's Prometheus metrics (``GET /metrics``, or the ``--metrics-listen`` port).

One ``CollectorRegistry`` per worker, never the library's global one, so two
workers (or a worker and a coordinator) in one process, and every test, count
apart.  Labels hold only fixed vocabularies (a reason, a kind of refusal):
never job content, a job id, or a client address.

What is counted where: the job manager reports a job's start (queue wait), its
sandbox run (launch time, set-up failure) and its end (reason, CPU time,
end-to-end time); the API reports upload bytes and refusals.  Gauges (queued,
running, stored bytes, open streams) are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from sandrun.wire import Reason

# The kinds of refusal counted in sandrun_refusals_total (the API names them).
REFUSAL_KINDS = ("cpu_quota", "hourly_limit", "concurrency_limit", "queue_full",
                 "storage_full")
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)
LAUNCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    3600.0)
# The classic text format, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class WorkerMetrics:
    """The worker's counters, histograms and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_finished = Counter(
            "sandrun_jobs_finished", "Jobs that ended, by final reason", ["reason"], registry=r)
        for reason in Reason:  # every series exists from the start, at 0
            self.jobs_finished.labels(reason.value)
        self.queue_wait = Histogram(
            "sandrun_job_queue_wait_seconds", "Time from submission to the job starting",
            buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.launch = Histogram(
            "sandrun_job_launch_seconds",
            "Time from asking the launcher to the job's process running in its sandbox",
            buckets=LAUNCH_BUCKETS, registry=r)
        self.duration = Histogram(
            "sandrun_job_duration_seconds", "Time from submission to the job's end",
            buckets=DURATION_BUCKETS, registry=r)
        self.cpu = Counter("sandrun_job_cpu_seconds", "CPU time consumed by finished jobs",
                           registry=r)
        self.uploaded = Counter("sandrun_upload_bytes",
                                "Request body bytes of accepted submissions", registry=r)
        self.refusals = Counter("sandrun_refusals",
                                "Submissions refused for a quota or for room, by kind",
                                ["kind"], registry=r)
        for kind in REFUSAL_KINDS:
            self.refusals.labels(kind)
        self.setup_failures = Counter(
            "sandrun_sandbox_setup_failures",
            "Jobs that could not run because a sandbox layer could not be applied",
            registry=r)
        self.queued = Gauge("sandrun_jobs_queued", "Jobs waiting for a slot", registry=r)
        self.running = Gauge("sandrun_jobs_running", "Jobs running now", registry=r)
        self.stored = Gauge("sandrun_stored_bytes", "Bytes of job data held on tmpfs now",
                            registry=r)
        self.streams = Gauge("sandrun_websocket_streams_open",
                             "Live-output WebSocket connections open now", registry=r)

    # -- gauges, read at scrape time ----------------------------------------------------

    def watch(self, **gauges: Callable[[], float]) -> None:
        """Read these gauges from functions when scraped (``queued=lambda: ...``)."""
        for name, read in gauges.items():
            gauge = {"queued": self.queued, "running": self.running, "stored": self.stored,
                     "streams": self.streams}[name]
            gauge.set_function(read)

    # -- events ---------------------------------------------------------------------------

    def job_started(self, waited_seconds: float) -> None:
        self.queue_wait.observe(max(0.0, waited_seconds))

    def sandbox_ran(self, reason: Reason, launch_seconds: float | None) -> None:
        if launch_seconds is not None:
            self.launch.observe(launch_seconds)
        if reason == Reason.SANDBOX_ERROR:
            self.setup_failures.inc()

    def job_ended(self, reason: Reason | None, cpu_seconds: float,
                  total_seconds: float) -> None:
        self.jobs_finished.labels((reason or Reason.SANDBOX_ERROR).value).inc()
        self.cpu.inc(max(0.0, cpu_seconds))
        self.duration.observe(max(0.0, total_seconds))

    def upload_accepted(self, size: int) -> None:
        self.uploaded.inc(size)

    def refused(self, kind: str) -> None:
        self.refusals.labels(kind).inc()

    def exposition(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
