"""The launcher: a small long-lived process that forks one sandboxed job per request.

Started once by the worker (``python -I -S``, stdlib and this package only,
so the process that forks stays small: a fork costs in proportion to its
memory).  Everything that is the same for every job (the seccomp BPF, compiled
by the worker; the sandbox's /etc, root and /dev templates; the capability
count) is prepared at start, so a launch is a fork, a few dozen system calls
and an exec.

Protocol, over a ``SOCK_SEQPACKET`` socket (one JSON object per message):

worker -> launcher
    ``{"op": "spawn", "id": ID, "request": LaunchRequest}`` with four
    descriptors attached (stdin, stdout, stderr, and a fresh network namespace
    with loopback up, prepared by the worker);
    ``{"op": "kill", "id": ID}``: SIGKILL the job's PID namespace.
launcher -> worker
    ``{"event": "ready", "cgroup_version", "stale_cgroups"}`` once, or
    ``{"event": "fatal", "message"}`` and exit: the worker must not start;
    ``{"id", "event": "started", "pid", "cgroup": {"version", "dirs"}}``;
    ``{"id", "event": "setup_failed", "message"}``: a layer could not be applied and
    the job never ran (reported through a close-on-exec status pipe, so a job
    cannot fake it);
    ``{"id", "event": "exited", "wait_status", "wall_time_ms", "cpu_seconds",
    "memory_peak_bytes", "oom_killed"}``.

Each job is PID 1 of its own PID namespace: when it exits or is killed, the
kernel kills every process it left, double-forked daemons included.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from sandrun.sandbox import cgroups, mounts, namespaces as ns, seccomp
from sandrun.sandbox.limits import apply_rlimits
from sandrun.sandbox.policy import LaunchRequest

MAX_MESSAGE = 1 << 20
CHILD_NAMESPACES = ns.CLONE_NEWNS | ns.CLONE_NEWIPC | ns.CLONE_NEWUTS | ns.CLONE_NEWCGROUP


@dataclass
class _Job:
    id: str
    pid: int
    pidfd: int
    cgroup: cgroups.JobCgroup
    started: float


class Launcher:
    def __init__(self, sock: socket.socket, state_dir: str, instance: str,
                 seccomp_file: str) -> None:
        self.sock = sock
        self.root_dir = os.path.join(state_dir, "root")
        self.templates = os.path.join(state_dir, "templates")
        os.makedirs(self.root_dir, exist_ok=True)
        self.cgroups = cgroups.CgroupManager(instance)
        self.stale = self.cgroups.cleanup_stale()
        with open(seccomp_file, "rb") as f:
            self.filters = seccomp.PreparedFilters(seccomp.split_programs(f.read()))
        self.last_cap = ns.last_capability()
        self.pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.jobs: dict[int, _Job] = {}  # by pidfd
        self.by_id: dict[str, _Job] = {}
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def serve(self) -> None:
        self.send({"event": "ready", "cgroup_version": self.cgroups.version,
                   "stale_cgroups": self.stale})
        while True:
            for fd, _ in self.poll.poll():
                if fd == self.sock.fileno():
                    if not self._handle_message():
                        self.shutdown()
                        return
                elif fd in self.jobs:
                    self._reap(self.jobs.pop(fd))

    def _handle_message(self) -> bool:
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4, socket.MSG_CMSG_CLOEXEC)
        if not data:
            return False
        message = json.loads(data)
        if message["op"] == "spawn":
            try:
                self._spawn(message["id"], LaunchRequest.from_wire(message["request"]), fds)
            finally:
                for fd in fds:
                    os.close(fd)
        elif message["op"] == "kill":
            job = self.by_id.get(message["id"])
            if job is not None:
                self._kill(job)
        return True

    def _kill(self, job: _Job) -> None:
        # The job is not reaped until its pidfd fires, so its pid cannot have been reused.
        try:
            os.kill(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.cgroup.kill()

    def _spawn(self, job_id: str, request: LaunchRequest, stdio: list[int]) -> None:
        if len(stdio) != 4:
            self.send({"id": job_id, "event": "setup_failed",
                       "message": "spawn needs stdin, stdout, stderr and netns descriptors"})
            return
        netns = stdio[3]
        try:
            group = self.cgroups.create(job_id, request.policy.memory_bytes,
                                        request.policy.pids_max)
        except (OSError, cgroups.CgroupError) as e:
            self.send({"id": job_id, "event": "setup_failed", "message": f"cgroup: {e}"})
            return
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        started = time.monotonic()
        ns.unshare(ns.CLONE_NEWPID)  # affects only the children forked from now on
        try:
            pid = os.fork()
            if pid == 0:
                self._child(request, stdio, netns, group, status_w)  # never returns
        finally:
            ns.setns(self.pidns, ns.CLONE_NEWPID)  # the next fork must not join this one
        os.close(status_w)
        error = b""
        while chunk := os.read(status_r, 4096):
            error += chunk
        os.close(status_r)
        if error:
            os.waitpid(pid, 0)
            group.remove()
            self.send({"id": job_id, "event": "setup_failed",
                       "message": error.decode(errors="replace")})
            return
        pidfd = os.pidfd_open(pid)
        job = _Job(job_id, pid, pidfd, group, started)
        self.jobs[pidfd] = job
        self.by_id[job_id] = job
        self.poll.register(pidfd, select.POLLIN)
        self.send({"id": job_id, "event": "started", "pid": pid,
                   "cgroup": {"version": group.version, "dirs": group.dirs}})

    def _child(self, request: LaunchRequest, stdio: list[int], netns: int,
               group: cgroups.JobCgroup, status_w: int) -> None:
        """Between fork and exec: apply every layer in security order, or report and exit."""
        step = "stdio"
        try:
            for target, fd in enumerate(stdio[:3]):
                os.dup2(fd, target)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            step = "cgroup"
            for procs in group.procs_files:
                with open(procs, "w") as f:
                    f.write("0")
            step = "network namespace"
            ns.setns(netns, ns.CLONE_NEWNET)
            step = "namespaces"
            ns.unshare(CHILD_NAMESPACES)
            socket.sethostname(request.policy.hostname)
            step = "filesystem"
            mounts.build_root(self.root_dir, self.templates, request)
            step = "rlimits"
            apply_rlimits(request.policy)
            step = "capabilities"
            ns.drop_bounding_set(self.last_cap)
            os.setgroups([])
            os.setresgid(request.gid, request.gid, request.gid)
            os.setresuid(request.uid, request.uid, request.uid)
            ns.clear_capabilities()
            # Set after the uid change, which would reset it.
            ns.prctl(ns.PR_SET_PDEATHSIG, signal.SIGKILL)
            step = "no_new_privs"
            ns.prctl(ns.PR_SET_NO_NEW_PRIVS, 1)
            step = "descriptors"
            ns.close_range_cloexec(3)
            step = "seccomp"
            self.filters.load()
            step = "exec"
            os.execvpe(request.argv[0], list(request.argv), request.environment())
        except BaseException as e:  # noqa: B036 - anything at all must be reported
            try:
                os.write(status_w, f"{step}: {e}".encode()[:4000])
            finally:
                os._exit(127)

    def _reap(self, job: _Job) -> None:
        self.poll.unregister(job.pidfd)
        os.close(job.pidfd)
        del self.by_id[job.id]
        _, wait_status, _ = os.wait4(job.pid, 0)
        wall_ms = (time.monotonic() - job.started) * 1000
        message: dict[str, Any] = {"id": job.id, "event": "exited", "wait_status": wait_status,
                                   "wall_time_ms": round(wall_ms, 3)}
        try:
            message.update(cpu_seconds=job.cgroup.cpu_seconds(),
                           memory_peak_bytes=job.cgroup.memory_peak(),
                           oom_killed=job.cgroup.oom_killed())
        finally:
            try:
                job.cgroup.remove()
            except (OSError, cgroups.CgroupError) as e:
                message["cleanup_error"] = str(e)
            self.send(message)

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            self._kill(job)
        for job in list(self.jobs.values()):
            self._reap(job)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sandrun's sandbox launcher (internal)")
    parser.add_argument("--fd", type=int, required=True, help="SOCK_SEQPACKET to the worker")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--instance", required=True, help="cgroup directory name")
    parser.add_argument("--slots", type=int, required=True, help="concurrent job slots")
    parser.add_argument("--uid-base", type=int, default=60000)
    parser.add_argument("--seccomp", required=True, help="BPF programs from seccomp.py")
    args = parser.parse_args(argv)
    ns.prctl(ns.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the worker
    sock = socket.socket(fileno=args.fd)
    try:
        uids = range(args.uid_base, args.uid_base + args.slots)
        templates = os.path.join(args.state_dir, "templates")
        mounts.prepare_etc(os.path.join(templates, "etc"), uids, {u: u for u in uids})
        mounts.prepare_templates(os.path.join(templates, "rootfs"),
                                 os.path.join(templates, "dev"))
        launcher = Launcher(sock, args.state_dir, args.instance, args.seccomp)
    except Exception as e:
        sock.send(json.dumps({"event": "fatal", "message": f"{type(e).__name__}: {e}"}).encode())
        sys.exit(1)
    launcher.serve()


if __name__ == "__main__":
    main()
