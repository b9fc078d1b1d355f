"""The coordinator's HTTP API: the worker's client-facing endpoints, proxied, plus ``/pool``.

Clients use the coordinator exactly like a worker (``shared/spec/api.md``).
What differs, and why:

- ``POST /submit`` checks the client's pool-wide quota (``quota.py``), then
  sends the body to the least-loaded worker (``scheduling.py``).  A worker
  that refuses (429, 503) or cannot be reached is skipped for the next one;
  when none takes it the answer is 503 with ``retry_after`` (or the workers'
  429).  The answer's ``job_id`` is the coordinator's (``jobids.py``).  When
  the worker answers ``replicas: N`` (the manifest's), N - 1 more copies go to
  other workers (``replication.py``); job endpoints then answer for the job as
  one, ``/status`` with a ``consensus`` block (``consensus.py``).
- ``POST /pool/join``: open enrollment (``enrollment.py``).
- ``POST /run`` places the job as ``/submit`` does (the client's lock is held
  only for that), then waits with the worker's long poll (``/status?wait=``)
  and answers with the status, the worker's ``/logs`` and its ``/outputs``
  (our URLs), relayed into the answer as they are read with the worker paused
  while the client lags (``runanswer.py``): an answer costs a bounded amount
  however much the job printed.  ``?keep=0`` deletes the job on its worker once
  answered, and a client that goes away has its job deleted.  ``/status?wait=S``
  is forwarded with a timeout of ``S`` plus the usual one.
- Job endpoints find the worker from the job id and forward to it, with the
  client's address in X-Forwarded-For.  Every ``job_id`` and
  ``download_url`` in an answer is rewritten to the coordinator's id.
- ``/status`` adds ``signature_verified``: whether ``worker_metadata`` holds
  a result signed by the key in workers.json that matches the document
  (``sandrun.identity.verify_result``, checked before the id is rewritten).
  The worker's own job id, which the signature covers, is kept in
  ``worker_metadata.job_id``: to verify a saved document offline, put it
  back in ``job_id``.
- A job whose worker is down (failed its last health check, refused a
  connection, or restarted after the job was sent) is reported by
  ``/status`` as ``failed`` with ``reason: worker_lost``; its logs, outputs
  and downloads answer 410 with the same reason.
- ``/download`` streams the worker's body to the client with back-pressure:
  the worker connection is paused while the client's is full.
- ``/stats`` sums the client's quota and the workers' own figures over the
  pool; ``/health`` and ``/`` describe the coordinator; ``/environments`` comes from a healthy worker.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import wraps
from importlib import metadata
from typing import Any
from urllib.parse import quote

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from coordinator.config import CoordinatorConfig
from coordinator.enrollment import Enrollment
from coordinator.errors import WorkerLost, not_found
from coordinator.jobids import JobRef, decode_job_id, decode_replicas, encode_job_id
from coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coordinator.metrics import CoordinatorMetrics
from coordinator.quota import LIFT_QUOTA, ClientLocks, PoolDecision, Usage, decide
from coordinator.registry import WorkerRegistry, WorkerState
from coordinator.relay import relay
from coordinator.replication import Replication
from coordinator.rewrite import LineRewriter
from coordinator.runanswer import RunAnswer
from coordinator.scheduling import (
    drain_retry_after,
    free_slots,
    has_room,
    job_limit,
    pick_worker,
    rank_workers,
)
from coordinator.statusdocs import iso as _iso
from coordinator.statusdocs import lost_status
from coordinator.stream import StreamRelay
from coordinator.worker_client import (
    MAX_SMALL_JSON_BYTES,
    BadWorkerResponse,
    WorkerClient,
    WorkerTimeout,
    WorkerUnreachable,
    read_body,
    read_json,
)
from sandrun import gpuwire, httpjson, pages
from sandrun.httpjson import APIError, content_type, cors, write_error, write_json
from sandrun.identity import verify_result
from sandrun.netaddr import address_in, client_key, parse_trusted_proxies, trusted_client_address
from sandrun.wire import JobStatus, Reason

log = Logger()

SERVICE = "sandrun-coordinator"
DESCRIPTION = "Anonymous, ephemeral, sandboxed code execution: pool coordinator"
PRIVACY = ("No accounts and no logs of job content. The coordinator keeps no job data: "
           "uploads pass through RAM to a worker, results stream back from it.")
# A pool that looks full is re-checked before a refusal if its loads are this old, seconds.
REFRESH_AFTER = 0.1
MAX_JOIN_BYTES = 4096  # a /pool/join body: a key and an endpoint
# Response headers of a worker that the client gets too.
# (Twisted's client keeps Content-Length in ``response.length``, not in the headers.)
# How long one long poll of a worker is held while a /run waits (the worker caps at 60).
RUN_POLL_SECONDS = 30.0
MAX_WAIT_SECONDS = 60.0  # the longest /status?wait= is held, as on a worker
_PASSED_HEADERS = (b"content-type", b"content-disposition", b"retry-after")


def _version() -> str:
    try:
        return metadata.version("sandrun")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Placement:
    """Where a submission went: ``state`` took it, or nobody did (``response`` says why,
    when a worker's answer is to be relayed)."""

    state: WorkerState | None
    response: Any = None
    doc: Any = None
    dispatched_at: float = 0.0
    # Nobody took it because no worker's GPUs can satisfy its "gpu": why, worker by worker.
    gpu_refusals: list[str] = field(default_factory=list)

    def ref(self) -> JobRef:
        assert self.state is not None
        cid = self.job_id()
        ref = decode_job_id(cid)
        assert ref is not None
        return ref

    def job_id(self) -> str:
        """The coordinator's id for the job; ``BadWorkerResponse`` for a malformed one."""
        assert self.state is not None
        try:
            return encode_job_id(self.state.entry.tag, self.dispatched_at, self.doc["job_id"])
        except ValueError as e:
            raise BadWorkerResponse(str(e)) from None


def _api(handler: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an async handler; turn every failure into the contract's JSON error."""

    @wraps(handler)
    def wrapped(self: CoordinatorAPI, request: Request, *args: Any, **kwargs: Any) -> Any:
        def fail(failure: Failure) -> Any:
            if failure.check(defer.CancelledError):
                return None  # the client went away
            error = to_api_error(failure)
            if error.status == 500:
                log.failure("unhandled error in {path}", failure, path=request.path)
            return write_error(request, error)

        d: defer.Deferred[Any] = defer.ensureDeferred(handler(self, request, *args, **kwargs))
        return d.addErrback(fail)

    return wrapped


def to_api_error(failure: Failure) -> APIError:
    value = failure.value
    if isinstance(value, APIError):
        return value
    if isinstance(value, WorkerLost):
        return APIError(410, "Worker lost", str(value), reason=Reason.WORKER_LOST.value)
    if isinstance(value, WorkerTimeout):
        return APIError(504, "Worker timeout", str(value))
    if isinstance(value, (WorkerUnreachable, BadWorkerResponse)):
        return APIError(502, "Bad gateway", str(value))
    return APIError(500, "Internal error", "the coordinator could not handle this request")


class CoordinatorAPI:
    app = Klein()
    # "/download//x" is a 404 like any unknown path, not an HTML redirect to "/download/x".
    app.url_map.merge_slashes = False

    def __init__(self, reactor: Any, registry: WorkerRegistry, client: WorkerClient,
                 config: CoordinatorConfig, streams: StreamRelay | None = None,
                 refresh: Callable[[list[WorkerState]], defer.Deferred[None]] | None = None,
                 metrics: CoordinatorMetrics | None = None) -> None:
        self.reactor = reactor
        # Re-checks workers before a submission is refused for want of room (health.py).
        self.refresh = refresh
        self.registry = registry
        self.client = client
        self.config = config
        self.streams = streams if streams is not None else StreamRelay(reactor, registry)
        self.metrics = metrics if metrics is not None else \
            CoordinatorMetrics(registry, self.streams.open_count)
        parse_trusted_proxies(config.metrics_allow)
        parse_trusted_proxies(config.trusted_proxies)  # a bad entry fails here, not per request
        parse_trusted_proxies(config.quotas.exempt)
        self.locks = ClientLocks()
        self.replication = Replication(reactor, registry, client, config, self.place,
                                       self.forward)
        self.enrollment = Enrollment(registry, config, refresh)

    def resource(self) -> Any:
        return self.app.resource()

    # -- helpers -------------------------------------------------------------------

    def client_address(self, request: Request) -> str:
        peer = getattr(request.getClientAddress(), "host", "unix")
        forwarded = request.getHeader(b"x-forwarded-for")
        return trusted_client_address(peer, forwarded.decode("latin-1") if forwarded else None,
                                      self.config.trusted_proxies)

    def forwarded(self, request: Request, **extra: bytes) -> dict[bytes, list[bytes]]:
        headers = {b"X-Forwarded-For": [self.client_address(request).encode("latin-1")]}
        for name, value in extra.items():
            headers[name.replace("_", "-").encode()] = [value]
        return headers

    def locate(self, job_id: str) -> tuple[JobRef, WorkerState]:
        """The job's worker; for a replicated job, its first replica's (see ``replication.py``)."""
        refs = decode_replicas(job_id)
        ref = refs[0] if refs else None
        state = self.registry.by_tag(ref.tag) if ref is not None else None
        if ref is None or state is None:
            raise not_found()
        return ref, state

    def replicas_of(self, job_id: str) -> list[JobRef]:
        return decode_replicas(job_id) or []

    async def forward(self, ref: JobRef, state: WorkerState, method: str, path: str,
                      headers: dict[bytes, list[bytes]], timeout: float | None = None) -> Any:
        """Send a job request to the job's worker; raises ``WorkerLost`` when it is gone."""
        try:
            return await self._forward(ref, state, method, path, headers, timeout)
        except WorkerLost:
            self.metrics.lost.labels(state.entry.label).inc()
            raise

    async def _forward(self, ref: JobRef, state: WorkerState, method: str, path: str,
                       headers: dict[bytes, list[bytes]], timeout: float | None) -> Any:
        if state.down:
            raise WorkerLost(f"the worker that ran this job is unavailable ({state.last_error})")
        try:
            response = await self.client.request(
                method, state.entry.endpoint + path,
                timeout if timeout is not None else self.config.request_timeout,
                headers=headers)
        except WorkerUnreachable as e:
            self.registry.mark_down(state, f"request failed: {e}")
            raise WorkerLost(f"the worker that ran this job is unreachable ({e})") from None
        if response.code == 404 and self.registry.restarted_after(state, ref.dispatched_at):
            await read_body(response, MAX_SMALL_JSON_BYTES)
            raise WorkerLost("the worker restarted after this job was sent to it")
        return response

    def relay_json(self, request: Request, response: Any, doc: Any,
                   cid: str | None = None) -> bytes:
        """A worker's JSON answer as is, except for the job id (when ``cid`` is given)."""
        if cid is not None and isinstance(doc, dict) and "job_id" in doc:
            doc["job_id"] = cid
        retry = response.headers.getRawHeaders(b"retry-after")
        if retry:
            request.setHeader(b"Retry-After", retry[0])
        return write_json(request, doc, response.code)

    async def relay_small(self, request: Request, response: Any, cid: str) -> bytes:
        """A worker's short answer (an error, DELETE's) as ``relay_json`` gives it."""
        return self.relay_json(request, response,
                               await read_json(response, MAX_SMALL_JSON_BYTES), cid)

    def pick_healthy(self) -> WorkerState:
        """A worker for a request that any worker can answer: the least loaded."""
        ranked = rank_workers(self.registry.workers(), self.registry.cursor)
        healthy = ranked or self.registry.healthy()
        if not healthy:
            raise APIError(503, "No worker available", "no worker in the pool is healthy",
                           retry_after=self.retry_after())
        return healthy[0]

    def retry_after(self) -> int:
        return max(1, math.ceil(self.config.health_interval))

    # -- service -------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    @_api
    async def root(self, request: Request) -> bytes:
        if pages.wants_html(request):
            return pages.serve_page(request)
        limits: dict[str, Any] = {}
        try:
            state = self.pick_healthy()
            code, info = await self.client.get_json(state.entry.endpoint + "/",
                                                    self.config.health_timeout)
            if code == 200 and isinstance(info, dict) and isinstance(info.get("limits"), dict):
                limits = dict(info["limits"])
        except (APIError, WorkerUnreachable, WorkerTimeout, BadWorkerResponse):
            pass  # the coordinator's own limits are still worth telling
        worker_upload = limits.get("max_upload_bytes")
        limits["max_upload_bytes"] = min(self.config.max_upload_bytes, worker_upload) \
            if isinstance(worker_upload, int) else self.config.max_upload_bytes
        q = self.config.quotas
        limits.update({"cpu_seconds_per_minute_per_ip": q.cpu_seconds_per_minute,
                       "max_active_jobs_per_ip": q.max_active_jobs,
                       "jobs_per_hour_per_ip": q.jobs_per_hour})
        return write_json(request, {
            "service": SERVICE, "version": _version(), "status": "running",
            "description": DESCRIPTION, "privacy": PRIVACY, "limits": limits,
            "worker_id": None,
            "workers": {"healthy": len(self.registry.healthy()),
                        "total": len(self.registry.workers())}})

    @app.route("/health", methods=["GET"])
    @_api
    async def health(self, request: Request) -> bytes:
        routable = self.registry.routable()
        load = pool_load(routable)
        body = {"status": "healthy" if routable else "unhealthy", "service": SERVICE,
                "worker_id": None, "version": _version(), "load": load,
                "workers": {"healthy": len(routable), "total": len(self.registry.workers())}}
        return write_json(request, body, 200 if routable else 503)

    @app.route("/pool", methods=["GET"])
    @_api
    async def pool(self, request: Request) -> bytes:
        workers = self.registry.workers()
        configured = self.registry.configured()
        drain = self.registry.drain_seconds
        return write_json(request, {
            "workers": [w.as_json(_iso, drain) for w in workers],
            "healthy": sum(1 for w in configured if w.healthy), "total": len(configured),
            "draining": sum(1 for w in workers if w.draining_since is not None),
            "open": len(self.registry.open_workers()),
            "load": pool_load(self.registry.routable()),
            "health_interval": self.config.health_interval,
            "drain_seconds": drain, "max_replicas": self.config.max_replicas,
            "max_disagreements": self.registry.max_disagreements,
            "open_enrollment": self.config.open_enrollment})

    @app.route("/pool/join", methods=["POST"])
    @_api
    async def join(self, request: Request) -> bytes:
        """Open enrollment (``enrollment.py``): a worker proves its key and joins."""
        data = request.content.read(MAX_JOIN_BYTES + 1) if request.content else b""
        if len(data) > MAX_JOIN_BYTES:
            raise APIError(413, "Request too large", f"at most {MAX_JOIN_BYTES} bytes")
        try:
            body = json.loads(data)
        except ValueError:
            raise APIError(400, "Invalid join request", "the body is not JSON") from None
        answer = await self.enrollment.join(body, self.client_address(request))
        return write_json(request, answer)

    @app.route("/environments", methods=["GET"])
    @_api
    async def environments(self, request: Request) -> bytes:
        return await self.from_a_healthy_worker(request, "/environments")

    @app.route("/runtimes", methods=["GET"])
    @_api
    async def runtimes(self, request: Request) -> bytes:
        return await self.from_a_healthy_worker(request, "/runtimes")

    async def from_a_healthy_worker(self, request: Request, path: str) -> bytes:
        """A document every worker of the pool answers alike, from any healthy one."""
        state = self.pick_healthy()
        code, body = await self.client.get_json(state.entry.endpoint + path,
                                                self.config.request_timeout)
        return write_json(request, body, code)

    @app.route("/stats", methods=["GET"])
    @_api
    async def stats(self, request: Request) -> bytes:
        decision, systems = await self.pool_usage(self.client_address(request))
        # Pool-wide: every healthy worker's own figures, summed.
        system = {name: sum(int(s.get(name, 0)) for s in systems
                            if isinstance(s.get(name, 0), int))
                  for name in ("queue_length", "active_jobs", "capacity", "queue_capacity")}
        system["free_slots"] = free_slots(self.registry.workers())
        system["workers_healthy"] = len(self.registry.routable())
        system["workers_total"] = len(self.registry.workers())
        return write_json(request, {"your_quota": decision.your_quota(), "system": system})

    async def pool_usage(self, address: str) -> tuple[PoolDecision, list[dict[str, Any]]]:
        """The client's quota summed over every healthy worker, and their ``system`` parts."""
        workers = self.registry.healthy()
        headers = {b"X-Forwarded-For": [address.encode("latin-1")]}
        results = await defer.DeferredList(
            [self.client.get_json(w.entry.endpoint + "/stats", self.config.health_timeout,
                                  headers=headers) for w in workers],
            consumeErrors=True)
        quotas: list[dict[str, Any]] = []
        systems: list[dict[str, Any]] = []
        for ok, result in results:
            if not ok:
                continue  # a worker that cannot answer holds no running jobs we can use
            code, body = result
            if code == 200 and isinstance(body, dict):
                if isinstance(body.get("your_quota"), dict):
                    quotas.append(body["your_quota"])
                if isinstance(body.get("system"), dict):
                    systems.append(body["system"])
        return decide(Usage.total(quotas), self.config.quotas), systems

    # -- submitting ------------------------------------------------------------------

    @app.route("/submit", methods=["POST"])
    @_api
    async def submit(self, request: Request) -> bytes:
        address = self.client_address(request)
        placed: Placed | bytes = await self.locks.run(
            client_key(address), lambda: defer.ensureDeferred(self._place(request, address)))
        if isinstance(placed, bytes):
            return placed
        return self.relay_json(request, placed.response, placed.doc, placed.job_id)

    async def _place(self, request: Request, address: str) -> Placed | bytes:
        """Send a submission to a worker that takes it; an error answer (bytes) if none does."""
        if not address_in(address, self.config.quotas.exempt):
            decision, _ = await self.pool_usage(address)
            if not decision.allowed:
                self.metrics.refused(decision.reason)
                raise APIError(429, "Rate limit exceeded", f"{decision.reason}. {LIFT_QUOTA}",
                               **decision.error_extra())
        body = request.content
        kind = content_type(request)
        headers = {b"X-Forwarded-For": [address.encode("latin-1")]}
        if kind:
            headers[b"Content-Type"] = [kind]
        # The first replica (the only one, for most jobs) always goes to a listed worker.
        placed = await self.place(body, headers, set(), open_ok=False)
        if placed.state is None:
            if placed.response is not None:
                if placed.response.code == 429:
                    self.metrics.refusals.labels("worker_rate_limit").inc()
                return self.relay_json(request, placed.response, placed.doc)
            self.metrics.refusals.labels("no_worker").inc()
            if placed.gpu_refusals:
                raise APIError(503, "No worker available",
                               "no worker in the pool has a GPU that can run this job: "
                               + "; ".join(placed.gpu_refusals), retry_after=self.retry_after())
            raise APIError(503, "No worker available",
                           "every worker's queue is full, refused the job, or is unavailable",
                           retry_after=self.retry_after_full())
        if body is not None:
            body.seek(0, os.SEEK_END)  # the producer sends from the start, each time
            self.metrics.uploaded.inc(body.tell())
        replicas = placed.doc.get("replicas", 1)
        if isinstance(replicas, int) and not isinstance(replicas, bool) and replicas > 1:
            answer = await self.replication.submit(placed, replicas, body, headers)
            return Placed(answer["job_id"], placed.response, answer)
        log.info("job dispatched to {worker}", worker=placed.state.entry.label)
        return Placed(placed.job_id(), placed.response, placed.doc)

    def retry_after_full(self) -> int:
        return drain_retry_after(self.registry.workers(), self.config.health_interval)

    async def place(self, body: Any, headers: dict[bytes, list[bytes]], tried: set[str],
                    open_ok: bool) -> Placement:
        """Send a submission to the best worker that takes it, skipping those in ``tried``.

        Adds every worker tried to ``tried``.  A worker that refuses (429,
        503) or cannot be reached is skipped for the next; one that answers
        400, 413, 415... is relayed (no worker would take the submission).
        """
        refusal: Placement | None = None
        refreshed = False
        # A GPU job's request, once a worker that cannot run it has told it (the
        # coordinator does not parse submissions); then only workers whose signed
        # GPUs satisfy it are tried.
        gpu_request: dict[str, Any] | None = None
        gpu_refusals: list[str] = []
        gpu_capable_tried = False
        while True:
            if gpu_request is not None:
                for other in self.registry.workers():
                    unmet = gpuwire.unmet(other.load.gpus if other.load else (), gpu_request)
                    if other.worker_id not in tried and unmet is not None:
                        tried.add(other.worker_id)
                        gpu_refusals.append(f"{other.entry.label}: {unmet[0]}: {unmet[1]}")
            state = pick_worker(self.registry.workers(), self.registry.cursor, tried, open_ok)
            if state is None and not refreshed and self.refresh is not None:
                # Every worker looks full, but by loads up to a health interval old (plus
                # what was sent since): jobs may have ended.  Ask again now rather than
                # refuse for a whole interval; a check under way is joined, not repeated.
                refreshed = True
                now = self.reactor.seconds()
                stale = [w for w in self.registry.routable()
                         if w.worker_id not in tried and not has_room(w)
                         and (w.last_check is None or now - w.last_check >= REFRESH_AFTER)]
                if stale:
                    await self.refresh(stale)
                    continue
            if state is None:
                break
            tried.add(state.worker_id)
            self.registry.note_dispatch(state)
            dispatched_at = self.reactor.seconds()
            try:
                response = await self.client.request(
                    "POST", state.entry.endpoint + "/submit", self.config.submit_timeout,
                    headers=headers, data=self.client.body(body))
                doc = await read_json(response, MAX_SMALL_JSON_BYTES)
            except WorkerUnreachable as e:
                # Never reached, or gone before it answered: the next worker gets it.
                self.registry.undo_dispatch(state)
                self.registry.mark_down(state, f"submit failed: {e}")
                self.metrics.worker_refused.labels(state.entry.label).inc()
                continue
            except (WorkerTimeout, BadWorkerResponse):
                raise  # it may have taken the job: sending it again could run it twice
            if response.code == 200 and isinstance(doc, dict) \
                    and isinstance(doc.get("job_id"), str):
                self.registry.cursor += 1
                placed = Placement(state, response, doc, dispatched_at)
                placed.job_id()  # a malformed id is a bad answer, before anything else
                self.metrics.routed.labels(state.entry.label).inc()
                return placed
            self.registry.undo_dispatch(state)
            if response.code in (429, 503):
                gpu_capable_tried = True
                self.metrics.worker_refused.labels(state.entry.label).inc()
                refusal = Placement(None, response, doc)
                continue
            if response.code == 400 and isinstance(doc, dict) \
                    and str(doc.get("field", "")).startswith("gpu") \
                    and isinstance(doc.get("gpu"), dict):
                # This worker's GPUs cannot run it, another's may.
                gpu_request = doc["gpu"]
                gpu_refusals.append(f"{state.entry.label}: {doc.get('details')}")
                continue
            # 400, 413, 415...: the submission itself is at fault; no worker would take it.
            return Placement(None, response, doc)
        if refusal is not None and refusal.response.code == 429:
            return refusal
        if gpu_refusals and not gpu_capable_tried:
            return Placement(None, gpu_refusals=gpu_refusals)
        return Placement(None)

    @app.route("/run", methods=["POST"])
    @_api
    async def run(self, request: Request) -> bytes | None:
        """Submit as ``/submit`` does, then answer with the whole result at the job's end.

        The wait is the worker's long poll (``/status?wait=``), then its ``/logs`` and
        ``/outputs`` are relayed into the answer as they are read (``answer_run``):
        the per-client lock is held only while the job is placed.  A client that
        goes away first (Klein cancels this) has its job deleted.
        """
        keep = _keep_arg(request)
        address = self.client_address(request)
        placed: Placed | bytes = await self.locks.run(
            client_key(address), lambda: defer.ensureDeferred(self._place(request, address)))
        if isinstance(placed, bytes):
            return placed
        job_id = placed.job_id
        ref, state = self.locate(job_id)
        headers = self.forwarded(request)
        refs = self.replicas_of(job_id)
        if len(refs) > 1:
            await self.run_replicated(request, job_id, refs, headers, keep)
            return None
        try:
            status = await self.final_status(ref, state, headers)
        except defer.CancelledError:
            self.forget_quietly(ref, state, headers)
            raise
        except WorkerLost as e:
            doc = lost_status(job_id, ref, state.worker_id, str(e))
            doc.update(stdout="", stderr="", truncated={"stdout": False, "stderr": False},
                       outputs=[], kept=False)
            return write_json(request, doc)
        if status is None:  # deleted meanwhile (by a DELETE with its id)
            raise not_found()
        doc = self.status_answer(job_id, state, status)
        await self.answer_run(request, job_id, doc, [ref], headers, keep)
        return None

    async def run_replicated(self, request: Request, job_id: str, refs: list[JobRef],
                             headers: dict[bytes, list[bytes]], keep: bool) -> None:
        """``/run`` of a replicated job: every replica's end, then the consensus answer.

        Logs come from the first replica; outputs only when the replicas agree.
        """
        try:
            for replica in refs:
                worker = self.registry.by_tag(replica.tag)
                if worker is not None:
                    try:
                        await self.final_status(replica, worker, headers)
                    except WorkerLost:
                        pass  # the consensus below reports it
        except defer.CancelledError:
            for replica in refs:
                worker = self.registry.by_tag(replica.tag)
                if worker is not None:
                    self.forget_quietly(replica, worker, headers)
            raise
        doc = await self.replication.status(job_id, refs, headers)
        await self.answer_run(request, job_id, doc, refs, headers, keep,
                              outputs=doc["consensus"]["agreed"] is True)

    async def answer_run(self, request: Request, job_id: str, doc: dict[str, Any],
                         refs: list[JobRef], headers: dict[bytes, list[bytes]], keep: bool,
                         outputs: bool = True) -> None:
        """``/run``'s answer: ``doc``, then the first replica's logs and outputs relayed
        as they are read (``members.py``), then ``kept``; with ``keep`` false, every
        replica is deleted, whatever happens to the answer.

        What it holds is bounded whatever the job printed: the worker is paused while
        the client lags.  A worker that fails once the answer has begun (its status
        line is gone) cuts the client's connection: an answer is whole or visibly not.
        """
        ref, state = refs[0], self.registry.by_tag(refs[0].tag)
        worker = state if state is not None and not state.down else None
        answer = RunAnswer(request, doc, keep, lambda entry: self.rewrite_outputs(
            job_id, [entry], keep)[0])
        try:
            logs = await self.job_body(ref, worker, "logs", headers) if worker else None
            answer.start()
            await answer.relay_logs(logs)
            listing = await self.job_body(ref, worker, "outputs", headers) \
                if worker and outputs else None
            await answer.relay_outputs(listing)
            if not keep and worker:
                await self.replication.delete(refs, headers)
                await self.forward_json(ref, worker, "jobs", headers, method="DELETE")
        except Exception as e:
            if not keep:
                for replica in refs:
                    holder = self.registry.by_tag(replica.tag)
                    if holder is not None:
                        self.forget_quietly(replica, holder, headers)
            if not answer.started or isinstance(e, defer.CancelledError):
                raise
            log.warn("a /run answer was cut: {error}", error=str(e))  # noqa: G010
            answer.cut()
            return
        answer.end()

    async def final_status(self, ref: JobRef, state: WorkerState,
                           headers: dict[bytes, list[bytes]]) -> dict[str, Any] | None:
        """The worker's /status once the job is finished (long polls); None once it is gone."""
        while True:
            response = await self.forward(
                ref, state, "GET", f"{_job_path('status', ref)}?wait={RUN_POLL_SECONDS:g}",
                headers, timeout=RUN_POLL_SECONDS + self.config.request_timeout)
            doc = await read_json(response)
            if response.code == 404:
                return None
            if response.code != 200 or not isinstance(doc, dict):
                raise BadWorkerResponse(f"the worker answered /status with {response.code}")
            if doc.get("status") in (JobStatus.COMPLETED.value, JobStatus.FAILED.value):
                return doc

    async def forward_json(self, ref: JobRef, state: WorkerState, endpoint: str,
                           headers: dict[bytes, list[bytes]], method: str = "GET"
                           ) -> dict[str, Any]:
        response = await self.forward(ref, state, method, _job_path(endpoint, ref), headers)
        doc = await read_json(response, MAX_SMALL_JSON_BYTES)
        return doc if response.code == 200 and isinstance(doc, dict) else {}

    async def job_body(self, ref: JobRef, state: WorkerState, endpoint: str,
                       headers: dict[bytes, list[bytes]]) -> Any:
        """The worker's answer for one of the job's documents, its body unread; None when
        it is not a 200 (its small body read and dropped)."""
        response = await self.forward(ref, state, "GET", _job_path(endpoint, ref), headers)
        if response.code == 200:
            return response
        await read_body(response, MAX_SMALL_JSON_BYTES)
        return None

    def forget_quietly(self, ref: JobRef, state: WorkerState,
                       headers: dict[bytes, list[bytes]]) -> None:
        """Delete a job whose /run client went away; nobody waits for the answer."""
        d = defer.ensureDeferred(self.forward_json(ref, state, "jobs", headers,
                                                   method="DELETE"))
        d.addErrback(lambda f: log.warn("cancelling an abandoned job failed: {error}",  # noqa: G010
                                        error=f.getErrorMessage()))

    # -- one job ----------------------------------------------------------------------

    @app.route("/status/<string:job_id>", methods=["GET"])
    @_api
    async def status(self, request: Request, job_id: str) -> bytes:
        ref, state = self.locate(job_id)
        refs = self.replicas_of(job_id)
        wait = _wait_arg(request)
        if len(refs) > 1:
            if wait:
                await self.replication.wait_all(refs, self.forwarded(request), wait)
            doc = await self.replication.status(job_id, refs, self.forwarded(request))
            return write_json(request, doc)
        path = _job_path("status", ref)
        if wait:
            path += f"?wait={wait:g}"
        try:
            response = await self.forward(ref, state, "GET", path, self.forwarded(request),
                                          timeout=wait + self.config.request_timeout)
        except WorkerLost as e:
            if self.replication.ledger.first_time(job_id):
                self.registry.record_lost(state)
            return write_json(request, lost_status(job_id, ref, state.worker_id, str(e)))
        doc = await read_json(response)
        if response.code != 200 or not isinstance(doc, dict):
            return self.relay_json(request, response, doc, job_id)
        return write_json(request, self.status_answer(job_id, state, doc))

    def status_answer(self, job_id: str, state: WorkerState,
                      doc: dict[str, Any]) -> dict[str, Any]:
        """A worker's /status document as the client gets it: verified, with our id."""
        doc["signature_verified"] = verify_result(doc, state.worker_id)
        worker = doc.get("worker_metadata")
        if isinstance(worker, dict):
            worker["job_id"] = doc.get("job_id")
        doc["job_id"] = job_id
        return doc

    @app.route("/logs/<string:job_id>", methods=["GET"])
    @_api
    async def logs(self, request: Request, job_id: str) -> Any:
        ref, state = self.locate(job_id)
        path = _job_path("logs", ref)
        fmt = _arg(request, b"format")
        if fmt:
            path += "?format=" + quote(fmt.decode("latin-1"), safe="")
        extra = {}
        accept = request.getHeader(b"accept")
        if accept:
            extra["Accept"] = accept.encode("latin-1") if isinstance(accept, str) else accept
        response = await self.forward(ref, state, "GET", path,
                                      self.forwarded(request, **extra))
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if kind.startswith(b"application/json"):
            if response.code != 200:
                return await self.relay_small(request, response, job_id)
            # Up to 3 x 10 MiB of output, as JSON: streamed, with our job id.
            return await self.relay_body(request, response, rewriter=LineRewriter(job_id))
        return await self.relay_body(request, response)

    @app.route("/outputs/<string:job_id>", methods=["GET"])
    @_api
    async def outputs(self, request: Request, job_id: str) -> bytes | None:
        ref, state = self.locate(job_id)
        refs = self.replicas_of(job_id)
        if len(refs) > 1:
            await self.replication.require_agreement(job_id, refs, self.forwarded(request))
        response = await self.forward(ref, state, "GET", _job_path("outputs", ref),
                                      self.forwarded(request))
        if response.code != 200:
            return await self.relay_small(request, response, job_id)
        # Up to 10,000 entries: streamed, each entry with our download URL.
        await self.relay_body(request, response, rewriter=LineRewriter(
            job_id, lambda entry: self.rewrite_outputs(job_id, [entry])[0]))
        return None

    def rewrite_outputs(self, job_id: str, files: list[Any], kept: bool = True) -> list[Any]:
        """A worker's outputs listing with our download URLs (none when not kept)."""
        for entry in files:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                entry["download_url"] = \
                    f"/download/{job_id}/{quote(entry['path'], safe='/')}" if kept else None
        return files

    @app.route("/download/<string:job_id>", methods=["GET"])
    @_api
    async def download_all(self, request: Request, job_id: str) -> Any:
        return await self.download(request, job_id, None)

    @app.route("/download/<string:job_id>/<path:path>", methods=["GET"])
    @_api
    async def download_one(self, request: Request, job_id: str, path: str) -> Any:
        return await self.download(request, job_id, path)

    async def download(self, request: Request, job_id: str, path: str | None) -> Any:
        ref, state = self.locate(job_id)
        refs = self.replicas_of(job_id)
        if len(refs) > 1:
            await self.replication.require_agreement(job_id, refs, self.forwarded(request))
        target = _job_path("download", ref)
        if path is not None:
            target += "/" + quote(path, safe="/")
        # Packing every output into one .tar.gz can take a while: the long timeout.
        response = await self.forward(ref, state, "GET", target, self.forwarded(request),
                                      timeout=self.config.submit_timeout)
        if response.code != 200:
            return await self.relay_small(request, response, job_id)
        return await self.relay_body(request, response, rename=(ref.worker_job_id, job_id))

    async def relay_body(self, request: Request, response: Any,
                         rename: tuple[str, str] | None = None,
                         rewriter: LineRewriter | None = None) -> None:
        """Stream a worker's answer to the client, pausing the worker while the client lags.

        With a ``rewriter`` the body's length changes: it goes chunked."""
        request.setResponseCode(response.code)
        for name in _PASSED_HEADERS:
            for value in response.headers.getRawHeaders(name, []):
                if rename is not None and name == b"content-disposition":
                    value = value.replace(rename[0].encode(), rename[1].encode())
                request.setHeader(name, value)
        if isinstance(response.length, int) and rewriter is None:
            request.setHeader(b"Content-Length", str(response.length).encode())
        cors(request)
        await relay(response, request, rewriter)

    @app.route("/jobs/<string:job_id>", methods=["DELETE"])
    @_api
    async def delete(self, request: Request, job_id: str) -> bytes:
        ref, state = self.locate(job_id)
        await self.replication.delete(self.replicas_of(job_id), self.forwarded(request))
        response = await self.forward(ref, state, "DELETE", _job_path("jobs", ref),
                                      self.forwarded(request))
        return await self.relay_small(request, response, job_id)

    # -- live output ---------------------------------------------------------------------

    @app.route("/logs/<string:job_id>/stream", methods=["GET"])
    def stream(self, request: Request, job_id: str) -> Any:
        refs = decode_replicas(job_id)
        ref = refs[0] if refs else None  # a replicated job streams its first replica
        state = self.registry.by_tag(ref.tag) if ref is not None else None
        fmt = _arg(request, b"format").decode("latin-1") or None
        return self.streams.resource(state, ref, fmt)

    @app.route("/stream/<string:job_id>", methods=["GET"])
    def stream_alias(self, request: Request, job_id: str) -> Any:
        return self.stream(request, job_id)

    # -- documents for people and programs (sandrun/pages.py) ---------------------

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: Request) -> bytes:
        """Prometheus metrics, unless they have a listener of their own (``metrics_listen``)."""
        if self.config.metrics_listen is not None or not address_in(
                self.client_address(request), self.config.metrics_allow):
            return write_error(request, APIError(404, "Not found", "no such endpoint"))
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode())
        return self.metrics.exposition()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: Request) -> bytes:
        return pages.serve_openapi(request, "coordinator")

    @app.route("/ui/", methods=["GET"])
    def page(self, request: Request) -> bytes:
        return pages.serve_page(request)

    @app.route("/docs", methods=["GET"])
    def docs(self, request: Request) -> bytes:
        return pages.serve_docs(request)

    @app.route("/ui/<path:name>", methods=["GET"])
    def page_asset(self, request: Request, name: str) -> bytes:
        return pages.serve_asset(request, name)

    # -- CORS and errors -------------------------------------------------------------------

    @app.route("/", branch=True, methods=["OPTIONS"])
    def preflight(self, request: Request) -> bytes:
        return httpjson.preflight(request)

    @app.handle_errors(NotFound, MethodNotAllowed)
    def no_route(self, request: Any, failure: Any) -> bytes:
        return httpjson.no_route(request, getattr(failure.value, "valid_methods", None))


