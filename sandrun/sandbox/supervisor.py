"""The Twisted side of the sandbox: start the launcher, run jobs, enforce limits.

``Sandbox.run`` hands a job to the launcher with its pipes, streams output to
a callback chunk by chunk as it arrives, and enforces the wall timeout, the
CPU cap and the output cap by asking the launcher to SIGKILL the job's PID
namespace.  Every way a job can end is turned into one ``Reason`` by
``classify``; no free text decides anything.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sandrun.sandbox import mounts, seccomp
from sandrun.sandbox import namespaces as ns
from sandrun.sandbox.cgroups import JobCgroup
from sandrun.sandbox.network import loopback_up_request
from sandrun.sandbox.policy import LaunchRequest, SandboxPolicy
from sandrun.wire import Reason

log = Logger()
READ_CHUNK = 65536
CPU_POLL_SECONDS = 0.1
KILL_RETRY_SECONDS = 1.0

OutputCallback = Callable[[str, bytes], None]


class SandboxUnavailable(Exception):
    """The launcher could not start or has died: no job can run (fail closed)."""


@dataclass(frozen=True)
class Slot:
    """One concurrent job's unprivileged identity, held from its first run to its last.

    A job whose install step and own run share one slot keeps one uid, so its
    directory is given to that uid once, before any of its code ran.
    """

    number: int
    uid: int
    gid: int


@dataclass
class SandboxResult:
    reason: Reason
    exit_code: int | None = None
    signal: int | None = None
    cpu_seconds: float = 0.0
    memory_peak_bytes: int = 0
    wall_time_ms: float = 0.0
    message: str | None = None  # sandbox_error: which layer failed; else a stats error
    # seconds from the request to the launcher to the job's process running in its
    # sandbox; None when it never started (set-up failed, or it never got that far)
    launch_seconds: float | None = None
    truncated: dict[str, bool] = field(default_factory=lambda: {"stdout": False,
                                                                "stderr": False})


def classify(wait_status: int, kill_reason: Reason | None, oom_killed: bool) -> tuple[
        Reason, int | None, int | None]:
    """(reason, exit_code, signal) from how the job's PID 1 ended."""
    exit_code = os.waitstatus_to_exitcode(wait_status)
    code, sig = (exit_code, None) if exit_code >= 0 else (None, -exit_code)
    if kill_reason is not None:
        return kill_reason, code, sig
    if oom_killed:
        return Reason.MEMORY_LIMIT, code, sig
    if sig == signal.SIGXFSZ:
        return Reason.DISK_LIMIT, code, sig
    if sig is not None:
        return Reason.SIGNALED, code, sig
    return (Reason.COMPLETED if code == 0 else Reason.EXIT_NONZERO), code, sig


@implementer(IReadDescriptor)
class _Reader:
    """Reads a non-blocking descriptor from the reactor and calls back per chunk."""

    def __init__(self, reactor: IReactorFDSet, fd: int, on_data: Callable[[bytes], None],
                 on_eof: Callable[[], None]) -> None:
        self.reactor, self.fd, self.on_data, self.on_eof = reactor, fd, on_data, on_eof
        os.set_blocking(fd, False)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "sandbox-pipe"

    def doRead(self) -> None:
        for _ in range(16):  # bounded, so one chatty job cannot starve the reactor
            if self.fd < 0:  # a callback closed us
                return None
            try:
                data = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                return None
            if not data:
                self.close()
                return None
            self.on_data(data)
        return None

    def close(self) -> None:
        if self.fd >= 0:
            self.reactor.removeReader(self)
            os.close(self.fd)
            self.fd = -1
            self.on_eof()

    def connectionLost(self, reason: Failure) -> None:
        self.close()


class _RunningJob:
    def __init__(self, job_id: str, policy: SandboxPolicy, on_output: OutputCallback) -> None:
        self.job_id = job_id
        self.policy = policy
        self.on_output = on_output
        self.done: defer.Deferred[SandboxResult] = defer.Deferred()
        self.kill_reason: Reason | None = None
        self.cgroup: JobCgroup | None = None
        self.exit_event: dict[str, Any] | None = None
        self.open_streams = 2
        self.sizes = {"stdout": 0, "stderr": 0}
        self.truncated = {"stdout": False, "stderr": False}
        self.timers: list[Any] = []
        self.requested_at = 0.0  # reactor time the launcher was asked to start it
        self.launch_seconds: float | None = None  # set when the launcher reports it started


