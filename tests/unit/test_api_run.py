"""POST /run, GET /status?wait= and GET /runtimes in memory.

Real ``WorkerAPI``, ``JobManager`` and ``UploadRequest`` behind StubTreq, a
scripted sandbox and a ``task.Clock`` (``worker_fakes``): the job's end and
the passing of time are the test's to decide.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer

from sandrun.config import QuotaConfig
from sandrun.jobs.runtimes import Runtime, RuntimeList
from sandrun.wire import Reason
from tests.unit.worker_fakes import FakeRun, Harness, multipart, synchronous


@pytest.fixture
def h(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path))


def run_json(h: Harness, document: Any, query: str = "") -> defer.Deferred[Any]:
    return h.begin("POST", "/run" + query, json.dumps(document).encode(),
                   {"Content-Type": "application/json"})


def only_run(h: Harness) -> FakeRun:
    (run,) = h.sandbox.runs.values()
    return run


def count_admissions(h: Harness) -> list[int]:
    """Counts the manager's admission checks (once from the headers, once in the route)."""
    asked: list[int] = []
    admit = h.manager.admit

    def counted(client: str, quota_exempt: bool = False) -> Any:
        asked.append(1)
        return admit(client, quota_exempt)

    h.manager.admit = counted  # type: ignore[method-assign]
    return asked


def error(reply: Any, status: int) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    body: dict[str, Any] = reply.json()
    assert isinstance(body["error"], str) and isinstance(body["details"], str)
    return body


# -- POST /run: the result in one answer ---------------------------------------------------


def test_run_answers_only_at_the_end_with_status_output_and_outputs(h: Harness) -> None:
    d = run_json(h, {"manifest": {"entrypoint": "main.py", "outputs": ["*.txt"]},
                     "files": {"main.py": "print('hi')"}})
    run = only_run(h)
    run.print("hi\n")
    run.print("warn\n", "stderr")
    run.write("result.txt", "42")
    assert not h.answered(d)  # still running: no answer yet
    run.finish(wall_time_ms=7.0)
    reply = h.reply(d)
    assert reply.status == 200
    body = reply.json()
    job_id = body["job_id"]
    assert body["status"] == "completed"
    assert body["execution_metadata"]["reason"] == "completed"
    assert body["execution_metadata"]["wall_time_ms"] == 7.0
    assert body["stdout"] == "hi\n" and body["stderr"] == "warn\n"
    assert body["truncated"] == {"stdout": False, "stderr": False}
    assert body["kept"] is True
    assert [f["path"] for f in body["outputs"]] == ["result.txt"]
    assert body["outputs"][0]["download_url"] == f"/download/{job_id}/result.txt"
    # Everything /status says is there, the same.
    status = h.status(job_id)
    assert {k: body[k] for k in status} == status
    # Kept: the output downloads as usual.
    assert h.get(body["outputs"][0]["download_url"]).body == b"42"


def test_run_takes_a_multipart_body_as_submit_does(h: Harness) -> None:
    body, kind = multipart({}, [("hello.rb", b"puts 1")])
    h.sandbox.script = lambda run: (run.print("1\n"), run.finish())
    reply = h.request("POST", "/run", body, {"Content-Type": kind})
    assert reply.status == 200, reply.body
    assert reply.json()["stdout"] == "1\n"
    assert only_run(h).argv == ("ruby", "hello.rb")


@pytest.mark.parametrize("reason", [
    Reason.EXIT_NONZERO, Reason.SIGNALED, Reason.TIMEOUT, Reason.MEMORY_LIMIT,
    Reason.CPU_LIMIT, Reason.OUTPUT_LIMIT, Reason.SANDBOX_ERROR])
def test_run_answers_a_failed_job_with_its_reason(h: Harness, reason: Reason) -> None:
    def end(run: FakeRun) -> None:
        run.print("partial", "stderr")
        run.finish(reason, exit_code=3 if reason == Reason.EXIT_NONZERO else None,
                   signal=9 if reason != Reason.EXIT_NONZERO else None)

    h.sandbox.script = end
    body = h.post_json({"files": {"a.py": ""}}, path="/run").json()
    assert body["status"] == "failed"
    assert body["execution_metadata"]["reason"] == reason.value
    assert body["stderr"] == "partial"


def test_run_answers_a_job_the_sandbox_could_not_take_as_sandbox_error(h: Harness) -> None:
    h.sandbox.unavailable = True
    body = h.post_json({"files": {"a.py": ""}}, path="/run").json()
    assert body["status"] == "failed"
    assert body["execution_metadata"]["reason"] == "sandbox_error"


