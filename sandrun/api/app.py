"""The worker's HTTP API (``shared/spec/api.md``): thin Klein handlers.

Each handler parses, calls the job manager, and serialises; every error is an
``APIError``, mapped from the domain's in one table (``errors.py``) and turned into
JSON in one place (``sandrun.httpjson``, shared with the coordinator).
"""

from __future__ import annotations

import os
import tarfile
import urllib.parse
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import PathConverter

import sandrun
from sandrun import httpjson, pages
from sandrun import identity as ident
from sandrun.api import results, sending, stream, uploads
from sandrun.api.errors import refusal_kind, to_api_error
from sandrun.api.packs import PackOnce
from sandrun.config import WorkerConfig
from sandrun.httpjson import APIError, content_type, cors, write_error, write_json
from sandrun.jobs import storage as store
from sandrun.jobs.manager import BlockingRunner, JobManager, new_job_id
from sandrun.jobs.manifest import Manifest
from sandrun.jobs.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sandrun.jobs.model import Job, iso
from sandrun.jobs.runtimes import Runtime, RuntimeList
from sandrun.jobs.workspace import OutputNotFound, open_output
from sandrun.netaddr import address_in, client_key, trusted_client_address
from sandrun.wire import JobStatus

log = Logger()
DESCRIPTION = "Anonymous, ephemeral, sandboxed code execution"
PRIVACY = ("No accounts and no logs of job content; job data lives in RAM only and is deleted "
           "after download, 5 minutes after a failure, or 1 hour after it finishes.")


