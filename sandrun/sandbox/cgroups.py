"""Per-job cgroups, v1 or v2, whichever the host has (detected once).

Job cgroups live beneath the cgroup the launcher was started in, under a
directory named after the worker instance, so an outer cap around the worker
(a test suite's own cgroup, a systemd slice) also caps its jobs, and two
workers on one host never clean up each other's jobs.

v1 uses the ``memory``, ``pids``, ``cpuacct`` and ``cpu`` hierarchies (the last
two are often one, co-mounted); v2 the unified hierarchy with ``memory``,
``pids`` and ``cpu`` enabled.  A job's CPU bandwidth is capped (``set_cpu_limit``).

On v2 the worker needs a delegated subtree: a cgroup that holds no process but
its own (the worker and the launcher), with the three controllers available,
such as a systemd unit's cgroup with ``Delegate=yes``, a container's own cgroup
namespace, or the root cgroup.  Because a non-root cgroup that holds
processes may not enable controllers for its children (the "no internal
processes" rule), the launcher first moves the worker and itself, and nothing
else, into a ``supervisor`` leaf; its job cgroups go into a sibling directory
named after the instance.  Started again from that leaf, it uses the same
subtree instead of nesting a level deeper.  A cgroup that also holds other
processes (a login session's scope) is refused with one line saying what to
do: ``DelegationError``, which ``sandrun serve`` checks before it starts.

A job's cgroup is made before the job is known, for the spare process that
will run it (see ``launcher``), and the spare moves itself in (through
``cgroup.procs`` descriptors the launcher opened, so a rename cannot race it): moving a
process takes a lock whose write side waits for an RCU grace period, now and
then several milliseconds, which a spare can afford and a launch cannot.
When the job arrives its limits are set and, on v1, the directory is renamed
``job-<id>`` (v2 cannot rename cgroups; there it keeps its ``spare-<n>``
name).  Its statistics start from what the spare used: on v1 they are reset,
on v2 the CPU time so far is subtracted.

No Twisted: this module runs in the launcher.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "pids", "cpuacct", "cpu")
CPU_PERIOD_US = 100_000  # the bandwidth period; a job gets cpus x this much CPU time in each
V2_CONTROLLERS = ("memory", "pids", "cpu")
SUPERVISOR = "supervisor"  # v2: the leaf the worker and its launcher move into
HOW_TO_DELEGATE = ("run Sandrun as its systemd unit (sandrun install-service) or under "
                   "`systemd-run --scope -p Delegate=yes sandrun serve`")


class CgroupError(Exception):
    pass


class DelegationError(CgroupError):
    """cgroup v2: the cgroup Sandrun started in cannot hold its job cgroups (one line)."""


def parse_keyed(text: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``cpu.stat``, ``memory.events``): ``key value`` per line."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    return values


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    # os.open and os.read: a job's stats are read on the launch path, where
    # Python's buffered text files cost more than the system calls.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _own_cgroup(controller: str | None, proc_file: str = "/proc/self/cgroup") -> str:
    """Our cgroup path in the named v1 hierarchy, or the v2 one for ``None``."""
    for line in _read(proc_file).splitlines():
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    raise CgroupError(f"not in a {controller or 'v2'} cgroup")


def _kill_procs(procs_file: str) -> int:
    try:
        pids = [int(p) for p in _read(procs_file).split()]
    except FileNotFoundError:
        return 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def _rmdir(path: str) -> None:
    """Remove a cgroup directory, waiting briefly for dying tasks to leave."""
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.005)
    raise CgroupError(f"cgroup {path} still busy")


def _relative(root: str, path: str) -> str:
    """A cgroup's path as /proc/<pid>/cgroup names it."""
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


def _procs(directory: str) -> set[int]:
    return {int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split()}


