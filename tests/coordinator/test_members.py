"""The member relay (``coordinator/members.py``) on the worker's own writers' output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.members import MAX_VALUE_BYTES, Each, Keep, MemberRelay, Stream
from coordinator.worker_client import BadWorkerResponse
from sandrun.api import sending

LOGS = {"stdout": Stream("stdout"), "stderr": Stream("stderr"), "truncated": Keep()}
TEXT = "tab\t \"q\" \\ é€😀 \x01\n".encode() + bytes(range(256))


def logs_body(stdout: bytes = TEXT, stderr: bytes = b"err\n", install: bytes = b"pip",
              truncated: dict[str, bool] | None = None) -> bytes:
    streams = {"stdout": [stdout[:7], stdout[7:]], "stderr": [stderr], "install": [install]}
    return b"".join(sending.logs_json("job-w", streams, truncated or {"stdout": True,
                                                                      "stderr": False}))


def relayed(body: bytes, rules: dict[str, Any], step: int | None = None) -> tuple[bytes, Any]:
    relay = MemberRelay(rules)
    size = step or len(body) or 1
    out = b"".join(relay.feed(body[i:i + size]) for i in range(0, len(body), size))
    return out + relay.end(), relay


def as_object(members: bytes) -> dict[str, Any]:
    """Our answer's members (each written as ', name: value') after a first one."""
    doc: dict[str, Any] = json.loads(b'{"first": 1' + members + b"}")
    del doc["first"]
    return doc


def test_stdout_and_stderr_pass_through_as_the_worker_escaped_them_and_truncated_is_kept(
) -> None:
    out, relay = relayed(logs_body(), LOGS)
    doc = as_object(out)
    assert doc == {"stdout": TEXT.decode("utf-8", "replace"), "stderr": "err\n"}
    assert relay.kept == {"truncated": {"stdout": True, "stderr": False}}
    assert json.dumps(doc["stdout"]).encode() in out  # the worker's bytes, not re-encoded
    assert b"pip" not in out and b"job-w" not in out  # members not asked for are left out


@pytest.mark.parametrize("step", [1, 2, 3, 5, 6, 7, 64, 4096])
def test_an_answer_split_anywhere_gives_the_same_bytes(step: int) -> None:
    whole, relay = relayed(logs_body(), LOGS)
    split, split_relay = relayed(logs_body(), LOGS, step)
    assert split == whole and split_relay.kept == relay.kept


def test_outputs_entries_are_rewritten_one_by_one_under_our_name() -> None:
    files = [{"path": f"d/{i}é.txt", "size_bytes": i, "sha256": "a" * 64,
              "mime_type": "text/plain", "download_url": f"/download/job-w/d/{i}"}
             for i in range(3)]
    body = b"".join(sending.listing_json({"job_id": "job-w", "status": "completed",
                                          "total_files": 3}, files))
    rules = {"files": Each("outputs", lambda e: {**e, "download_url": "/ours/" + e["path"]})}
    for step in (None, 1, 9):
        out, _ = relayed(body, rules, step)
        assert as_object(out) == {"outputs": [{**f, "download_url": "/ours/" + f["path"]}
                                              for f in files]}
    empty = b"".join(sending.listing_json({"job_id": "job-w", "status": "completed",
                                           "total_files": 0}, []))
    assert as_object(relayed(empty, rules)[0]) == {"outputs": []}


def test_a_long_skipped_string_is_not_held() -> None:
    relay = MemberRelay(LOGS)
    relay.feed(b'{"install": "')
    for _ in range(200):  # 20 MB of a member nobody wants
        assert relay.feed(b"x" * 100_000) == b""
        assert len(relay._value) == 0 and relay._pending == b""
    relay.feed(b'", "stdout": "ok"}')
    assert relay.end() == b"" and relay.written == {"stdout"}


def test_a_streamed_string_is_written_as_it_comes_not_held() -> None:
    relay = MemberRelay(LOGS)
    assert relay.feed(b'{"stdout": "ab') == b', "stdout": "ab'
    assert relay.feed(b"cd\\") == b"cd"  # an escape split between reads waits for its end
    assert relay.feed(b'n"}') == b'\\n"'
    assert relay.end() == b""


def test_a_repeated_member_is_written_once() -> None:
    out, relay = relayed(b'{"stdout": "a", "stdout": "b", "truncated": {"stdout": true},'
                         b' "truncated": 5}', LOGS)
    assert out == b', "stdout": "a"' and relay.kept == {"truncated": {"stdout": True}}


@pytest.mark.parametrize("body", [
    b'{"stdout": "a\x01"}',  # a raw control character
    b'{"stdout": "a\\x"}',  # an escape JSON does not have
    b'{"stdout": "\\u12G4"}',
    b'{"stdout": "caf\xc3\xa9"}',  # raw UTF-8: workers escape everything (json.dumps)
    b'{"stdout": 5}',  # not a string
    b'{"stdout": "a"',  # ends before its object
    b'{"stdout": "a"} {"stdout": "b"}',  # something after it
    b'["stdout"]',
    b'{"stdout" "a"}',
    b'{"stdout": "a",}',
    b'{"truncated": {"stdout": tru}}',
    b'{"truncated": [1, 2}',
    b"",
])
def test_a_malformed_answer_is_a_bad_worker_response(body: bytes) -> None:
    with pytest.raises(BadWorkerResponse):
        relayed(body, LOGS)


def test_a_string_cannot_end_early_to_smuggle_in_a_member() -> None:
    # The worker's text '", "status": "completed' stays inside stdout's string.
    sneaky = b'x", "kept": false, "y": "'
    out, _ = relayed(logs_body(stdout=sneaky), LOGS)
    assert as_object(out)["stdout"] == sneaky.decode() and "kept" not in as_object(out)


def test_a_value_over_the_cap_is_refused_not_buffered() -> None:
    relay = MemberRelay(LOGS)
    relay.feed(b'{"truncated": ["')
    with pytest.raises(BadWorkerResponse):
        for _ in range(MAX_VALUE_BYTES // 1000 + 2):
            relay.feed(b"y" * 1000)
    assert len(relay._value) <= MAX_VALUE_BYTES
    entries = MemberRelay({"files": Each("outputs")})
    with pytest.raises(BadWorkerResponse):
        entries.feed(b'{"files": [{"path": "' + b"p" * (MAX_VALUE_BYTES + 1))
    names = MemberRelay(LOGS)
    with pytest.raises(BadWorkerResponse):
        names.feed(b'{"' + b"n" * 5000)
