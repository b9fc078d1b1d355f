"""Every worker endpoint but /submit, in memory: shapes exactly as api.md, errors as JSON.

Real ``WorkerAPI`` and ``JobManager`` behind StubTreq with a scripted fake
sandbox (``worker_fakes``): a test decides what a job prints, leaves behind
and how it ends.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import time
import urllib.parse
from typing import Any

import pytest

import sandrun
from sandrun import identity as ident
from sandrun.sandbox.supervisor import SandboxResult
from sandrun.wire import Reason
from tests.unit.worker_fakes import Harness

ISO = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


@pytest.fixture
def h(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path))


def finished_job(h: Harness, files: dict[str, str | bytes] | None = None,
                 manifest: dict[str, Any] | None = None,
                 reason: Reason = Reason.COMPLETED) -> str:
    job_id = h.submit({"main.py": "print(1)"}, manifest)
    run = h.run_of(job_id)
    for path, data in (files or {}).items():
        run.write(path, data)
    run.print("out line\n")
    run.print("err line\n", "stderr")
    run.finish(reason)
    return job_id


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- service endpoints -----------------------------------------------------------------------


def test_root_describes_the_service_and_its_effective_limits(h: Harness) -> None:
    body = h.get("/").json()
    assert body["service"] == "sandrun" and body["status"] == "running"
    assert body["version"] == sandrun.__version__
    assert body["description"] and "RAM" in body["privacy"]
    assert body["limits"]["max_upload_bytes"] == 200_000
    assert body["limits"]["max_timeout"] == 60
    assert body["worker_id"] is None


def test_health_reports_the_load(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    h.submit()
    h.submit()
    body = h.get("/health").json()
    assert body == {"status": "healthy", "worker_id": None, "version": sandrun.__version__,
                    "load": {"active_jobs": 1, "queued_jobs": 1, "capacity": 1,
                             "queue_capacity": 10}, "gpus": []}


def test_health_without_a_key_ignores_the_nonce(h: Harness) -> None:
    body = h.get("/health?nonce=abc").json()
    assert "signature" not in body and body["worker_id"] is None


def test_health_with_a_key_signs_the_nonce(tmp_path: Any) -> None:
    identity = ident.WorkerIdentity.from_seed(b"\x01" * 32)
    h = Harness(str(tmp_path), identity=identity)
    body = h.get("/health?nonce=n-123").json()
    assert body["worker_id"] == identity.worker_id
    assert ident.verify_health(body, identity.worker_id, "n-123", h.clock.seconds())
    assert not ident.verify_health(body, identity.worker_id, "n-124", h.clock.seconds())
    assert json.loads(body["signed"])["load"] == body["load"]


def test_an_oversized_nonce_is_400(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), identity=ident.WorkerIdentity.from_seed(b"\x01" * 32))
    assert h.get("/health?nonce=" + "n" * 300).status == 400


def test_stats_show_the_callers_own_quota_and_the_system(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    h.submit()
    h.submit()
    body = h.get("/stats").json()
    assert set(body["your_quota"]) == {"used", "limit", "available", "active_jobs",
                                       "max_concurrent", "jobs_this_hour", "hourly_limit",
                                       "can_submit", "reason", "retry_after", "exempt"}
    assert body["your_quota"]["exempt"] is False
    assert body["your_quota"]["active_jobs"] == 2
    assert body["your_quota"]["jobs_this_hour"] == 2
    assert body["your_quota"]["can_submit"] is True
    assert body["system"] == {"queue_length": 1, "active_jobs": 1, "capacity": 1,
                              "queue_capacity": 10, "finished_jobs_held": 0,
                              "max_finished_jobs": 5000, "storage_used_bytes": 0,
                              "storage_bytes": 1 << 30}


def test_environments_list_the_default_template(h: Harness) -> None:
    body = h.get("/environments").json()
    assert "default" in body["templates"]
    assert {"name", "description", "packages", "ready"} <= set(body["environments"][0])


# -- CORS, unknown paths, methods ----------------------------------------------------------


@pytest.mark.parametrize("method,path", [
    ("GET", "/"), ("GET", "/health"), ("GET", "/stats"), ("GET", "/environments"),
    ("GET", "/status/job-nope"), ("GET", "/logs/job-nope"), ("GET", "/outputs/job-nope"),
    ("GET", "/download/job-nope"), ("GET", "/download/job-nope/a.txt"),
    ("DELETE", "/jobs/job-nope"), ("GET", "/no/such/path"), ("POST", "/health"),
    ("PUT", "/submit"),
])
def test_every_response_carries_the_cors_header(h: Harness, method: str, path: str) -> None:
    assert h.request(method, path).header("access-control-allow-origin") == "*"


@pytest.mark.parametrize("path", ["/submit", "/status/x", "/anything/at/all"])
def test_a_preflight_is_answered_for_any_path(h: Harness, path: str) -> None:
    reply = h.request("OPTIONS", path, headers={"Origin": "https://example.org",
                                                "Access-Control-Request-Method": "POST"})
    assert reply.status == 204
    assert reply.header("access-control-allow-origin") == "*"
    assert "POST" in (reply.header("access-control-allow-methods") or "")
    assert "Content-Type" in (reply.header("access-control-allow-headers") or "")


@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/nope"),
                                         ("GET", "/status"), ("GET", "/status/a/b")])
def test_an_unknown_path_is_a_json_404(h: Harness, method: str, path: str) -> None:
    reply = h.request(method, path)
    assert reply.status == 404
    assert reply.json()["error"] == "Not found"


def test_a_wrong_method_on_a_known_path_is_a_json_405(h: Harness) -> None:
    reply = h.request("GET", "/submit")
    assert reply.status == 405
    assert set(reply.json()) == {"error", "details"}


@pytest.mark.parametrize("path", ["/status/{}", "/logs/{}", "/outputs/{}", "/download/{}",
                                  "/download/{}/main.py"])
def test_an_unknown_job_is_a_json_404(h: Harness, path: str) -> None:
    reply = h.get(path.format("job-" + "A" * 24))
    assert reply.status == 404 and reply.json()["error"] == "Job not found"


# -- status, logs, outputs --------------------------------------------------------------------


def test_status_of_a_queued_job(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    h.submit()
    job_id = h.submit()
    status = h.status(job_id)
    assert status["status"] == "queued" and status["queue_position"] == 1
    assert status["started_at"] is None and status["finished_at"] is None
    assert status["execution_metadata"]["exit_code"] is None


def test_status_of_a_finished_job_has_every_field_of_the_contract(h: Harness) -> None:
    job_id = finished_job(h, {"out/r.csv": "a,b\n"})
    status = h.status(job_id)
    assert set(status) == {"job_id", "status", "queue_position", "submitted_at", "started_at",
                           "finished_at", "execution_metadata", "job_hash", "output_files",
                           "worker_metadata"}
    assert status["job_id"] == job_id and status["status"] == "completed"
    assert status["queue_position"] == 0
    for key in ("submitted_at", "started_at", "finished_at"):
        assert re.match(ISO, status[key]), status[key]
    meta = status["execution_metadata"]
    assert {"cpu_seconds", "memory_peak_bytes", "wall_time_ms", "exit_code", "signal",
            "reason", "environment", "interpreter"} <= set(meta)
    assert (meta["exit_code"], meta["reason"], meta["interpreter"], meta["environment"]) == \
        (0, "completed", "python3", "none")  # default is not built here
    assert meta["memory_peak_bytes"] == 4096 and meta["wall_time_ms"] == 12.5
    assert status["output_files"]["out/r.csv"] == {"size_bytes": 4, "sha256": sha(b"a,b\n"),
                                                   "type": "file"}
    assert status["worker_metadata"] == {"worker_id": None, "signature": None, "signed": None}


def test_a_nonzero_exit_is_failed_with_its_reason(h: Harness) -> None:
    job_id = finished_job(h, reason=Reason.EXIT_NONZERO)
    status = h.status(job_id)
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "exit_nonzero"
    assert status["execution_metadata"]["exit_code"] == 1


def test_a_signed_status_verifies_and_tampering_breaks_it(tmp_path: Any) -> None:
    identity = ident.WorkerIdentity.from_seed(b"\x02" * 32)
    h = Harness(str(tmp_path), identity=identity)
    job_id = finished_job(h, {"r.txt": "42"})
    status = h.status(job_id)
    assert status["worker_metadata"]["worker_id"] == identity.worker_id
    assert ident.verify_result(status, identity.worker_id)
    signed = json.loads(status["worker_metadata"]["signed"])
    assert signed["job_id"] == job_id and signed["outputs"]["r.txt"] == sha(b"42")
    tampered = json.loads(json.dumps(status))
    tampered["output_files"]["r.txt"]["sha256"] = sha(b"43")
    assert not ident.verify_result(tampered, identity.worker_id)
    other = ident.WorkerIdentity.from_seed(b"\x03" * 32)
    assert not ident.verify_result(status, other.worker_id)


def test_logs_as_json_keep_the_streams_apart(h: Harness) -> None:
    job_id = finished_job(h)
    body = h.get(f"/logs/{job_id}").json()
    assert body == {"job_id": job_id, "stdout": "out line\n", "stderr": "err line\n", "install": "",
                    "truncated": {"stdout": False, "stderr": False}}


@pytest.mark.parametrize("query,headers", [("?format=text", {}),
                                           ("", {"Accept": "text/plain"})])
def test_logs_as_text_combine_the_streams_in_order(h: Harness, query: str,
                                                   headers: dict[str, str]) -> None:
    job_id = finished_job(h)
    reply = h.get(f"/logs/{job_id}{query}", headers=headers)
    assert reply.status == 200
    assert (reply.header("content-type") or "").startswith("text/plain")
    assert reply.body == b"out line\nerr line\n"
    assert reply.header("access-control-allow-origin") == "*"


def test_logs_of_a_running_job_show_what_it_printed_so_far(h: Harness) -> None:
    job_id = h.submit()
    h.run_of(job_id).print("partial")
    body = h.get(f"/logs/{job_id}").json()
    assert body["stdout"] == "partial"
    assert h.status(job_id)["status"] == "running"


def test_truncated_output_is_reported(h: Harness) -> None:
    job_id = h.submit()
    run = h.run_of(job_id)
    run.done.callback(SandboxResult(Reason.OUTPUT_LIMIT, None, 9,
                                    truncated={"stdout": True, "stderr": False}))
    body = h.get(f"/logs/{job_id}").json()
    assert body["truncated"] == {"stdout": True, "stderr": False}
    assert h.status(job_id)["execution_metadata"]["reason"] == "output_limit"


def test_outputs_list_every_file_the_job_made_with_a_working_download_url(h: Harness) -> None:
    job_id = finished_job(h, {"out/a b#?.txt": "spaces", "out/x.json": "{}"})
    body = h.get(f"/outputs/{job_id}").json()
    assert set(body) == {"job_id", "status", "total_files", "files"}
    assert body["job_id"] == job_id and body["status"] == "completed"
    assert body["total_files"] == 2 == len(body["files"])
    by_path = {f["path"]: f for f in body["files"]}
    assert set(by_path) == {"out/a b#?.txt", "out/x.json"}  # not the uploaded main.py
    entry = by_path["out/a b#?.txt"]
    assert set(entry) == {"path", "size_bytes", "sha256", "mime_type", "download_url"}
    assert entry["size_bytes"] == 6 and entry["sha256"] == sha(b"spaces")
    assert entry["mime_type"] == "text/plain"
    assert by_path["out/x.json"]["mime_type"] == "application/json"
    reply = h.get(entry["download_url"])
    assert reply.status == 200 and reply.body == b"spaces"


def test_without_patterns_an_uploaded_file_is_an_output_only_if_the_job_changed_it(
        h: Harness) -> None:
    job_id = h.submit({"main.py": "print(1)", "data.txt": "old", "same.txt": "kept"},
                      {"entrypoint": "main.py"})
    run = h.run_of(job_id)
    run.write("data.txt", "new")
    run.finish(Reason.COMPLETED)
    assert set(h.status(job_id)["output_files"]) == {"data.txt"}
    assert h.get(f"/download/{job_id}/same.txt").status == 404
    # Named by a pattern, an unchanged upload is an output like any other file.
    named = h.submit({"main.py": "print(1)", "same.txt": "kept"},
                     {"entrypoint": "main.py", "outputs": ["*.txt"]})
    h.run_of(named).finish(Reason.COMPLETED)
    assert set(h.status(named)["output_files"]) == {"same.txt"}


def test_the_outputs_archive_keeps_each_files_modification_time(h: Harness) -> None:
    job_id = finished_job(h, {"r.txt": "1"})
    reply = h.get(f"/download/{job_id}")
    with tarfile.open(fileobj=io.BytesIO(reply.body)) as tar:
        (member,) = tar.getmembers()
    assert member.name == "r.txt"
    assert abs(member.mtime - time.time()) < 600  # written just now, not 1970


def test_output_globs_decide_what_is_listed_and_downloadable(h: Harness) -> None:
    job_id = finished_job(h, {"results/a.csv": "1", "results/deep/b.csv": "2", "c.csv": "3",
                              "logs/run.log": "4", "secret.txt": "5"},
                          {"outputs": ["*.csv", "results/**/*.csv", "logs/"]})
    listed = {f["path"] for f in h.get(f"/outputs/{job_id}").json()["files"]}
    assert listed == {"c.csv", "results/a.csv", "results/deep/b.csv", "logs/run.log"}
    assert set(h.status(job_id)["output_files"]) == listed
    assert h.get(f"/download/{job_id}/results/deep/b.csv").body == b"2"
    for hidden in ("secret.txt", "main.py"):
        reply = h.get(f"/download/{job_id}/{hidden}")
        assert reply.status == 404 and reply.json()["error"] == "Output not found"


@pytest.mark.parametrize("path", ["../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
                                  "out/../main.py", "out//x.txt", "nosuch.txt",
                                  "out/%00x.txt"])
def test_a_download_that_escapes_or_does_not_match_is_404(h: Harness, path: str) -> None:
    job_id = finished_job(h, {"out/x.txt": "x"})
    reply = h.get(f"/download/{job_id}/{path}")
    assert reply.status == 404, (path, reply.body)
    assert reply.header("content-type") == "application/json"


def test_a_path_that_is_not_utf8_is_a_json_400(h: Harness) -> None:
    job_id = finished_job(h, {"out/x.txt": "x"})
    reply = h.get(f"/download/{job_id}/out/%ff.txt")
    assert reply.status == 400 and reply.json()["error"] == "Invalid URL"
    assert reply.header("access-control-allow-origin") == "*"
    assert h.get("/health").status == 200


def test_a_symlink_left_by_the_job_is_neither_listed_nor_served(h: Harness) -> None:
    job_id = h.submit()
    run = h.run_of(job_id)
    os.symlink("/etc/passwd", os.path.join(run.job_dir, "passwd"))
    run.finish()
    assert "passwd" not in h.status(job_id)["output_files"]
    assert h.get(f"/download/{job_id}/passwd").status == 404


def test_one_download_has_its_type_length_and_attachment_name(h: Harness) -> None:
    job_id = finished_job(h, {"report.json": '{"a": 1}'})
    reply = h.get(f"/download/{job_id}/report.json")
    assert reply.status == 200 and reply.body == b'{"a": 1}'
    assert reply.header("content-type") == "application/json"
    assert reply.header("content-disposition").startswith(  # type: ignore[union-attr]
        'attachment; filename="report.json"')
    assert h.status(job_id)["status"] == "completed"  # one file does not delete the job


def test_a_hostile_file_name_cannot_inject_headers(h: Harness) -> None:
    job_id = finished_job(h, {'x"\r\nSet-Cookie: a=b;.txt': "x"})
    path = urllib.parse.quote('x"\r\nSet-Cookie: a=b;.txt')
    reply = h.get(f"/download/{job_id}/{path}")
    assert reply.status == 200
    assert "set-cookie" not in reply.headers
    disposition = reply.header("content-disposition") or ""
    assert "\r" not in disposition and "\n" not in disposition
    assert disposition.startswith('attachment; filename="x___Set-Cookie: a=b_.txt"')


def test_download_of_a_running_job_is_409(h: Harness) -> None:
    job_id = h.submit()
    assert h.get(f"/download/{job_id}").status == 409
    assert h.get(f"/download/{job_id}/main.py").status == 409


def test_download_all_is_a_tar_gz_of_the_outputs_and_then_the_job_is_gone(h: Harness) -> None:
    job_id = finished_job(h, {"out/a.txt": "A", "b.bin": b"\0B"}, {"outputs": ["out/", "*.bin"]})
    reply = h.get(f"/download/{job_id}")
    assert reply.status == 200
    assert reply.header("content-type") == "application/gzip"
    assert "attachment" in (reply.header("content-disposition") or "")
    with tarfile.open(fileobj=io.BytesIO(reply.body), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert members == {"out/a.txt": b"A", "b.bin": b"\0B"}
    assert h.get(f"/status/{job_id}").status == 404
    assert h.get(f"/download/{job_id}").status == 404
    assert not h.storage.exists(job_id)


def test_download_all_of_a_job_without_outputs_is_an_empty_archive(h: Harness) -> None:
    job_id = finished_job(h, manifest={"outputs": ["nothing/"]})
    reply = h.get(f"/download/{job_id}")
    assert reply.status == 200
    assert gzip.decompress(reply.body)[:512].strip(b"\0") == b""


# -- delete ----------------------------------------------------------------------------------


def test_delete_of_a_finished_job_removes_its_data_at_once(h: Harness) -> None:
    job_id = finished_job(h, {"a.txt": "a"})
    reply = h.delete(f"/jobs/{job_id}")
    assert reply.status == 200
    assert reply.json() == {"job_id": job_id, "deleted": True, "cancelled": False}
    assert not h.storage.exists(job_id)
    for path in ("/status/{}", "/logs/{}", "/outputs/{}", "/download/{}/a.txt"):
        assert h.get(path.format(job_id)).status == 404


def test_delete_of_a_running_job_kills_it_and_the_id_is_gone_at_once(h: Harness) -> None:
    h.sandbox.kills_take_effect = False  # the kill lands later, as with a real sandbox
    job_id = h.submit()
    reply = h.delete(f"/jobs/{job_id}")
    assert reply.json()["cancelled"] is True
    assert h.sandbox.kills == [(job_id, Reason.CANCELLED)]
    assert h.get(f"/status/{job_id}").status == 404
    assert h.storage.exists(job_id)  # the sandbox still holds it
    h.run_of(job_id).finish(Reason.CANCELLED, exit_code=None, signal=9)
    assert not h.storage.exists(job_id)
    assert h.manager.jobs == {}


def test_delete_of_a_queued_job_dequeues_it_and_moves_the_rest_up(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    h.submit()
    second, third = h.submit(), h.submit()
    assert h.status(third)["queue_position"] == 2
    assert h.delete(f"/jobs/{second}").json()["cancelled"] is True
    assert h.status(third)["queue_position"] == 1
    assert second not in h.sandbox.runs and not h.storage.exists(second)
    assert h.get("/stats").json()["system"]["queue_length"] == 1


def test_delete_of_an_unknown_job_is_404(h: Harness) -> None:
    assert h.delete("/jobs/job-unknown").status == 404


def test_a_job_id_is_never_listed(h: Harness) -> None:
    job_id = finished_job(h)
    for path in ("/", "/health", "/stats", "/environments"):
        assert job_id.encode() not in h.get(path).body


def test_an_id_of_the_wrong_job_shows_nothing_of_another(h: Harness) -> None:
    job_id = finished_job(h, {"a.txt": "a"})
    other = job_id[:-1] + ("A" if job_id[-1] != "A" else "B")
    assert h.get(f"/download/{other}/a.txt").status == 404
