"""The job lifecycle on a ``task.Clock``: queue, retention, quota slots, CPU charging, shutdown.

A real ``JobManager`` with a scripted fake sandbox and plain-directory storage
(``worker_fakes``); time only moves when a test advances the clock.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import defer, task

from sandrun.config import QuotaConfig
from sandrun.jobs import manager as manager_module
from sandrun.jobs.manager import CPU_CHARGE_INTERVAL, FAILED_RETENTION, FINISHED_RETENTION
from sandrun.jobs.model import COALESCE_BYTES, COALESCE_SECONDS, JobLog
from sandrun.sandbox.supervisor import SandboxResult
from sandrun.wire import JobStatus, Reason
from tests.unit.worker_fakes import FakeRun, Harness

CLIENT = "127.0.0.1"  # the address StubTreq's requests come from


@pytest.fixture
def h(tmp_path: Any) -> Harness:
    return Harness(str(tmp_path))


def active_jobs(h: Harness) -> int:
    quota = h.limiter.quota(CLIENT, h.clock.seconds())
    return int(quota["active_jobs"])  # type: ignore[call-overload]


def retention_timers(h: Harness) -> list[Any]:
    return [c for c in h.clock.getDelayedCalls() if "delete" in repr(c)]


# -- retention ---------------------------------------------------------------------------------


def test_a_failed_jobs_data_is_deleted_five_minutes_after_it_ends(h: Harness) -> None:
    job_id = h.submit()
    h.clock.advance(100)  # running time does not count
    h.run_of(job_id).finish(Reason.EXIT_NONZERO)
    h.clock.advance(FAILED_RETENTION - 0.001)
    assert h.storage.exists(job_id) and h.get(f"/status/{job_id}").status == 200
    h.clock.advance(0.001)
    assert not h.storage.exists(job_id)
    assert h.get(f"/status/{job_id}").status == 404
    assert h.manager.jobs == {}


def test_a_completed_jobs_data_is_kept_for_one_hour(h: Harness) -> None:
    job_id = h.submit()
    h.run_of(job_id).finish()
    h.clock.advance(FAILED_RETENTION + 1)
    assert h.storage.exists(job_id)
    h.clock.advance(FINISHED_RETENTION - FAILED_RETENTION - 1.001)
    assert h.get(f"/logs/{job_id}").status == 200
    h.clock.advance(0.001)
    assert not h.storage.exists(job_id)
    assert h.get(f"/logs/{job_id}").status == 404


def test_retention_timers_go_with_the_job_when_it_is_deleted_early(h: Harness) -> None:
    job_id = h.submit()
    h.run_of(job_id).finish()
    assert len(retention_timers(h)) == 1
    assert h.delete(f"/jobs/{job_id}").status == 200
    assert retention_timers(h) == []


def test_a_queued_or_running_job_is_never_expired(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    running, queued = h.submit(), h.submit()
    h.clock.advance(FINISHED_RETENTION * 3)
    assert h.status(running)["status"] == "running"
    assert h.status(queued)["status"] == "queued"


# -- queue and concurrency -----------------------------------------------------------------


def test_jobs_beyond_the_concurrency_limit_wait_and_start_in_order(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=2)
    ids = [h.submit() for _ in range(4)]
    assert list(h.sandbox.running) == ids[:2]
    assert [h.status(i)["queue_position"] for i in ids] == [0, 0, 1, 2]
    system = h.get("/stats").json()["system"]
    assert {k: system[k] for k in ("queue_length", "active_jobs", "capacity",
                                   "queue_capacity")} == {"queue_length": 2, "active_jobs": 2,
                                                          "capacity": 2, "queue_capacity": 10}
    h.run_of(ids[1]).finish()
    assert list(h.sandbox.running) == [ids[0], ids[2]]
    assert h.status(ids[2])["status"] == "running"
    assert [h.status(i)["queue_position"] for i in ids[2:]] == [0, 1]
    assert h.status(ids[2])["started_at"] is not None


def test_a_sandbox_that_cannot_take_a_job_fails_it_and_the_queue_goes_on(h: Harness) -> None:
    h.sandbox.unavailable = True
    job_id = h.submit()
    status = h.status(job_id)
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "sandbox_error"
    assert active_jobs(h) == 0
    h.sandbox.unavailable = False
    assert h.status(h.submit())["status"] == "running"


def test_a_failure_listing_outputs_still_ends_the_job(h: Harness,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise OSError("no such file: secret-name.txt")

    monkeypatch.setattr(manager_module, "list_outputs", broken)
    job_id = h.submit()
    h.run_of(job_id).finish()
    status = h.status(job_id)
    assert status["status"] == "completed" and status["output_files"] == {}
    assert active_jobs(h) == 0


# -- quota slots: released on every way a job ends --------------------------------------------


def _complete(h: Harness, job_id: str) -> None:
    h.run_of(job_id).finish()


def _fail(h: Harness, job_id: str) -> None:
    h.run_of(job_id).finish(Reason.EXIT_NONZERO)


def _timeout(h: Harness, job_id: str) -> None:
    h.run_of(job_id).finish(Reason.TIMEOUT, exit_code=None, signal=9)


def _memory(h: Harness, job_id: str) -> None:
    h.run_of(job_id).finish(Reason.MEMORY_LIMIT, exit_code=None, signal=9)


def _sandbox_error(h: Harness, job_id: str) -> None:
    h.run_of(job_id).done.callback(SandboxResult(Reason.SANDBOX_ERROR, message="seccomp"))


def _sandbox_crash(h: Harness, job_id: str) -> None:
    h.run_of(job_id).done.errback(RuntimeError("launcher died"))


def _cancel(h: Harness, job_id: str) -> None:
    assert h.delete(f"/jobs/{job_id}").status == 200


def _shutdown(h: Harness, job_id: str) -> None:
    h.manager.stop()


@pytest.mark.parametrize("end,reason", [
    (_complete, "completed"), (_fail, "exit_nonzero"), (_timeout, "timeout"),
    (_memory, "memory_limit"), (_sandbox_error, "sandbox_error"),
    (_sandbox_crash, "sandbox_error"), (_cancel, None), (_shutdown, None),
])
def test_a_running_jobs_quota_slot_is_released_however_it_ends(
        h: Harness, end: Callable[[Harness, str], None], reason: str | None) -> None:
    job_id = h.submit()
    assert active_jobs(h) == 1
    end(h, job_id)
    assert active_jobs(h) == 0
    if reason is not None:
        status = h.status(job_id)
        assert status["status"] == ("completed" if reason == "completed" else "failed")
        assert status["execution_metadata"]["reason"] == reason


@pytest.mark.parametrize("end", [_cancel, _shutdown])
def test_a_queued_jobs_quota_slot_is_released_when_it_is_cancelled(
        tmp_path: Any, end: Callable[[Harness, str], None]) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    h.submit()
    queued = h.submit()
    assert active_jobs(h) == 2
    end(h, queued)
    assert active_jobs(h) == (1 if end is _cancel else 0)
    assert queued not in h.sandbox.runs


def test_cancelling_a_running_job_frees_its_slot_before_the_kill_lands(tmp_path: Any) -> None:
    quotas = QuotaConfig(cpu_seconds_per_minute=100, max_active_jobs=1, jobs_per_hour=10)
    h = Harness(str(tmp_path), quotas=quotas)
    h.sandbox.kills_take_effect = False
    job_id = h.submit()
    h.run_of(job_id).cpu = 1.25
    h.delete(f"/jobs/{job_id}")
    assert active_jobs(h) == 0
    assert h.get("/stats").json()["your_quota"]["used"] == 1.25  # charged on the way out
    assert h.post_json({"files": {"a.py": ""}}).status == 200
    h.run_of(job_id).finish(Reason.CANCELLED, exit_code=None, signal=9)
    assert active_jobs(h) == 1  # only the new job


def test_a_finished_job_frees_the_slot_for_the_next_submission(tmp_path: Any) -> None:
    quotas = QuotaConfig(cpu_seconds_per_minute=100, max_active_jobs=1, jobs_per_hour=10)
    h = Harness(str(tmp_path), quotas=quotas)
    job_id = h.submit()
    assert h.post_json({"files": {"a.py": ""}}).status == 429
    h.run_of(job_id).finish()
    assert h.post_json({"files": {"a.py": ""}}).status == 200


# -- CPU charging ------------------------------------------------------------------------------


def test_cpu_is_charged_while_a_job_runs_and_blocks_the_next_submission(tmp_path: Any) -> None:
    quotas = QuotaConfig(cpu_seconds_per_minute=4, max_active_jobs=5, jobs_per_hour=10)
    h = Harness(str(tmp_path), quotas=quotas)
    run: FakeRun = h.run_of(h.submit())
    run.cpu = 3.0
    h.clock.advance(CPU_CHARGE_INTERVAL)
    assert h.get("/stats").json()["your_quota"]["used"] == 3.0
    assert h.post_json({"files": {"a.py": ""}}).status == 200  # 3 of 4 used: still allowed
    run.cpu = 4.5
    h.clock.advance(CPU_CHARGE_INTERVAL)
    assert not run.finished
    reply = h.post_json({"files": {"a.py": ""}})
    assert reply.status == 429
    assert "CPU" in reply.json()["reason"] and reply.json()["cpu_available"] == 0
    retry = reply.json()["retry_after"]
    run.finish(cpu_seconds=4.5)
    h.clock.advance(retry - 1)
    assert h.post_json({"files": {"a.py": ""}}).status == 429
    h.clock.advance(1)
    assert h.post_json({"files": {"a.py": ""}}).status == 200


def test_the_final_cpu_figure_is_charged_when_the_job_ends(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    run = h.run_of(h.submit())
    run.finish(cpu_seconds=2.5)  # ended before the charger ever ran
    assert h.get("/stats").json()["your_quota"]["used"] == 2.5


def test_the_charger_stops_with_the_manager(h: Harness) -> None:
    h.submit()
    h.manager.stop()
    assert h.clock.getDelayedCalls() == []


# -- shutdown ------------------------------------------------------------------------------------


def test_stop_kills_running_jobs_drops_queued_ones_and_deletes_all_data(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1)
    h.sandbox.kills_take_effect = False  # the sandbox reports back after the manager stopped
    done = h.submit()
    h.run_of(done).finish()
    running, queued = h.submit(), h.submit()
    h.manager.stop()
    assert h.sandbox.kills == [(running, Reason.SHUTDOWN)]
    assert queued not in h.sandbox.runs
    assert h.storage.job_ids() == [] and h.manager.jobs == {}
    # The late result of the killed job is ignored quietly.
    h.run_of(running).finish(Reason.SHUTDOWN, exit_code=None, signal=9)
    assert h.manager.jobs == {} and h.storage.job_ids() == []
    assert h.clock.getDelayedCalls() == []


def test_after_stop_submissions_are_refused_with_503(h: Harness) -> None:
    h.manager.stop()
    reply = h.post_json({"files": {"a.py": ""}})
    assert reply.status == 503 and "shutting down" in reply.json()["details"]
    assert h.storage.job_ids() == []


def test_end_listeners_hear_of_every_ending(h: Harness) -> None:
    job_id = h.submit()
    heard: list[JobStatus] = []
    h.manager.jobs[job_id].end_listeners.append(lambda job: heard.append(job.status))
    h.run_of(job_id).finish(Reason.EXIT_NONZERO)
    assert heard == [JobStatus.FAILED]


def test_stop_waits_for_the_sandbox_to_report_each_killed_job(h: Harness) -> None:
    h.sandbox.kills_take_effect = False
    job_id = h.submit()
    drained = h.manager.stop()
    assert not drained.called  # the launcher must not be told to go with reports in flight
    h.run_of(job_id).finish(Reason.SHUTDOWN, exit_code=None, signal=9)
    assert drained.called


def test_stop_gives_up_waiting_after_the_grace_period(h: Harness) -> None:
    h.sandbox.kills_take_effect = False
    h.submit()
    drained = h.manager.stop(grace=5.0)
    h.clock.advance(4.9)
    assert not drained.called
    h.clock.advance(0.1)
    assert drained.called
    assert h.clock.getDelayedCalls() == []


def test_stop_with_nothing_running_is_done_at_once(h: Harness) -> None:
    h.run_of(h.submit()).finish()
    assert h.manager.stop().called


# -- the output log ------------------------------------------------------------------------------


def test_sparse_output_is_published_at_once(tmp_path: Any) -> None:
    clock = task.Clock()
    log = JobLog(str(tmp_path / "job.log"), clock=clock)
    for line in (b"one\n", b"two\n"):
        log.append("stdout", line)
        assert log.chunks[-1] == ("stdout", line)
        clock.advance(COALESCE_SECONDS)


def test_dense_output_is_coalesced_into_few_chunks_and_nothing_is_lost(tmp_path: Any) -> None:
    clock = task.Clock()
    log = JobLog(str(tmp_path / "job.log"), clock=clock)
    heard: list[tuple[str, bytes]] = []
    log.listeners.append(lambda stream, data: heard.append((stream, data)))
    for _ in range(10_000):
        log.append("stdout", b"x")
    assert heard == [("stdout", b"x")]  # the first at once, the rest held back
    assert log.text("stdout") == "x" * 10_000 and log.sizes["stdout"] == 10_000
    clock.advance(COALESCE_SECONDS)
    assert heard == [("stdout", b"x"), ("stdout", b"x" * 9_999)]
    assert list(log.chunks) == heard


def test_a_full_buffer_or_the_other_stream_publishes_at_once_in_order(tmp_path: Any) -> None:
    log = JobLog(str(tmp_path / "job.log"), clock=task.Clock())
    log.append("stdout", b"a")
    log.append("stderr", b"b")
    log.append("stdout", b"c" * COALESCE_BYTES)
    assert list(log.chunks) == [("stdout", b"a"), ("stderr", b"b"),
                                ("stdout", b"c" * COALESCE_BYTES)]
    assert log.text() == "ab" + "c" * COALESCE_BYTES


def test_the_output_lives_in_its_file_not_in_the_workers_memory(tmp_path: Any) -> None:
    path = tmp_path / "job.log"
    log = JobLog(str(path))
    log.append("stdout", b"hello ")
    log.append("stderr", b"world")
    assert path.read_bytes() == b"hello world"
    assert log.chunks.in_memory() == 0
    assert log.chunks[1] == ("stderr", b"world") and log.text("stdout") == "hello "
    log.close()
    assert not path.exists() and log.chunks[0] == ("stdout", b"")


def test_output_that_cannot_be_written_to_the_file_is_kept_in_memory(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    log = JobLog(str(tmp_path / "job.log"))

    def full(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    log.append("stdout", b"kept")
    assert log.chunks[0] == ("stdout", b"kept")


def test_a_job_prints_one_byte_at_a_time_into_a_handful_of_chunks(h: Harness) -> None:
    job_id = h.submit()
    run = h.run_of(job_id)
    for i in range(20):
        for _ in range(500):
            run.print("x")
        h.clock.advance(COALESCE_SECONDS)
    assert len(h.manager.jobs[job_id].log.chunks) <= 21
    assert h.get(f"/logs/{job_id}").json()["stdout"] == "x" * 10_000


def test_all_output_is_published_before_the_end_is_reported(h: Harness) -> None:
    job_id = h.submit()
    job = h.manager.jobs[job_id]
    events: list[str] = []
    job.log.listeners.append(lambda stream, data: events.append(data.decode()))
    job.end_listeners.append(lambda job: events.append("end"))
    h.run_of(job_id).print("last words")
    h.run_of(job_id).finish()
    assert events == ["last words", "end"]


def test_the_log_file_goes_with_the_job_however_it_goes(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_concurrent=1, queue_size=3)
    expired, downloaded, deleted = h.submit(), h.submit(), h.submit()
    assert len(h.storage.logs()) == 3
    h.run_of(expired).finish(Reason.EXIT_NONZERO)
    h.clock.advance(FAILED_RETENTION)
    h.run_of(downloaded).finish()
    assert h.get(f"/download/{downloaded}").status == 200
    h.delete(f"/jobs/{deleted}")
    assert h.storage.logs() == []
    h.submit()  # running
    h.submit()  # queued
    assert len(h.storage.logs()) == 2
    h.manager.stop()
    assert h.storage.logs() == [] and h.storage.job_ids() == []


def test_a_submission_refused_after_its_upload_leaves_no_log_file(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    quotas = QuotaConfig(cpu_seconds_per_minute=100, max_active_jobs=1, jobs_per_hour=10)
    h = Harness(str(tmp_path), quotas=quotas)
    h.submit()
    # As when another submission of the same client won the race while this one
    # uploaded: the early checks pass, the final one in manager.submit refuses.
    monkeypatch.setattr(h.manager, "admit", lambda client, exempt=False: None)
    assert h.post_json({"files": {"a.py": ""}}).status == 429
    assert len(h.storage.logs()) == 1 and len(h.storage.job_ids()) == 1


def test_past_the_cap_on_finished_jobs_the_oldest_finished_is_deleted(tmp_path: Any) -> None:
    h = Harness(str(tmp_path), max_finished_jobs=3)
    ids = [h.submit() for _ in range(2)]
    running = h.submit()  # still running: never counted, never deleted early
    for job_id in ids:
        h.run_of(job_id).finish()
    more = []
    for _ in range(3):
        job_id = h.submit()
        h.run_of(job_id).finish()
        more.append(job_id)
    held = [*ids, *more][-3:]
    assert list(h.manager.finished) == held
    assert sorted(h.manager.jobs) == sorted([*held, running])
    assert h.get(f"/status/{ids[0]}").status == 404
    assert h.status(running)["status"] == "running"
    assert sorted(h.storage.job_ids()) == sorted([*held, running])
    assert h.get("/stats").json()["system"]["finished_jobs_held"] == 3


def test_a_job_deleted_while_its_directory_is_chowned_never_starts(tmp_path: Any) -> None:
    # The chown runs in a thread (with the fetch); a DELETE meanwhile has no sandbox run to
    # kill yet.
    h = Harness(str(tmp_path))
    chowns: list[defer.Deferred[Any]] = []
    plain = h.manager.blocking

    def blocking(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if getattr(f, "__name__", "") == "prepare_and_chown":
            plans.append(f(*args, **kwargs))  # the thread's work is done; its answer waits
            d: defer.Deferred[Any] = defer.Deferred()
            chowns.append(d)
            return d
        return plain(f, *args, **kwargs)

    plans: list[Any] = []
    h.manager.blocking = blocking
    job_id = h.submit()
    assert len(chowns) == 1 and h.sandbox.runs == {}
    assert h.delete(f"/jobs/{job_id}").status == 200
    chowns[0].callback(plans[0])
    assert h.sandbox.runs == {}  # never launched
    assert h.get("/stats").json()["system"]["active_jobs"] == 0
    assert h.manager.jobs == {}
