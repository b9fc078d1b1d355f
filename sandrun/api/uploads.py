"""The HTTP edge: request bodies capped and spooled to tmpfs, parsed as a stream.

``UploadRequest`` replaces twisted.web's request so that

- a ``Content-Length`` over the limit is answered 413 before the body is read,
  and a chunked body is cut off with 413 as soon as it passes the limit (a
  JSON body has its own, smaller cap: it is parsed whole);
- a submission the worker could not take now (queue full, the client over its
  quota) is refused from its headers alone, before the upload is read, and so
  is a body sent to a route that takes none, or one past the budget of upload
  bytes in flight per client address and in all (``sandrun.connections``);
- the body is spooled to an unlinked file on the worker's tmpfs, never to
  disk and never whole in the worker's memory;
- twisted.web does not parse multipart bodies into memory itself: we do, as a
  stream, with python-multipart, writing each part straight to the job's tmpfs.

``WorkerSite`` answers malformed HTTP (bad ``Content-Length``, huge headers)
with a JSON 400 and keeps an access log without job content: method, the
endpoint, the job id and the status, never output file names or queries.
"""

from __future__ import annotations

import os
import stat
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from twisted.logger import Logger
from twisted.web import server

from sandrun.config import Limits
from sandrun.connections import BodyRoutes, GuardedChannel, UploadBudget
from sandrun.httpjson import RawBodyRequest
from sandrun.jobs import workspace
from sandrun.jobs.manifest import (
    ALLOWED_INTERPRETERS,
    EXTENSION_INTERPRETERS,
    Manifest,
    ManifestError,
    loads_strict,
    parse_manifest,
    parse_manifest_json,
)
from sandrun.jobs.workspace import InputFiles, UploadError

log = Logger()
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MAX_MANIFEST_BYTES = 1024 * 1024  # a manifest form field or job.json
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024  # the JSON body form is parsed whole: snippets only
READ_CHUNK = 65536
SPOOL_IN_MEMORY = 64 * 1024  # bodies up to this stay in memory (GETs, small JSON)


SUBMISSION_PATHS = frozenset({b"/submit", b"/run"})  # admitted from their headers

# An early answer to a request: (status, JSON body, extra headers).
Refusal = tuple[int, dict[str, Any], dict[str, str]]


class UploadRequest(RawBodyRequest):
    """A request whose body is capped and spooled to the worker's tmpfs."""

    max_body_bytes = 100 * 1000 * 1000
    spool_dir: str | None = None
    # Asked from the headers of POST /submit and /run whether the job could be taken at all.
    admission: Callable[[Any], Refusal | None] | None = None

    _received = 0
    _chunked = False

    def _body_limit(self) -> int:
        kind, _ = parse_options_header(self.requestHeaders.getRawHeaders(b"content-type",
                                                                         [b""])[0])
        if kind == b"application/json":
            return min(self.max_body_bytes, MAX_JSON_BODY_BYTES)
        return self.max_body_bytes

    def gotLength(self, length: int | None) -> None:
        # Kept open as the request's body until twisted.web cleans the request up.
        self.content = tempfile.SpooledTemporaryFile(  # type: ignore[assignment]  # noqa: SIM115
            SPOOL_IN_MEMORY, dir=self.spool_dir)
        if length is not None and length > self._body_limit():
            self._refuse(413, "Upload too large",
                         f"the limit is {self._body_limit()} bytes; Content-Length is {length}")
            return
        self._chunked = length is None
        if self.refuse_early(length):  # a body where none is taken; over the in-flight budget
            return
        admission = type(self).admission
        if admission is not None and self._is_submission():
            refusal = admission(self)
            if refusal is not None:
                self.answer(*refusal)

    def _is_submission(self) -> bool:
        # Method and path are the channel's until requestReceived copies them over;
        # without them (another twisted) the route refuses later, after the body.
        command = getattr(self.channel, "_command", None)
        path = getattr(self.channel, "_path", None) or b""
        # Decoded as the router decodes it: "/%73ubmit" is "/submit".
        decoded = b"/".join(urllib.parse.unquote_to_bytes(part)
                            for part in path.split(b"?", 1)[0].split(b"/"))
        return command == b"POST" and decoded in SUBMISSION_PATHS

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._body_limit():
            self._refuse(413, "Upload too large",
                         f"the limit is {self._body_limit()} bytes; the body went past it")
            return
        if self._chunked and not self.take_budget(len(data)):
            return
        try:
            super().handleContentChunk(data)
        except OSError:  # the spool tmpfs is full: too many uploads at once
            self.answer(503, {"error": "Storage full", "retry_after": 30,
                               "details": "the worker cannot take this upload now"},
                         {"Retry-After": "30"})

    def _refuse(self, status: int, error: str, details: str) -> None:
        self.answer(status, {"error": error, "details": details})


