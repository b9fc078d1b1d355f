"""Run a job in its environment: prepare (host, thread), install (sandbox), then the job.

The one piece of the environment work that touches Twisted and the sandbox,
so the job manager's change is a single call (see ``run_in_environment``).

The install step runs in the job's own sandbox with the job's limits and the
network off; its output goes to the job's log like the job's own.  Its wall
time, CPU time and output count toward the job's limits: the job itself gets
what is left.  How a job ends:

- the dependencies cannot be fetched, or the template went away since
  submission: ``install_failed`` with the reason, nothing ran;
- the installer exits non-zero or is killed by a signal: ``install_failed``
  with the installer's last error line;
- a limit hit during the install (timeout, memory, CPU, output, cancel,
  shutdown, sandbox error) keeps its own reason;
- otherwise the job's own result, with the install's time added.

The install and the job run under one slot (one uid), taken here and returned
whatever happens; the job directory is given to that uid once, in a thread,
before the install, so nothing the job's code made is ever chowned.  The
installer sees the plan's variables only, never the manifest's ``env``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from sandrun.environments.plan import EnvironmentPlan, Environments, ManifestLike
from sandrun.environments.registry import EnvironmentUnavailable
from sandrun.environments.requirements import DependencyError
from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox, SandboxResult, Slot, chown_tree
from sandrun.wire import Reason

__all__ = ["run_in_environment"]

OutputCallback = Callable[[str, bytes], None]
Blocking = Callable[..., "defer.Deferred[Any]"]
INSTALL_FAILURES = (Reason.EXIT_NONZERO, Reason.SIGNALED, Reason.DISK_LIMIT)
TAIL_BYTES = 8192  # of the installer's output, kept to find its error line
MIN_SECONDS = 0.001  # below this the job has no time left at all
INSTALL = "install"  # the log stream of the install step (``/logs`` ``install``)


@defer.inlineCallbacks
def run_in_environment(
        sandbox: Sandbox, environments: Environments, blocking: Blocking, *, job_id: str,
        manifest: ManifestLike, argv: tuple[str, ...], job_dir: str, policy: SandboxPolicy,
        on_output: OutputCallback, stdin: bytes = b"",
        cancelled: Callable[[], Reason | None] = lambda: None,
        on_installed: Callable[[SandboxResult], None] = lambda result: None,
        stop: threading.Event | None = None,
        on_fetched: Callable[[float], None] = lambda cpu_seconds: None) -> Any:
    """Fire with the job's ``SandboxResult``.  Fails only as ``Sandbox.run`` or an
    unexpected host error would (the manager's ``sandbox_error`` path).

    ``blocking`` runs the fetch off the reactor thread (``threads.deferToThread``);
    ``cancelled`` says whether (and why) the job was stopped between steps, when
    ``Sandbox.kill`` has no run to kill.  ``on_installed`` hears the install
    step's result as soon as it ends (``Sandbox.cpu_seconds`` counts the job's
    own run from 0 again, so a live CPU charge adds the install's).  Setting
    ``stop`` kills a fetch under way (a cancelled job must not hold its worker
    slot for the fetch's whole deadline); ``on_fetched`` hears the CPU time the
    fetch used, for the client's quota.
    """
    # One slot (one uid) for the install and the job, held from here: a running job
    # needs one anyway, and then the directory is given to it in the same trip to a
    # thread as the fetch (one hop per job, not two).
    slot = sandbox.take_slot()
    try:
        result = yield _in_slot(sandbox, slot, environments, blocking, job_id, manifest,
                                argv, job_dir, policy, on_output, stdin, cancelled,
                                on_installed, stop, on_fetched)
        return result
    finally:
        sandbox.return_slot(slot)


@defer.inlineCallbacks
def _in_slot(sandbox: Sandbox, slot: Slot, environments: Environments, blocking: Blocking,
             job_id: str, manifest: ManifestLike, argv: tuple[str, ...], job_dir: str,
             policy: SandboxPolicy, on_output: OutputCallback, stdin: bytes,
             cancelled: Callable[[], Reason | None],
             on_installed: Callable[[SandboxResult], None], stop: threading.Event | None,
             on_fetched: Callable[[float], None]) -> Any:
    stopped = cancelled()
    if stopped is not None:
        return SandboxResult(stopped)
    try:
        plan: EnvironmentPlan = yield blocking(prepare_and_chown, environments, manifest,
                                               job_dir, stop, slot)
    except (DependencyError, EnvironmentUnavailable) as e:
        stopped = cancelled()
        if stopped is not None:
            return SandboxResult(stopped)
        output = getattr(e, "output", "")
        if output:
            on_output(INSTALL, output.encode()[-TAIL_BYTES * 8:])
        message = e.message if isinstance(e, DependencyError) else e.details
        on_output(INSTALL, f"sandrun: install failed: {message}\n".encode())
        return SandboxResult(Reason.INSTALL_FAILED, message=message)
    try:
        on_fetched(plan.fetch_cpu_seconds)
        if plan.log:
            on_output(INSTALL, plan.log.encode())
        # Cancelled during the fetch or the chown (a thread): no run to kill yet, so it
        # must not start.
        stopped = cancelled()
        if stopped is not None:
            return SandboxResult(stopped)
        result = yield _install_then_run(sandbox, slot, job_id, plan, argv,
                                         plan.job_env(manifest.env), job_dir, policy,
                                         on_output, stdin, cancelled, on_installed)
        return result
    finally:
        environments.release(plan)  # its dependency set may be evicted from now on


def prepare_and_chown(environments: Environments, manifest: ManifestLike, job_dir: str,
                      stop: threading.Event | None, slot: Slot) -> EnvironmentPlan:
    """The job's plan (a fetch, when it has requirements), then its directory given to its
    slot's uid, before anything of the job ran.  Blocking: called in a thread."""
    plan = environments.prepare(manifest, job_dir, stop)
    try:
        chown_tree(job_dir, slot.uid, slot.gid)
    except BaseException:
        environments.release(plan)
        raise
    return plan


@defer.inlineCallbacks
def _install_then_run(
        sandbox: Sandbox, slot: Slot, job_id: str, plan: EnvironmentPlan,
        argv: tuple[str, ...], env: tuple[tuple[str, str], ...], job_dir: str,
        policy: SandboxPolicy, on_output: OutputCallback, stdin: bytes,
        cancelled: Callable[[], Reason | None],
        on_installed: Callable[[SandboxResult], None]) -> Any:
    if plan.install_argv is None:
        result = yield sandbox.run(job_id, argv, env, job_dir, policy, on_output, stdin=stdin,
                                   ro_binds=plan.ro_binds, slot=slot)
        return result

    tail = bytearray()
    sizes = {"stdout": 0, "stderr": 0}

    def install_output(stream: str, data: bytes) -> None:
        tail.extend(data)
        del tail[:-TAIL_BYTES]
        sizes[stream] += len(data)
        on_output(INSTALL, data)  # the install step's own log, never the job's stdout

    # The installer gets the plan's variables only: none of the manifest's
    # (RUBYOPT, NODE_OPTIONS, PYTHON*, PIP_*, GEM_* would steer it).
    installed: SandboxResult = yield sandbox.run(job_id, plan.install_argv, plan.env, job_dir,
                                                 policy, install_output,
                                                 ro_binds=plan.ro_binds, slot=slot)
    on_installed(installed)
    if installed.reason != Reason.COMPLETED:
        if installed.reason in INSTALL_FAILURES:
            installed.message = "the install step failed: " + _error_line(bytes(tail))
            installed.reason = Reason.INSTALL_FAILED
        return installed
    stopped = cancelled()
    if stopped is not None:
        return dataclasses.replace(installed, reason=stopped)
    timeout = policy.timeout_seconds - installed.wall_time_ms / 1000.0
    cpu = None if policy.cpu_seconds is None else policy.cpu_seconds - installed.cpu_seconds
    if timeout < MIN_SECONDS or (cpu is not None and cpu < MIN_SECONDS):
        reason = Reason.TIMEOUT if timeout < MIN_SECONDS else Reason.CPU_LIMIT
        return dataclasses.replace(installed, reason=reason)
    rest = dataclasses.replace(
        policy, timeout_seconds=timeout, cpu_seconds=cpu,
        output_cap_bytes=max(1, policy.output_cap_bytes - max(sizes.values())))
    ran: SandboxResult = yield sandbox.run(job_id, argv, env, job_dir, rest, on_output,
                                           stdin=stdin, ro_binds=plan.ro_binds, slot=slot)
    ran.cpu_seconds += installed.cpu_seconds
    ran.wall_time_ms += installed.wall_time_ms
    ran.memory_peak_bytes = max(ran.memory_peak_bytes, installed.memory_peak_bytes)
    return ran


def _error_line(output: bytes) -> str:
    """The installer's most telling line: its last ``ERROR``, else its last line."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "sandrun:", "error"))]
    chosen = (errors or lines or ["no output"])[-1]
    return chosen[:300]
