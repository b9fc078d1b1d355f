"""Large answers streamed with back-pressure: what one request costs stays bounded.

A job's ``/logs`` can hold 3 x 10 MiB of output, which as JSON (a control
character escapes to 6 bytes) is up to ~180 MB; ``/outputs`` lists up to
10,000 files.  Built whole, twenty unread answers would hold gigabytes.
Here an answer is a generator of pieces of at most ~64 KiB of input each,
written by a push producer while the client's connection takes them: a client
that does not read pauses its own answer, and its cost is one piece.

The JSON answers put a line break after the ``job_id`` member and around each
``files`` entry (valid JSON whitespace), so the coordinator can rewrite ids
and URLs line by line while it relays them (``coordinator/proxy.py``): no line
but the string values of output is long, and those it passes through as is.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

SEND_CHUNK = 65536  # bytes read from a file per write


@implementer(IPushProducer)
class PiecesProducer:
    """Writes pieces from an iterator to a request while the transport wants more.

    Pieces are made on the reactor thread (reads from tmpfs, JSON escaping of
    at most one log chunk).  ``done`` fires once every piece was written and
    fails when the client went away first.
    """

    def __init__(self, pieces: Iterable[bytes], request: Any,
                 on_end: Any = None) -> None:
        self.pieces: Iterator[bytes] | None = iter(pieces)
        self.request = request
        self.on_end = on_end  # called once, however it ends (closes a file)
        self.paused = False
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        self.request.registerProducer(self, True)
        self.resumeProducing()
        return self.done

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.pieces is not None:
            # Pieces are gathered into writes of up to SEND_CHUNK bytes: each write is a
            # chunk of its own on the wire (and a trip through twisted.web), and most
            # answers are a few small pieces.  An answer that fits in its first write is
            # sent with a Content-Length instead of chunked.
            buffer = bytearray()
            try:
                while len(buffer) < SEND_CHUNK:
                    buffer += next(self.pieces)
            except StopIteration:
                if buffer:
                    if not getattr(self.request, "startedWriting", True):
                        self.request.setHeader(b"Content-Length", str(len(buffer)).encode())
                    self.request.write(bytes(buffer))
                self._end(None)
                return
            except Exception as e:  # noqa: BLE001 - reported through done
                self._end(e)
                return
            self.request.write(bytes(buffer))

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self._end(ConnectionLost("the client went away during the answer"))

    def _end(self, error: Exception | None) -> None:
        if self.pieces is None:
            return
        self.pieces = None
        if self.on_end is not None:
            self.on_end()
        self.request.unregisterProducer()
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


def send_pieces(request: Any, pieces: Iterable[bytes], on_end: Any = None
                ) -> defer.Deferred[None]:
    """Stream ``pieces`` with back-pressure; fires once all were written."""
    return PiecesProducer(pieces, request, on_end).start()


def send_file(f: Any, request: Any) -> defer.Deferred[None]:
    """Stream an open file; it is closed however the answer ends."""
    return send_pieces(request, iter(lambda: f.read(SEND_CHUNK), b""), on_end=f.close)


def json_string(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A JSON string (quotes included) of the UTF-8 text in ``chunks``, piece by piece.

    The same bytes as ``json.dumps(b"".join(chunks).decode("utf-8", "replace"))``:
    the incremental decoder carries a character split across two chunks.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    yield b'"'
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield json.dumps(text)[1:-1].encode("ascii")
    text = decoder.decode(b"", final=True)
    if text:
        yield json.dumps(text)[1:-1].encode("ascii")
    yield b'"'


def logs_json(job_id: str, streams: Mapping[str, Iterable[bytes]],
              truncated: dict[str, bool]) -> Iterator[bytes]:
    """``{"job_id", <each stream>, "truncated"}``, the streams' text streamed."""
    yield b"{" + _member("job_id", job_id) + b",\n"
    for name, chunks in streams.items():
        yield json.dumps(name).encode() + b": "
        yield from json_string(chunks)
        yield b",\n"
    yield _member("truncated", truncated) + b"}"


def listing_json(head: dict[str, Any], files: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """``head``'s members (``job_id`` first, on a line of its own), then ``files``, one
    entry a line."""
    members = list(head.items())
    yield b"{" + _member(*members[0]) + b",\n"
    for name, value in members[1:]:
        yield _member(name, value) + b", "
    yield b'"files": ['
    separator = b"\n"
    for entry in files:
        yield separator + json.dumps(entry).encode()
        separator = b",\n"
    yield b"\n]}"


class Text:
    """A string member of ``object_json`` whose UTF-8 bytes come in chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks


def object_json(members: Iterable[tuple[str, Any]]) -> Iterator[bytes]:
    """A JSON object of ``members`` in order; a ``Text`` value is streamed.

    Each run of other members is encoded in one ``json.dumps`` (the same bytes as one
    call per name and per value: a ``/run`` answer has a dozen of them)."""
    separator = b"{"
    plain: dict[str, Any] = {}
    for name, value in members:
        if plain and (isinstance(value, Text) or name in plain):
            yield separator + json.dumps(plain).encode()[1:-1]
            separator, plain = b", ", {}
        if isinstance(value, Text):
            yield separator + json.dumps(name).encode() + b": "
            yield from json_string(value.chunks)
            separator = b", "
        else:
            plain[name] = value
    if plain:
        yield separator + json.dumps(plain).encode()[1:-1]
        separator = b", "
    yield b"}" if separator == b", " else b"{}"


def _member(name: str, value: Any) -> bytes:
    return json.dumps(name).encode() + b": " + json.dumps(value).encode()