def _api(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler and turn any error into the contract's JSON error."""

    def wrapped(self: WorkerAPI, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        def fail(failure: Any) -> bytes:
            if failure.check(defer.CancelledError):  # the client went away (Klein cancels)
                return b""
            self.count_refusal(failure.value)
            error = to_api_error(failure.value)
            if error.status == 500:
                # The route only: a path may name an output file (job content).
                log.failure("unhandled error in {route}", failure,
                            route=uploads.log_route(request.path or b""))
            if getattr(request, "startedWriting", False):  # a download broke off
                return b""
            return write_error(request, error)

        d = defer.maybeDeferred(handler, self, request, *args, **kwargs)
        return d.addErrback(fail)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


class _Utf8Guard(Resource):
    """Klein answers a path that is not UTF-8 with a bare text 400; the contract wants JSON."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def render(self, request: Any) -> Any:
        try:
            for segment in request.prepath + request.postpath:
                segment.decode("utf-8")
        except UnicodeDecodeError:
            return write_error(request, APIError(400, "Invalid URL",
                                                 "the path is not valid UTF-8"))
        return self.inner.render(request)


class _AnyPath(PathConverter):
    """``<path:...>`` that also matches file names with newlines (a job may make them)."""

    regex = "[^/][\\s\\S]*?"


MAX_NONCE_CHARS = 256
# Parses a submission body into the job directory: (content type, body, work, staging).
Unpack = Callable[[bytes | None, Any, str, str], uploads.Submission]


class WorkerAPI:
    """The worker's routes; collaborators come in, nothing global is touched.

    ``blocking`` runs file-heavy work (upload extraction, packing outputs)
    off the reactor thread; tests pass a synchronous runner.
    ``runtimes`` answers ``/runtimes``.
    ``environments`` answers ``/environments`` (by default the manager's own
    ``Environments``, which also checks each manifest's template).
    ``unpack`` parses a submission's body into the job directory (the worker
    passes ``Unpacker.parse``, a child process with its own limits; by default
    ``uploads.parse_submission`` in the calling thread).
    """

    app = Klein()
    app.url_map.converters["anypath"] = _AnyPath
    # "/download/ID//etc/passwd" is a JSON 404 like any unknown path, never werkzeug's HTML
    # 308 to a merged path (with a Location built from the Host header).
    app.url_map.merge_slashes = False

    def __init__(self, manager: JobManager, config: WorkerConfig,
                 identity: ident.WorkerIdentity | None = None,
                 environments: Callable[[], dict[str, Any]] | None = None,
                 blocking: BlockingRunner | None = None,
                 runtimes: RuntimeList | None = None,
                 unpack: Unpack | None = None) -> None:
        self.manager = manager
        self.config = config
        self.identity = identity
        self.environments = environments or manager.environments.describe
        self.blocking = blocking or manager.blocking
        # GET /runtimes; the worker starts the probe when it starts (service.py).
        self.runtime_list = runtimes or RuntimeList(self.blocking)
        self.unpack: Unpack = unpack or self._unpack_here
        self.streams = stream.Subscribers(manager.reactor)  # closed with 1001 at shutdown
        self.packs = PackOnce(self.blocking, pack_outputs,
                              lambda job_id: manager.storage.pack_path(job_id),
                              lambda job_id: manager.get(job_id) is not None,
                              lambda job_id: manager.storage.measure(job_id))
        self.metrics = manager.metrics
        self.metrics.watch(streams=lambda: len(self.streams))

    def resource(self) -> Any:
        return _Utf8Guard(self.app.resource())

    # -- helpers -------------------------------------------------------------

    def client(self, request: IRequest) -> str:
        return client_key(self.client_address(request))

    def client_address(self, request: IRequest) -> str:
        peer = request.getClientAddress()
        host = getattr(peer, "host", "unix")
        # Every X-Forwarded-For line, in order: a proxy may add its own line.
        lines = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        forwarded = b",".join(lines).decode("latin-1") if lines else None
        return trusted_client_address(host, forwarded, self.config.trusted_proxies)

    def count_refusal(self, exc: BaseException) -> None:
        kind = refusal_kind(exc)
        if kind is not None:
            self.metrics.refused(kind)

    def quota_exempt(self, request: IRequest) -> bool:
        """Whether the request comes from a ``--quota-exempt`` address (the one
        ``client`` charges, so a trusted proxy's X-Forwarded-For counts)."""
        return address_in(self.client_address(request), self.config.quotas.exempt)

    def early_refusal(self, request: IRequest) -> uploads.Refusal | None:
        """For ``UploadRequest``: refuse a submission from its headers, before its body.

        The same checks run again once the upload is in (things change meanwhile).
        """
        try:
            self.manager.admit(self.client(request), self.quota_exempt(request))
        except Exception as e:  # noqa: BLE001 (mapped, and anything unexpected is left to the route)
            self.count_refusal(e)
            error = to_api_error(e)
            if error.status >= 500 and error.status != 503:
                return None
            headers = {"Retry-After": str(error.extra["retry_after"])} \
                if "retry_after" in error.extra else {}
            return error.status, error.body(), headers
        return None

    def _unpack_here(self, kind: bytes | None, body: Any, work: str,
                     staging: str) -> uploads.Submission:
        return uploads.parse_submission(kind, body, work, staging, self.config.limits)

    def job(self, job_id: str) -> Job:
        job = self.manager.get(job_id)
        if job is None:
            raise APIError(404, "Job not found", "no job with that id (it may have expired)")
        return job

    # -- service ---------------------------------------------------------------

    @app.route("/", methods=["GET"])
    @_api
    def root(self, request: IRequest) -> bytes:
        if pages.wants_html(request):
            return pages.serve_page(request)
        return write_json(request, {
            "service": "sandrun", "version": sandrun.__version__, "status": "running",
            "description": DESCRIPTION, "privacy": PRIVACY,
            "limits": self.config.limits.as_json(), "worker_id": self.manager.worker_id,
            **self.manager.gpus.report()})

    @app.route("/health", methods=["GET"])
    @_api
    def health(self, request: IRequest) -> bytes:
        stats = self.manager.stats()
        # queue_capacity: a coordinator places up to capacity + queue_capacity jobs here.
        load: dict[str, Any] = {"active_jobs": stats["active_jobs"],
                                "queued_jobs": stats["queue_length"],
                                "capacity": stats["capacity"],
                                "queue_capacity": stats["queue_capacity"]}
        gpus = self.manager.gpus.report()
        if self.manager.gpus.usable():
            # Signed with the load: a coordinator sends GPU jobs only where they can run.
            load["gpus"] = gpus["gpus"]
        # A worker that cannot run jobs (launcher gone, slots lost) must not be
        # chosen: 503, and a status other than "healthy" for the coordinator.
        problem = self.manager.problem()
        body: dict[str, Any] = {"status": "healthy" if problem is None else "unhealthy",
                                "worker_id": self.manager.worker_id,
                                "version": sandrun.__version__, "load": load, **gpus}
        if problem is not None:
            body["problem"] = problem
        nonce = request.args.get(b"nonce")
        if nonce and self.identity is not None:
            text = nonce[0].decode("utf-8", "replace")
            if len(text) > MAX_NONCE_CHARS:
                raise APIError(400, "Invalid nonce", f"at most {MAX_NONCE_CHARS} characters")
            # The wall clock on purpose: a coordinator compares it with its own.
            body.update(ident.health_response(self.identity, text, load,
                                              self.manager.reactor.seconds()))
        return write_json(request, body, 200 if problem is None else 503)

    @app.route("/stats", methods=["GET"])
    @_api
    def stats(self, request: IRequest) -> bytes:
        quota = self.manager.limiter.quota(self.client(request), self.manager.reactor.seconds())
        quota["exempt"] = self.quota_exempt(request)
        if quota["exempt"]:
            quota.update(can_submit=True, reason=None, retry_after=0)
        return write_json(request, {"your_quota": quota, "system": self.manager.stats()})

    @app.route("/runtimes", methods=["GET"])
    @_api
    def runtimes_list(self, request: IRequest) -> Any:
        def answer(found: tuple[Runtime, ...]) -> bytes:
            return write_json(request, {"runtimes": [r.as_json() for r in found]})

        return self.runtime_list.get().addCallback(answer)

    @app.route("/environments", methods=["GET"])
    @_api
    def environments_list(self, request: IRequest) -> bytes:
        return write_json(request, self.environments())

    # -- jobs ------------------------------------------------------------------

    @app.route("/submit", methods=["POST"])
    @_api
    def submit(self, request: IRequest) -> Any:
        def queued(accepted: tuple[Job, int]) -> bytes:
            job, position = accepted
            # "queued" means accepted; position 0 says it is already running.
            answer: dict[str, Any] = {"job_id": job.id, "status": JobStatus.QUEUED.value,
                                      "position": position}
            if job.manifest.replicas > 1:
                # For a coordinator, which does not parse submissions: how many to run.
                answer["replicas"] = job.manifest.replicas
            return write_json(request, answer)

        return self.accept(request).addCallback(queued)

    @app.route("/run", methods=["POST"])
    @_api
    def run(self, request: IRequest) -> Any:
        """Submit, wait for the end, answer with the whole result (``results.py``).

        A client that goes away first cancels its job: Klein cancels the
        Deferred this returns, which cancels the wait, which cancels the job.
        """
        keep = results.keep_arg(request.args)

        def wait(accepted: tuple[Job, int]) -> defer.Deferred[Job]:
            job = accepted[0]
            ended = results.job_ended(job, self.manager.reactor,
                                      on_cancel=lambda: self.manager.cancel(job.id))
            return ended.addCallback(lambda _: job)

        def answer(job: Job) -> Any:
            request.setHeader(b"Content-Type", b"application/json")
            cors(request)
            members = results.run_document(self.status_document(job), job, keep=keep)
            sent = sending.send_pieces(request, sending.object_json(members))
            if not keep:  # once sent: the output is read from the job's log as it goes
                def delete(result: object) -> object:
                    self.manager.delete(job.id)
                    return result
                sent.addBoth(delete)
            return sent

        return self.accept(request).addCallback(wait).addCallback(answer)

    def accept(self, request: IRequest) -> defer.Deferred[tuple[Job, int]]:
        """Take a submission (``/submit``, ``/run``): the job and its queue position."""
        client = self.client(request)
        body = request.content
        body.seek(0, os.SEEK_END)
        size = body.tell()
        if size > self.config.limits.max_upload_bytes:
            # UploadRequest refuses these before reading; this guards any other request type.
            raise APIError(413, "Upload too large",
                           f"the limit is {self.config.limits.max_upload_bytes} bytes")
        kind = content_type(request)
        exempt = self.quota_exempt(request)
        self.manager.admit(client, exempt)
        job_id = new_job_id()

        def parse() -> tuple[str, uploads.Submission, str | None]:
            # A tmpfs mount (kernel work), the upload written into it and measured, and the
            # template looked up (files of the environment registry): one trip to a thread.
            base, submission = self.manager.store_upload(job_id, lambda base: self.unpack(
                kind, body, store.work_dir(base), store.staging_dir(base)))
            return base, submission, self.check_environment(submission.manifest)

        def queued(parsed: tuple[str, uploads.Submission, str | None]) -> tuple[Job, int]:
            base, submission, environment = parsed
            self.manager.check_gpu(submission.manifest)
            files = [(f.path, f.sha256) for f in submission.inputs.files]
            job = Job(id=job_id, manifest=submission.manifest, client=client, base_dir=base,
                      job_hash=ident.job_hash(submission.manifest.as_json(), files),
                      submitted_at=self.manager.reactor.seconds(),
                      log=self.manager.new_log(base), quota_exempt=exempt,
                      environment=environment,
                      inputs={} if submission.manifest.outputs else dict(files))
            position = self.manager.submit(job)
            self.metrics.upload_accepted(size)
            return job, position

        def failed(failure: Any) -> Any:
            if failure.check(uploads.Unsupported):
                failure = Failure(APIError(415, "Unsupported content type",
                                           f"{failure.value.kind}: use multipart/form-data or "
                                           "application/json"))
            if self.manager.get(job_id) is not None:
                return failure
            # Answered once nothing of the refused job is left.
            self.manager.discard_workspace(job_id)
            return self.manager.removed(job_id).addCallback(lambda _: failure)

        # Mounting, extraction and hashing (up to hundreds of MB): off the reactor thread.
        d = self.blocking(parse)
        d.addCallback(queued)
        d.addErrback(failed)
        return d

    def check_environment(self, manifest: Manifest) -> str | None:
        """400 (``EnvironmentUnavailable``) for an unknown or unbuilt template; else the
        template the job gets (None: the host's interpreters alone)."""
        return self.manager.environments.check(manifest)

    @app.route("/status/<string:job_id>", methods=["GET"])
    @_api
    def status(self, request: IRequest, job_id: str) -> Any:
        job = self.job(job_id)
        wait = results.wait_arg(request.args)
        if not wait or job.finished:
            return write_json(request, self.status_document(job))
        # A long poll: answered at the job's end or after ``wait`` seconds, whichever is
        # first; a job deleted meanwhile is a 404 like any unknown one.
        ended = results.job_ended(job, self.manager.reactor, timeout=wait)
        return ended.addCallback(
            lambda _: write_json(request, self.status_document(self.job(job_id))))

    def status_document(self, job: Job) -> dict[str, Any]:
        return {
            "job_id": job.id, "status": job.status.value,
            "queue_position": self.manager.position(job),
            "submitted_at": iso(job.submitted_at), "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at),
            "execution_metadata": job.execution_metadata(),
            "job_hash": job.job_hash,
            "output_files": {o.path: {"size_bytes": o.size_bytes, "sha256": o.sha256,
                                      "type": o.type} for o in job.outputs},
            "worker_metadata": {"worker_id": self.manager.worker_id,
                                "signature": job.signature, "signed": job.signed}}

    @app.route("/logs/<string:job_id>", methods=["GET"])
    @_api
    def logs(self, request: IRequest, job_id: str) -> Any:
        # Streamed with back-pressure (sending.py): up to 3 x 10 MiB of output, as JSON.
        job = self.job(job_id)
        accept = request.getHeader(b"accept") or b""
        fmt = request.args.get(b"format", [b""])[0]
        if fmt == b"text" or (fmt != b"json" and b"text/plain" in accept.lower()):
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            cors(request)
            return sending.send_pieces(request, job.log.pieces())
        request.setHeader(b"Content-Type", b"application/json")
        cors(request)
        streams = {name: job.log.pieces(name) for name in ("stdout", "stderr", "install")}
        return sending.send_pieces(request, sending.logs_json(job.id, streams,
                                                              dict(job.truncated)))

    @app.route("/outputs/<string:job_id>", methods=["GET"])
    @_api
    def outputs(self, request: IRequest, job_id: str) -> Any:
        job = self.job(job_id)
        files = results.output_listing(job)
        request.setHeader(b"Content-Type", b"application/json")
        cors(request)
        head = {"job_id": job.id, "status": job.status.value, "total_files": len(files)}
        return sending.send_pieces(request, sending.listing_json(head, files))

    @app.route("/download/<string:job_id>/<anypath:path>", methods=["GET"])
    @_api
    def download_one(self, request: IRequest, job_id: str, path: str) -> Any:
        job = self.finished_job(job_id)
        if path not in {o.path for o in job.outputs}:
            raise OutputNotFound(path)
        f, size = open_output(store.work_dir(job.base_dir), path, job.manifest.outputs)
        output = next(o for o in job.outputs if o.path == path)
        request.setHeader(b"Content-Type", output.mime_type.encode())
        request.setHeader(b"Content-Length", str(size).encode())
        request.setHeader(b"Content-Disposition", content_disposition(os.path.basename(path)))
        cors(request)
        return _send_file(f, request)

    @app.route("/download/<string:job_id>", methods=["GET"])
    @_api
    def download_all(self, request: IRequest, job_id: str) -> Any:
        job = self.finished_job(job_id)
        d = self.packs.get(job)

        def send(path: str) -> Any:
            self.manager.storage.measure(job.id)  # the pack counts until the job goes
            f = open(path, "rb")  # noqa: SIM115 (closed by the producer)
            request.setHeader(b"Content-Type", b"application/gzip")
            request.setHeader(b"Content-Disposition",
                              f'attachment; filename="{job.id}-outputs.tar.gz"'.encode())
            request.setHeader(b"Content-Length", str(os.fstat(f.fileno()).st_size).encode())
            cors(request)

            def sent(_: Any) -> None:
                # Klein finishes the request next; the data goes once all of it is out.
                self.manager.delete(job.id)

            return _send_file(f, request).addCallback(sent)

        return d.addCallback(send)

    def finished_job(self, job_id: str) -> Job:
        job = self.job(job_id)
        if not job.finished:
            raise APIError(409, "Job not finished", f"the job is {job.status.value}")
        return job

    @app.route("/jobs/<string:job_id>", methods=["DELETE"])
    @_api
    def delete(self, request: IRequest, job_id: str) -> defer.Deferred[bytes]:
        job = self.job(job_id)
        was = job.status
        self.manager.cancel(job_id)
        # Answered once its data is gone (a running job's goes when its sandbox stops).
        return self.manager.removed(job_id).addCallback(lambda _: write_json(
            request, {"job_id": job_id, "deleted": True,
                      "cancelled": was in (JobStatus.QUEUED, JobStatus.RUNNING)}))

    # -- live output (the WebSocket itself is in stream.py) ------------------------

    @app.route("/logs/<string:job_id>/stream", methods=["GET"])
    def live_output(self, request: IRequest, job_id: str) -> Any:
        return stream.stream_resource(self.manager, job_id, request,
                                      subscribers=self.streams)

    @app.route("/stream/<string:job_id>", methods=["GET"])
    def live_output_alias(self, request: IRequest, job_id: str) -> Any:
        return self.live_output(request, job_id)

    # -- documents for people and programs (sandrun/pages.py) ---------------------

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        """Prometheus metrics, unless they have a listener of their own (``metrics_listen``)."""
        if self.config.metrics_listen is not None or not address_in(
                self.client_address(request), self.config.metrics_allow):
            return write_error(request, APIError(404, "Not found", "no such endpoint"))
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode())
        return self.metrics.exposition()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return pages.serve_openapi(request, "worker")

    @app.route("/ui/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        return pages.serve_page(request)

    @app.route("/docs", methods=["GET"])
    def docs(self, request: IRequest) -> bytes:
        return pages.serve_docs(request)

    @app.route("/ui/<anypath:name>", methods=["GET"])
    def page_asset(self, request: IRequest, name: str) -> bytes:
        return pages.serve_asset(request, name)

    # -- CORS and errors -----------------------------------------------------------

    @app.route("/", branch=True, methods=["OPTIONS"])
    def preflight(self, request: IRequest) -> bytes:
        return httpjson.preflight(request)

    @app.handle_errors(NotFound, MethodNotAllowed)
    def no_route(self, request: IRequest, failure: Any) -> bytes:
        return httpjson.no_route(request, getattr(failure.value, "valid_methods", None))


def _send_file(f: Any, request: IRequest) -> defer.Deferred[None]:
    """Stream a file with back-pressure; fires once every byte was written.

    Fails (and the caller's follow-up is skipped) when the client went away.
    """
    return sending.send_file(f, request)


def content_disposition(name: str) -> bytes:
    """``attachment`` with an ASCII fallback name and the exact one per RFC 6266.

    The name is the job's (hostile) file name: quotes, control characters and
    non-ASCII never reach the header raw.
    """
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_"
                       for c in name) or "download"
    return (f'attachment; filename="{fallback}"; '
            f"filename*=UTF-8''{urllib.parse.quote(name, safe='')}").encode("ascii")


def pack_outputs(job: Job, path: str) -> None:
    """Every listed output in one .tar.gz at ``path`` (blocking).

    Not on the job's own tmpfs: a job that filled it could not be downloaded.
    """
    work = store.work_dir(job.base_dir)
    with open(path, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as tar:
        for output in job.outputs:
            try:
                f, size = open_output(work, output.path, job.manifest.outputs)
            except OutputNotFound:
                continue
            with f:
                info = tarfile.TarInfo(output.path)
                info.size, info.mode = size, 0o644
                info.mtime = int(os.fstat(f.fileno()).st_mtime)  # when the job wrote it
                tar.addfile(info, f)