# The first byte of a TLS handshake record: a client speaking https:// to a plain port.
_TLS_HANDSHAKE = b"\x16"


class WorkerChannel(GuardedChannel):
    """The worker's HTTP/1.1 channel: a header deadline, malformed requests answered in JSON.

    A TLS ClientHello on this plain-HTTP port is closed at once: it holds no
    line end, so it would otherwise wait for the rest of a request line until
    the header deadline, and the client could tell nobody what was wrong.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[:1] == _TLS_HANDSHAKE:
                self.loseConnection()  # nothing was written: it closes at once
                return
        super().dataReceived(data)


# Endpoints whose second path segment is a job id; anything after it (an
# output's file name) is job content and never logged.
_LOGGED_ENDPOINTS = frozenset({"", "submit", "run", "runtimes", "status", "logs", "outputs",
                               "download", "jobs",
                               "stats", "environments", "health", "stream"})


def log_route(path: bytes) -> str:
    """The part of a request path that may be logged: endpoint and job id only."""
    parts = path.split(b"?", 1)[0].decode("latin-1").split("/")
    endpoint = parts[1] if len(parts) > 1 else ""
    if endpoint not in _LOGGED_ENDPOINTS:
        return "/(unknown)"
    route = "/" + endpoint
    if len(parts) > 2 and parts[2]:
        job = parts[2]
        route += "/" + (job if job.startswith("job-") and len(job) <= 64
                        and job.isascii() and job.replace("-", "").replace("_", "").isalnum()
                        else "(invalid)")
    if len(parts) > 3:
        route += "/..."
    return route


class WorkerSite(server.Site):
    """The worker's site: our channel, and an access log with no job content."""

    protocol = WorkerChannel  # type: ignore[assignment]
    noisy = False  # no "Starting factory <...WorkerSite object at 0x...>" line

    def log(self, request: Any) -> None:
        log.info("{method} {route} {code} {length}",
                 method=request.method.decode("latin-1")[:16],
                 route=log_route(request.path or b""), code=request.code,
                 length=request.sentLength)


def request_factory(limits: Limits, spool_dir: str,
                    admission: Callable[[Any], Refusal | None] | None = None,
                    body_routes: BodyRoutes | None = None,
                    upload_budget: UploadBudget | None = None) -> type[UploadRequest]:
    """The worker's request class: its upload cap, spool directory and early refusals
    (admission of a submission; a body its route does not take; the in-flight budget)."""
    return type("SandrunRequest", (UploadRequest,),
                {"max_body_bytes": limits.max_upload_bytes, "spool_dir": spool_dir,
                 "admission": staticmethod(admission) if admission else None,
                 "body_routes": body_routes, "upload_budget": upload_budget})


@dataclass
class Submission:
    manifest: Manifest
    inputs: InputFiles


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    path: str | None = None  # staging file for uploads
    file: BinaryIO | None = None
    data: bytearray = field(default_factory=bytearray)  # small form fields


