"""A GPU job's device cgroup: the job may open its own GPU's nodes and the usual few, no more.

Only GPU jobs get one; every other job has no device node beyond ``null``,
``zero``, ``full``, ``random`` and ``urandom`` in its ``/dev`` and cannot make
one (no ``CAP_MKNOD``).  A GPU job's ``/dev`` also holds its ``nvidiaN``,
``nvidiactl``, ``nvidia-uvm`` (and ``nvidia-uvm-tools``), recreated by number
(see ``mounts.finish_root``); the driver itself would let any process that can
open ``nvidiactl`` reach every GPU through it, so the kernel must also refuse
the other GPUs' numbers: that is the device cgroup's job.

cgroup v1: a ``devices`` cgroup per GPU job, beneath the launcher's own like
the others (``<instance>/job-<id>``), that denies everything (``a``) and then
allows the five standard devices and the job's GPU nodes (read, write and
mknod, which the job cannot use without ``CAP_MKNOD``).  The spare that will
run the job is moved into it before it is handed the job, so the job's init
and command are both held by it.

cgroup v2 controls devices only through a BPF program attached to the
cgroup (``BPF_CGROUP_DEVICE``), which Sandrun does not load: on a v2 host GPU
jobs are refused (fail closed, see ``V2_REFUSAL``) while other jobs run as
usual.

No Twisted: this module runs in the launcher.
"""

from __future__ import annotations

import os
import re

from sandrun.sandbox import cgroups

V2_REFUSAL = ("GPU jobs are refused on cgroup v2: this worker cannot limit a job to its own "
              "GPU there (no BPF device filter)")
# The only node names a GPU job may be given, so a request can never name another device.
NODE_NAME = re.compile(r"nvidia(?:[0-9]{1,3}|ctl|-uvm|-uvm-tools)")
STANDARD = ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9))  # null zero full random urandom


class DeviceError(Exception):
    pass


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
    return [f"c {major}:{minor} rwm" for major, minor in
            (*STANDARD, *((major, minor) for _, major, minor in nodes))]


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
