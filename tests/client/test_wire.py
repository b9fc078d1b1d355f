"""Error mapping, typed results and request bodies: what both clients share."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sandrun.client import body
from sandrun.client.errors import (
    BadRequestError,
    NotFoundError,
    ProtocolError,
    QueueFullError,
    RateLimitedError,
    SandrunError,
    ServerError,
    ServiceUnavailableError,
    error_from_response,
)
from sandrun.client.models import Done, Job, Logs, OutputChunk, Outputs, StatusUpdate, parse_frame


def test_a_429_carries_the_servers_reason_and_retry_after() -> None:
    raw = {"error": "Rate limit exceeded", "details": "2 jobs active (max 2)",
           "reason": "2 jobs active (max 2)", "retry_after": 12.5, "cpu_available": 3.0,
           "active_jobs": 2}
    e = error_from_response(429, json.dumps(raw).encode(), {"retry-after": "13"})
    assert isinstance(e, RateLimitedError)
    assert (e.status, e.error, e.reason, e.retry_after) == (429, "Rate limit exceeded",
                                                            "2 jobs active (max 2)", 12.5)
    assert e.body["active_jobs"] == 2
    assert str(e) == "Rate limit exceeded: 2 jobs active (max 2) (retry after 12.5 s)"


def test_retry_after_falls_back_to_the_header() -> None:
    e = error_from_response(503, b'{"error": "Queue full", "details": "later"}',
                            {"retry-after": "5"})
    assert isinstance(e, QueueFullError) and isinstance(e, ServiceUnavailableError)
    assert e.retry_after == 5.0


def test_status_codes_map_to_their_exception_classes() -> None:
    assert isinstance(error_from_response(400, b'{"error": "Invalid manifest", '
                                               b'"details": "timeout: too big"}'),
                      BadRequestError)
    assert isinstance(error_from_response(404, b'{"error": "Job not found"}'), NotFoundError)
    assert type(error_from_response(503, b'{"error": "Storage full"}')) is \
        ServiceUnavailableError
    assert isinstance(error_from_response(502, b"<html>bad gateway</html>"), ServerError)
    other = error_from_response(418, b"")
    assert type(other) is SandrunError and other.error == "HTTP 418"


def test_a_body_that_is_not_json_still_gives_its_text() -> None:
    e = error_from_response(500, b"Internal Server Error")
    assert (e.error, e.details) == ("HTTP 500", "Internal Server Error")


STATUS = {
    "job_id": "job-abc", "status": "failed", "queue_position": 0,
    "submitted_at": "2026-01-01T00:00:00.000Z", "started_at": "2026-01-01T00:00:00.100Z",
    "finished_at": "2026-01-01T00:00:01.000Z",
    "execution_metadata": {"cpu_seconds": 0.5, "memory_peak_bytes": 1000,
                           "wall_time_ms": 900.0, "exit_code": 3, "signal": None,
                           "reason": "exit_nonzero", "environment": "default",
                           "interpreter": "python3"},
    "job_hash": "f" * 64,
    "output_files": {"out/a.txt": {"size_bytes": 2, "sha256": "a" * 64, "type": "file"}},
    "worker_metadata": {"worker_id": "W", "signature": "S", "signed": "{}"},
}


def test_a_status_document_parses_into_a_job_that_keeps_the_raw_document() -> None:
    job = Job.from_json(STATUS)
    assert job.finished and not job.succeeded
    assert (job.reason, job.exit_code) == ("exit_nonzero", 3)
    assert job.output_files["out/a.txt"].sha256 == "a" * 64
    assert job.worker.signature == "S"
    assert job.raw == STATUS and job.raw is not STATUS


def test_a_queued_job_is_not_finished() -> None:
    job = Job.from_json({"job_id": "j", "status": "queued", "execution_metadata": None,
                         "output_files": {}, "worker_metadata": None})
    assert not job.finished and job.exit_code is None


def test_documents_of_the_wrong_shape_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        Job.from_json(["not", "an", "object"])
    with pytest.raises(ProtocolError):
        Job.from_json({"status": "queued"})
    with pytest.raises(ProtocolError):
        Outputs.from_json({"job_id": "j", "files": "nope"})


def test_logs_and_outputs_parse() -> None:
    logs = Logs.from_json({"job_id": "j", "stdout": "o", "stderr": "e",
                           "truncated": {"stdout": True, "stderr": False}})
    assert (logs.stdout, logs.stderr, logs.stdout_truncated, logs.stderr_truncated) == \
        ("o", "e", True, False)
    outputs = Outputs.from_json({"job_id": "j", "status": "completed", "total_files": 1,
                                 "files": [{"path": "a", "size_bytes": 1, "sha256": "x",
                                            "mime_type": "text/plain",
                                            "download_url": "/download/j/a"}]})
    assert [f.path for f in outputs] == ["a"] and outputs.files[0].mime_type == "text/plain"


def test_stream_frames_parse_and_unknown_types_are_skipped() -> None:
    assert parse_frame('{"type": "output", "stream": "stderr", "data": "x"}') == \
        OutputChunk("stderr", "x")
    assert parse_frame(b'{"type": "status", "status": "running"}') == StatusUpdate("running")
    done = parse_frame('{"type": "done", "status": "failed", "reason": "timeout", '
                       '"exit_code": null, "cpu_seconds": 1, "wall_time_ms": 1000}')
    assert done == Done("failed", "timeout", None, 1, None, 1000)
    assert parse_frame('{"type": "heartbeat"}') is None
    with pytest.raises(ProtocolError):
        parse_frame("plain text")


def test_a_multipart_body_is_exactly_as_long_as_it_says(tmp_path: Path) -> None:
    archive = tmp_path / "job.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 3000)
    form = body.MultipartBody([body.Part("files", filename="job.tar.gz", path=str(archive)),
                               body.manifest_part({"entrypoint": "main.py"})])
    seen: list[tuple[int, int]] = []
    data = b"".join(form.chunks(lambda sent, total: seen.append((sent, total))))
    assert len(data) == form.length
    assert seen[-1] == (form.length, form.length)
    assert data.endswith(f"--{form.boundary}--\r\n".encode())
    assert b'name="manifest"' in data and b'{"entrypoint": "main.py"}' in data
    assert form.content_type == f"multipart/form-data; boundary={form.boundary}"


def test_snippets_are_stored_under_their_languages_file_name() -> None:
    doc = body.snippet_document("puts 1", "Ruby", {"timeout": 5})
    assert doc == {"manifest": {"entrypoint": "main.rb", "timeout": 5},
                   "files": {"main.rb": "puts 1"}}
    with pytest.raises(ValueError, match="unknown language"):
        body.snippet_document("x", "cobol")


def test_bytes_go_as_base64_and_text_as_is() -> None:
    doc = body.files_document({"a.txt": "text", "b.bin": b"\x00\xff"}, {"entrypoint": "a.txt"})
    assert doc["files"]["a.txt"] == "text"
    assert base64.b64decode(doc["files"]["b.bin"]["base64"]) == b"\x00\xff"
    with pytest.raises(TypeError):
        body.files_document({"c": 3})  # type: ignore[dict-item]