def locate_v2(root: str = ROOT, ours: frozenset[int] = frozenset(),
              proc_file: str = "/proc/self/cgroup") -> tuple[str, list[int]]:
    """Where this worker's v2 subtree is, and which of its processes must move to its leaf.

    The subtree is the cgroup we were started in (or the one above, if that is
    our own ``supervisor`` leaf from an earlier start).  Raises
    ``DelegationError`` with one line that says what to do if it lacks a
    controller or holds processes that are not ours.
    """
    own = os.path.normpath(os.path.join(root, _own_cgroup(None, proc_file).lstrip("/")))
    if own != root and os.path.basename(own) == SUPERVISOR:
        own = os.path.dirname(own)
    where = _relative(root, own)
    if not os.access(os.path.join(own, "cgroup.procs"), os.W_OK):
        raise DelegationError(
            f"cgroup v2: {where} is not writable here (/sys/fs/cgroup mounted read-only?); "
            f"in a container: --privileged --cgroupns=private; else {HOW_TO_DELEGATE}")
    available = set(_read(os.path.join(own, "cgroup.controllers")).split())
    missing = [c for c in V2_CONTROLLERS if c not in available]
    if missing:
        raise DelegationError(
            f"cgroup v2: the {', '.join(missing)} controller{'s' if len(missing) > 1 else ''} "
            f"not available in {where} (not delegated to it); {HOW_TO_DELEGATE}")
    # The real root cgroup may hold processes and still give its children controllers;
    # every other cgroup (a cgroup namespace's root included) has a cgroup.type.
    if not os.path.exists(os.path.join(own, "cgroup.type")):
        return own, []
    inside = _procs(own)
    # Ours: the given processes and whatever they started (the worker's short-lived
    # probes, the launcher), which are born in the same cgroup.
    ours = frozenset(pid for pid in inside if _descends_from(pid, ours))
    others = inside - ours
    if others:
        raise DelegationError(
            f"cgroup v2: {where} also holds {len(others)} process"
            f"{'es' if len(others) > 1 else ''} that {'are' if len(others) > 1 else 'is'} not "
            f"Sandrun's, so it cannot be given limited child cgroups; {HOW_TO_DELEGATE}")
    return own, sorted(inside & ours)


def _descends_from(pid: int, ancestors: frozenset[int]) -> bool:
    """Whether ``pid`` is one of ``ancestors`` or a descendant of one (through /proc)."""
    for _ in range(64):  # deeper than any process tree the worker makes
        if pid in ancestors:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False  # gone (or not on this host): not ours to move
        pid = int(stat.rsplit(b")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False


def enter_leaf(root: str = ROOT) -> None:
    """cgroup v2: move this process, alone in its delegated cgroup, into the ``supervisor`` leaf.

    Done by ``sandrun serve`` before it starts anything, so that every process
    it starts is born in the leaf and the cgroup above stays free to give job
    cgroups their controllers.  ``locate_v2`` must have found it usable.
    """
    subtree, movers = locate_v2(root, frozenset({os.getpid()}))
    if os.getpid() in movers:
        leaf = os.path.join(subtree, SUPERVISOR)
        os.makedirs(leaf, exist_ok=True)
        _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))


@dataclass
class JobCgroup:
    """One job's cgroup: the files the child joins and where stats are read."""

    version: int
    dirs: dict[str, str]  # controller ("memory", "pids", "cpu") -> directory
    cpu_base: float = 0.0  # CPU seconds used before the job started (v2 cannot reset)

    @property
    def procs_files(self) -> list[str]:
        return sorted({os.path.join(d, "cgroup.procs") for d in self.dirs.values()})

    def cpu_seconds(self) -> float:
        return max(self._cpu_total() - self.cpu_base, 0.0)

    def _cpu_total(self) -> float:
        if self.version == 1:
            return int(_read(os.path.join(self.dirs["cpu"], "cpuacct.usage"))) / 1e9
        return parse_keyed(_read(os.path.join(self.dirs["cpu"], "cpu.stat"))).get(
            "usage_usec", 0) / 1e6

    def memory_peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int(_read(os.path.join(self.dirs["memory"], name)))
        except FileNotFoundError:  # v2 before Linux 5.19
            return int(_read(os.path.join(self.dirs["memory"], "memory.current")))

    def oom_killed(self) -> bool:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return parse_keyed(_read(os.path.join(self.dirs["memory"], name))).get("oom_kill", 0) > 0

    def kill(self) -> None:
        if self.version == 2:
            try:
                _write(os.path.join(self.dirs["pids"], "cgroup.kill"), "1")
                return
            except FileNotFoundError:  # before Linux 5.14
                pass
        for procs in self.procs_files:
            _kill_procs(procs)

    def try_remove(self) -> bool:
        """One attempt, without waiting: True once every directory is gone.

        Right after a job's last process was reaped a v1 ``rmdir`` can still
        find the group busy for a moment; the caller retries later instead of
        sleeping here.
        """
        gone = True
        for d in sorted(set(self.dirs.values())):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                _kill_procs(os.path.join(d, "cgroup.procs"))
                gone = False
        return gone

    def remove(self) -> None:
        """Kill what is left and remove the directories, waiting up to a second."""
        for _ in range(50):
            if not any(_kill_procs(p) for p in self.procs_files):
                break
            time.sleep(0.002)
        for d in sorted(set(self.dirs.values())):
            _rmdir(d)