def pool_load(workers: list[WorkerState]) -> dict[str, int]:
    """What ``workers`` hold and can hold, summed, as their signed loads say."""
    loads = [w.load for w in workers if w.load is not None]
    return {"active_jobs": sum(load.active_jobs for load in loads),
            "queued_jobs": sum(load.queued_jobs for load in loads),
            "capacity": sum(load.capacity for load in loads),
            "queue_capacity": sum(load.queue_capacity or 0 for load in loads),
            "job_limit": sum(job_limit(w) for w in workers)}


@dataclass(frozen=True)
class Placed:
    """A submission a worker took: our job id and the worker's answer."""

    job_id: str
    response: Any
    doc: dict[str, Any]


def _wait_arg(request: Request) -> float:
    """``?wait=S`` for a long poll (the worker caps it too), 0 without it."""
    raw = _arg(request, b"wait")
    if not raw:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise APIError(400, "Invalid wait",
                       f"wait is a number of seconds, 0 to {MAX_WAIT_SECONDS:g}", field="wait")
    return min(seconds, MAX_WAIT_SECONDS)


def _keep_arg(request: Request) -> bool:
    raw = _arg(request, b"keep").lower()
    if raw in (b"", b"1", b"true", b"yes"):
        return True
    if raw in (b"0", b"false", b"no"):
        return False
    raise APIError(400, "Invalid keep", "keep is 1 or 0 (true or false)", field="keep")


def _arg(request: Request, name: bytes) -> bytes:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name) or []
    return values[0] if values else b""


def _job_path(endpoint: str, ref: JobRef) -> str:
    return f"/{endpoint}/{quote(ref.worker_job_id, safe='')}"
