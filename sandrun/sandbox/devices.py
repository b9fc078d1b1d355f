"""What device nodes a job may open: the usual few, and a GPU job's own GPU.

Every job's ``/dev`` holds only ``null``, ``zero``, ``full``, ``random`` and
``urandom`` (bound from a template) and it cannot make another node (no
``CAP_MKNOD``).  A GPU job's ``/dev`` also holds its ``nvidiaN``,
``nvidiactl``, ``nvidia-uvm`` (and ``nvidia-uvm-tools``), recreated by number
(see ``mounts.finish_root``); the driver itself would let any process that can
open ``nvidiactl`` reach every GPU through it, so the kernel must also refuse
the other GPUs' numbers: that is the device cgroup's job.

cgroup v1: a ``devices`` cgroup per GPU job, beneath the launcher's own like
the others (``<instance>/job-<id>``), that denies everything (``a``) and then
allows the five standard devices and the job's GPU nodes (read, write and
mknod, which the job cannot use without ``CAP_MKNOD``).  The spare that will
run the job is moved into it before it is handed the job, so the job's init
and command are both held by it.  Other jobs get no devices cgroup on v1:
their ``/dev`` is all they can reach.

cgroup v2 has no ``devices`` controller: a BPF program attached to the job's
cgroup decides instead (``devfilter``), and there every job gets one.  Each
spare's cgroup gets the standard filter (read and write of the five standard
devices; nothing else, and ``mknod`` of nothing) as soon as it is made, before
any process is in it, so it costs a launch nothing; a GPU job's is replaced,
before the spare is handed the job, by one that allows the same list as v1's
``devices.allow``.  The kernel drops a cgroup's program when the cgroup is
removed.  If the program cannot be loaded the launcher does not start; if it
cannot be attached the job does not run.

No Twisted: this module runs in the launcher.
"""

from __future__ import annotations

import os
import re

from sandrun.sandbox import cgroups, devfilter, mounts

# The only node names a GPU job may be given, so a request can never name another device.
NODE_NAME = re.compile(r"nvidia(?:[0-9]{1,3}|ctl|-uvm|-uvm-tools)")
# Every job's /dev (null zero full random urandom), by number.
STANDARD = tuple((major, minor) for _, major, minor in mounts.DEVICES)


class DeviceError(Exception):
    pass


def filter_rules(nodes: tuple[tuple[str, int, int], ...] | None) -> list[devfilter.Rule]:
    """The v2 filter's rules: a GPU job's as ``rules`` says, any other job's read and write only.

    ``mknod`` only where the spare makes nodes itself (``mounts.gpu_dev``); an
    ordinary job's /dev comes from a template the worker made outside the cgroup.
    """
    if nodes is None:
        return [(major, minor, devfilter.ACC_READ | devfilter.ACC_WRITE)
                for major, minor in STANDARD]
    return [(major, minor, devfilter.ACC_ALL) for major, minor in _allowed(nodes)]


def check_nodes(nodes: tuple[tuple[str, int, int], ...]) -> None:
    """Refuse anything but NVIDIA node names with plausible numbers."""
    for name, major, minor in nodes:
        if not NODE_NAME.fullmatch(name) or not 0 < major < 4096 or not 0 <= minor < 1 << 20:
            raise DeviceError(f"device node {name!r} ({major}:{minor}) is not allowed")


def rules(nodes: tuple[tuple[str, int, int], ...]) -> list[str]:
    """What ``devices.allow`` gets, one line each, after ``devices.deny`` got ``a``.

    ``m`` (mknod) too: the spare, still privileged, makes these nodes in the
    job's /dev after it joined the group; the job itself has no ``CAP_MKNOD``.
    """
    return [f"c {major}:{minor} rwm" for major, minor in _allowed(nodes)]


def _allowed(nodes: tuple[tuple[str, int, int], ...]) -> tuple[tuple[int, int], ...]:
    """A GPU job's devices, by number: every job's and its GPU's nodes."""
    return (*STANDARD, *((major, minor) for _, major, minor in nodes))


class DeviceCgroups:
    """The v1 ``devices`` groups of one worker instance (made when first needed)."""

    def __init__(self, instance: str, root: str = cgroups.ROOT) -> None:
        self.instance = instance
        self.root = root
        self._base: str | None = None

    def base(self) -> str:
        if self._base is None:
            hierarchy = os.path.join(self.root, "devices")
            if not os.path.isdir(hierarchy):
                raise DeviceError("no cgroup v1 devices controller")
            own = cgroups._own_cgroup("devices").lstrip("/")
            self._base = os.path.join(hierarchy, own, self.instance)
            os.makedirs(self._base, exist_ok=True)
        return self._base

    def create(self, job_id: str, nodes: tuple[tuple[str, int, int], ...], pid: int) -> str:
        """Make the job's group, allow only ``nodes`` and the standard ones, move ``pid`` in.

        Returns its directory; on failure removes it and raises (the job must not run).
        """
        check_nodes(nodes)
        path = os.path.join(self.base(), f"job-{job_id}")
        os.mkdir(path)
        try:
            cgroups._write(os.path.join(path, "devices.deny"), "a")
            for rule in rules(nodes):
                cgroups._write(os.path.join(path, "devices.allow"), rule)
            cgroups._write(os.path.join(path, "cgroup.procs"), str(pid))
        except BaseException:
            cgroups._rmdir(path)
            raise
        return path

    def cleanup_stale(self) -> int:
        """Remove the groups an earlier run of this instance left; how many."""
        hierarchy = os.path.join(self.root, "devices")
        if not os.path.isdir(hierarchy):
            return 0
        base = os.path.join(hierarchy, cgroups._own_cgroup("devices").lstrip("/"),
                            self.instance)
        if not os.path.isdir(base):
            return 0
        removed = 0
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if name.startswith("job-") and os.path.isdir(path):
                cgroups._kill_procs(os.path.join(path, "cgroup.procs"))
                cgroups._rmdir(path)
                removed += 1
        return removed

    def remove_base(self) -> None:
        if self._base is not None:
            try:
                os.rmdir(self._base)
            except OSError:
                pass  # not empty (left for the next start) or already gone


class DeviceFilters:
    """cgroup v2: the device programs of one launcher (see ``devfilter``).

    The standard program is loaded once, at start, and attached to every
    spare's cgroup; a GPU job's is loaded for it, attached over the standard
    one, and its descriptor closed at once: the cgroup holds the program until
    it is removed, and the kernel frees it then.
    """

    def __init__(self) -> None:
        try:
            self.standard = devfilter.load(devfilter.program(filter_rules(None)))
        except devfilter.BpfError as e:
            raise DeviceError(f"cgroup v2 device filter: {e.strerror}; the worker needs "
                              "CAP_SYS_ADMIN (or CAP_BPF) and a kernel with "
                              "CONFIG_CGROUP_BPF") from None

    def attach_standard(self, cgroup_dir: str) -> None:
        devfilter.attach(self.standard, cgroup_dir)

    def attach_gpu(self, cgroup_dir: str, nodes: tuple[tuple[str, int, int], ...]) -> None:
        """Give the cgroup the filter of a GPU job with ``nodes``; raises if it cannot."""
        check_nodes(nodes)
        prog = devfilter.load(devfilter.program(filter_rules(nodes)))
        try:
            devfilter.attach(prog, cgroup_dir)
        finally:
            os.close(prog)

    def close(self) -> None:
        os.close(self.standard)
