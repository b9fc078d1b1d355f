"""The job's init: PID 1 of the job's PID namespace, with the job's command as PID 2.

A PID namespace's first process is special: the kernel delivers to it only the
signals it has a handler for (so a program that signals itself with a default
action, ``kill $$``, ``raise(SIGABRT)``, SIGXFSZ at the file size limit, would
survive as PID 1), and every orphan of the namespace becomes its child (so
zombies pile up against ``pids.max`` unless it reaps them).  The job's command
therefore runs as PID 2 under this small init, which

- starts it with ``posix_spawnp`` (a ``vfork``: no copy of this process's page
  tables), in a process group of its own, with every signal unblocked and the
  ones a supervisor sends at their default action;
- forwards TERM, INT, HUP, QUIT, USR1 and USR2 to it;
- reaps every orphan;
- once PID 2 has ended, reports its wait status to the launcher and exits,
  which makes the kernel kill and reap everything left in the namespace.

The init is the spare process itself (see ``launcher``), after every layer of
the job was applied to it: the same namespaces, cgroup, rlimits, uid and gid,
no capability, ``no_new_privs`` and the same seccomp filter as the job.  It
gives the job nothing the job does not already have, and the job cannot take
it over either: the kernel drops SIGKILL and SIGSTOP sent to a namespace's init
from inside it (the other signals it handles are forwarded or reaped), and it
is not dumpable, so the job (same uid, but no ``CAP_SYS_PTRACE``) cannot open its
``/proc/1/mem``, ``fd``, ``environ`` or ``maps``; ``ptrace`` and
``process_vm_*`` are refused by seccomp anyway.  Its only descriptor is the
report socket to the launcher, which the job never inherits (close-on-exec,
and the init's own ``/proc/1/fd`` is closed to the job), so a job cannot fake
its own result.  Its command line is overwritten with ``sandrun-init`` so that
``/proc/1/cmdline`` shows no host path.

Messages on the report socket (one ``SOCK_SEQPACKET`` message each):
``E<text>`` a layer failed or the command could not be executed (the job
never ran); ``S`` the command was executed; ``X<wait status>`` the command ended.

Stdlib only, no Twisted: this runs in the launcher's children.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket

from sandrun.sandbox import namespaces as ns

# typing.TYPE_CHECKING without importing typing, which the launcher (a small
# process that forks every job) does not load.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

FAILED = b"E"
STARTED = b"S"
EXITED = b"X"
NAME = b"sandrun-init"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
# Blocked in the init and taken with sigwaitinfo: no handler runs in the middle of a wait.
WAITED = frozenset((*FORWARDED, signal.SIGCHLD))
# Reset to the default action in the job: an ignored signal would stay ignored across exec.
DEFAULTED = (*FORWARDED, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGALRM)
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4


def arg_area() -> tuple[int, int]:
    """Where this process's command line lies in its memory (``arg_start``, ``arg_end``).

    Read once by the launcher: every process it forks has the same layout.
    """
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(b")") + 2:].split()
    # arg_start and arg_end are fields 48 and 49 of proc(5); fields[0] is field 3.
    return int(fields[45]), int(fields[46])


def prepare(area: tuple[int, int]) -> None:
    """In the spare, before any job: what the init needs that is the same for every job.

    Blocks the signals the init waits for (the launcher only ever sends
    SIGKILL, which cannot be blocked), leaves the launcher's session and
    process group, and hides the launcher's command line and name.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    os.setsid()
    ns.prctl(PR_SET_NAME, ctypes.addressof(_NAME_BUFFER))
    start, end = area
    if end > start:
        ctypes.memset(start, 0, end - start)
        ctypes.memmove(start, NAME, min(len(NAME), end - start - 1))
    # The page copies the init's first calls would cost after the fork, taken now
    # (see the launcher's _warm_up); nothing is pending, and there is no child yet.
    signal.sigtimedwait(WAITED, 0)
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass


_NAME_BUFFER = ctypes.create_string_buffer(NAME)


def harden() -> None:
    """After the uid change (which resets it): not dumpable, so the job cannot reach in.

    An ``execve`` makes a process dumpable again, so the job itself is not affected.
    """
    ns.prctl(PR_SET_DUMPABLE, 0)


def spawn(argv: list[str], env: dict[str, str]) -> int:
    """Start the job's command as this process's child; raises ``OSError`` if it cannot.

    ``posix_spawnp`` looks ``argv[0]`` up on this process's own ``PATH``, which
    is set to the job's first, as ``execvpe`` would.
    """
    os.environ["PATH"] = env.get("PATH", os.defpath)
    return os.posix_spawnp(argv[0], argv, env, setpgroup=0, setsigmask=(),
                           setsigdef=DEFAULTED)


def supervise(child: int, report: socket.socket) -> NoReturn:
    """Forward signals to ``child`` and reap every process until it ends, then exit."""
    # The job's output and input are its own: the init holds none of them.
    ns.close_all_but(report.fileno())
    for fd in (0, 1, 2):
        os.close(fd)
    report.send(STARTED, socket.MSG_NOSIGNAL)
    while True:
        sig = signal.sigwaitinfo(WAITED).si_signo
        if sig != signal.SIGCHLD:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass  # ended already; its SIGCHLD is pending
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                try:
                    report.send(EXITED + str(status).encode(), socket.MSG_NOSIGNAL)
                finally:
                    code = os.waitstatus_to_exitcode(status)
                    os._exit(code if code >= 0 else 128 - code)
