"""The job manager with environments: install before the run, CPU across both, cancels.

A real ``JobManager`` and ``WorkerAPI`` (``worker_fakes.Harness``) with a
scripted sandbox; ``ScriptedEnvironments`` stands in for the fetch so a test
decides when it ends and what it yields.  The real fetch and install are
``tests/environments`` and ``tests/integration/test_worker_environments.py``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet import defer

from sandrun.environments import DependencyError, EnvironmentPlan, Environments, Registry
from sandrun.jobs.manager import CPU_CHARGE_INTERVAL
from sandrun.wire import Reason
from tests.unit.worker_fakes import Harness

CLIENT = "127.0.0.1"
INSTALL = ("python3", "-m", "pip", "install", "six")
PLAN = EnvironmentPlan("default", install_argv=INSTALL, log="sandrun: 1 pip package(s)\n",
                       output_excludes=(".deps/",))
WITH_REQUIREMENTS = {"entrypoint": "main.py", "requirements": "requirements.txt"}
FILES = {"main.py": "import six", "requirements.txt": "six==1.16.0\n"}


class ScriptedEnvironments(Environments):
    """``prepare`` answers what the test queued: a plan, an error, or a pending fetch."""

    def __init__(self, root: str) -> None:
        super().__init__(Registry(root))
        self.answer: Any = PLAN
        self.prepared = 0

    def prepare(self, manifest: Any, job_work_dir: str, stop: Any = None) -> Any:
        self.stop = stop
        self.prepared += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # a Deferred stands for a fetch still running


@pytest.fixture
def envs(tmp_path: Any) -> ScriptedEnvironments:
    return ScriptedEnvironments(os.path.join(str(tmp_path), "environments"))


@pytest.fixture
def h(tmp_path: Any, envs: ScriptedEnvironments) -> Harness:
    return Harness(str(tmp_path), environments=envs)


def used(h: Harness) -> float:
    return float(h.get("/stats").json()["your_quota"]["used"])


def test_the_install_runs_first_in_the_sandbox_then_the_job_and_each_has_its_own_log(
        h: Harness) -> None:
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    install = h.run_of(job_id)
    assert install.argv == INSTALL
    install.print("Successfully installed six-1.16.0\n")
    install.finish(cpu_seconds=1.0, wall_time_ms=500.0)
    run = h.run_of(job_id)
    assert run is not install and run.argv[-1] == "main.py"
    run.print("ok\n")
    run.finish(cpu_seconds=0.25, wall_time_ms=100.0)
    status = h.status(job_id)
    assert status["status"] == "completed"
    assert status["execution_metadata"]["cpu_seconds"] == 1.25
    assert status["execution_metadata"]["wall_time_ms"] == 600.0
    logs = h.get(f"/logs/{job_id}").json()
    assert logs["stdout"] == "ok\n"  # the program's output only
    assert logs["stderr"] == ""
    assert logs["install"] == "sandrun: 1 pip package(s)\nSuccessfully installed six-1.16.0\n"
    assert h.get(f"/logs/{job_id}?format=text").body == b"ok\n"


def test_cpu_is_charged_live_across_the_install_and_the_run_never_going_back(
        h: Harness) -> None:
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    install = h.run_of(job_id)
    install.cpu = 1.5
    h.clock.advance(CPU_CHARGE_INTERVAL)
    assert used(h) == 1.5
    install.finish(cpu_seconds=2.0)  # more than the last reading
    run = h.run_of(job_id)
    run.cpu = 0.5  # the sandbox counts the job's own run from 0 again
    h.clock.advance(CPU_CHARGE_INTERVAL)
    assert used(h) == 2.5
    run.cpu = 1.0
    h.clock.advance(CPU_CHARGE_INTERVAL)
    assert used(h) == 3.0
    run.finish(cpu_seconds=1.25)
    assert used(h) == 3.25


def test_a_job_cancelled_during_its_install_is_charged_for_it_and_never_runs(
        h: Harness) -> None:
    h.sandbox.kills_take_effect = False
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    install = h.run_of(job_id)
    install.cpu = 0.75
    assert h.delete(f"/jobs/{job_id}").json()["cancelled"] is True
    assert h.sandbox.kills == [(job_id, Reason.CANCELLED)]
    assert used(h) == 0.75
    install.finish(Reason.CANCELLED, exit_code=None, signal=9)
    assert h.run_of(job_id) is install  # the job itself never started
    assert h.manager.jobs == {} and h.storage.job_ids() == []
    assert h.manager.stats()["active_jobs"] == 0


def test_a_job_cancelled_as_its_own_run_starts_is_charged_for_the_install(
        h: Harness) -> None:
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    install = h.run_of(job_id)

    def cancel(run: Any) -> None:  # lands as the job's own run is asked for
        h.manager.cancel(job_id)

    h.sandbox.script = cancel
    install.finish(cpu_seconds=2.0)
    assert h.run_of(job_id) is not install
    assert h.sandbox.kills == [(job_id, Reason.CANCELLED)]
    assert used(h) == 2.0
    assert h.manager.jobs == {} and h.storage.job_ids() == []


@pytest.mark.parametrize("stop", ["cancel", "shutdown"])
def test_a_job_stopped_while_its_dependencies_are_fetched_never_reaches_the_sandbox(
        h: Harness, envs: ScriptedEnvironments, stop: str) -> None:
    fetch: defer.Deferred[EnvironmentPlan] = defer.Deferred()
    envs.answer = fetch
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    assert envs.prepared == 1 and job_id not in h.sandbox.runs
    ended: list[Any] = []
    h.manager.jobs[job_id].end_listeners.append(lambda job: ended.append(job.reason))
    if stop == "cancel":
        assert h.delete(f"/jobs/{job_id}").json()["cancelled"] is True
        assert h.get(f"/status/{job_id}").status == 404
        assert ended == []  # it ends once the fetch returns
    else:
        drained = h.manager.stop()
        assert ended == [Reason.SHUTDOWN] and not drained.called
    fetch.callback(PLAN)
    assert job_id not in h.sandbox.runs
    assert ended == [Reason.CANCELLED if stop == "cancel" else Reason.SHUTDOWN]
    assert h.manager.jobs == {} and h.storage.job_ids() == []
    assert h.manager.running == set()
    if stop == "shutdown":
        assert drained.called


def test_a_failed_fetch_ends_the_job_install_failed_with_the_message_and_runs_nothing(
        h: Harness, envs: ScriptedEnvironments) -> None:
    envs.answer = DependencyError("nosuch-pkg: no such package, or no version matching")
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    status = h.status(job_id)
    assert status["status"] == "failed"
    meta = status["execution_metadata"]
    assert meta["reason"] == "install_failed"
    assert meta["message"] == "nosuch-pkg: no such package, or no version matching"
    logs = h.get(f"/logs/{job_id}").json()
    assert "sandrun: install failed: nosuch-pkg" in logs["install"]
    assert logs["stdout"] == logs["stderr"] == ""
    assert job_id not in h.sandbox.runs


def test_a_failing_installer_ends_the_job_install_failed_with_its_error_line(
        h: Harness) -> None:
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    install = h.run_of(job_id)
    install.print("Looking in links\nERROR: No matching distribution found for six\n",
                  "stderr")
    install.finish(Reason.EXIT_NONZERO, exit_code=1)
    meta = h.status(job_id)["execution_metadata"]
    assert meta["reason"] == "install_failed"
    assert meta["message"] == ("the install step failed: "
                               "ERROR: No matching distribution found for six")
    assert h.run_of(job_id) is install


def test_installed_dependencies_are_not_outputs_and_cannot_be_downloaded(h: Harness) -> None:
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    install = h.run_of(job_id)
    install.write(".deps/python/six.py", "# six")
    install.finish()
    run = h.run_of(job_id)
    run.write("result.txt", "42")
    run.finish()
    outputs = h.get(f"/outputs/{job_id}").json()["files"]
    assert [f["path"] for f in outputs] == ["result.txt"]
    assert h.get(f"/download/{job_id}/.deps/python/six.py").status == 404


@pytest.mark.parametrize("name,details", [
    ("vision", "sandrun env build vision"),
    ("nosuch", "GET /environments lists them"),
])
def test_an_unbuilt_or_unknown_template_is_a_400_saying_what_to_do_and_leaves_nothing(
        tmp_path: Any, name: str, details: str) -> None:
    h = Harness(str(tmp_path))
    reply = h.post_json({"manifest": {"entrypoint": "main.py", "environment": name},
                         "files": {"main.py": ""}})
    assert reply.status == 400
    body = reply.json()
    assert body["error"] == "Invalid manifest" and body["field"] == "environment"
    assert details in body["details"]
    assert h.manager.jobs == {} and h.storage.job_ids() == []


def test_environments_lists_what_the_worker_checks_against(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    body = h.get("/environments").json()
    assert body["templates"][0] == "default" and "vision" in body["templates"]
    assert {e["name"]: e["ready"] for e in body["environments"]}["vision"] is False


def test_the_installer_gets_the_plans_variables_and_none_of_the_manifests(
        h: Harness, envs: ScriptedEnvironments) -> None:
    envs.answer = EnvironmentPlan("default", env=(("GEM_PATH", "/job/.deps/ruby"),),
                                  install_argv=INSTALL)
    job_id = h.submit(FILES, {**WITH_REQUIREMENTS,
                              "env": {"RUBYOPT": "-r/job/evil.rb", "NODE_OPTIONS": "-r x"}})
    install = h.run_of(job_id)
    assert install.env == (("GEM_PATH", "/job/.deps/ruby"),)
    install.finish()
    run = h.run_of(job_id)
    assert ("RUBYOPT", "-r/job/evil.rb") in run.env and ("NODE_OPTIONS", "-r x") in run.env


def test_the_install_and_the_run_share_one_slot_which_comes_back_at_the_end(
        h: Harness) -> None:
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    h.run_of(job_id).finish()
    assert len(h.sandbox.slots_held) == 1
    h.run_of(job_id).finish()
    slots = [slot for j, slot in h.sandbox.slot_uses if j == job_id]
    assert len(slots) == 2 and slots[0] == slots[1]
    assert h.sandbox.slots_held == set()
    assert h.status(job_id)["status"] == "completed"


def test_a_failed_install_returns_the_slot(h: Harness) -> None:
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    h.run_of(job_id).finish(Reason.EXIT_NONZERO)
    assert h.status(job_id)["execution_metadata"]["reason"] == "install_failed"
    assert h.sandbox.slots_held == set()


@pytest.mark.parametrize("stop", ["cancel", "shutdown"])
def test_stopping_a_job_during_its_fetch_kills_the_fetch_and_frees_the_slot_at_once(
        h: Harness, envs: ScriptedEnvironments, stop: str) -> None:
    fetch: defer.Deferred[EnvironmentPlan] = defer.Deferred()
    envs.answer = fetch
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    assert not envs.stop.is_set()
    if stop == "cancel":
        h.delete(f"/jobs/{job_id}")
    else:
        h.manager.stop()
    assert envs.stop.is_set()  # the fetch's tools are killed within a tenth of a second
    # ... and the killed fetch fails as a cancelled one would.
    fetch.errback(DependencyError("the job was cancelled while its dependencies were fetched"))
    assert h.manager.running == set() and h.manager.jobs == {}


def test_the_fetchs_cpu_time_is_charged_to_the_client_but_not_reported_as_the_jobs(
        h: Harness, envs: ScriptedEnvironments) -> None:
    envs.answer = EnvironmentPlan("default", install_argv=INSTALL, fetch_cpu_seconds=2.0)
    job_id = h.submit(FILES, WITH_REQUIREMENTS)
    assert used(h) == 0.0
    h.clock.advance(CPU_CHARGE_INTERVAL)
    assert used(h) == 2.0  # charged live once the fetch ended
    h.run_of(job_id).finish(cpu_seconds=0.5)
    h.run_of(job_id).finish(cpu_seconds=0.25)
    assert h.status(job_id)["execution_metadata"]["cpu_seconds"] == 0.75
    assert used(h) == 2.75
