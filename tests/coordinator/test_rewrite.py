"""The coordinator rewrites ids and URLs in a worker's streamed answer without holding it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.rewrite import MAX_ENTRY_LINE, LineRewriter
from coordinator.worker_client import BadWorkerResponse
from sandrun.api import sending


def fed(rewriter: LineRewriter, body: bytes, size: int) -> bytes:
    out = [rewriter.feed(body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(out) + rewriter.end()


@pytest.mark.parametrize("size", [1, 7, 65536])
def test_the_logs_get_our_job_id_and_pass_through_unchanged_in_any_chunking(size: int) -> None:
    streams = {"stdout": [b'"job-w",\n' * 50], "stderr": [b"\x01" * 100],
               "install": [b""]}
    body = b"".join(sending.logs_json("job-w", streams, {"stdout": False, "stderr": False}))
    out = fed(LineRewriter("cid-1"), body, size)
    doc = json.loads(out)
    assert doc["job_id"] == "cid-1"
    assert doc["stdout"] == '"job-w",\n' * 50  # job output that looks like an id is kept
    assert out[len(b'{"job_id": "cid-1",\n'):] == body[len(b'{"job_id": "job-w",\n'):]


@pytest.mark.parametrize("size", [1, 5, 65536])
def test_each_outputs_entry_gets_our_download_url(size: int) -> None:
    files = [{"path": f'x",\n{{"path" {i}', "download_url": f"/download/job-w/{i}"}
             for i in range(20)]
    body = b"".join(sending.listing_json({"job_id": "job-w", "status": "completed",
                                          "total_files": 20}, files))

    def ours(entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "download_url": entry["download_url"].replace("job-w", "cid-1")}

    doc = json.loads(fed(LineRewriter("cid-1", ours), body, size))
    assert doc["job_id"] == "cid-1" and doc["total_files"] == 20
    assert [f["download_url"] for f in doc["files"]] == [f"/download/cid-1/{i}"
                                                         for i in range(20)]
    assert [f["path"] for f in doc["files"]] == [f["path"] for f in files]


def test_an_answer_without_the_job_id_line_is_a_bad_worker_response() -> None:
    with pytest.raises(BadWorkerResponse):
        LineRewriter("cid").feed(b'{"stdout": "x", "job_id": "w"}\n')
    with pytest.raises(BadWorkerResponse):
        LineRewriter("cid").feed(b"{" + b" " * 5000)  # no line end within the cap
    rewriter = LineRewriter("cid")
    rewriter.feed(b'{"job_id"')
    with pytest.raises(BadWorkerResponse):
        rewriter.end()


def test_an_entry_line_beyond_its_cap_is_refused_not_buffered() -> None:
    rewriter = LineRewriter("cid", lambda entry: entry)
    rewriter.feed(b'{"job_id": "w",\n"status": "completed", "files": [\n')
    with pytest.raises(BadWorkerResponse):
        for _ in range(MAX_ENTRY_LINE // 65536 + 2):
            rewriter.feed(b"{" + b"x" * 65536)
