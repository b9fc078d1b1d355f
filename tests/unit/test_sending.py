"""Streamed answers: the same JSON as built whole, produced piece by piece under back-pressure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandrun.api import sending
from sandrun.jobs.model import JobLog


@pytest.mark.parametrize("chunks", [
    [b""],
    [b"plain ascii\n", b"and more"],
    ["é€😀".encode()[:3], "é€😀".encode()[3:]],  # characters split across chunks
    [b"\xff\xfe bad", b" \xe2\x82", b"\xac ok"],  # invalid UTF-8 and a split euro sign
    [b"\x01\x02\"\\ \n\t" * 1000],  # escapes that grow 6 times
])
def test_a_json_string_streamed_is_byte_for_byte_the_one_built_whole(
        chunks: list[bytes]) -> None:
    whole = json.dumps(b"".join(chunks).decode("utf-8", "replace")).encode()
    assert b"".join(sending.json_string(chunks)) == whole


def test_the_logs_document_parses_to_the_fields_of_the_log(tmp_path: Any) -> None:
    log = JobLog(str(tmp_path / "job.log"))
    log.append("stdout", b"out 1\n")
    log.append("stderr", b"err \xe2\x82")
    log.append("stdout", b"out 2\n")
    log.append("stderr", b"\xac\n")
    log.append("install", b"installed\n")
    streams = {name: log.pieces(name) for name in ("stdout", "stderr", "install")}
    body = b"".join(sending.logs_json("job-x", streams, {"stdout": False, "stderr": True}))
    assert body.split(b"\n", 1)[0] == b'{"job_id": "job-x",'
    assert json.loads(body) == {"job_id": "job-x", "stdout": "out 1\nout 2\n",
                                "stderr": "err €\n", "install": "installed\n",
                                "truncated": {"stdout": False, "stderr": True}}
    assert b"".join(log.pieces()) == b"out 1\nerr \xe2\x82out 2\n\xac\n"


def test_the_listing_puts_job_id_and_each_entry_on_a_line_of_its_own() -> None:
    files = [{"path": f"a\n{i}.txt", "download_url": f"/download/job-x/a%0A{i}.txt"}
             for i in range(3)]
    body = b"".join(sending.listing_json({"job_id": "job-x", "status": "completed",
                                          "total_files": 3}, files))
    lines = body.split(b"\n")
    assert lines[0] == b'{"job_id": "job-x",'
    assert [json.loads(line.rstrip(b",")) for line in lines[2:5]] == files
    assert json.loads(body) == {"job_id": "job-x", "status": "completed", "total_files": 3,
                                "files": files}


class Transport:
    """A request whose connection holds ``room`` writes before it pauses its producer."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.written: list[bytes] = []
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if len(self.written) >= self.room:
            self.producer.pauseProducing()


def test_a_client_that_does_not_read_pauses_its_answer_after_one_piece() -> None:
    made = []

    def pieces() -> Any:
        for i in range(1000):
            made.append(i)
            yield b"x" * 65536

    request = Transport(room=2)
    done = sending.send_pieces(request, pieces())
    assert len(made) == 2 and not done.called  # paused: nothing more is made
    request.room = 10**6
    request.producer.resumeProducing()
    assert len(made) == 1000 and done.called and request.producer is None


def test_a_client_that_goes_away_stops_the_answer_and_its_cleanup_runs() -> None:
    closed = []
    request = Transport(room=1)
    done = sending.send_pieces(request, iter([b"a" * 65536, b"b"]),
                               on_end=lambda: closed.append(1))
    failures: list[Any] = []
    done.addErrback(failures.append)
    request.producer.stopProducing()
    assert closed == [1] and len(failures) == 1


def test_an_object_with_streamed_text_members_is_the_json_built_whole() -> None:
    members = [("job_id", "job-x"), ("stdout", sending.Text([b"a\n", b"\xe2\x82", b"\xac"])),
               ("outputs", [{"path": "p"}]), ("kept", False)]
    body = b"".join(sending.object_json(members))
    assert json.loads(body) == {"job_id": "job-x", "stdout": "a\n€", "outputs": [{"path": "p"}],
                                "kept": False}
    assert b"".join(sending.object_json([])) == b"{}"


@pytest.mark.parametrize("members", [
    [("job_id", "job-x"), ("status", "completed"), ("execution_metadata", {"exit_code": 0}),
     ("stdout", sending.Text([b"out"])), ("stderr", sending.Text([])), ("truncated", {}),
     ("outputs", []), ("kept", True)],
    [("stdout", sending.Text([b"x"])), ("a", 1)],
    [("a", 1), ("a", 2), ("b", "\u00e9")],  # a name twice stays twice, in order
    [("only", None)],
])
def test_runs_of_plain_members_encode_as_one_member_at_a_time_would(
        members: list[tuple[str, Any]]) -> None:
    def one_at_a_time() -> bytes:
        parts = []
        for name, value in members:
            text = (json.dumps(b"".join(value.chunks).decode()) if isinstance(value, sending.Text)
                    else json.dumps(value))
            parts.append(json.dumps(name) + ": " + text)
        return ("{" + ", ".join(parts) + "}").encode()

    assert b"".join(sending.object_json(members)) == one_at_a_time()


def test_small_pieces_go_out_in_one_write_with_a_content_length() -> None:
    class Request(Transport):
        startedWriting = 0
        headers: dict[bytes, bytes] = {}

        def setHeader(self, name: bytes, value: bytes) -> None:
            self.headers = {**self.headers, name: value}

    request = Request(room=10)
    done = sending.send_pieces(request, iter([b"{", b'"a": 1', b"}"]))
    assert request.written == [b'{"a": 1}'] and done.called
    assert request.headers == {b"Content-Length": b"8"}


def test_a_large_answer_goes_out_in_writes_of_about_64_kib_without_a_length() -> None:
    class Request(Transport):
        startedWriting = 1  # as twisted.web says once the first write went out
        headers: dict[bytes, bytes] = {}

        def setHeader(self, name: bytes, value: bytes) -> None:
            self.headers = {**self.headers, name: value}

    request = Request(room=100)
    done = sending.send_pieces(request, (b"x" * 1000 for _ in range(200)))
    assert done.called and b"".join(request.written) == b"x" * 200_000
    assert [len(w) for w in request.written] == [66000, 66000, 66000, 2000]
    assert request.headers == {}