def test_run_says_which_stream_was_truncated(h: Harness) -> None:
    def flood(run: FakeRun) -> None:
        run.print("x" * 100)
        run.sandbox.running.pop(run.job_id)
        from sandrun.sandbox.supervisor import SandboxResult
        run.done.callback(SandboxResult(Reason.OUTPUT_LIMIT, None, 9, 0.1, 1, 1.0,
                                        truncated={"stdout": True, "stderr": False}))

    h.sandbox.script = flood
    body = h.post_json({"files": {"a.py": ""}}, path="/run").json()
    assert body["execution_metadata"]["reason"] == "output_limit"
    assert body["truncated"] == {"stdout": True, "stderr": False}


def test_run_with_keep_0_deletes_the_job_once_answered(h: Harness) -> None:
    h.sandbox.script = lambda run: (run.write("out.txt", "x"), run.finish())
    reply = h.post_json({"manifest": {"entrypoint": "a.py", "outputs": ["out.txt"]},
                         "files": {"a.py": ""}}, path="/run?keep=0")
    body = reply.json()
    assert body["status"] == "completed" and body["kept"] is False
    assert body["outputs"] == [{"path": "out.txt", "size_bytes": 1,
                                "sha256": body["outputs"][0]["sha256"],
                                "mime_type": "text/plain", "download_url": None}]
    assert h.get(f"/status/{body['job_id']}").status == 404
    assert h.manager.jobs == {} and h.storage.job_ids() == [] and h.storage.logs() == []


def test_run_with_a_bad_keep_is_400_and_creates_no_job(h: Harness) -> None:
    body = error(h.post_json({"files": {"a.py": ""}}, path="/run?keep=maybe"), 400)
    assert body["field"] == "keep"
    assert h.manager.jobs == {} and h.storage.job_ids() == []


@pytest.mark.parametrize("document,field", [
    ({"manifest": {"timeout": 0}, "files": {"a.py": ""}}, "timeout"),
    ({"manifest": {"entrypoint": "b.py"}, "files": {"a.py": ""}}, "entrypoint"),
    ({"manifest": {"colour": "red"}, "files": {"a.py": ""}}, "colour"),
])
def test_run_with_a_bad_manifest_is_400_naming_the_field(h: Harness, document: Any,
                                                        field: str) -> None:
    body = error(h.post_json(document, path="/run"), 400)
    assert body["field"] == field
    assert h.manager.jobs == {} and h.storage.job_ids() == []


def test_run_of_an_unknown_content_type_is_415(h: Harness) -> None:
    error(h.request("POST", "/run", b"print(1)", {"Content-Type": "text/x-python"}), 415)
    assert h.storage.job_ids() == []


def test_run_over_the_upload_limit_is_413_from_the_headers(h: Harness) -> None:
    body, kind = multipart({}, [("big.py", b"#" * 250_000)])
    reply = h.request("POST", "/run", body, {"Content-Type": kind})
    assert error(reply, 413)["details"].endswith(f"Content-Length is {len(body)}")
    assert h.manager.jobs == {}


def test_run_over_the_quota_is_429_before_the_body_is_read(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), quotas=QuotaConfig(cpu_seconds_per_minute=10,
                                                  max_active_jobs=1, jobs_per_hour=20))
    h.submit()
    asked = count_admissions(h)
    reply = h.post_json({"files": {"a.py": ""}}, path="/run")
    body = error(reply, 429)
    assert body["retry_after"] >= 1 and reply.header("retry-after") == str(body["retry_after"])
    # Refused once, from the headers (UploadRequest); the route would have asked again.
    assert asked == [1]
    assert len(h.manager.jobs) == 1


def test_run_into_a_full_queue_is_503_before_the_body_is_read(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1, queue_size=1)
    h.submit()
    h.submit()  # one running, one queued: the queue is full
    asked = count_admissions(h)
    reply = h.post_json({"files": {"a.py": ""}}, path="/run")
    assert error(reply, 503)["retry_after"] > 0
    assert asked == [1]
    assert len(h.manager.jobs) == 2


def test_run_into_full_storage_is_503(h: Harness) -> None:
    h.storage.full = True
    assert error(h.post_json({"files": {"a.py": ""}}, path="/run"), 503)["retry_after"] > 0