def parse_submission(content_type: bytes | None, body: BinaryIO, work: str, staging: str,
                     limits: Limits) -> Submission:
    """Store the upload in ``work`` and return the validated manifest.

    Raises ``Unsupported`` (415) for a content type that is neither
    multipart nor JSON, ``UploadError`` or ``ManifestError`` (400) for a bad
    upload.  Blocks on file I/O: run it in a thread.
    """
    if not content_type:
        raise Unsupported("no Content-Type")
    kind, options = parse_options_header(content_type)
    body.seek(0)
    inputs = InputFiles(limits)
    if kind == b"application/json":
        return _parse_json(body, work, limits, inputs)
    if kind == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise UploadError("Content-Type", "multipart without a boundary")
        return _parse_multipart(body, boundary, work, staging, limits, inputs)
    raise Unsupported(kind.decode("latin-1")[:100])


class Unsupported(Exception):
    """The body is neither multipart/form-data nor JSON (a 415)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _parse_json(body: BinaryIO, work: str, limits: Limits, inputs: InputFiles) -> Submission:
    data = body.read(MAX_JSON_BODY_BYTES + 1)
    if len(data) > MAX_JSON_BODY_BYTES:
        raise UploadError("body", f"a JSON body is at most {MAX_JSON_BODY_BYTES} bytes; "
                                  "send larger uploads as multipart/form-data")
    document = loads_strict(data, "body")
    if not isinstance(document, dict):
        raise ManifestError("body", "must be a JSON object with manifest and files")
    unknown = sorted(set(document) - {"manifest", "files"})
    if unknown:
        raise ManifestError(unknown[0], "unknown field " + ", ".join(unknown))
    files = document.get("files", {})
    workspace.write_files_json(files, work, limits, inputs)
    stored = inputs.files
    single = stored[0].path if len(stored) == 1 else None
    manifest = parse_manifest(document.get("manifest", {}), limits, default_entrypoint=single)
    _check_entrypoint(manifest, inputs, work)
    return Submission(manifest, inputs)


def _header_text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError(value.decode("utf-8", "replace"), f"{what} is not valid UTF-8") \
            from None


def _parse_multipart(body: BinaryIO, boundary: bytes, work: str, staging: str, limits: Limits,
                     inputs: InputFiles) -> Submission:
    parts: list[_Part] = []
    header: dict[str, bytes] = {"field": b"", "value": b""}
    headers: dict[bytes, bytes] = {}
    ended: list[bool] = []

    def on_part_begin() -> None:
        headers.clear()
        if len(parts) >= limits.max_archive_members:
            raise UploadError("body", f"more than {limits.max_archive_members} parts")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]
        if len(header["value"]) > MAX_MANIFEST_BYTES:
            raise UploadError("body", "part header too large")

    def on_header_end() -> None:
        headers[header["field"].lower()] = header["value"]
        header["field"] = header["value"] = b""

    def on_headers_finished() -> None:
        part = parts[-1]
        _, opts = parse_options_header(headers.get(b"content-disposition", b""))
        part.name = _header_text(opts.get(b"name", b""), "form field name")
        if b"filename" in opts:
            part.filename = _header_text(opts[b"filename"], "file name")
            fd, part.path = tempfile.mkstemp(dir=staging)
            part.file = os.fdopen(fd, "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        if part.file is not None:
            try:
                part.file.write(data[start:end])
            except OSError:
                raise UploadError(part.filename or "body",
                                  "no space left for the job's files") from None
        else:
            part.data += data[start:end]
            if len(part.data) > MAX_MANIFEST_BYTES:
                raise UploadError(part.name or "form field", "form field too large")

    def on_part_end() -> None:
        if parts[-1].file is not None:
            parts[-1].file.close()  # type: ignore[union-attr]

    def on_end() -> None:
        ended.append(True)

    callbacks: Any = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                      "on_header_value": on_header_value, "on_header_end": on_header_end,
                      "on_headers_finished": on_headers_finished,
                      "on_part_data": on_part_data, "on_part_end": on_part_end,
                      "on_end": on_end}
    try:
        try:
            parser = MultipartParser(boundary, callbacks)
            while chunk := body.read(READ_CHUNK):
                parser.write(chunk)
            parser.finalize()
        except UploadError:
            raise
        except Exception as e:  # noqa: BLE001 (whatever the parser raises is a bad body)
            raise UploadError("body", f"malformed multipart: {e}") from None
        finally:
            for part in parts:
                if part.file is not None and not part.file.closed:
                    part.file.close()
        if not ended:
            raise UploadError("body", "malformed multipart: no closing boundary (truncated?)")
        return _store_parts(parts, work, limits, inputs)
    finally:
        for part in parts:
            if part.path is not None and os.path.exists(part.path):
                os.unlink(part.path)


def _store_parts(parts: list[_Part], work: str, limits: Limits,
                 inputs: InputFiles) -> Submission:
    manifest_text: bytes | None = None
    singles: list[str] = []
    archives = 0
    for part in parts:
        if part.filename is None:
            if part.name == "manifest":
                if manifest_text is not None:
                    raise UploadError("manifest", "given twice")
                manifest_text = bytes(part.data)
            elif part.name not in ("files", ""):
                raise UploadError(part.name, "unknown form field")
            continue
        assert part.path is not None
        with open(part.path, "rb") as f:
            if part.filename.lower().endswith(ARCHIVE_SUFFIXES):
                archives += 1
                workspace.extract_archive(f, work, limits, inputs, archive_name=part.filename)
            else:
                stored = workspace.store_file(part.filename, f, work, limits, inputs)
                singles.append(stored.path)
        os.unlink(part.path)
    if not singles and not archives:
        raise UploadError("files", "no file uploaded")
    if manifest_text is None:
        manifest_text = _read_job_json(work)
    default_entrypoint = singles[0] if len(singles) == 1 and not archives else None
    if manifest_text is None:
        if default_entrypoint is None:
            raise ManifestError("manifest", "missing: send a manifest field or job.json")
        manifest_text = b"{}"
    manifest = parse_manifest_json(manifest_text, limits, default_entrypoint=default_entrypoint)
    _check_entrypoint(manifest, inputs, work)
    return Submission(manifest, inputs)


def _read_job_json(work: str) -> bytes | None:
    """``job.json`` at the upload's root, if it is there as a regular file."""
    try:
        fd = os.open(os.path.join(work, "job.json"),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        raise ManifestError("job.json", "cannot be read") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ManifestError("job.json", "must be a regular file")
    with os.fdopen(fd, "rb") as f:
        text = f.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError("job.json", f"larger than {MAX_MANIFEST_BYTES} bytes")
    return text


def _check_entrypoint(manifest: Manifest, inputs: InputFiles, work: str) -> None:
    """The entrypoint was uploaded, and can run: with an interpreter, or by itself."""
    if manifest.entrypoint not in {f.path for f in inputs.files}:
        raise ManifestError("entrypoint",
                            f"{manifest.entrypoint!r} is not among the uploaded files")
    if manifest.interpreter is None and not _runs_directly(os.path.join(work,
                                                                         manifest.entrypoint)):
        known = ", ".join(sorted(EXTENSION_INTERPRETERS))
        raise ManifestError(
            "interpreter", f"{manifest.entrypoint!r} has no known extension ({known}) and is "
                           "not an executable with a #! line or an ELF header: give one of "
                           + ", ".join(sorted(ALLOWED_INTERPRETERS)))


def _runs_directly(path: str) -> bool:
    """Whether the kernel can exec this uploaded file: executable, and ``#!`` or ELF."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        head = os.read(fd, 4)
    finally:
        os.close(fd)
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111) \
        and (head.startswith(b"#!") or head == b"\x7fELF")
