"""Fail closed: a layer that cannot be set up makes the job a sandbox_error, and leaves nothing."""

from __future__ import annotations

import os

import pytest_twisted

from sandrun.wire import Reason

from .conftest import SLOTS, JobRunner, job_cgroups, processes_of


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
