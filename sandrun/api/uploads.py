"""Request bodies: capped, spooled to tmpfs, parsed as a stream into the job's directory.

``UploadRequest`` replaces twisted.web's request so that

- a ``Content-Length`` over the limit is answered 413 before the body is read,
  and a chunked body is cut off with 413 as soon as it passes the limit;
- the body is spooled to an unlinked file on the worker's tmpfs, never to
  disk and never whole in the worker's memory;
- twisted.web does not parse multipart bodies into memory itself: we do, as a
  stream, with python-multipart, writing each part straight to the job's tmpfs.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from twisted.web import server

from sandrun.config import Limits
from sandrun.jobs import workspace
from sandrun.jobs.manifest import Manifest, ManifestError, parse_manifest, parse_manifest_json
from sandrun.jobs.workspace import InputFiles, UploadError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MAX_MANIFEST_BYTES = 1024 * 1024
READ_CHUNK = 65536


class UploadRequest(server.Request):
    """A request whose body is capped and spooled to the worker's tmpfs."""

    max_body_bytes = 100 * 1000 * 1000
    spool_dir: str | None = None

    original_content_type: bytes | None = None
    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self._refuse()
        self.content = tempfile.TemporaryFile(dir=self.spool_dir)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        """413 at once; the rest of the body is never read."""
        self._refused = True
        body = json.dumps({"error": "Upload too large",
                           "details": f"the limit is {self.max_body_bytes} bytes"}).encode()
        head = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                b"Access-Control-Allow-Origin: *\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        transport = self.channel.transport if self.channel else None
        if transport is not None:
            transport.write(head + body)
            transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        # Hide multipart bodies from twisted.web's in-memory parser.
        types = self.requestHeaders.getRawHeaders(b"content-type")
        if types:
            self.original_content_type = types[0]
            self.requestHeaders.setRawHeaders(b"content-type", [b"application/octet-stream"])
        super().requestReceived(command, path, version)


def request_factory(limits: Limits, spool_dir: str) -> type[UploadRequest]:
    return type("SandrunRequest", (UploadRequest,),
                {"max_body_bytes": limits.max_upload_bytes, "spool_dir": spool_dir})


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
    """Store the upload in ``work`` and return the validated manifest."""
    if content_type is None:
        raise UploadError("Content-Type", "missing; use multipart/form-data or JSON")
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
    raise _Unsupported(kind.decode("latin-1"))


class _Unsupported(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _parse_json(body: BinaryIO, work: str, limits: Limits, inputs: InputFiles) -> Submission:
    try:
        document = json.loads(body.read())
    except (ValueError, UnicodeDecodeError):
        raise ManifestError("body", "not valid JSON") from None
    if not isinstance(document, dict):
        raise ManifestError("body", "must be a JSON object with manifest and files")
    unknown = set(document) - {"manifest", "files"}
    if unknown:
        raise ManifestError(sorted(unknown)[0], "unknown field")
    files = document.get("files", {})
    workspace.write_files_json(files, work, limits, inputs)
    stored = inputs.files
    single = stored[0].path if len(stored) == 1 else None
    manifest = parse_manifest(document.get("manifest", {}), limits, default_entrypoint=single)
    _check_entrypoint(manifest, inputs)
    return Submission(manifest, inputs)


def _parse_multipart(body: BinaryIO, boundary: bytes, work: str, staging: str, limits: Limits,
                     inputs: InputFiles) -> Submission:
    parts: list[_Part] = []
    header: dict[str, bytes] = {"field": b"", "value": b""}
    headers: dict[bytes, bytes] = {}

    def on_part_begin() -> None:
        headers.clear()
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        headers[header["field"].lower()] = header["value"]
        header["field"] = header["value"] = b""

    def on_headers_finished() -> None:
        part = parts[-1]
        _, opts = parse_options_header(headers.get(b"content-disposition", b""))
        part.name = opts.get(b"name", b"").decode("utf-8", errors="replace")
        if b"filename" in opts:
            part.filename = opts[b"filename"].decode("utf-8", errors="replace")
            fd, part.path = tempfile.mkstemp(dir=staging)
            part.file = os.fdopen(fd, "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        if part.file is not None:
            part.file.write(data[start:end])
        else:
            part.data += data[start:end]
            if len(part.data) > MAX_MANIFEST_BYTES:
                raise UploadError(part.name or "form field", "form field too large")

    def on_part_end() -> None:
        if parts[-1].file is not None:
            parts[-1].file.close()  # type: ignore[union-attr]

    callbacks: Any = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                      "on_header_value": on_header_value, "on_header_end": on_header_end,
                      "on_headers_finished": on_headers_finished,
                      "on_part_data": on_part_data, "on_part_end": on_part_end}
    parser = MultipartParser(boundary, callbacks)
    try:
        while chunk := body.read(READ_CHUNK):
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as e:
        raise UploadError("body", f"malformed multipart: {e}") from None
    finally:
        for part in parts:
            if part.file is not None and not part.file.closed:
                part.file.close()
    try:
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
    if manifest_text is None:
        manifest_text = _read_job_json(work)
    default_entrypoint = singles[0] if len(singles) == 1 and not archives else None
    if manifest_text is None:
        if default_entrypoint is None:
            raise ManifestError("manifest", "missing: send a manifest field or job.json")
        manifest_text = b"{}"
    manifest = parse_manifest_json(manifest_text, limits, default_entrypoint=default_entrypoint)
    _check_entrypoint(manifest, inputs)
    return Submission(manifest, inputs)


def _read_job_json(work: str) -> bytes | None:
    try:
        fd = os.open(os.path.join(work, "job.json"), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_MANIFEST_BYTES + 1)


def _check_entrypoint(manifest: Manifest, inputs: InputFiles) -> None:
    if manifest.entrypoint not in {f.path for f in inputs.files}:
        raise ManifestError("entrypoint", f"{manifest.entrypoint!r} is not among the uploaded files")
