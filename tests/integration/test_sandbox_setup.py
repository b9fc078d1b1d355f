"""Fail closed: a layer that cannot be set up makes the job a sandbox_error, and leaves nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import pytest_twisted

from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox
from sandrun.wire import Reason

from .conftest import SLOTS, UID_BASE, JobRunner, job_cgroups, processes_of


async def _assert_nothing_left(runner: JobRunner) -> None:
    assert job_cgroups(runner.cap) == []
    assert processes_of(runner.uids) == []
    assert len(runner.sandbox.free_slots) == SLOTS
    ran = await runner.run(("/bin/true",))  # and the sandbox still works
    assert ran.reason == Reason.COMPLETED, ran.describe()


@pytest_twisted.ensureDeferred
async def test_a_job_directory_that_does_not_exist_is_a_sandbox_error(
        runner: JobRunner) -> None:
    missing = os.path.join(runner.base, "no-such-job")
    ran = await runner.run(("/bin/true",), job_dir=missing)
    assert ran.reason == Reason.SANDBOX_ERROR, ran.describe()
    assert ran.result.message and "No such file or directory" in ran.result.message
    assert (ran.result.exit_code, ran.result.signal) == (None, None)
    assert not os.path.exists(missing)
    await _assert_nothing_left(runner)


@pytest_twisted.ensureDeferred
async def test_a_layer_failing_in_the_launcher_is_a_sandbox_error_naming_it(
        runner: JobRunner) -> None:
    # A file where the job directory should be: the bind mount onto /job fails.
    not_a_dir = os.path.join(runner.new_dir(), "file")
    with open(not_a_dir, "w") as f:
        f.write("x")
    ran = await runner.run(("bash", "-c", "echo ran > /tmp/x; echo ran"), job_dir=not_a_dir)
    assert ran.reason == Reason.SANDBOX_ERROR, ran.describe()
    assert ran.result.message and ran.result.message.startswith("filesystem: ")
    assert ran.stdout == b""  # the command never ran
    await _assert_nothing_left(runner)


@pytest_twisted.ensureDeferred
async def test_a_command_that_does_not_exist_is_a_sandbox_error_not_the_jobs_exit(
        runner: JobRunner) -> None:
    ran = await runner.run(("no-such-command-anywhere",))
    assert ran.reason == Reason.SANDBOX_ERROR, ran.describe()
    assert ran.result.message and ran.result.message.startswith("exec: ")
    await _assert_nothing_left(runner)


@pytest_twisted.ensureDeferred
async def test_a_read_only_bind_outside_opt_env_and_opt_deps_is_refused(
        runner: JobRunner) -> None:
    ran = await runner.run(("cat", "/etc/hostname"), ro_binds=(("/etc", "/etc"),))
    assert ran.reason == Reason.SANDBOX_ERROR, ran.describe()
    assert ran.result.message and ran.result.message.startswith("filesystem: ")
    ran = await runner.run(("/bin/true",), ro_binds=(("/etc", "/opt/deps/../../usr"),))
    assert ran.reason == Reason.SANDBOX_ERROR, ran.describe()
    await _assert_nothing_left(runner)


@pytest_twisted.ensureDeferred
async def test_a_job_cannot_fake_a_setup_failure(runner: JobRunner) -> None:
    # Writing what a setup failure would say, and exiting 127, is still the job's own exit.
    ran = await runner.run(("bash", "-c", "echo 'exec: [Errno 2] nope' >&2; exit 127"))
    assert (ran.reason, ran.result.exit_code) == (Reason.EXIT_NONZERO, 127), ran.describe()
    assert ran.result.message is None


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_crashed_launcher_leaves_no_process_and_the_next_start_removes_its_cgroups(
        runner: JobRunner) -> None:
    from twisted.internet import reactor

    instance = f"{runner.cap.instance}-crash"
    uid = UID_BASE + SLOTS  # a slot of its own, outside the shared sandbox's
    state_dir = tempfile.mkdtemp(prefix="sandrun-crash-")
    first = Sandbox(reactor, state_dir, instance, 1, uid_base=uid)
    await first.start()
    job_id = "left-behind"
    done = first.run(job_id, ("sleep", "60"), (), runner.new_dir(), SandboxPolicy(),
                     lambda stream, data: None)
    while first.jobs[job_id].cgroup is None:
        await runner.sleep(0.01)
    # As the launcher reported them: job-<id> on v1, the spare's own name on v2.
    groups = sorted(set(first.jobs[job_id].cgroup.dirs.values()))
    assert all(os.path.isdir(g) for g in groups)
    assert processes_of(range(uid, uid + 1))
    assert first._proc is not None
    first._proc.kill()  # no clean-up of its own
    result = await done
    assert result.reason == Reason.SANDBOX_ERROR  # the worker was told the launcher is gone
    first.stop()
    # Every process of the job died with the launcher (PR_SET_PDEATHSIG)...
    deadline = time.monotonic() + 2
    while processes_of(range(uid, uid + 1)) and time.monotonic() < deadline:
        await runner.sleep(0.01)
    assert processes_of(range(uid, uid + 1)) == []
    # ...but its cgroups could not be removed by anyone: the next start does it.
    assert any(os.path.isdir(g) for g in groups)
    left = {g: os.stat(g).st_ino for g in groups}
    second = Sandbox(reactor, state_dir, instance, 1, uid_base=uid)
    await second.start()
    try:
        # On v2 the new launcher's first spare may already have made a cgroup of the
        # same name (spare-1): a new directory, not the one left behind.
        assert not any(os.path.isdir(g) and os.stat(g).st_ino == ino for g, ino in left.items())
        ran = await second.run("after-crash", ("/bin/true",), (), runner.new_dir(),
                               SandboxPolicy(), lambda stream, data: None)
        assert ran.reason == Reason.COMPLETED
    finally:
        second.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    # A clean stop leaves not even the instance's own (empty) directories.
    assert not any(os.path.exists(os.path.join(d, instance)) for d in runner.cap.dirs.values())


@pytest_twisted.ensureDeferred
async def test_a_job_id_already_running_is_refused_and_the_running_job_unharmed(
        runner: JobRunner) -> None:
    job_id, first = runner.start(("bash", "-c", "sleep 0.5; echo first"))
    await runner.wait_started(job_id)
    with pytest.raises(ValueError):
        runner.sandbox.run(job_id, ("/bin/true",), (), runner.new_dir(), SandboxPolicy(),
                           lambda stream, data: None)
    ran = await first
    assert (ran.reason, ran.out) == (Reason.COMPLETED, "first\n"), ran.describe()
    assert len(runner.sandbox.free_slots) == SLOTS
