"""Request bodies at the coordinator: capped, spooled to RAM, never parsed.

The coordinator only forwards ``/submit`` bodies, so it never parses them:
twisted.web's own multipart parsing (into memory) is switched off by hiding
the content type, which is kept in ``original_content_type`` for forwarding.
A ``Content-Length`` over the limit is answered 413 before the body is read;
a chunked body is cut off with 413 as soon as it passes the limit.  Bodies
up to 1 MiB stay in memory; larger ones go to an unlinked file in the spool
directory (``/dev/shm`` by default, so job content never reaches a disk), and
are sent to a worker from there, again if that worker refuses.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.web import server

IN_MEMORY_BYTES = 1024 * 1024


def default_spool_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class SpoolingRequest(server.Request):
    max_body_bytes = 100 * 1000 * 1000
    spool_dir: str | None = None

    original_content_type: bytes | None = None
    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self._refuse()
        self.content = tempfile.SpooledTemporaryFile(  # type: ignore[assignment]  # noqa: SIM115
            max_size=IN_MEMORY_BYTES, dir=self.spool_dir)  # closed with the request

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
        transport: Any = self.channel.transport if self.channel else None
        if transport is not None:
            transport.write(head + body)
            transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        types = self.requestHeaders.getRawHeaders(b"content-type")
        if types:
            self.original_content_type = types[0]
            self.requestHeaders.setRawHeaders(b"content-type", [b"application/octet-stream"])
        super().requestReceived(command, path, version)


def request_factory(max_body_bytes: int, spool_dir: str | None) -> Any:
    """A ``Site.requestFactory`` with these limits."""

    class Request(SpoolingRequest):
        pass

    Request.max_body_bytes = max_body_bytes
    Request.spool_dir = spool_dir
    return Request


def content_type(request: Any) -> bytes | None:
    """The client's Content-Type, whether or not ``SpoolingRequest`` hid it."""
    original = getattr(request, "original_content_type", None)
    if original:
        return bytes(original)
    value = request.getHeader(b"content-type")
    return value.encode("latin-1") if isinstance(value, str) else value
