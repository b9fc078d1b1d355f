"""The launcher: a small long-lived process that forks one sandboxed job per request.

Started once by the worker (``python -I -S``, stdlib and this package only,
so the process that forks stays small: a fork costs in proportion to its
memory).  Everything that is the same for every job is prepared once: the
seccomp BPF and the sandbox's /etc, root and /dev templates by the worker
before it starts the launcher (so the launcher need not load what that takes),
and an empty capability bounding set, which every child inherits, by the
launcher itself.

A job's process is forked before its request arrives.  The launcher keeps a
few spare children ("zygotes"), each of which has already entered its own PID,
mount, IPC, UTS and network namespaces (``lo`` up, see ``network``), built
the part of its root every job shares, pivoted into it, dropped its
supplementary groups, moved itself into a cgroup made for it (see
``cgroups``), and now waits on a socket of its own.  A request then costs only what depends on the
job: the launcher sets the cgroup's limits and hands the spare the request
with its descriptors and the job directory as a detached mount; the spare
applies the rest in security order (cgroup namespace, host name, job
directory and scratch tmpfs, rlimits, gid and uid, capabilities,
``no_new_privs``, descriptors, seccomp) and execs.  Spares are forked in
batches: after a fork, every page the launcher writes is copied once, and a
batch pays for that once, not once per job.  A spare that could not prepare a
layer says so when it is given a job, which then fails closed.

Protocol, over a ``SOCK_SEQPACKET`` socket (one JSON object per message):

worker -> launcher
    ``{"op": "spawn", "id": ID, "request": LaunchRequest}`` with four
    descriptors attached (stdin, stdout, stderr, and the job directory as a
    detached mount from ``open_tree``: the launcher has a mount namespace of
    its own, copied at its start, and the worker's state tmpfs is private, so
    job mounts never reach the launcher's namespace, nor the spares' copies of
    it, however many jobs the worker holds);
    ``{"op": "kill", "id": ID}``: SIGKILL the job's PID namespace.
launcher -> worker
    ``{"event": "ready", "cgroup_version", "stale_cgroups"}`` once, or
    ``{"event": "fatal", "message"}`` and exit: the worker must not start;
    ``{"id", "event": "started", "pid", "cgroup": {"version", "dirs"}}`` once
    the job's command was exec'd;
    ``{"id", "event": "setup_failed", "message"}``: a layer could not be
    applied and the job never ran (told through the spare's own socket, which
    the job never holds, so a job cannot fake it); sent once the child is
    reaped and its cgroup removed;
    ``{"id", "event": "exited", "wait_status", "wall_time_ms", "cpu_seconds",
    "memory_peak_bytes", "oom_killed"}`` (and ``"error"`` if the statistics
    could not be read), sent as soon as the job is reaped; its cgroup is
    removed right after, or ``{"id", "event": "cleanup_failed", "message"}``.

Each spare becomes the init of its job's PID namespace (see ``pid1``): PID 1,
with the job's command as PID 2; it reaps orphans, forwards signals and, when
the command ends, reports its wait status and exits.  The kernel then kills
every process the job left, double-forked daemons included, and reaps them all
before the init itself can be reaped, so ``exited`` means that nothing of the
job runs any more.  The launcher holds each job's mount namespace until it is
idle after the report, so that the unmounting happens off the way from the
job's exit to its result.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from sandrun.sandbox import cgroups, devfilter, devices, mounts, network, pid1, seccomp
from sandrun.sandbox import namespaces as ns
from sandrun.sandbox.limits import apply_rlimits
from sandrun.sandbox.policy import LaunchRequest

# typing.TYPE_CHECKING without importing typing, which the launcher (a small
# process that forks every job) does not load.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

MAX_MESSAGE = 1 << 20
MAX_FDS = 16  # stdin, stdout, stderr; then the job directory and extras, as mounts
ZYGOTE_NAMESPACES = ns.CLONE_NEWNS | ns.CLONE_NEWIPC | ns.CLONE_NEWUTS | ns.CLONE_NEWNET
CLEANUP_RETRY_MS = 5
CLEANUP_GIVE_UP_SECONDS = 5.0
SPARES = 4  # spare children kept ready...
SPARES_LOW = 1  # ...and forked again, in a batch, once no more than this many are left
MAX_SPARE_DEATHS = 3  # spares that died unused in a row before they are made on demand only
# A request like the real ones, parsed after each fork to warm the pages up (see _warm_up).
_SAMPLE_SPAWN = json.dumps({"op": "spawn", "id": "warm-up", "request": LaunchRequest(
    argv=("true",), env=(("K", "V"),), job_dir="/", uid=65534, gid=65534).to_wire()}).encode()


class SetupError(Exception):
    """A layer the launcher applies itself could not be set up; the message starts with it."""

    def __init__(self, step: str, error: BaseException | str) -> None:
        super().__init__(f"{step}: {error}")


@dataclass
class _Zygote:
    pid: int
    pidfd: int
    sock: socket.socket  # ours; the child holds the other end, close-on-exec
    cgroup: cgroups.JobCgroup  # made for it, joined by it; the job's once it is given one


@dataclass
class _Job:
    id: str
    pid: int
    pidfd: int
    cgroup: cgroups.JobCgroup
    started: float
    status: socket.socket | None  # the spare's socket, until it execs or reports
    mntns: int  # the job's mount namespace, held so that it is torn down after the report
    failure: str | None = None
    executed: bool = False  # the init reported the command started
    wait_status: int | None = None  # the command's, as the init reported it


@dataclass
class _Doomed:
    job_id: str
    group: cgroups.JobCgroup
    deadline: float


@dataclass
class Launcher:
    sock: socket.socket
    state_dir: str
    instance: str
    seccomp_file: str
    loopback_file: str  # the netlink request that sets lo up, from network.py
    allow_unlimited_swap: bool = False  # start even where a job's swap cannot be capped
    spares: list[_Zygote] = field(default_factory=list)  # oldest first
    jobs: dict[int, _Job] = field(default_factory=dict)  # by pidfd
    by_id: dict[str, _Job] = field(default_factory=dict)
    doomed: list[_Doomed] = field(default_factory=list)
    held_namespaces: list[int] = field(default_factory=list)  # released when idle
    cold: bool = False  # forked since the last warm-up
    spare_deaths: int = 0
    spares_made: int = 0  # numbers the spares' cgroups

    def __post_init__(self) -> None:
        self.root_dir = os.path.join(self.state_dir, "root")
        self.templates = os.path.join(self.state_dir, "templates")
        os.makedirs(self.root_dir, exist_ok=True)
        self.lib_dirs = mounts.host_lib_dirs()
        self.arg_area = pid1.arg_area()
        # Ours: the launcher and the worker that started it, nothing else.
        self.cgroups = cgroups.CgroupManager(self.instance,
                                             ours=frozenset({os.getpid(), os.getppid()}))
        if not self.allow_unlimited_swap and self.cgroups.swap_unlimited():
            # Fail closed: a job's memory limit would not bound what it swaps out.
            raise cgroups.CgroupError(
                "swap is on and this host cannot limit a job's swap (no memory.memsw on "
                "cgroup v1, no memory.swap.max on v2); turn swap off, enable swap "
                "accounting, or start with --allow-unlimited-swap")
        self.stale = self.cgroups.cleanup_stale()
        self.devices = devices.DeviceCgroups(self.instance)
        # cgroup v2: every job's device filter (see devices); None on v1.
        self.device_filters: devices.DeviceFilters | None = None
        if self.cgroups.version == 1:
            self.stale += self.devices.cleanup_stale()
        else:
            self.device_filters = devices.DeviceFilters()
        with open(self.seccomp_file, "rb") as f:
            self.filters = seccomp.PreparedFilters(seccomp.split_programs(f.read()))
        with open(self.loopback_file, "rb") as f:
            self.loopback_up = f.read()
        self.pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.poll = select.poll()
        # fd -> what it belongs to; an event is only acted on if the same object is
        # still registered, since a descriptor closed in a batch can be reused in it.
        self.watched: dict[int, object] = {}
        self._watch(self.sock.fileno(), self.sock)

    def _watch(self, fd: int, owner: object) -> None:
        self.watched[fd] = owner
        self.poll.register(fd, select.POLLIN)

    def _unwatch(self, fd: int) -> None:
        del self.watched[fd]
        self.poll.unregister(fd)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(json.dumps(message).encode(), socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker is gone; shutdown() follows once its EOF is read

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        self.send({"event": "ready", "cgroup_version": self.cgroups.version,
                   "stale_cgroups": self.stale})
        while True:
            if len(self.spares) <= SPARES_LOW and self.spare_deaths < MAX_SPARE_DEATHS:
                self._refill()
            events = self.poll.poll(0)
            if not events:
                # Nothing waits: pay now for what the last jobs and forks left.
                self._release_namespaces()
                if self.cold:
                    self.cold = False
                    _warm_up()
                    self._warm_up_stats()
                events = self.poll.poll(CLEANUP_RETRY_MS if self.doomed else None)
            snapshot = dict(self.watched)
            for fd, _ in events:
                owner = snapshot.get(fd)
                if owner is None or self.watched.get(fd) is not owner:
                    continue  # closed, or closed and reused, earlier in this batch
                if owner is self.sock:
                    if not self._handle_message():
                        self.shutdown()
                        return
                elif isinstance(owner, _Job):
                    if fd == owner.pidfd:
                        self._reap(owner)
                    else:
                        self._read_status(owner)
                elif isinstance(owner, _Zygote):
                    self._spare_died(owner)
            if self.doomed:
                self._remove_doomed()

    def _handle_message(self) -> bool:
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4, socket.MSG_CMSG_CLOEXEC)
        if not data:
            return False
        try:
            message = json.loads(data)
            if message["op"] == "spawn":
                self._spawn(message["id"], data, fds)
            elif message["op"] == "kill":
                job = self.by_id.get(message["id"])
                if job is not None:
                    self._kill(job)
        finally:
            for fd in fds:
                os.close(fd)
        return True

    # -- spares -------------------------------------------------------------------------------

    def _fork_zygote(self) -> _Zygote:
        self.spares_made += 1
        group = self.cgroups.create_spare(self.spares_made)
        try:
            if self.device_filters is not None:
                # Before the spare joins: nothing ever runs there unfiltered.
                self.device_filters.attach_standard(group.dirs["pids"])
            return self._fork_into(group)
        except BaseException:
            self._remove_now(group)
            raise

    def _fork_into(self, group: cgroups.JobCgroup) -> _Zygote:
        # Opened here: the spare writes itself in through these even if the group
        # has been renamed by then (a job may come before the spare has joined).
        procs = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in group.procs_files]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ns.unshare(ns.CLONE_NEWPID)  # affects only the children forked from now on
            try:
                pid = os.fork()
                if pid == 0:
                    try:
                        self._zygote(theirs.fileno(), procs)
                    finally:
                        os._exit(127)
            finally:
                ns.setns(self.pidns, ns.CLONE_NEWPID)  # the next fork must not join this one
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            for fd in procs:
                os.close(fd)
        zygote = _Zygote(pid, os.pidfd_open(pid), ours, group)
        self._watch(zygote.pidfd, zygote)
        return zygote

    def _refill(self) -> None:
        """Fork spares up to ``SPARES``, stopping early if anything needs the launcher."""
        while len(self.spares) < SPARES:
            try:
                self.spares.append(self._fork_zygote())
            except (OSError, cgroups.CgroupError):
                self.spare_deaths += 1
                break
            self.cold = True
            if self.poll.poll(0):
                break

    def _spare_died(self, zygote: _Zygote) -> None:
        self._discard(zygote)
        if zygote in self.spares:
            self.spares.remove(zygote)
            self.spare_deaths += 1

    def _discard(self, zygote: _Zygote) -> None:
        """Kill and reap a spare that will not run a job."""
        if self.watched.get(zygote.pidfd) is zygote:
            self._unwatch(zygote.pidfd)
        try:
            os.kill(zygote.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(zygote.pid, 0)
        os.close(zygote.pidfd)
        zygote.sock.close()
        self._remove_now(zygote.cgroup)

    def _take_spare(self) -> _Zygote:
        while self.spares:
            zygote = self.spares.pop(0)
            if os.waitid(os.P_PIDFD, zygote.pidfd,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                break
            self._discard(zygote)  # died unused; its exit event is still to come
        else:
            zygote = self._fork_zygote()
        self._unwatch(zygote.pidfd)
        return zygote

    # -- jobs ---------------------------------------------------------------------------------

    def _spawn(self, job_id: str, data: bytes, fds: list[int]) -> None:
        started = time.monotonic()
        trees: list[int] = []
        group: cgroups.JobCgroup | None = None
        zygote: _Zygote | None = None
        mntns = -1
        try:
            if len(fds) != 4:
                raise SetupError("spawn", "needs stdin, stdout, stderr and job directory "
                                          "descriptors")
            try:
                request = LaunchRequest.from_wire(json.loads(data)["request"])
            except (KeyError, TypeError, ValueError) as e:
                raise SetupError("request", repr(e)) from None
            try:
                mounts.check_ro_binds(request.ro_binds)
            except ValueError as e:
                raise SetupError("filesystem", e) from None
            gpu = request.policy.gpu
            if gpu is not None:
                try:
                    devices.check_nodes(gpu.nodes)
                except devices.DeviceError as e:
                    raise SetupError("devices", e) from None
            try:
                zygote = self._take_spare()
            except devfilter.BpfError as e:  # a spare made now, whose filter would not attach
                raise SetupError("devices", e) from None
            except (OSError, cgroups.CgroupError) as e:
                raise SetupError("fork", e) from None
            mntns = _open_mount_namespace(zygote.pid)
            try:
                group = self.cgroups.assign(zygote.cgroup, job_id, request.policy.memory_bytes,
                                            request.policy.pids_max, request.policy.cpus)
            except (OSError, cgroups.CgroupError) as e:
                raise SetupError("cgroup", e) from None
            if gpu is not None:
                # Before the spare has the job: its init and command are both held.
                try:
                    if self.device_filters is not None:
                        self.device_filters.attach_gpu(group.dirs["pids"], gpu.nodes)
                    else:
                        held = self.devices.create(job_id, gpu.nodes, zygote.pid)
                        group.dirs["devices"] = zygote.cgroup.dirs["devices"] = held
                except (OSError, devices.DeviceError, cgroups.CgroupError) as e:
                    raise SetupError("devices", e) from None
            try:
                for host, _ in request.ro_binds:
                    trees.append(ns.open_tree_clone(host))
            except OSError as e:
                raise SetupError("filesystem", e) from None
            try:
                socket.send_fds(zygote.sock, [data], fds + trees)
            except OSError as e:
                raise SetupError("handover", e) from None
        except SetupError as e:
            if mntns >= 0:
                os.close(mntns)
            if zygote is not None:
                self._discard(zygote)  # and its cgroup, whatever its name by now
            self.send({"id": job_id, "event": "setup_failed", "message": str(e)})
            return
        finally:
            for fd in trees:
                os.close(fd)
        zygote.sock.setblocking(False)
        job = _Job(job_id, zygote.pid, zygote.pidfd, group, started, zygote.sock, mntns)
        self.jobs[job.pidfd] = job
        self.by_id[job_id] = job
        self._watch(job.pidfd, job)
        self._watch(zygote.sock.fileno(), job)

    def _read_status(self, job: _Job) -> bool:
        """One report of the job's init (see ``pid1``): started, setup failed, or exited.

        False if there was none to read.
        """
        assert job.status is not None
        try:
            report = job.status.recv(4096)
        except BlockingIOError:
            return False
        except OSError as e:
            report = pid1.FAILED + f"status: {e}".encode()
        kind, body = report[:1], report[1:]
        if kind == pid1.STARTED and not job.executed and job.failure is None:
            job.executed = True
            self.spare_deaths = 0
            self.send({"id": job.id, "event": "started", "pid": job.pid,
                       "cgroup": {"version": job.cgroup.version, "dirs": job.cgroup.dirs,
                                  "cpu_base": job.cgroup.cpu_base}})
            # The exit report follows on the same socket, sent before the init exits:
            # it is read when the init is reaped, which saves the launcher a wake-up.
            self._unwatch(job.status.fileno())
            return True
        if kind == pid1.EXITED and job.executed:
            try:
                job.wait_status = int(body)
            except ValueError:
                pass  # then the init's own status stands
        elif report and not job.executed:
            job.failure = body.decode(errors="replace") if kind == pid1.FAILED \
                else report.decode(errors="replace")
        self._close_status(job)  # EOF, the exit, or a failure: nothing more comes
        return True

    def _close_status(self, job: _Job) -> None:
        assert job.status is not None
        if self.watched.get(job.status.fileno()) is job:
            self._unwatch(job.status.fileno())
        job.status.close()
        job.status = None

    def _read_reports(self, job: _Job) -> None:
        """At the job's end: what its init reported and the launcher has not read yet."""
        while job.status is not None and self._read_status(job):
            pass
        if job.status is not None:  # nothing more to read, though it is gone
            self._close_status(job)

    def _kill(self, job: _Job) -> None:
        # The job is not reaped until its pidfd fires, so its pid cannot have been reused.
        try:
            os.kill(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.cgroup.kill()

    def _reap(self, job: _Job) -> None:
        if job.status is not None:
            self._read_reports(job)
        self._unwatch(job.pidfd)
        del self.jobs[job.pidfd]
        del self.by_id[job.id]
        _, wait_status, _ = os.wait4(job.pid, 0)
        if job.wait_status is not None:
            wait_status = job.wait_status  # the command's own (the init's says less)
        os.close(job.pidfd)
        wall_ms = (time.monotonic() - job.started) * 1000
        if job.mntns >= 0:
            self.held_namespaces.append(job.mntns)
        if job.failure is not None:
            self._remove_now(job.cgroup)
            self.send({"id": job.id, "event": "setup_failed", "message": job.failure})
            return
        message: dict[str, Any] = {"id": job.id, "event": "exited", "wait_status": wait_status,
                                   "wall_time_ms": round(wall_ms, 3)}
        try:
            message.update(cpu_seconds=job.cgroup.cpu_seconds(),
                           memory_peak_bytes=job.cgroup.memory_peak(),
                           oom_killed=job.cgroup.oom_killed())
        except (OSError, ValueError) as e:
            message["error"] = f"cgroup statistics: {e}"
        # Report first: every process of the job is gone, only the directory is left.
        self.send(message)
        self.doomed.append(_Doomed(job.id, job.cgroup,
                                   time.monotonic() + CLEANUP_GIVE_UP_SECONDS))
        self._remove_doomed()

    def _release_namespaces(self) -> None:
        """Close the mount namespaces of finished jobs, which tears them down.

        Unmounting a job's tree (its tmpfs, /proc, the binds) waits for an
        expedited RCU grace period; left to the job's own exit, that would
        delay its reaping and so its result.
        """
        for fd in self.held_namespaces:
            os.close(fd)
        self.held_namespaces = []

    def _warm_up_stats(self) -> None:
        """Read the instance's own statistics the way a job's are read (see ``_warm_up``)."""
        try:
            instance = cgroups.JobCgroup(self.cgroups.version, self.cgroups.bases)
            instance.cpu_seconds(), instance.memory_peak(), instance.oom_killed()
        except (OSError, ValueError):
            pass

    def _remove_doomed(self) -> None:
        now = time.monotonic()
        left = []
        for doomed in self.doomed:
            try:
                if doomed.group.try_remove():
                    continue
                if now < doomed.deadline:
                    left.append(doomed)
                    continue
                error = "still busy"
            except (OSError, cgroups.CgroupError) as e:
                error = str(e)
            # Left for the next start's cleanup_stale.
            self.send({"id": doomed.job_id, "event": "cleanup_failed",
                       "message": f"cgroup: {error}"})
        self.doomed = left

    def _remove_now(self, group: cgroups.JobCgroup) -> None:
        try:
            group.remove()
        except (OSError, cgroups.CgroupError):
            pass  # left for the next start's cleanup_stale

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            self._kill(job)
        for job in list(self.jobs.values()):
            self._reap(job)
        for zygote in self.spares:
            self._discard(zygote)
        self.spares = []
        for doomed in self.doomed:
            self._remove_now(doomed.group)
        self.doomed = []
        self._release_namespaces()
        self.cgroups.remove_bases()
        self.devices.remove_base()
        if self.device_filters is not None:
            self.device_filters.close()

    # -- in the child -------------------------------------------------------------------------

    def _zygote(self, control: int, cgroup_procs: list[int]) -> NoReturn:
        """The spare: prepare what every job shares, wait for a job, launch it."""
        step = "descriptors"
        error: str | None = None
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the launcher ignores it
            ns.prctl(ns.PR_SET_PDEATHSIG, signal.SIGKILL)
            # Nothing of other jobs, nor the worker's socket.
            ns.close_all_but(control, *cgroup_procs)
            step = "namespaces"
            ns.unshare(ZYGOTE_NAMESPACES)
            step = "network namespace"
            network.send_netlink(self.loopback_up)
            step = "filesystem"
            mounts.prepare_root(self.root_dir, self.templates, self.lib_dirs)
            step = "capabilities"
            os.setgroups([])  # the same for every job, so done here
            step = "scheduling"
            # A worker started with a real-time policy (``chrt``) must not hand it to
            # jobs, and cgroup v1 refuses real-time tasks a group with a CPU bandwidth
            # limit (and no real-time budget of its own).
            if os.sched_getscheduler(0) != os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            step = "init"
            pid1.prepare(self.arg_area)
            ns.warm_up()
            _warm_up()
            # Last: while a process moves into a cgroup, forks wait (see cgroups), and
            # by now the launcher is likely done forking this spare's batch.
            step = "cgroup"
            for fd in cgroup_procs:
                os.write(fd, b"0")
                os.close(fd)
        except BaseException as e:  # noqa: B036 - reported when a job arrives
            error = f"{step}: {e}"
        # Held until exec or exit: a dropped socket object would close ``control``.
        channel = socket.socket(fileno=control)
        try:
            data, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, MAX_FDS,
                                              socket.MSG_CMSG_CLOEXEC)
        except BaseException:  # noqa: B036
            os._exit(1)
        if not data:
            os._exit(0)  # the launcher let this spare go
        if error is None:
            error = self._launch(data, fds, channel)  # returns only on failure
        try:
            channel.send(pid1.FAILED + error.encode()[:4000])
        finally:
            os._exit(127)

    def _launch(self, data: bytes, fds: list[int], channel: socket.socket) -> str:
        """Apply the job's layers in security order and become its init, or say which failed.

        The layers are applied to this process, the init, and the job's command
        inherits every one of them.
        """
        step = "request"
        try:
            request = LaunchRequest.from_wire(json.loads(data)["request"])
            if len(fds) != 4 + len(request.ro_binds):
                raise ValueError(f"{len(fds)} descriptors")
            step = "stdio"
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
            step = "cgroup"
            ns.unshare(ns.CLONE_NEWCGROUP)  # rooted at the cgroup joined before
            step = "namespaces"
            socket.sethostname(request.policy.hostname)
            step = "filesystem"
            mounts.finish_root(request.policy, fds[3],
                               [(fd, inside) for fd, (_, inside)
                                in zip(fds[4:], request.ro_binds)])
            step = "rlimits"
            apply_rlimits(request.policy)
            step = "capabilities"
            # The bounding set was emptied in the launcher, once, and is inherited.
            os.setgroups([])
            os.setresgid(request.gid, request.gid, request.gid)
            os.setresuid(request.uid, request.uid, request.uid)
            ns.clear_capabilities()
            # Set after the uid change, which would reset them.
            ns.prctl(ns.PR_SET_PDEATHSIG, signal.SIGKILL)
            # A launcher that died before that sends no signal any more; its end of
            # the channel is closed then (an init's getppid() is 0 and cannot tell).
            hangup = select.poll()
            hangup.register(channel.fileno(), 0)  # POLLHUP and POLLERR are always reported
            if hangup.poll(0):
                os._exit(1)
            pid1.harden()
            step = "no_new_privs"
            ns.prctl(ns.PR_SET_NO_NEW_PRIVS, 1)
            step = "descriptors"
            ns.close_range_cloexec(3)
            step = "seccomp"
            self.filters.load()
            step = "exec"
            child = pid1.spawn(list(request.argv), request.environment())
        except BaseException as e:  # noqa: B036 - anything at all must be reported
            return f"{step}: {e}"
        pid1.supervise(child, channel)