class Sandbox:
    """Runs jobs through one launcher process; one instance per worker."""

    def __init__(self, reactor: Any, state_dir: str, instance: str, slots: int,
                 uid_base: int = 60000, allow_unlimited_swap: bool = False) -> None:
        self.reactor = reactor
        self.allow_unlimited_swap = allow_unlimited_swap
        self.state_dir = state_dir
        self.instance = instance
        self.uid_base = uid_base
        self.slots = slots
        self.free_slots = list(range(slots))
        self._held: set[int] = set()  # slots taken and not yet returned
        self.jobs: dict[str, _RunningJob] = {}
        self.cgroup_version: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready: defer.Deferred[None] | None = None
        self._reader: _Reader | None = None

    # -- launcher process -------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """Start the launcher; fires when it reports ready, fails if it cannot start."""
        # Prepared here, once, so that the launcher, the process that forks every
        # job, need not load what it takes to copy files (shutil, zlib, bz2, lzma).
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            bpf = os.path.join(self.state_dir, "seccomp.bpf")
            with open(bpf, "wb") as f:
                f.write(seccomp.join_programs(seccomp.build_filters()))
            loopback = os.path.join(self.state_dir, "loopback.nl")
            with open(loopback, "wb") as f:
                f.write(loopback_up_request())
            uids = range(self.uid_base, self.uid_base + len(self.free_slots))
            templates = os.path.join(self.state_dir, "templates")
            mounts.prepare_etc(os.path.join(templates, "etc"), uids, {u: u for u in uids})
            mounts.prepare_templates(os.path.join(templates, "rootfs"),
                                     os.path.join(templates, "dev"))
        except (OSError, ValueError) as e:
            return defer.fail(SandboxUnavailable(f"preparing the sandbox: {e}"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(seccomp.__file__)))
        bootstrap = (f"import sys; sys.path.insert(0, {os.path.dirname(package_root)!r}); "
                     "from sandrun.sandbox.launcher import main; main()")
        # -I -S: no site-packages, no environment: a small process forks faster.
        settings = {"fd": theirs.fileno(), "state_dir": self.state_dir,
                    "instance": self.instance, "seccomp": bpf, "loopback": loopback,
                    "allow_unlimited_swap": self.allow_unlimited_swap}
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", bootstrap, json.dumps(settings)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._sock = ours
        self._ready = defer.Deferred()
        # One read of a SOCK_SEQPACKET descriptor is one whole message.  The reader
        # owns the descriptor; the socket object only sends.
        self._reader = _Reader(self.reactor, ours.fileno(),
                               lambda data: self._on_event(json.loads(data)),
                               self._launcher_lost)
        return self._ready

    def _launcher_lost(self) -> None:
        if self._sock is not None:
            self._sock.detach()
            self._sock = None
        error = SandboxUnavailable("the sandbox launcher exited")
        if self._ready is not None and not self._ready.called:
            self._ready.errback(error)
        for job in list(self.jobs.values()):
            self._finish(job, SandboxResult(Reason.SANDBOX_ERROR, message=str(error)))

    def stop(self) -> None:
        """Kill every job and the launcher (which kills what it still runs)."""
        for job_id in list(self.jobs):
            self.kill(job_id, Reason.SHUTDOWN)
        if self._sock is not None:
            self._sock.detach()
            self._sock = None
        if self._reader is not None:
            self._reader.close()  # the launcher sees EOF, kills its jobs and exits
            self._reader = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    # -- jobs --------------------------------------------------------------

    def take_slot(self) -> Slot:
        """Reserve a slot (a uid) for a job; ``return_slot`` gives it back.

        Raises ``SandboxUnavailable`` when there is no launcher or every slot is held.
        """
        if self._sock is None or not self.free_slots:
            raise SandboxUnavailable("no launcher" if self._sock is None else "no free slot")
        number = self.free_slots.pop()
        self._held.add(number)
        return Slot(number, self.uid_base + number, self.uid_base + number)

    def return_slot(self, slot: Slot) -> None:
        if slot.number in self._held:
            self._held.discard(slot.number)
            self.free_slots.append(slot.number)

    def problem(self) -> str | None:
        """Why no job can run here, or None: for ``/health``."""
        if self._sock is None:
            return "the sandbox launcher is not running"
        lost = self.slots - len(self.free_slots) - len(self._held)
        if lost:
            return f"{lost} sandbox slot(s) lost"
        return None

    def run(self, job_id: str, argv: tuple[str, ...], env: tuple[tuple[str, str], ...],
            job_dir: str, policy: SandboxPolicy, on_output: OutputCallback,
            stdin: bytes = b"", ro_binds: tuple[tuple[str, str], ...] = (),
            slot: Slot | None = None) -> defer.Deferred[SandboxResult]:
        """Run one job; the Deferred fires with its result and never fails.

        With a ``slot`` (see ``take_slot``) the job runs as that slot's uid and
        the caller has already given it ``job_dir`` (``chown_tree``, off the
        reactor thread) and returns the slot itself.  Without one, a slot is
        taken for this run only, ``job_dir`` is given to it here (a small
        directory: tests and tools), and returned when the run ends.

        Raises ``SandboxUnavailable`` at once, before anything is made, when
        there is no launcher or every slot is taken.
        """
        if self._sock is None:
            raise SandboxUnavailable("no launcher")
        if job_id in self.jobs:
            raise ValueError(f"job {job_id!r} is already running")
        own = slot is None
        held = self.take_slot() if slot is None else slot
        job = _RunningJob(job_id, policy, on_output)
        self.jobs[job_id] = job
        if own:
            def release(result: SandboxResult) -> SandboxResult:
                self.return_slot(held)
                return result

            job.done.addBoth(release)
        theirs: list[int] = []  # the launcher's copies: ours to close once sent
        ours: list[int] = []  # the read ends, kept only if the job starts
        try:
            if own:
                chown_tree(job_dir, held.uid, held.gid)
            request = LaunchRequest(argv=argv, env=env, job_dir=job_dir, uid=held.uid,
                                    gid=held.gid, policy=policy, ro_binds=ro_binds)
            theirs.append(_stdin_fd(stdin))
            for _ in ("stdout", "stderr"):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                ours.append(read_end)
                theirs.append(write_end)
            # The job directory as a detached mount, taken here: the launcher's mount
            # namespace does not see the worker's job mounts (see launcher.py).
            theirs.append(ns.open_tree_clone(job_dir))
            message = {"op": "spawn", "id": job_id, "request": request.to_wire()}
            job.requested_at = self.reactor.seconds()
            socket.send_fds(self._sock, [json.dumps(message).encode()], theirs)
        except Exception as e:  # noqa: BLE001 - whatever it is, the slot must come back
            for fd in ours:
                os.close(fd)
            # The error's kind only: a full message could name a job's file.
            detail = (e.strerror if isinstance(e, OSError) else None) or type(e).__name__
            self._finish(job, SandboxResult(Reason.SANDBOX_ERROR, message=f"spawn: {detail}"))
            return job.done
        finally:
            for fd in theirs:
                os.close(fd)
        out_r, err_r = ours
        for name, fd in (("stdout", out_r), ("stderr", err_r)):
            self._read_stream(job, name, fd)
        return job.done

    def _read_stream(self, job: _RunningJob, stream: str, fd: int) -> None:
        _Reader(self.reactor, fd, lambda data: self._on_output(job, stream, data),
                lambda: self._on_stream_closed(job))

    def kill(self, job_id: str, reason: Reason) -> None:
        """Kill a running job (its whole PID namespace); the result carries ``reason``."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.kill_reason is None:
            job.kill_reason = reason
        self._send_kill(job)
        job.timers.append(self.reactor.callLater(KILL_RETRY_SECONDS, self._send_kill, job))

    def cpu_seconds(self, job_id: str) -> float | None:
        """The CPU time a running job has used so far, from its cgroup."""
        job = self.jobs.get(job_id)
        if job is None or job.cgroup is None:
            return None
        try:
            return job.cgroup.cpu_seconds()
        except OSError:
            return None

    def _send_kill(self, job: _RunningJob) -> None:
        if self._sock is not None and job.job_id in self.jobs:
            try:
                self._sock.send(json.dumps({"op": "kill", "id": job.job_id}).encode())
            except OSError as e:
                if e.errno != errno.EPIPE:
                    raise

    def _on_output(self, job: _RunningJob, stream: str, data: bytes) -> None:
        room = job.policy.output_cap_bytes - job.sizes[stream]
        if len(data) > room:
            # Also when room is 0: output that filled the cap exactly at a chunk
            # boundary is only known to be over it when the next byte arrives.
            data = data[:max(room, 0)]
            if not job.truncated[stream]:
                job.truncated[stream] = True
                self.kill(job.job_id, Reason.OUTPUT_LIMIT)
        if data:
            job.sizes[stream] += len(data)
            job.on_output(stream, data)

    def _on_stream_closed(self, job: _RunningJob) -> None:
        job.open_streams -= 1
        self._maybe_done(job)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "ready":
            self.cgroup_version = event["cgroup_version"]
            log.info("sandbox launcher ready: cgroup v{version}, {stale} stale cgroups removed",
                     version=event["cgroup_version"], stale=event["stale_cgroups"])
            assert self._ready is not None
            self._ready.callback(None)
            return
        if kind == "fatal":
            assert self._ready is not None
            self._ready.errback(SandboxUnavailable(event["message"]))
            return
        if kind == "cleanup_failed":  # after the job's result; left for the next start
            log.warn("sandbox clean-up failed for job {job_id}: {message}",
                     job_id=event["id"], message=event["message"])
            return
        job = self.jobs.get(event["id"])
        if job is None:
            return
        if kind == "started":
            job.launch_seconds = max(0.0, self.reactor.seconds() - job.requested_at)
            job.cgroup = JobCgroup(event["cgroup"]["version"], event["cgroup"]["dirs"],
                                   event["cgroup"].get("cpu_base", 0.0))
            job.timers.append(self.reactor.callLater(job.policy.timeout_seconds, self.kill,
                                                     job.job_id, Reason.TIMEOUT))
            if job.policy.cpu_seconds is not None:
                poll = task.LoopingCall(self._check_cpu, job)
                poll.clock = self.reactor
                poll.start(CPU_POLL_SECONDS, now=False)
                job.timers.append(poll)
        elif kind == "setup_failed":
            log.warn("sandbox setup failed for job {job_id}: {message}", job_id=job.job_id,
                     message=event["message"])
            job.exit_event = {"setup_failed": event["message"]}
            self._maybe_done(job)
        elif kind == "exited":
            job.exit_event = event
            self._maybe_done(job)

    def _check_cpu(self, job: _RunningJob) -> None:
        used = self.cpu_seconds(job.job_id)
        if used is not None and job.policy.cpu_seconds is not None \
                and used >= job.policy.cpu_seconds:
            self.kill(job.job_id, Reason.CPU_LIMIT)

    def _maybe_done(self, job: _RunningJob) -> None:
        event = job.exit_event
        if event is None or job.open_streams > 0:
            return
        if "setup_failed" in event:
            result = SandboxResult(Reason.SANDBOX_ERROR, message=event["setup_failed"])
        else:
            kill_reason = job.kill_reason
            if kill_reason == Reason.TIMEOUT \
                    and event["wall_time_ms"] < job.policy.timeout_seconds * 1000:
                # It ended on its own within its time (the launcher's clock starts
                # before the timer's): a busy reactor ran the timer first.
                kill_reason = None
            reason, code, sig = classify(event["wait_status"], kill_reason,
                                         event.get("oom_killed", False))
            if job.kill_reason == Reason.CPU_LIMIT or (
                    job.policy.cpu_seconds is not None
                    and event.get("cpu_seconds", 0) >= job.policy.cpu_seconds
                    and reason in (Reason.SIGNALED, Reason.TIMEOUT)):
                reason = Reason.CPU_LIMIT
            result = SandboxResult(reason, code, sig, event.get("cpu_seconds", 0.0),
                                   event.get("memory_peak_bytes", 0), event["wall_time_ms"],
                                   event.get("error"))
        result.truncated = dict(job.truncated)
        result.launch_seconds = job.launch_seconds
        self._finish(job, result)

    def _finish(self, job: _RunningJob, result: SandboxResult) -> None:
        self.jobs.pop(job.job_id, None)
        for timer in job.timers:
            if isinstance(timer, task.LoopingCall):
                if timer.running:
                    timer.stop()
            elif timer.active():
                timer.cancel()
        if not job.done.called:
            job.done.callback(result)


def _stdin_fd(data: bytes) -> int:
    if not data:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def chown_tree(path: str, uid: int, gid: int) -> int:
    """Give a job its directory, before any of its code ran; returns the entries changed.

    Iterative (a deep tree cannot exhaust the interpreter's recursion limit)
    and blocking: the worker runs it off the reactor thread.  Links are never
    followed.
    """
    os.chown(path, uid, gid, follow_symlinks=False)
    count = 1
    stack = [path] if stat.S_ISDIR(os.lstat(path).st_mode) else []  # else the launcher says
    while stack:
        top = stack.pop()
        with os.scandir(top) as entries:
            for entry in entries:
                os.chown(entry.path, uid, gid, follow_symlinks=False)
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return count