def set_cpu_limit(version: int, directory: str, cpus: float) -> None:
    """Cap a cgroup's CPU bandwidth at ``cpus`` cores (``cpu.max`` or CFS quota/period)."""
    quota = max(1000, round(cpus * CPU_PERIOD_US))  # the kernel's floor is 1 ms
    if version == 2:
        _write(os.path.join(directory, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
        return
    _write(os.path.join(directory, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
    _write(os.path.join(directory, "cpu.cfs_quota_us"), str(quota))


def swap_on(proc_swaps: str) -> bool:
    """Whether ``/proc/swaps`` lists any active swap area (its first line is a header)."""
    return len([line for line in proc_swaps.splitlines()[1:] if line.strip()]) > 0


class CgroupManager:
    """Creates, limits and removes job cgroups for one worker instance.

    ``ours``: the processes of this worker, which alone may be moved into the
    ``supervisor`` leaf on v2 (the launcher passes itself and the worker);
    ``proc_file`` says where to read our own cgroup (tests give a fake tree).
    """

    def __init__(self, instance: str, root: str = ROOT, ours: frozenset[int] | None = None,
                 proc_file: str = "/proc/self/cgroup") -> None:
        self.root = root
        self.ours = frozenset({os.getpid()}) if ours is None else ours
        self.proc_file = proc_file
        self.version = self._detect()
        self.instance = instance
        self.bases = self._prepare_bases()
        # Whether swap can be capped per cgroup (v1 with swap accounting), found once.
        mem = self.bases["memory"]
        self.v1_memsw = self.version == 1 and os.path.exists(
            os.path.join(mem, "memory.memsw.limit_in_bytes"))
        self.v2_swap = self.version == 2 and os.path.exists(os.path.join(mem, "memory.swap.max"))

    def swap_unlimited(self) -> bool:
        """True when the host has swap on and a job's swap use cannot be capped at 0."""
        if self.v1_memsw or self.v2_swap:
            return False
        try:
            return swap_on(_read("/proc/swaps"))
        except FileNotFoundError:  # no swap support in the kernel
            return False

    def _detect(self) -> int:
        if os.path.exists(os.path.join(self.root, "cgroup.controllers")):
            return 2  # which controllers we may use is checked where we are (locate_v2)
        absent = [c for c in V1_CONTROLLERS if not os.path.isdir(os.path.join(self.root, c))]
        if absent:
            raise CgroupError(f"no cgroup v2 and cgroup v1 lacks: {', '.join(absent)}")
        return 1

    def _prepare_bases(self) -> dict[str, str]:
        if self.version == 1:
            bases = {}
            for controller, key in (("memory", "memory"), ("pids", "pids"), ("cpuacct", "cpu"),
                                    ("cpu", "cpu_limit")):
                own = _own_cgroup(controller, self.proc_file).lstrip("/")
                base = os.path.join(self.root, controller, own, self.instance)
                os.makedirs(base, exist_ok=True)
                # Resolved: co-mounted cpu,cpuacct is one directory, made once per job.
                bases[key] = os.path.realpath(base)
            return bases
        subtree, movers = locate_v2(self.root, self.ours, self.proc_file)
        enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        if movers:
            leaf = os.path.join(subtree, SUPERVISOR)
            os.makedirs(leaf, exist_ok=True)
            for pid in movers:
                try:
                    _write(os.path.join(leaf, "cgroup.procs"), str(pid))
                except ProcessLookupError:
                    pass
        try:
            _write(os.path.join(subtree, "cgroup.subtree_control"), enable)
        except OSError as e:
            raise DelegationError(
                f"cgroup v2: cannot enable {', '.join(V2_CONTROLLERS)} for the children of "
                f"{_relative(self.root, subtree)} ({e.strerror or e}); {HOW_TO_DELEGATE}"
            ) from None
        base = os.path.join(subtree, self.instance)
        os.makedirs(base, exist_ok=True)
        _write(os.path.join(base, "cgroup.subtree_control"), enable)
        return {"memory": base, "pids": base, "cpu": base}

    def remove_bases(self) -> None:
        """Remove the instance's own directories, if nothing is left in them (at exit).

        Otherwise every worker that ever ran on the host would leave an empty
        group behind, and the kernel keeps and walks every one of them.
        """
        for base in sorted(set(self.bases.values())):
            try:
                os.rmdir(base)
            except OSError:
                pass  # not empty (left for the next start) or already gone

    def cleanup_stale(self) -> int:
        """Kill and remove every job and spare cgroup left by an earlier run; how many."""
        removed = 0
        for base in set(self.bases.values()):
            for name in os.listdir(base):
                path = os.path.join(base, name)
                if os.path.isdir(path) and name.startswith(("job-", "spare-")):
                    _kill_procs(os.path.join(path, "cgroup.procs"))
                    _rmdir(path)
                    removed += 1
        return removed

    def create_spare(self, number: int) -> JobCgroup:
        """Make ``spare-<number>``, without limits yet, for a spare to join."""
        dirs = {key: os.path.join(base, f"spare-{number}") for key, base in self.bases.items()}
        for d in set(dirs.values()):
            os.mkdir(d)
        group = JobCgroup(self.version, dirs)
        try:
            mem = dirs["memory"]
            if self.version == 1 and not self.v1_memsw:
                _write(os.path.join(mem, "memory.swappiness"), "0")
            if self.v2_swap:
                _write(os.path.join(mem, "memory.swap.max"), "0")
        except BaseException:
            group.remove()
            raise
        return group

    def assign(self, group: JobCgroup, job_id: str, memory_bytes: int,
               pids_max: int, cpus: float | None = None) -> JobCgroup:
        """Give a spare's cgroup to a job: its limits, fresh statistics, its name.

        Fails closed: on any error the caller must not run the job.  Returns
        the group as it is now (renamed on v1).
        """
        mem = group.dirs["memory"]
        if self.version == 1:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
            if self.v1_memsw:
                _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_bytes))
        else:
            _write(os.path.join(mem, "memory.max"), str(memory_bytes))
        _write(os.path.join(group.dirs["pids"], "pids.max"), str(pids_max))
        if cpus is not None:
            set_cpu_limit(self.version, group.dirs.get("cpu_limit", group.dirs["cpu"]), cpus)
        if self.version == 2:
            return JobCgroup(2, group.dirs, cpu_base=group._cpu_total())
        _write(os.path.join(group.dirs["cpu"], "cpuacct.usage"), "0")
        _write(os.path.join(mem, "memory.max_usage_in_bytes"), "0")  # to the current usage
        renamed: dict[str, str] = {}  # co-mounted hierarchies share one directory
        for key, d in list(group.dirs.items()):
            if d not in renamed:
                renamed[d] = os.path.join(os.path.dirname(d), f"job-{job_id}")
                os.rename(d, renamed[d])
            group.dirs[key] = renamed[d]  # so that a failure half-way still removes all
        return JobCgroup(1, dict(group.dirs))