def _open_mount_namespace(pid: int) -> int:
    """A descriptor holding the spare's mount namespace, or -1 (then the exit pays)."""
    try:
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _warm_up() -> None:
    """Run the request path once on a sample, right after a fork, while there is time.

    After a fork, every page the launcher and its spare share is copied on
    the first write to it by either; in CPython that is nearly every page a
    code path touches (reference counts, allocator pools), and parsing one
    request costs 0.3 ms instead of 0.01.  Taking those faults here, between
    jobs, keeps them off the next launch.
    """
    request = LaunchRequest.from_wire(json.loads(_SAMPLE_SPAWN)["request"])
    request.environment()
    json.dumps({"id": "warm-up", "event": "exited", "wait_status": 0, "wall_time_ms": 0.5,
                "cpu_seconds": 0.001, "memory_peak_bytes": 4096, "oom_killed": False})


def main(argv: list[str] | None = None) -> None:
    """Run the launcher; ``argv`` is one JSON object, from ``Sandbox.start``.

    Its keys: ``fd`` (the SOCK_SEQPACKET to the worker), ``state_dir``,
    ``instance`` (the cgroup directory name), ``seccomp`` (the BPF programs
    from seccomp.py), ``loopback`` (the netlink request from network.py) and
    ``allow_unlimited_swap`` (start even where a job's swap cannot be capped).
    JSON, not argparse: this process is internal, it parses JSON anyway, and
    argparse was 0.4 MB of its memory.
    """
    settings = json.loads((sys.argv[1:] if argv is None else argv)[0])
    ns.prctl(ns.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the worker
    # Python ignores these; an ignored signal stays ignored across exec, and the
    # jobs must get the defaults.  The launcher sends with MSG_NOSIGNAL.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    # A Ctrl-C at the terminal reaches the whole process group: the worker stops the
    # launcher itself (or it dies with the worker), never with a traceback.  Spares put
    # the default back first thing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=settings["fd"])
    try:
        # A mount namespace of its own, copied now: the worker's state tmpfs is private
        # (storage.py), so the job mounts the worker makes from now on never appear here,
        # nor in the spares' namespaces copied from this one, however many are held.
        ns.unshare(ns.CLONE_NEWNS)
        ns.drop_bounding_set(ns.last_capability())
        launcher = Launcher(sock, settings["state_dir"], settings["instance"],
                            settings["seccomp"], settings["loopback"],
                            allow_unlimited_swap=settings["allow_unlimited_swap"])
    except Exception as e:
        # A DelegationError is already the one line that says what to do.
        message = str(e) if isinstance(e, cgroups.DelegationError) else f"{type(e).__name__}: {e}"
        sock.send(json.dumps({"event": "fatal", "message": message}).encode(),
                  socket.MSG_NOSIGNAL)
        sys.exit(1)
    launcher.serve()


if __name__ == "__main__":
    main()