def test_run_waits_through_the_queue(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    first = h.submit()
    d = run_json(h, {"files": {"a.py": ""}})
    assert len(h.sandbox.runs) == 1  # queued behind the first
    h.run_of(first).finish()
    (second,) = (r for r in h.sandbox.runs.values() if r.job_id != first)
    assert not h.answered(d)
    second.finish()
    assert h.reply(d).json()["status"] == "completed"


def test_a_run_client_that_goes_away_cancels_its_running_job(h: Harness) -> None:
    d = run_json(h, {"files": {"a.py": ""}})
    run = only_run(h)
    d.addErrback(lambda _: None)  # the client's own side of it fails, as it should
    d.cancel()  # the client hangs up
    h.stub.flush()
    assert h.sandbox.kills == [(run.job_id, Reason.CANCELLED)]
    assert h.manager.jobs == {} and h.storage.job_ids() == []
    assert h.get("/stats").json()["your_quota"]["active_jobs"] == 0


def test_a_run_client_that_goes_away_cancels_its_queued_job(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    first = h.submit()
    d = run_json(h, {"files": {"a.py": ""}})
    d.addErrback(lambda _: None)
    d.cancel()
    h.stub.flush()
    assert [j.id for j in h.manager.jobs.values()] == [first]
    assert h.manager.queue == type(h.manager.queue)()
    h.run_of(first).finish()
    assert len(h.sandbox.runs) == 1  # the cancelled one never started


def test_a_run_whose_job_is_deleted_meanwhile_answers_it_cancelled(h: Harness) -> None:
    d = run_json(h, {"files": {"a.py": ""}})
    job_id = only_run(h).job_id
    assert h.delete(f"/jobs/{job_id}").status == 200
    body = h.reply(d).json()
    assert body["status"] == "failed" and body["execution_metadata"]["reason"] == "cancelled"


# -- GET /status?wait= ------------------------------------------------------------------------


def test_a_long_poll_is_answered_as_soon_as_the_job_ends(h: Harness) -> None:
    job_id = h.submit()
    d = h.begin("GET", f"/status/{job_id}?wait=30")
    h.clock.advance(10)
    assert not h.answered(d)
    h.run_of(job_id).finish()
    body = h.reply(d).json()
    assert body["status"] == "completed"
    assert h.clock.getDelayedCalls() == [c for c in h.clock.getDelayedCalls()
                                         if c.getTime() != h.clock.seconds() + 20]


def test_a_long_poll_is_answered_at_its_time_with_the_job_still_running(h: Harness) -> None:
    job_id = h.submit()
    d = h.begin("GET", f"/status/{job_id}?wait=2.5")
    h.clock.advance(2.4)
    assert not h.answered(d)
    h.clock.advance(0.1)
    assert h.reply(d).json()["status"] == "running"
    assert h.manager.jobs[job_id].end_listeners == []  # nothing left behind


def test_a_long_poll_is_held_at_most_the_servers_cap(h: Harness) -> None:
    job_id = h.submit()
    d = h.begin("GET", f"/status/{job_id}?wait=100000")
    h.clock.advance(59.9)
    assert not h.answered(d)
    h.clock.advance(0.1)
    assert h.reply(d).json()["status"] == "running"


def test_a_long_poll_on_a_finished_job_is_answered_at_once(h: Harness) -> None:
    job_id = h.submit()
    h.run_of(job_id).finish()
    assert h.get(f"/status/{job_id}?wait=30").json()["status"] == "completed"


@pytest.mark.parametrize("wait", ["-1", "soon", "nan", "inf"])
def test_a_bad_wait_is_400(h: Harness, wait: str) -> None:
    job_id = h.submit()
    assert error(h.get(f"/status/{job_id}?wait={wait}"), 400)["field"] == "wait"


def test_a_long_poll_on_a_job_deleted_meanwhile_is_404(h: Harness) -> None:
    job_id = h.submit()
    d = h.begin("GET", f"/status/{job_id}?wait=30")
    h.delete(f"/jobs/{job_id}")
    assert h.reply(d).status == 404


def test_a_long_poll_client_that_goes_away_leaves_no_listener_and_the_job_runs(
        h: Harness) -> None:
    job_id = h.submit()
    d = h.begin("GET", f"/status/{job_id}?wait=30")
    d.addErrback(lambda _: None)
    d.cancel()
    h.stub.flush()
    job = h.manager.jobs[job_id]
    assert job.end_listeners == [] and h.sandbox.kills == []
    assert job.status.value == "running"


# -- GET /runtimes ------------------------------------------------------------------------------


def test_runtimes_lists_what_the_probe_found(tmp_path: Any) -> None:
    found = (Runtime("python3", "python", "3.11.2", "/usr/bin/python3", (".py",), ("python",)),)
    calls: list[int] = []

    def probe() -> tuple[Runtime, ...]:
        calls.append(1)
        return found

    h = Harness(str(tmp_path))
    h.api.runtime_list = RuntimeList(synchronous, probe)
    for _ in range(2):
        body = h.get("/runtimes").json()
        assert body == {"runtimes": [{"language": "python", "interpreter": "python3",
                                      "version": "3.11.2", "path": "/usr/bin/python3",
                                      "extensions": [".py"], "aliases": ["python"]}]}
    assert calls == [1]  # asked once


def test_runtimes_waits_for_a_probe_under_way(tmp_path: Any) -> None:
    pending: defer.Deferred[Any] = defer.Deferred()
    h = Harness(str(tmp_path))
    h.api.runtime_list = RuntimeList(lambda f: pending, lambda: ())
    d = h.begin("GET", "/runtimes")
    assert not h.answered(d)
    pending.callback((Runtime("perl", "perl", "5.36.0", "/usr/bin/perl", (".pl",), ()),))
    assert [r["version"] for r in h.reply(d).json()["runtimes"]] == ["5.36.0"]
