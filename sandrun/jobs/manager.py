"""The job lifecycle: queue, concurrency, quotas, retention, clean-up.

All of it runs on the reactor thread; time comes from the injected clock, so
retention and quota tests drive it with ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import collections
import secrets
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, task, threads
from twisted.logger import Logger

from sandrun import identity as ident
from sandrun.config import WorkerConfig
from sandrun.environments import Environments
from sandrun.environments.plan import DEPS_OUTPUT
from sandrun.environments.staged import run_in_environment
from sandrun.jobs import storage as store
from sandrun.jobs.gpus import Gpu, GpuPool
from sandrun.jobs.manifest import Manifest, ManifestError
from sandrun.jobs.metrics import WorkerMetrics
from sandrun.jobs.model import Job, JobLog
from sandrun.jobs.ratelimit import Decision, RateLimiter
from sandrun.jobs.workspace import OutputFile, list_outputs
from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox, SandboxResult
from sandrun.wire import JobStatus, Reason

log = Logger()
T = TypeVar("T")
MiB = 1024 * 1024
FAILED_RETENTION = 5 * 60.0  # seconds a failed job's data is kept
FINISHED_RETENTION = 60 * 60.0  # seconds any finished job's data is kept
CPU_CHARGE_INTERVAL = 0.5  # seconds between quota charges of running jobs

# Runs a blocking function off the reactor thread: deferToThread in the worker,
# a synchronous stand-in in tests.
BlockingRunner = Callable[..., "defer.Deferred[Any]"]


class QueueFull(Exception):
    retry_after = 5

    def __init__(self, details: str = "too many jobs are waiting; try again later") -> None:
        super().__init__(details)
        self.details = details


class GpuUnavailable(ManifestError):
    """A required GPU no GPU of this worker could ever satisfy: a 400 naming the field.

    ``request`` is the job's ``gpu`` request, told back so that a coordinator,
    which does not parse submissions, can pick a worker whose GPUs satisfy it.
    """

    def __init__(self, field: str, message: str, request: dict[str, Any]) -> None:
        super().__init__(field, message)
        self.request = request


class RateLimited(Exception):
    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


def new_job_id() -> str:
    """``job-`` and 144 random bits, URL-safe: an unguessable bearer secret."""
    return "job-" + secrets.token_urlsafe(18)


class JobManager:
    """Every job of this worker, from submission to deletion.

    ``reactor`` gives time and timers; ``blocking`` runs file-heavy work (listing
    and hashing outputs, fetching dependencies) off the reactor thread;
    ``environments`` gives jobs their template and dependencies.
    """

    def __init__(self, reactor: Any, sandbox: Sandbox, storage: store.Storage,
                 config: WorkerConfig, limiter: RateLimiter,
                 identity: ident.WorkerIdentity | None = None,
                 blocking: BlockingRunner = threads.deferToThread,
                 environments: Environments | None = None,
                 metrics: WorkerMetrics | None = None,
                 gpus: GpuPool | None = None) -> None:
        self.reactor = reactor
        self.gpus = gpus or GpuPool()
        self.metrics = metrics or WorkerMetrics()
        self.metrics.watch(queued=lambda: len(self.queue), running=lambda: len(self.running))
        self.blocking = blocking
        self.environments = environments or Environments()
        self.sandbox = sandbox
        self.storage = storage
        self.config = config
        self.limiter = limiter
        self.identity = identity
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[str] = collections.deque()
        self.running: set[str] = set()
        # Finished jobs still held, oldest first: at most config.max_finished_jobs.
        self.finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._timers: dict[str, Any] = {}
        self._removals: dict[str, defer.Deferred[None]] = {}  # data being removed, by job id
        self._charger = task.LoopingCall(self._charge_cpu)
        self._charger.clock = reactor
        self._stopping = False
        self._in_sandbox: set[str] = set()  # started jobs whose sandbox has not reported
        self._drained: list[defer.Deferred[None]] = []  # stop() waiting for those
        self._fetch_stops: dict[str, threading.Event] = {}  # set: kill the job's fetch
        self._fetch_cpu: dict[str, float] = {}  # CPU its dependency fetch used, charged

    @property
    def worker_id(self) -> str | None:
        return self.identity.worker_id if self.identity else None

    def start(self) -> None:
        self._charger.start(CPU_CHARGE_INTERVAL, now=False)

    # -- admission ---------------------------------------------------------

    def admit(self, client: str, quota_exempt: bool = False) -> Decision | None:
        """Refuse early (before the upload is processed) when the job could not be taken.

        A ``quota_exempt`` client (``--quota-exempt``) meets only the queue's limit.
        """
        if self._stopping:
            raise QueueFull("the worker is shutting down")
        if len(self.queue) >= self.config.queue_size:
            raise QueueFull()
        if quota_exempt:
            return None
        decision = self.limiter.check(client, self.reactor.seconds())
        if not decision.allowed:
            raise RateLimited(decision)
        return decision

    def new_log(self, base_dir: str) -> JobLog:
        """A job's output log: beside its tmpfs (not in it: a job that fills its
        directory must not lose its output), coalescing writes on our clock."""
        return JobLog(base_dir.rstrip("/") + ".log", clock=self.reactor)

    def create_workspace(self, job_id: str) -> str:
        """Mount a job's tmpfs (blocks on the kernel: the API calls it in a thread)."""
        return self.storage.create(job_id)

    def store_upload(self, job_id: str, store_files: Callable[[str], T]) -> tuple[str, T]:
        """Mount a job's tmpfs, ``store_files(base)`` into it, and measure what it holds (the
        upload counts towards the storage cap from now on).  Blocking: one trip to a thread
        for the three."""
        base = self.create_workspace(job_id)
        stored = store_files(base)
        self.storage.measure(job_id)
        return base, stored

    def discard_workspace(self, job_id: str) -> None:
        """Unmount and remove a job's tmpfs, in a thread: unmounting is kernel work
        (and grows with the mount table) that the reactor need not wait for.
        ``removed`` tells when it is done."""
        def failed(failure: Any) -> None:
            log.failure("removing the data of job {job_id} failed", failure, job_id=job_id)

        def done(_: None) -> None:
            self._removals.pop(job_id, None)

        d = self.blocking(self.storage.delete, job_id).addErrback(failed)
        if not d.called:
            self._removals[job_id] = d
            d.addCallback(done)

    def removed(self, job_id: str) -> defer.Deferred[None]:
        """Fires once the job's data removal under way (if any) has finished."""
        pending = self._removals.get(job_id)
        if pending is None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()

        def tell(result: Any) -> Any:
            waiter.callback(None)
            return result

        pending.addBoth(tell)
        return waiter

    def submit(self, job: Job) -> int:
        """Queue a job whose workspace is ready (written and measured: ``store_upload``);
        returns its queue position (1-based)."""
        try:
            self.admit(job.client, job.quota_exempt)
            if not job.quota_exempt:  # an exempt job is never charged, so never released
                decision = self.limiter.try_acquire(job.client, job.id, self.reactor.seconds())
                if not decision.allowed:
                    raise RateLimited(decision)
        except Exception:
            job.log.close()
            self.discard_workspace(job.id)
            raise
        self.jobs[job.id] = job
        self.queue.append(job.id)
        log.info("job {job_id} queued", job_id=job.id)
        self._pump()
        return self.position(job)

    def get(self, job_id: str) -> Job | None:
        """A job the API may show; a deleted one is gone even while its sandbox winds down."""
        job = self.jobs.get(job_id)
        return None if job is None or job.deleted else job

    def position(self, job: Job) -> int:
        if job.status != JobStatus.QUEUED:
            return 0
        try:
            return self.queue.index(job.id) + 1
        except ValueError:
            return 0

    def problem(self) -> str | None:
        """Why this worker cannot run jobs now (``/health`` says so), or None."""
        if self._stopping:
            return "the worker is shutting down"
        return self.sandbox.problem()

    def stats(self) -> dict[str, int]:
        return {"queue_length": len(self.queue), "active_jobs": len(self.running),
                "capacity": self.config.max_concurrent,
                "queue_capacity": self.config.queue_size,
                "finished_jobs_held": len(self.finished),
                "max_finished_jobs": self.config.max_finished_jobs,
                "storage_used_bytes": self.storage.used_bytes(),
                "storage_bytes": self.storage.total_bytes}

    # -- running -----------------------------------------------------------

    def check_gpu(self, manifest: Manifest) -> None:
        """400 (``ManifestError`` naming the field) if no GPU here could ever run the job."""
        if manifest.gpu is None:
            return
        request = manifest.gpu.as_json()
        unmet = self.gpus.unmet(request)
        if unmet is not None:
            raise GpuUnavailable(*unmet, request)

    def _pump(self) -> None:
        """Start queued jobs in order while slots are free.

        A job that requires a GPU waits, keeping its place, until one that
        satisfies it is free; the jobs behind it that need none go first.
        """
        for job_id in list(self.queue):
            if len(self.running) >= self.config.max_concurrent or self._stopping:
                return
            job = self.jobs[job_id]
            gpu = None
            if job.manifest.gpu is not None:
                gpu = self.gpus.acquire(job.id, job.manifest.gpu.as_json())
                if gpu is None and job.manifest.gpu.required:
                    continue
            self.queue.remove(job_id)
            self._start(job, gpu)

    def _policy(self, job: Job, gpu: Gpu | None = None) -> SandboxPolicy:
        limits = self.config.limits
        return SandboxPolicy(
            memory_bytes=job.manifest.memory_mb * MiB, pids_max=limits.max_pids,
            cpus=job.manifest.cpus,
            timeout_seconds=float(job.manifest.timeout), cpu_seconds=job.manifest.cpu_seconds,
            output_cap_bytes=limits.output_cap_bytes, tmp_bytes=limits.tmp_mb * MiB,
            shm_bytes=limits.shm_mb * MiB, open_files=limits.max_open_files,
            file_size_bytes=limits.job_dir_mb * MiB,
            gpu=None if gpu is None else gpu.grant())

    def _start(self, job: Job, gpu: Gpu | None = None) -> None:
        job.move_to(JobStatus.RUNNING)
        job.started_at = self.reactor.seconds()
        self.metrics.job_started(job.started_at - job.submitted_at)
        self.running.add(job.id)
        self._in_sandbox.add(job.id)
        log.info("job {job_id} started", job_id=job.id)
        manifest = job.manifest

        def installed(result: SandboxResult) -> None:
            # The sandbox counts the job's own run from 0 again: charge the install on top.
            job.install_cpu_seconds = result.cpu_seconds

        # Fetch (thread), install inside the sandbox, then the job with what is left of
        # its limits; a failed fetch or install is reason install_failed.  maybeDeferred:
        # a sandbox that cannot take the job raises at once.
        d = defer.maybeDeferred(
            run_in_environment, self.sandbox, self.environments, self._blocking_for(job),
            job_id=job.id, manifest=manifest, argv=tuple(manifest.argv()),
            job_dir=store.work_dir(job.base_dir), policy=self._policy(job, gpu),
            on_output=job.log.append, stdin=manifest.stdin.encode(),
            cancelled=lambda: self._stopped_why(job), on_installed=installed,
            stop=self._fetch_stops.setdefault(job.id, threading.Event()),
            on_fetched=lambda cpu: self._fetch_cpu.__setitem__(job.id, cpu))

        def broken(failure: Any) -> SandboxResult:
            log.warn("sandbox could not run job {job_id}: {error}", job_id=job.id,  # noqa: G010
                     error=failure.getErrorMessage())
            return SandboxResult(Reason.SANDBOX_ERROR, message="the sandbox could not run it")

        d.addErrback(broken)
        d.addCallback(self._ran, job)
        d.addErrback(lambda f: log.failure("ending job {job_id} failed", f, job_id=job.id))

    def _stopped_why(self, job: Job) -> Reason | None:
        """Why a job stopped between its install steps (when there is no sandbox run to kill)."""
        if self._stopping:
            return Reason.SHUTDOWN
        return Reason.CANCELLED if job.deleted else None

    def _cpu_used(self, job: Job) -> float:
        """CPU time so far: its fetch, a finished install step and the run in the sandbox."""
        return self._fetch_cpu.get(job.id, 0.0) + job.install_cpu_seconds + (
            self.sandbox.cpu_seconds(job.id) or 0.0)

    @defer.inlineCallbacks
    def _ran(self, result: SandboxResult, job: Job) -> Any:
        self._fetch_stops.pop(job.id, None)
        self.running.discard(job.id)
        self.gpus.release(job.id)
        self._sandbox_done(job.id)
        job.log.flush()  # all output is published before the end is
        if job.finished:  # shut down while it ran: already ended
            return
        self.metrics.sandbox_ran(result.reason, result.launch_seconds)
        reason = result.reason
        if reason in (Reason.EXIT_NONZERO, Reason.SIGNALED) and not job.deleted \
                and store.disk_full(job.base_dir):
            reason = Reason.DISK_LIMIT
        job.reason = reason
        job.exit_code, job.signal = result.exit_code, result.signal
        job.cpu_seconds, job.memory_peak_bytes = result.cpu_seconds, result.memory_peak_bytes
        job.wall_time_ms, job.message = result.wall_time_ms, result.message
        job.truncated = result.truncated
        if not job.deleted:
            try:
                job.outputs = yield self._blocking_for(job)(self._list_and_measure, job)
            except Exception as e:  # noqa: BLE001 (the job ends regardless)
                # The type only: a message could carry a file name (job content).
                log.warn(  # noqa: G010 (twisted.logger has no "warning")
                    "listing outputs of job {job_id} failed: {error}", job_id=job.id,
                    error=type(e).__name__)
        if job.finished:
            return
        self._end(job, JobStatus.COMPLETED if reason == Reason.COMPLETED else JobStatus.FAILED)
        self._pump()

    def _blocking_for(self, job: Job) -> BlockingRunner:
        """``blocking`` for this job's chown (with its fetch) and listing; made right here
        for a small job with nothing to fetch (``storage.is_small``: a snippet's few files),
        which costs less than the trip to a thread and back (a fetch never runs here)."""
        def run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            if job.manifest.requirements is None and store.is_small(job.base_dir):
                return defer.maybeDeferred(f, *args, **kwargs)
            return self.blocking(f, *args, **kwargs)
        return run

    def _list_and_measure(self, job: Job) -> list[OutputFile]:
        """The job's outputs, then what it left measured (it counts until it is deleted):
        both blocking, in one trip off the reactor thread."""
        try:
            # The job's installed dependencies are not its outputs; without
            # patterns, neither are the uploaded files it left as they were.
            return list_outputs(store.work_dir(job.base_dir), job.manifest.outputs,
                                exclude=(DEPS_OUTPUT,), unchanged=job.inputs)
        finally:
            self.storage.measure(job.id)

    def _end(self, job: Job, status: JobStatus) -> None:
        """The one place a job becomes finished: sign, release quota, schedule deletion."""
        job.move_to(status)
        job.finished_at = self.reactor.seconds()
        now = job.finished_at
        # The fetch ran on the host, not in the job: charged, not in its cpu_seconds.
        self.limiter.release(job.client, job.id, now, cpu_seconds_total=job.cpu_seconds
                             + self._fetch_cpu.pop(job.id, 0.0))
        job.signed, job.signature = ident.sign_result(self.identity,
                                                      job.signed_result(self.worker_id))
        self.metrics.job_ended(job.reason, job.cpu_seconds, now - job.submitted_at)
        log.info("job {job_id} {status}: {reason}", job_id=job.id, status=status.value,
                 reason=job.reason.value if job.reason else None)
        keep = FAILED_RETENTION if status == JobStatus.FAILED else FINISHED_RETENTION
        if job.deleted:
            self._forget(job.id)
        else:
            self._timers[job.id] = self.reactor.callLater(keep, self.delete, job.id)
            self.finished[job.id] = None
            while len(self.finished) > self.config.max_finished_jobs:
                # The oldest finished job goes first: a worker holds a bounded number.
                oldest = next(iter(self.finished))
                log.info("job {job_id} deleted early: {held} finished jobs held",
                         job_id=oldest, held=len(self.finished))
                self.delete(oldest)
        for listener in list(job.end_listeners):
            listener(job)

    def _charge_cpu(self) -> None:
        now = self.reactor.seconds()
        for job_id in list(self.running):
            job = self.jobs[job_id]
            self.limiter.charge_cpu(job.client, job_id, self._cpu_used(job), now)

    # -- ending early and deleting --------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job and delete its data; False if unknown."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if job.status == JobStatus.QUEUED:
            self.queue.remove(job_id)
            job.reason = Reason.CANCELLED
            job.deleted = True
            self.discard_workspace(job_id)
            self._end(job, JobStatus.FAILED)
        elif job.status == JobStatus.RUNNING:
            job.deleted = True
            # The client's slot frees now, with the CPU used so far charged: the kill
            # lands within milliseconds, and the job is already gone for the client.
            self.limiter.release(job.client, job_id, self.reactor.seconds(),
                                 cpu_seconds_total=self._cpu_used(job))
            self._stop_fetch(job_id)
            self.sandbox.kill(job_id, Reason.CANCELLED)
            # The data goes once the sandbox has let go of it (in _end via _forget).
        else:
            self.delete(job_id)
        return True

    def _stop_fetch(self, job_id: str) -> None:
        """Kill the job's dependency fetch, if one runs: its worker slot is freed
        within a tenth of a second, not at the fetch's deadline."""
        stop = self._fetch_stops.get(job_id)
        if stop is not None:
            stop.set()

    def delete(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if not job.finished:
            self.cancel(job_id)
            return
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        timer = self._timers.pop(job_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        job = self.jobs.pop(job_id, None)
        if job is not None:
            job.deleted = True
            job.log.close()
        self.finished.pop(job_id, None)
        self.discard_workspace(job_id)
        log.info("job {job_id} deleted", job_id=job_id)

    def _sandbox_done(self, job_id: str) -> None:
        self._in_sandbox.discard(job_id)
        if not self._in_sandbox:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def stop(self, grace: float = 5.0) -> defer.Deferred[None]:
        """Shutdown: stop taking jobs, kill what runs, delete every job's data.

        Jobs still queued or running end as ``failed`` with reason ``shutdown``,
        and their quota slots are released.  The returned Deferred fires once
        the sandbox has reported every killed job (or after ``grace`` seconds),
        so the sandbox can then be stopped with nothing left in flight.
        """
        self._stopping = True
        if self._charger.running:
            self._charger.stop()
        for job_id in list(self.queue):
            self.cancel(job_id)
        now = self.reactor.seconds()
        for job_id in list(self.running):
            job = self.jobs[job_id]
            job.deleted = True
            self._stop_fetch(job_id)
            self.sandbox.kill(job_id, Reason.SHUTDOWN)
            if not job.finished:  # the sandbox reports later, if at all: end it now
                job.reason = Reason.SHUTDOWN
                self._end(job, JobStatus.FAILED)
        self.running.clear()
        self.gpus.busy.clear()
        for job_id in list(self.jobs):
            self.limiter.release(self.jobs[job_id].client, job_id, now)
            self._forget(job_id)
        self.jobs.clear()
        drained: defer.Deferred[None] = defer.Deferred()
        if not self._in_sandbox:
            drained.callback(None)
            return drained
        self._drained.append(drained)

        def give_up() -> None:
            if not drained.called:
                drained.callback(None)

        timer = self.reactor.callLater(grace, give_up)

        def cancel_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(cancel_timer)
