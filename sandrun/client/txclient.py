"""``TxSandrunClient``: the Sandrun client for Twisted programs (treq and autobahn).

The same calls as ``SandrunClient``, each returning a ``Deferred``; the
request bodies (``body.py``), URLs, JSON answers and ``wait``'s polling
(``calls.py``), the typed results (``models.py``), the error table
(``errors.py``) and packing (``pack.py``) are shared with it, so the two
clients speak exactly the same protocol.  Blocking work (packing a directory,
extracting an archive) runs in the reactor's thread pool.

    client = TxSandrunClient("http://127.0.0.1:8443", reactor)
    submitted = await client.submit_code("print(1)")
    done = await client.stream(submitted.job_id, on_event=print)
    job = await client.status(submitted.job_id)

``http`` may be any object with treq's ``request`` (a ``treq.HTTPClient``, or
``treq.testing.StubTreq`` around a worker's resource, in tests).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, error, task, threads
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from sandrun import __version__
from sandrun.client import body as bodies
from sandrun.client.calls import (
    Polling,
    default_port,
    json_answer,
    output_path,
    parse_server_url,
    segment,
    stream_url,
)
from sandrun.client.errors import (
    NotFoundError,
    ProtocolError,
    SandrunConnectionError,
    SandrunError,
    StreamUnavailableError,
    error_from_response,
)
from sandrun.client.models import (
    Cancelled,
    Done,
    Job,
    Logs,
    Outputs,
    RunResult,
    StreamEvent,
    Submitted,
    parse_frame,
)
from sandrun.client.pack import IgnoreRules, extract_archive, pack_directory

__all__ = ["TxSandrunClient"]

_CONNECTION_ERRORS = (error.ConnectError, error.DNSLookupError, error.ConnectionLost,
                      error.TimeoutError, ResponseFailed, ResponseNeverReceived)


class TxSandrunClient:
    """A non-blocking client; every method returns a ``Deferred``."""

    def __init__(self, server_url: str | None = None, reactor: Any = None, *,
                 http: Any = None, timeout: float = 30.0) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.server_url, self._parsed = parse_server_url(server_url)
        self.reactor = reactor
        self.timeout = timeout
        if http is None:
            import treq

            http = treq
        self._http = http

    # -- service and submitting -------------------------------------------------------------

    def info(self) -> defer.Deferred[dict[str, Any]]:
        return self._json("GET", "/")

    def stats(self) -> defer.Deferred[dict[str, Any]]:
        return self._json("GET", "/stats")

    def submit_code(self, code: str, language: str = "python", *,
                    args: list[str] | None = None, stdin: str | None = None,
                    timeout: int | None = None,
                    manifest: Mapping[str, Any] | None = None) -> defer.Deferred[Submitted]:
        try:
            document = bodies.code_document(code, language, args=args, stdin=stdin,
                                            timeout=timeout, manifest=manifest)
        except ValueError:
            return defer.fail()
        return self.submit_json(document)

    def submit_files(self, files: Mapping[str, str | bytes],
                     manifest: Mapping[str, Any] | None = None) -> defer.Deferred[Submitted]:
        return self.submit_json(bodies.files_document(files, manifest))

    def submit_json(self, document: Mapping[str, Any]) -> defer.Deferred[Submitted]:
        data = json.dumps(dict(document)).encode("utf-8")
        d = self._request("POST", "/submit", data=data,
                          headers={"Content-Type": ["application/json"]})
        return d.addCallback(_json_body).addCallback(Submitted.from_json)

    @defer.inlineCallbacks
    def submit_directory(self, path: str, manifest: Mapping[str, Any] | None = None, *,
                         ignore: IgnoreRules | None = None) -> Any:
        """Pack ``path`` (in a thread) and upload it as one ``.tar.gz``."""
        with tempfile.NamedTemporaryFile(prefix="sandrun-", suffix=".tar.gz") as archive:
            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                            _pack, path, archive, ignore)
            form = bodies.MultipartBody(bodies.archive_parts(archive.name, manifest))
            response = yield self._request(
                "POST", "/submit", data=_MultipartProducer(form),
                headers={"Content-Type": [form.content_type]})
            document = yield _json_body(response)
        return Submitted.from_json(document)

    # -- following a job --------------------------------------------------------------------

    def status(self, job_id: str, *, wait: float | None = None) -> defer.Deferred[Job]:
        """``GET /status``; with ``wait``, a long poll (answered at the end or after
        ``wait`` seconds)."""
        path = f"/status/{segment(job_id)}"
        if not wait:
            return self._json("GET", path).addCallback(Job.from_json)
        d = self._request("GET", f"{path}?wait={wait:g}", timeout=self.timeout + wait)
        return d.addCallback(_json_body).addCallback(Job.from_json)

    @defer.inlineCallbacks
    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval: float = 0.2,
             max_interval: float = 2.0) -> Any:
        """Wait (on the reactor's clock) by long polls of ``/status`` until the job has
        finished (``calls.Polling``)."""
        polling = Polling(job_id, timeout, self.reactor.seconds(), poll_interval=poll_interval,
                          max_interval=max_interval)
        while True:
            held = polling.hold(self.reactor.seconds())
            asked = self.reactor.seconds()
            job = yield self.status(job_id, wait=held)
            if job.finished:
                return job
            pause = polling.pause(job, self.reactor.seconds(), asked=asked, held=held)
            yield task.deferLater(self.reactor, pause, lambda: None)

    def run(self, code: str | None = None, language: str = "python", *,
            files: Mapping[str, str | bytes] | None = None,
            manifest: Mapping[str, Any] | None = None, args: list[str] | None = None,
            stdin: str | None = None, timeout: int | None = None, keep: bool = True,
            wait_timeout: float | None = None) -> defer.Deferred[RunResult]:
        """Run ``code`` or ``files`` with one ``POST /run``; fires with the whole result.

        As ``SandrunClient.run``: ``keep=False`` deletes the job once answered;
        ``wait_timeout`` (None: no limit) bounds the wait, and cancelling the
        Deferred (or the timeout) closes the connection, which cancels the job.
        """
        try:
            document = bodies.run_document(code, language, files=files, manifest=manifest,
                                           args=args, stdin=stdin, timeout=timeout)
        except ValueError:
            return defer.fail()
        data = json.dumps(document).encode("utf-8")
        d = self._request("POST", "/run" if keep else "/run?keep=0", data=data,
                          headers={"Content-Type": ["application/json"]},
                          timeout=wait_timeout)
        return d.addCallback(_json_body).addCallback(RunResult.from_json)

    def logs(self, job_id: str) -> defer.Deferred[Logs]:
        return self._json("GET", f"/logs/{segment(job_id)}").addCallback(Logs.from_json)

    def outputs(self, job_id: str) -> defer.Deferred[Outputs]:
        return self._json("GET", f"/outputs/{segment(job_id)}").addCallback(Outputs.from_json)

    def download(self, job_id: str, path: str) -> defer.Deferred[bytes]:
        d = self._request("GET", f"/download/{segment(job_id)}/{output_path(path)}")
        return d.addCallback(lambda response: response.content())

    @defer.inlineCallbacks
    def download_all(self, job_id: str, dest_dir: str, max_bytes: int | None = None) -> Any:
        """Every output, extracted safely (in a thread) into ``dest_dir``; the paths written."""
        import treq

        response = yield self._request("GET", f"/download/{segment(job_id)}")
        with tempfile.TemporaryFile() as spool:

            def save(data: bytes) -> None:
                spool.write(data)

            yield treq.collect(response, save)
            spool.seek(0)
            written = yield threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), extract_archive, spool, dest_dir,
                max_bytes)
        return written

    def cancel(self, job_id: str) -> defer.Deferred[Cancelled]:
        d = self._json("DELETE", f"/jobs/{segment(job_id)}")
        return d.addCallback(Cancelled.from_json)

    def verify(self, job: Job | str, worker_id: str) -> defer.Deferred[bool]:
        from sandrun.identity import verify_result

        d = self.status(job) if isinstance(job, str) else defer.succeed(job)
        return d.addCallback(lambda found: verify_result(found.raw, worker_id))

    def stream(self, job_id: str,
               on_event: Callable[[StreamEvent], None]) -> defer.Deferred[Done | None]:
        """Live output: ``on_event`` gets each event; fires with the ``Done`` event at the end.

        Fails with ``NotFoundError`` (close code 4404), ``StreamUnavailableError``
        (the server did not upgrade) or ``SandrunConnectionError``.
        """
        host = self._parsed.hostname or "127.0.0.1"
        finished: defer.Deferred[Done | None] = defer.Deferred()
        factory = _StreamFactory(stream_url(self._parsed, job_id), on_event, finished)
        endpoint: Any = HostnameEndpoint(self.reactor, host, default_port(self._parsed),
                                         timeout=self.timeout)
        if self._parsed.scheme == "https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)

        def unreachable(failure: Any) -> None:
            if not finished.called:
                finished.errback(_connection_error(self.server_url, failure.value))

        endpoint.connect(factory).addErrback(unreachable)
        return finished

    # -- HTTP ---------------------------------------------------------------------------------

    def _json(self, method: str, path: str) -> defer.Deferred[Any]:
        return self._request(method, path).addCallback(_json_body)

    def _request(self, method: str, path: str, **kwargs: Any) -> defer.Deferred[Any]:
        headers = {"User-Agent": [f"sandrun-client/{__version__}"],
                   "Accept": ["application/json"], **kwargs.pop("headers", {})}
        url = self.server_url + path
        timeout = kwargs.pop("timeout", self.timeout)
        if timeout is not None:
            kwargs["timeout"] = timeout
        d = self._http.request(method, url, headers=headers, **kwargs)

        def failed(failure: Any) -> Any:
            if failure.check(*_CONNECTION_ERRORS) or isinstance(failure.value, OSError):
                raise _connection_error(self.server_url, failure.value)
            return failure

        def check(response: Any) -> Any:
            if response.code < 400:
                return response
            got = response.content()

            def raise_error(data: bytes) -> None:
                names = {k.decode("latin-1").lower(): v[0].decode("latin-1")
                         for k, v in response.headers.getAllRawHeaders()}
                raise error_from_response(response.code, data, names)

            return got.addCallback(raise_error)

        return d.addCallbacks(check, failed)


def _pack(path: str, archive: Any, ignore: IgnoreRules | None) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory")
    pack_directory(path, archive, ignore)
    archive.flush()


def _json_body(response: Any) -> defer.Deferred[Any]:
    d: defer.Deferred[Any] = response.content()
    return d.addCallback(lambda data: json_answer(response.code, data))


def _connection_error(url: str, e: BaseException) -> SandrunError:
    if isinstance(e, ResponseFailed) and e.reasons:
        e = e.reasons[0].value
    return SandrunConnectionError(f"Cannot reach {url}", str(e) or type(e).__name__)


@implementer(IBodyProducer)
class _MultipartProducer:
    """A multipart body with a known length, written cooperatively (file reads are small)."""

    def __init__(self, form: bodies.MultipartBody) -> None:
        self.form = form
        self.length = form.length
        self._task: task.CooperativeTask | None = None

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        self._task = task.cooperate(consumer.write(chunk) for chunk in self.form.chunks())
        d: defer.Deferred[Any] = self._task.whenDone()
        return d.addCallback(lambda _: None)

    def pauseProducing(self) -> None:
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None:
            self._task.resume()

    def stopProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.stop()
            except task.TaskFinished:
                pass


class _StreamFactory(WebSocketClientFactory):  # type: ignore[misc]
    """One stream's connection: where its events go and the Deferred it fires."""

    def __init__(self, url: str, on_event: Callable[[StreamEvent], None],
                 finished: defer.Deferred[Done | None]) -> None:
        super().__init__(url, useragent=f"sandrun-client/{__version__}")
        self.protocol = _StreamProtocol
        self.on_event = on_event
        self.finished = finished


class _StreamProtocol(WebSocketClientProtocol):  # type: ignore[misc]
    """Feeds JSON frames to ``factory.on_event``; fires ``factory.finished`` on close."""

    opened = False
    done: Done | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            event = parse_frame(payload)
        except ProtocolError as e:
            self._finish(failure=e)
            self.sendClose(1002)  # protocol error: the frames are not the contract's
            return
        if event is None:
            return
        if isinstance(event, Done):
            self.done = event
        self.factory.on_event(event)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened:
            self._finish(failure=StreamUnavailableError(
                "Streaming unavailable", reason or "the WebSocket handshake failed"))
        elif code == 4404:
            self._finish(failure=NotFoundError("Job not found", reason or "", status=404))
        elif code == 1000 or self.done is not None:
            self._finish()
        else:
            self._finish(failure=SandrunConnectionError(
                "Stream interrupted", f"the connection closed (code {code})"))

    def _finish(self, failure: Exception | None = None) -> None:
        finished: defer.Deferred[Done | None] = self.factory.finished
        if finished.called:
            return
        if failure is None:
            finished.callback(self.done)
        else:
            finished.errback(failure)
