"""``SandrunClient``: a blocking client for one Sandrun worker or coordinator.

HTTP goes through the standard library (``http.client``), one connection per
request; live output comes over the WebSocket with the ``websockets`` sync
API.  Every error answer becomes an exception from ``sandrun.client.errors``
that carries the server's ``error``, ``details``, ``reason`` and
``retry_after``.

    client = SandrunClient("http://127.0.0.1:8443")
    job = client.submit_code("print(6 * 7)")
    for event in client.stream(job.job_id):
        ...
    result = client.wait(job.job_id, timeout=60)
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sandrun import __version__
from sandrun.client import body as bodies
from sandrun.client.calls import (
    DEFAULT_URL,
    Polling,
    default_port,
    json_answer,
    output_path,
    parse_server_url,
    segment,
    server_url_from_env,
    stream_url,
)
from sandrun.client.errors import (
    NotFoundError,
    SandrunConnectionError,
    SandrunError,
    StreamUnavailableError,
    WaitTimeoutError,
    connection_problem,
    error_from_response,
)
from sandrun.client.models import (
    Cancelled,
    Job,
    Logs,
    Outputs,
    RunResult,
    StreamEvent,
    Submitted,
    parse_frame,
)
from sandrun.client.pack import (
    IgnoreRules,
    PackResult,
    extract_archive,
    pack_directory,
    write_output,
)

__all__ = ["DEFAULT_URL", "SandrunClient", "server_url_from_env"]

Progress = Callable[[int, int], None]
_READ_CHUNK = 256 * 1024
# Errors of the connection while a body is read (local file errors are other OSErrors).
_NETWORK_ERRORS = (ConnectionError, TimeoutError, http.client.HTTPException)


@dataclass(frozen=True)
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json_answer(self.status, self.body)


class SandrunClient:
    """A blocking client; safe to share between threads (no state but the address)."""

    def __init__(self, server_url: str | None = None, *, timeout: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``timeout`` bounds each network operation (connect, one read), not a whole job."""
        self.server_url, self._parsed = parse_server_url(server_url)
        self._scheme = self._parsed.scheme
        self._host = self._parsed.hostname or ""
        self._port = default_port(self._parsed)
        self._prefix = self._parsed.path.rstrip("/")
        self.timeout = timeout
        self._ssl = ssl_context
        self._clock = clock
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"SandrunClient({self.server_url!r})"

    # -- service --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /``: version, effective limits, worker id."""
        return self._json("GET", "/")

    def health(self, nonce: str | None = None) -> dict[str, Any]:
        return self._json("GET", "/health", query={"nonce": nonce} if nonce else None)

    def stats(self) -> dict[str, Any]:
        """``GET /stats``: this client's quota and the system's load."""
        return self._json("GET", "/stats")

    def environments(self) -> dict[str, Any]:
        return self._json("GET", "/environments")

    # -- submitting -----------------------------------------------------------------------

    def submit_code(self, code: str, language: str = "python", *,
                    args: list[str] | None = None, stdin: str | None = None,
                    timeout: int | None = None,
                    manifest: Mapping[str, Any] | None = None) -> Submitted:
        """Run ``code`` as a one-file job; ``manifest`` adds or overrides manifest fields."""
        return self.submit_json(bodies.code_document(code, language, args=args, stdin=stdin,
                                                     timeout=timeout, manifest=manifest))

    def submit_files(self, files: Mapping[str, str | bytes],
                     manifest: Mapping[str, Any] | None = None) -> Submitted:
        """Upload ``{path: content}`` (text, or bytes sent as base64) with a manifest."""
        return self.submit_json(bodies.files_document(files, manifest))

    def submit_json(self, document: Mapping[str, Any]) -> Submitted:
        """``POST /submit`` with a ready JSON body ``{"manifest", "files"}``."""
        data = json.dumps(dict(document)).encode("utf-8")
        response = self._call("POST", "/submit", data, "application/json")
        return Submitted.from_json(response.json())

    def submit_directory(self, path: str, manifest: Mapping[str, Any] | None = None, *,
                         ignore: IgnoreRules | None = None,
                         progress: Progress | None = None) -> Submitted:
        """Pack ``path`` (honouring its ``.sandrunignore``) and upload it as one ``.tar.gz``.

        Without ``manifest`` the directory must hold ``job.json``.
        """
        submitted, _ = self.submit_directory_packed(path, manifest, ignore=ignore,
                                                    progress=progress)
        return submitted

    def submit_directory_packed(self, path: str, manifest: Mapping[str, Any] | None = None, *,
                                ignore: IgnoreRules | None = None,
                                progress: Progress | None = None,
                                ) -> tuple[Submitted, PackResult]:
        """``submit_directory``, also returning what was packed and what was skipped."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory")
        with tempfile.NamedTemporaryFile(prefix="sandrun-", suffix=".tar.gz") as archive:
            packed = pack_directory(path, archive, ignore)
            archive.flush()
            parts = bodies.archive_parts(archive.name, manifest)
            return self._submit_multipart(parts, progress), packed

    def submit_file(self, path: str, manifest: Mapping[str, Any] | None = None, *,
                    progress: Progress | None = None) -> Submitted:
        """Upload one file; it is the entrypoint unless ``manifest`` says otherwise."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} is not a file")
        parts = [bodies.Part("files", filename=os.path.basename(path), path=path)]
        if manifest is not None:
            parts.append(bodies.manifest_part(manifest))
        return self._submit_multipart(parts, progress)

    def _submit_multipart(self, parts: list[bodies.Part], progress: Progress | None) -> Submitted:
        form = bodies.MultipartBody(parts)
        response = self._call("POST", "/submit", form, form.content_type, progress=progress)
        return Submitted.from_json(response.json())

    # -- following a job ------------------------------------------------------------------

    def status(self, job_id: str, *, wait: float | None = None) -> Job:
        """``GET /status``; with ``wait`` the server holds the answer until the job
        ends or ``wait`` seconds have passed (a long poll)."""
        path = f"/status/{segment(job_id)}"
        if not wait:
            return Job.from_json(self._json("GET", path))
        response = self._call("GET", path, query={"wait": f"{wait:g}"},
                              read_timeout=self.timeout + wait)
        return Job.from_json(response.json())

    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval: float = 0.2,
             max_interval: float = 2.0) -> Job:
        """Wait until the job has finished, by long polls of ``/status`` (``calls.Polling``).

        Raises ``WaitTimeoutError`` after ``timeout`` seconds (the job goes on).
        """
        polling = Polling(job_id, timeout, self._clock(), poll_interval=poll_interval,
                          max_interval=max_interval)
        while True:
            held = polling.hold(self._clock())
            asked = self._clock()
            job = self.status(job_id, wait=held)
            if job.finished:
                return job
            self._sleep(polling.pause(job, self._clock(), asked=asked, held=held))

    def run(self, code: str | None = None, language: str = "python", *,
            files: Mapping[str, str | bytes] | None = None,
            manifest: Mapping[str, Any] | None = None, args: list[str] | None = None,
            stdin: str | None = None, timeout: int | None = None, keep: bool = True,
            wait_timeout: float | None = None) -> RunResult:
        """Run ``code`` (in ``language``) or ``files`` and return the whole result.

        One request (``POST /run``): the answer comes when the job has ended, with
        its status, ``stdout``, ``stderr`` and outputs.  ``keep=False`` has the
        server delete the job once answered (nothing to download later).
        ``wait_timeout`` bounds the wait in seconds (None: as long as the job and
        its place in the queue take); past it the connection is closed, which
        cancels the job.
        """
        document = bodies.run_document(code, language, files=files, manifest=manifest,
                                       args=args, stdin=stdin, timeout=timeout)
        data = json.dumps(document).encode("utf-8")
        response = self._call("POST", "/run", data, "application/json",
                              query=None if keep else {"keep": "0"}, read_timeout=wait_timeout,
                              bounded=wait_timeout is not None)
        return RunResult.from_json(response.json())

    def logs(self, job_id: str) -> Logs:
        return Logs.from_json(self._json("GET", f"/logs/{segment(job_id)}"))

    def logs_text(self, job_id: str) -> str:
        """stdout and stderr combined, in the order they arrived."""
        response = self._call("GET", f"/logs/{segment(job_id)}", query={"format": "text"})
        return response.body.decode("utf-8", "replace")

    def stream(self, job_id: str, *, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Live output: every chunk so far, then each new one, then ``Done``.

        Yields ``OutputChunk``, ``StatusUpdate`` and, last, ``Done``.  Raises
        ``NotFoundError`` for an unknown job, ``StreamUnavailableError`` when the
        server does not upgrade to a WebSocket (poll ``wait``/``logs`` instead),
        ``WaitTimeoutError`` after ``timeout`` seconds in all.
        """
        try:
            from websockets.exceptions import (
                ConnectionClosedError,
                ConnectionClosedOK,
                InvalidHandshake,
                InvalidStatus,
            )
            from websockets.sync.client import connect
        except ImportError:
            raise StreamUnavailableError("Streaming unavailable",
                                         "install the 'websockets' package") from None
        url = stream_url(self._parsed, job_id)
        try:
            ws = connect(url, open_timeout=self.timeout, ssl=self._ssl_for_ws(), proxy=None,
                         max_size=16 * 1024 * 1024, compression=None,
                         user_agent_header=f"sandrun-client/{__version__}")
        except InvalidStatus as e:
            status = e.response.status_code
            raise StreamUnavailableError("Streaming unavailable",
                                         f"the server answered HTTP {status} to the upgrade",
                                         status=status) from None
        except InvalidHandshake as e:
            raise StreamUnavailableError("Streaming unavailable", str(e)) from None
        except (OSError, TimeoutError) as e:
            raise self._unreachable(e) from None
        deadline = None if timeout is None else self._clock() + timeout
        with ws:
            while True:
                wait = None if deadline is None else max(deadline - self._clock(), 0.0)
                try:
                    message = ws.recv(timeout=wait)
                except TimeoutError:
                    raise WaitTimeoutError("Stream timed out",
                                           f"no end of {job_id} within {timeout} s") from None
                except ConnectionClosedOK:
                    return
                except ConnectionClosedError as e:
                    code = e.rcvd.code if e.rcvd is not None else None
                    if code == 4404:
                        raise NotFoundError("Job not found", e.rcvd.reason if e.rcvd else "",
                                            status=404) from None
                    raise SandrunConnectionError("Stream interrupted",
                                                 f"the connection closed (code {code})") from None
                event = parse_frame(message)
                if event is not None:
                    yield event

    def outputs(self, job_id: str) -> Outputs:
        return Outputs.from_json(self._json("GET", f"/outputs/{segment(job_id)}"))

    def download(self, job_id: str, path: str) -> bytes:
        """One output file's bytes (the job's data stays on the server)."""
        return self._call("GET", f"/download/{segment(job_id)}/{output_path(path)}").body

    def download_to(self, job_id: str, path: str, dest_dir: str) -> str:
        """Stream one output to ``dest_dir/path`` (no ``..``, no links); the file written."""
        with self._open("GET", f"/download/{segment(job_id)}/{output_path(path)}") as response:
            try:
                return write_output(dest_dir, path, _read_chunks(response))
            except _NETWORK_ERRORS as e:
                raise self._unreachable(e) from None

    def download_all(self, job_id: str, dest_dir: str,
                     max_bytes: int | None = None) -> list[str]:
        """Every output, extracted safely into ``dest_dir``; the relative paths written.

        The server deletes the job's data once the archive is sent, so ask for
        ``status`` first if you need it.
        """
        with self._open("GET", f"/download/{segment(job_id)}") as response:
            try:
                return extract_archive(response, dest_dir, max_bytes)
            except _NETWORK_ERRORS as e:
                raise self._unreachable(e) from None

    def cancel(self, job_id: str) -> Cancelled:
        """Cancel a queued or running job and delete its data (a finished one: just delete)."""
        return Cancelled.from_json(self._json("DELETE", f"/jobs/{segment(job_id)}"))

    def verify(self, job: Job | Mapping[str, Any] | str, worker_id: str) -> bool:
        """Whether the job's result is signed by ``worker_id`` and matches what /status shows.

        ``job`` is a ``Job``, a raw /status document, or a job id (fetched now).
        """
        from sandrun.identity import verify_result

        if isinstance(job, str):
            job = self.status(job)
        document = job.raw if isinstance(job, Job) else job
        return verify_result(document, worker_id)

    # -- HTTP -----------------------------------------------------------------------------

    def _json(self, method: str, path: str, query: Mapping[str, str] | None = None) -> Any:
        return self._call(method, path, query=query).json()

    def _call(self, method: str, path: str, body: bytes | bodies.MultipartBody | None = None,
              content_type: str | None = None, *, query: Mapping[str, str] | None = None,
              progress: Progress | None = None, read_timeout: float | None = None,
              bounded: bool = True) -> _Response:
        """One request; ``read_timeout`` replaces ``timeout`` for this one (unbounded
        with ``bounded=False``: a ``/run`` waits as long as its job)."""
        with self._open(method, path, body, content_type, query=query, progress=progress,
                        read_timeout=read_timeout, bounded=bounded) as response:
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as e:
                raise self._unreachable(e) from None
            return _Response(response.status, _headers(response), data)

    @contextmanager
    def _open(self, method: str, path: str, body: bytes | bodies.MultipartBody | None = None,
              content_type: str | None = None, *, query: Mapping[str, str] | None = None,
              progress: Progress | None = None, read_timeout: float | None = None,
              bounded: bool = True) -> Iterator[http.client.HTTPResponse]:
        """Send a request; the open response of a 2xx answer, else the error it maps to."""
        conn = self._connection()
        if read_timeout is not None or not bounded:
            conn.timeout = read_timeout  # applied once connected, to every read
        try:
            yield self._send(conn, method, path, body, content_type, query, progress)
        finally:
            conn.close()

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str,
              body: bytes | bodies.MultipartBody | None, content_type: str | None,
              query: Mapping[str, str] | None,
              progress: Progress | None) -> http.client.HTTPResponse:
        target = self._prefix + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            conn.putheader("User-Agent", f"sandrun-client/{__version__}")
            conn.putheader("Accept", "application/json")
            if body is not None:
                length = body.length if isinstance(body, bodies.MultipartBody) else len(body)
                conn.putheader("Content-Type", content_type or "application/octet-stream")
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if body is not None:
                self._send_body(conn, body, progress)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None
        if response.status >= 400:
            try:
                data = response.read()
            except (OSError, http.client.HTTPException):
                data = b""
            raise error_from_response(response.status, data, _headers(response))
        return response

    def _send_body(self, conn: http.client.HTTPConnection,
                   body: bytes | bodies.MultipartBody, progress: Progress | None) -> None:
        chunks = body.chunks(progress) if isinstance(body, bodies.MultipartBody) else [body]
        try:
            for chunk in chunks:
                conn.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            # The worker refuses an upload over its limit (413) without reading it,
            # then closes: its answer is already waiting for us.  getresponse()
            # reads it, or raises the connection error if there is none.
            pass

    def _connection(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _unreachable(self, e: BaseException) -> SandrunError:
        return SandrunConnectionError(f"Cannot reach {self.server_url}",
                                      connection_problem(e, self._scheme, self.timeout))

    def _ssl_for_ws(self) -> ssl.SSLContext | None:
        if self._scheme != "https":
            return None
        return self._ssl or ssl.create_default_context()


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {name.lower(): value for name, value in response.getheaders()}


def _read_chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while chunk := response.read(_READ_CHUNK):
        yield chunk

