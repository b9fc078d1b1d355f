"""URLs, JSON answers and ``wait``'s polling: what both clients make of a call."""

from __future__ import annotations

import urllib.parse

import pytest

from sandrun.client import body
from sandrun.client.calls import (
    Polling,
    json_answer,
    output_path,
    parse_server_url,
    segment,
    stream_url,
)
from sandrun.client.errors import ProtocolError, UnsafeArchiveError, WaitTimeoutError
from sandrun.client.models import Job

RUNNING = Job.from_json({"job_id": "job-1", "status": "running", "execution_metadata": None,
                         "output_files": {}, "worker_metadata": None})


def test_pauses_grow_to_the_maximum_and_none_passes_the_timeout() -> None:
    polling = Polling("job-1", 2.0, 100.0, poll_interval=0.5, max_interval=1.0)
    assert polling.pause(RUNNING, 100.0) == 0.5
    assert polling.pause(RUNNING, 100.5) == 0.75
    assert polling.pause(RUNNING, 101.25) == 0.75  # 1.0 would pass the deadline at 102
    with pytest.raises(WaitTimeoutError, match="job-1 is still running after 2.0 s"):
        polling.pause(RUNNING, 102.0)


def test_without_a_timeout_polling_never_ends() -> None:
    polling = Polling("job-1", None, 0.0, poll_interval=0.2, max_interval=2.0)
    pauses = [polling.pause(RUNNING, 1e9) for _ in range(10)]
    assert pauses[0] == 0.2 and pauses[-1] == 2.0 and pauses == sorted(pauses)


def test_the_server_url_must_be_http_and_loses_its_trailing_slash() -> None:
    url, parsed = parse_server_url("https://[::1]:9000/sandrun/")
    assert url == "https://[::1]:9000/sandrun" and parsed.hostname == "::1"
    with pytest.raises(ValueError, match="must be http"):
        parse_server_url("ftp://example.org")


def test_the_stream_url_keeps_the_prefix_and_brackets_an_ipv6_host() -> None:
    _, parsed = parse_server_url("https://[::1]/sandrun/")
    assert stream_url(parsed, "job/x") == "wss://[::1]:443/sandrun/logs/job%2Fx/stream?format=json"
    assert stream_url(urllib.parse.urlsplit("http://h:8443"), "j") == (
        "ws://h:8443/logs/j/stream?format=json")


def test_a_job_id_is_one_segment_and_an_output_path_cannot_leave_the_job() -> None:
    assert segment("a/b?c") == "a%2Fb%3Fc"
    with pytest.raises(ValueError):
        segment("")
    assert output_path("out/a b.txt") == "out/a%20b.txt"
    with pytest.raises(UnsafeArchiveError):
        output_path("../etc/passwd")


def test_an_answer_that_is_not_json_is_a_protocol_error() -> None:
    assert json_answer(200, b'{"a": 1}') == {"a": 1}
    with pytest.raises(ProtocolError, match="HTTP 200 with a body that is not JSON"):
        json_answer(200, b"<html>")


def test_code_documents_carry_args_stdin_and_timeout_and_the_manifest_wins() -> None:
    doc = body.code_document("print(1)", args=["a"], stdin="in", timeout=5,
                             manifest={"timeout": 9})
    assert doc == {"manifest": {"entrypoint": "main.py", "args": ["a"], "stdin": "in",
                                "timeout": 9},
                   "files": {"main.py": "print(1)"}}


def test_a_long_poll_is_held_up_to_its_length_and_never_past_the_timeout() -> None:
    polling = Polling("job-1", 45.0, 100.0, poll_interval=0.2, max_interval=2.0)
    assert polling.hold(100.0) == 30.0
    assert polling.hold(130.0) == 15.0
    assert polling.hold(146.0) == 0.0
    assert Polling("job-1", None, 0.0, poll_interval=0.2, max_interval=2.0).hold(1e9) == 30.0


def test_after_a_held_long_poll_the_next_ask_goes_at_once() -> None:
    polling = Polling("job-1", None, 0.0, poll_interval=0.2, max_interval=2.0)
    assert polling.pause(RUNNING, 30.0, asked=0.0, held=30.0) == 0.0


def test_a_server_that_answers_a_long_poll_at_once_is_asked_again_after_pauses() -> None:
    # A server without long polls answers at once: back to polling's growing pauses.
    polling = Polling("job-1", None, 0.0, poll_interval=0.2, max_interval=2.0)
    assert polling.pause(RUNNING, 0.01, asked=0.0, held=30.0) == 0.2
    assert polling.pause(RUNNING, 0.5, asked=0.49, held=30.0) == pytest.approx(0.3)
