"""Install, then run: the install counts toward the job's limits and its failure is
``install_failed`` with the installer's message (real sandbox, network off inside)."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from sandrun.environments import DependencyCache, Environments, Registry
from sandrun.environments.staged import run_in_environment
from sandrun.jobs.manifest import Manifest
from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox, SandboxResult
from sandrun.wire import Reason

from .helpers import make_wheel

POLICY = SandboxPolicy(timeout_seconds=60.0)
MANIFEST = Manifest(entrypoint="main.py", interpreter="python3",
                    requirements="requirements.txt")


@pytest.fixture
def envs(tmp_path: str) -> Environments:
    index = os.path.join(str(tmp_path), "index")
    os.makedirs(index)
    make_wheel(index, "sandrun-probe", "1.0", "VALUE = 42\n")
    return Environments(Registry(os.path.join(str(tmp_path), "envs")),
                        DependencyCache(os.path.join(str(tmp_path), "cache"),
                                        pip_args=("--no-index", "--find-links", index)))


def job_dir(tmp_path: str, main: str, requirements: str = "sandrun-probe==1.0\n") -> str:
    path = tempfile.mkdtemp(prefix="job-", dir=str(tmp_path))
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o755)
    for name, text in (("main.py", main), ("requirements.txt", requirements)):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


async def staged(sandbox: Sandbox, envs: Environments, directory: str,
                 policy: SandboxPolicy = POLICY,
                 manifest: Manifest = MANIFEST, **kwargs: object
                 ) -> tuple[SandboxResult, str]:
    log: list[bytes] = []
    result = await run_in_environment(
        sandbox, envs, threads.deferToThread, job_id=os.path.basename(directory),
        manifest=manifest, argv=tuple(manifest.argv()), job_dir=directory, policy=policy,
        on_output=lambda _stream, data: log.append(data), **kwargs)  # type: ignore[arg-type]
    return result, b"".join(log).decode(errors="replace")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_the_job_runs_after_its_install_and_is_charged_for_both(
        env_sandbox: Sandbox, envs: Environments, tmp_path: str) -> None:
    directory = job_dir(tmp_path, "import sandrun_probe\nprint(sandrun_probe.VALUE)\n")
    result, log = await staged(env_sandbox, envs, directory)
    assert result.reason == Reason.COMPLETED, (result, log)
    assert "Successfully installed sandrun-probe-1.0" in log
    assert log.index("Successfully installed") < log.index("42\n")
    assert result.cpu_seconds > 0.1  # pip's start-up alone is more than a print
    assert os.path.isfile(os.path.join(directory, ".deps", "python", "sandrun_probe.py"))


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_fetch_failure_ends_the_job_install_failed_before_anything_runs(
        env_sandbox: Sandbox, envs: Environments, tmp_path: str) -> None:
    directory = job_dir(tmp_path, "open('/job/ran', 'w')\n", "sandrun-absent==1.0\n")
    result, log = await staged(env_sandbox, envs, directory)
    assert result.reason == Reason.INSTALL_FAILED
    assert result.message == "sandrun-absent: no such package, or no version matching the " \
                             "requirement, on the package index"
    assert "sandrun: install failed: sandrun-absent: no such package" in log
    assert not os.path.exists(os.path.join(directory, "ran"))


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_an_installer_that_fails_inside_ends_the_job_with_its_message(
        env_sandbox: Sandbox, envs: Environments, tmp_path: str) -> None:
    directory = job_dir(tmp_path, "open('/job/ran', 'w')\n")
    # Break the cache entry the fetch made, so pip inside finds no wheel.
    plan = envs.prepare(MANIFEST, directory)
    (deps, _), = plan.ro_binds
    os.remove(os.path.join(deps, "wheels", "sandrun_probe-1.0-py3-none-any.whl"))
    result, log = await staged(env_sandbox, envs, directory)
    assert result.reason == Reason.INSTALL_FAILED, (result, log)
    assert result.message == ("the install step failed: ERROR: No matching distribution "
                              "found for sandrun-probe==1.0")
    assert "Could not find a version that satisfies" in log
    assert not os.path.exists(os.path.join(directory, "ran"))


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_install_time_counts_toward_the_timeout(
        env_sandbox: Sandbox, envs: Environments, tmp_path: str) -> None:
    directory = job_dir(tmp_path, "import time\ntime.sleep(30)\n")
    started = time.monotonic()
    result, log = await staged(env_sandbox, envs, directory,
                               policy=SandboxPolicy(timeout_seconds=3.0))
    took = time.monotonic() - started
    assert result.reason == Reason.TIMEOUT, (result, log)
    assert "Successfully installed" in log
    # Install and job together had 3 s of wall clock, not 3 s each.
    assert 2.9 <= result.wall_time_ms / 1000 <= 4.0
    assert took < 6.0


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_job_cancelled_between_install_and_run_never_starts(
        env_sandbox: Sandbox, envs: Environments, tmp_path: str) -> None:
    directory = job_dir(tmp_path, "open('/job/ran', 'w')\n")
    checks: list[None] = []

    def cancelled() -> Reason | None:  # not yet before the install, then cancelled
        checks.append(None)  # before the chown, after it, after the install
        return Reason.CANCELLED if len(checks) > 2 else None

    result, log = await staged(env_sandbox, envs, directory, cancelled=cancelled)
    assert result.reason == Reason.CANCELLED
    assert "Successfully installed" in log and len(checks) == 3
    assert not os.path.exists(os.path.join(directory, "ran"))
    first, _ = await staged(env_sandbox, envs, job_dir(tmp_path, "open('/job/ran', 'w')\n"),
                            cancelled=lambda: Reason.SHUTDOWN)
    assert first.reason == Reason.SHUTDOWN and first.wall_time_ms == 0  # nothing ran


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_template_gone_since_submission_is_install_failed(
        env_sandbox: Sandbox, envs: Environments, tmp_path: str) -> None:
    directory = job_dir(tmp_path, "print(1)\n")
    manifest = Manifest(entrypoint="main.py", interpreter="python3", environment="vision")
    result, log = await staged(env_sandbox, envs, directory, manifest=manifest)
    assert result.reason == Reason.INSTALL_FAILED
    assert "sandrun: install failed: environment 'vision' is not built" in log
    assert result.message is not None and "sandrun env build vision" in result.message
