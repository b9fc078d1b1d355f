"""Request bodies at the coordinator, over a real socket: capped before they are read,
spooled, and forwarded byte for byte with their content type."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, endpoints, reactor, threads
from twisted.web import resource, server

from coordinator.uploads import request_factory
from sandrun.httpjson import content_type


class Echo(resource.Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        request.content.seek(0)
        body = request.content.read()
        kind = content_type(request) or b"-"
        parsed = b"parsed" if request.args else b"unparsed"
        return kind + b"|" + parsed + b"|" + str(len(body)).encode() + b"|" + body[:16]


def exchange(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        if body:
            try:
                sock.sendall(body)
            except OSError:
                pass  # the server may close before it read everything: that is the point
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


@defer.inlineCallbacks
def listen(limit: int) -> Any:
    site = server.Site(Echo())
    site.requestFactory = request_factory(limit, None)
    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    return port


@pytest_twisted.inlineCallbacks
def test_a_declared_length_over_the_limit_gets_413_before_the_body_is_sent() -> Any:
    port = yield listen(1000)
    try:
        head = (b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n")
        answer = yield threads.deferToThread(exchange, port.getHost().port, head)
        assert answer.startswith(b"HTTP/1.1 413")
        # The 413 is the whole answer: no "100 Continue" after it.
        assert answer.endswith(b'"details": "the limit is 1000 bytes"}')
        assert b'"error": "Upload too large"' in answer
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_chunked_body_is_cut_off_with_413_once_it_passes_the_limit() -> Any:
    port = yield listen(1000)
    try:
        head = (b"POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 600
        body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3 + b"0\r\n\r\n"
        answer = yield threads.deferToThread(exchange, port.getHost().port, head, body)
        assert answer.startswith(b"HTTP/1.1 413")
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_multipart_body_is_kept_whole_with_its_content_type_and_never_parsed() -> Any:
    port = yield listen(10_000_000)
    try:
        body = (b"--B\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{}\r\n"
                + b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n"
                + b"\r\n" + b"z" * 2_000_000 + b"\r\n--B--\r\n")
        head = (b"POST /submit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: multipart/form-data; boundary=B\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        answer = yield threads.deferToThread(exchange, port.getHost().port, head, body)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        payload = answer.split(b"\r\n\r\n", 1)[1]
        kind, parsed, size, start = payload.split(b"|", 3)
        assert kind == b"multipart/form-data; boundary=B"
        assert parsed == b"unparsed" and int(size) == len(body) and start == body[:16]
    finally:
        yield port.stopListening()


def test_independent_readers_of_one_body_each_read_all_of_it_side_by_side(
        tmp_path: Any) -> None:
    import contextlib
    import io
    import tempfile

    data = bytes(range(256)) * 4096  # 1 MiB
    with contextlib.ExitStack() as stack:
        small = stack.enter_context(tempfile.SpooledTemporaryFile(
            max_size=10 * len(data), dir=str(tmp_path)))  # stays in memory
        large = stack.enter_context(tempfile.SpooledTemporaryFile(
            max_size=1024, dir=str(tmp_path)))  # rolls over to a file
        read_side_by_side((io.BytesIO(data), small, large), data)


def read_side_by_side(bodies: Any, data: bytes) -> None:
    import io

    from coordinator.uploads import independent_reader

    for body in bodies:
        if not isinstance(body, io.BytesIO):
            body.write(data)
        readers = [independent_reader(body) for _ in range(3)]
        chunks: list[list[bytes]] = [[], [], []]
        while True:  # interleaved reads: each keeps its own position
            parts = [r.read(65536) for r in readers]
            if not any(parts):
                break
            for got, part in zip(chunks, parts, strict=True):
                got.append(part)
        assert [b"".join(c) for c in chunks] == [data] * 3
        for r in readers:
            r.close()
        body.seek(0)
        assert body.read() == data  # the original is still whole
