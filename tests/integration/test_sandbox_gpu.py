"""A GPU job gets exactly its GPU: its nodes in /dev, a device cgroup allowing only them.

Against the real kernel, with fake device nodes: there is no NVIDIA driver
here, so opening a node the device cgroup allows fails with ENXIO (no driver
for that number), and one it does not allow fails with EPERM before any
driver is asked.  Nodes are made by the tests with mknod in their own tmpfs,
with the real NVIDIA numbers (195:N, 195:255) and an nvidia-uvm major.

cgroup v1 hosts use the ``devices`` controller, v2 hosts a BPF program
(``devfilter``).  The program's tests need only a cgroup2 mount, which a v1
host often has beside its controllers (``/sys/fs/cgroup/unified``, holding
none): a device program applies to a process by its cgroup2 membership
whatever the controllers, so they run on such hosts too.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from sandrun.sandbox import cgroups, devfilter, devices
from sandrun.sandbox.policy import GpuGrant, SandboxPolicy
from sandrun.wire import Reason

from .conftest import DEFAULT_POLICY, JobRunner

UVM_MAJOR = 508  # dynamic on a real host; any number the kernel has no driver for
# What a job given GPU 1 finds in its /dev: (character device, major, minor, mode, open's
# error); allowed by the device cgroup or program, so the kernel asks the (absent) driver.
GIVEN_NODES = {
    "nvidia1": [True, 195, 1, "0o666", "ENXIO"],
    "nvidiactl": [True, 195, 255, "0o666", "ENXIO"],
    "nvidia-uvm": [True, UVM_MAJOR, 0, "0o666", "ENXIO"],
    "nvidia-uvm-tools": [True, UVM_MAJOR, 1, "0o666", "ENXIO"]}
GRANT = GpuGrant("GPU-fake-1", (("nvidia1", 195, 1), ("nvidiactl", 195, 255),
                                ("nvidia-uvm", UVM_MAJOR, 0), ("nvidia-uvm-tools", UVM_MAJOR, 1)))

PROBE = """
import errno, json, os, stat, sys, time
seen = {"dev": sorted(os.listdir("/dev")), "nodes": {}, "env": {
    k: os.environ.get(k) for k in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}}
for name in seen["dev"]:
    if name.startswith("nvidia"):
        info = os.stat("/dev/" + name)
        try:
            os.close(os.open("/dev/" + name, os.O_RDWR))
            opened = "opened"
        except OSError as e:
            opened = errno.errorcode[e.errno]
        seen["nodes"][name] = [stat.S_ISCHR(info.st_mode), os.major(info.st_rdev),
                               os.minor(info.st_rdev), oct(info.st_mode & 0o777), opened]
try:
    os.mkdir("/dev/extra")
    seen["mkdir"] = "made"
except OSError as e:
    seen["mkdir"] = errno.errorcode[e.errno]
print(json.dumps(seen), flush=True)
if len(sys.argv) > 1:
    time.sleep(float(sys.argv[1]))
"""
STANDARD_DEV = ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom",
                "zero"]


@pytest_twisted.ensureDeferred
async def test_a_gpu_job_sees_only_its_own_nodes_and_is_told_its_gpu(runner: JobRunner) -> None:
    policy = SandboxPolicy(memory_bytes=DEFAULT_POLICY.memory_bytes, pids_max=64,
                           timeout_seconds=20, gpu=GRANT)
    job_id, d = runner.start(("python3", "-I", "-S", "-c", PROBE, "1.5"), policy=policy)
    await runner.wait_output(job_id, b"}")
    if runner.cap.version == 2:
        await _check_gpu_filter(runner, job_id, d)
        return
    held = runner.cgroup_dirs(job_id)["devices"]
    with open(os.path.join(held, "devices.list")) as f:
        allowed = f.read().split("\n")
    with open(os.path.join(held, "cgroup.procs")) as f:
        held_pids = f.read().split()
    ran = await d
    assert ran.reason == Reason.COMPLETED, ran.describe()
    seen = json.loads(ran.out)
    assert seen["dev"] == sorted(STANDARD_DEV + ["nvidia1", "nvidiactl", "nvidia-uvm",
                                                 "nvidia-uvm-tools"])
    # Character devices by the host's numbers; allowed, so the kernel asks the (absent) driver.
    assert seen["nodes"] == GIVEN_NODES
    assert seen["mkdir"] == "EROFS"
    assert seen["env"] == {"NVIDIA_VISIBLE_DEVICES": "GPU-fake-1",
                           "CUDA_VISIBLE_DEVICES": "GPU-fake-1"}
    # The device cgroup allows the standard five and the job's four nodes, nothing else,
    # and holds the job's init and its command.
    assert sorted(filter(None, allowed)) == sorted(
        ["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 195:1 rwm",
         "c 195:255 rwm", f"c {UVM_MAJOR}:0 rwm", f"c {UVM_MAJOR}:1 rwm"])
    assert len(held_pids) == 2
    deadline = time.monotonic() + 5
    while os.path.exists(held) and time.monotonic() < deadline:
        await runner.sleep(0.01)
    assert not os.path.exists(held), "the job's device cgroup was left behind"


def open_each(node_dir: str) -> dict[str, str]:
    """Open each test node read-write: "opened", or the errno's name (EPERM: the device
    cgroup or program refused it; ENXIO: it passed them and found no driver)."""
    found = {}
    for name in ("nvidia0", "nvidia1", "nvidiactl", "kmsg", "null"):
        try:
            os.close(os.open(os.path.join(node_dir, name), os.O_RDWR))
            found[name] = "opened"
        except OSError as e:
            found[name] = errno.errorcode[e.errno]
    return found


def _standard_filter(runner: JobRunner, job_id: str) -> int:
    """cgroup v2: the id of the program on the launcher's idle spares (every job's at first).

    On v2 a job's cgroup keeps its spare's name: the running job's own is left out.
    """
    own = runner.cgroup_dirs(job_id)["pids"]
    spares = [os.path.join(d, n) for d in runner.cap.instance_dirs() if os.path.isdir(d)
              for n in os.listdir(d) if n.startswith("spare-") and os.path.join(d, n) != own]
    found = {tuple(devfilter.attached(s)) for s in spares}
    assert len(found) == 1 and len(next(iter(found))) == 1, found
    return next(iter(found))[0]


async def _check_gpu_filter(runner: JobRunner, job_id: str, d: Any) -> None:
    """cgroup v2: the running GPU job's cgroup has one program, its own, freed after it."""
    group = runner.cgroup_dirs(job_id)["pids"]
    assert "devices" not in runner.cgroup_dirs(job_id)
    programs = devfilter.attached(group)
    with open(os.path.join(group, "cgroup.procs")) as f:
        held_pids = f.read().split()
    standard = _standard_filter(runner, job_id)
    ran = await d
    assert ran.reason == Reason.COMPLETED, ran.describe()
    seen = json.loads(ran.out)
    # The same view as on v1: the filter let every one of its nodes through to the driver.
    assert seen["nodes"] == GIVEN_NODES
    assert seen["mkdir"] == "EROFS"
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-fake-1"
    assert len(held_pids) == 2  # the init and the command
    # One program, replacing (not added to) the standard one the spare had.
    assert len(programs) == 1 and programs[0] != standard, (programs, standard)
    deadline = time.monotonic() + 5
    while devfilter.loaded(programs[0]) and time.monotonic() < deadline:
        await runner.sleep(0.01)
    assert not devfilter.loaded(programs[0]), "the GPU job's device program outlived its cgroup"
    assert devfilter.loaded(standard)


@pytest_twisted.ensureDeferred
async def test_a_job_without_a_gpu_has_no_nvidia_node_and_no_device_cgroup(
        runner: JobRunner) -> None:
    job_id, d = runner.start(("python3", "-I", "-S", "-c", PROBE, "0.5"))
    await runner.wait_output(job_id, b"}")
    assert "devices" not in runner.cgroup_dirs(job_id)
    if runner.cap.version == 2:  # the standard filter, as on the spare it was
        assert devfilter.attached(runner.cgroup_dirs(job_id)["pids"]) == [
            _standard_filter(runner, job_id)]
    ran = await d
    seen = json.loads(ran.out)
    assert seen["dev"] == STANDARD_DEV and seen["nodes"] == {}
    assert seen["env"] == {"NVIDIA_VISIBLE_DEVICES": None, "CUDA_VISIBLE_DEVICES": None}


@pytest_twisted.ensureDeferred
async def test_a_grant_naming_another_device_is_a_sandbox_error(runner: JobRunner) -> None:
    for nodes in ((("mem", 1, 1),), (("nvidia0", 1, 1), ("../kmsg", 1, 11))):
        ran = await runner.run(("true",), policy=SandboxPolicy(gpu=GpuGrant("GPU-x", nodes)))
        assert ran.reason == Reason.SANDBOX_ERROR, ran.describe()
        assert ran.result.message and ran.result.message.startswith("devices: ")


@pytest.fixture
def node_dir() -> Iterator[str]:
    """A tmpfs of the test's own (not nodev) with fake NVIDIA nodes made by mknod."""
    path = tempfile.mkdtemp(prefix="sandrun-gpu-nodes-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=755", "tmpfs", path],
                   check=True)
    try:
        for name, major, minor in (("nvidia0", 195, 0), ("nvidia1", 195, 1),
                                   ("nvidiactl", 195, 255), ("kmsg", 1, 11), ("null", 1, 3)):
            os.mknod(os.path.join(path, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


def test_the_device_cgroup_refuses_every_other_gpu_even_to_root(node_dir: str) -> None:
    if not os.path.isdir(os.path.join(cgroups.ROOT, "devices")):
        pytest.skip("no cgroup v1 devices controller (v2: the BPF filter tests below)")
    groups = devices.DeviceCgroups(f"sandrun-test-devices-{uuid.uuid4().hex[:8]}")
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    child = os.fork()
    if child == 0:  # root, every capability: only the device cgroup stands in the way
        os.close(go_w)
        os.read(go_r, 1)
        os.write(out_w, json.dumps(open_each(node_dir)).encode())
        os._exit(0)
    os.close(go_r)
    os.close(out_w)
    held = groups.create("probe", (("nvidia0", 195, 0), ("nvidiactl", 195, 255)), child)
    try:
        os.write(go_w, b"x")
        found = json.loads(os.read(out_r, 4096))
        os.waitpid(child, 0)
    finally:
        cgroups._rmdir(held)
        groups.remove_base()
    assert found == {"nvidia0": "ENXIO", "nvidiactl": "ENXIO",  # allowed: no driver here
                     "nvidia1": "EPERM", "kmsg": "EPERM",  # refused by the cgroup
                     "null": "opened"}


# -- cgroup v2: the device program against the real kernel -----------------------------------


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    return None


@pytest.fixture
def cgroup2_dir() -> Iterator[str]:
    """A fresh cgroup2 directory beneath ours (on a v1 host, in its cgroup2 mount)."""
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount here")
    own = cgroups._own_cgroup(None).lstrip("/")
    path = os.path.join(mount, own, f"sandrun-test-devfilter-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        cgroups._kill_procs(os.path.join(path, "cgroup.procs"))
        cgroups._rmdir(path)


def _probe_as_root_in(group: str, node_dir: str) -> dict[str, str]:
    """Open and mknod in ``node_dir`` from a root child in the cgroup2 ``group``.

    Root with every capability: only the device program stands in the way.
    """
    out_r, out_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            cgroups._write(os.path.join(group, "cgroup.procs"), str(os.getpid()))
            found = open_each(node_dir)
            for name, kind, major, minor in (("m-nvidia0", stat.S_IFCHR, 195, 0),
                                             ("m-nvidia1", stat.S_IFCHR, 195, 1),
                                             ("m-null", stat.S_IFCHR, 1, 3),
                                             ("m-loop0", stat.S_IFBLK, 7, 0)):
                try:
                    os.mknod(os.path.join(node_dir, name), 0o600 | kind,
                             os.makedev(major, minor))
                    found[name] = "made"
                    os.unlink(os.path.join(node_dir, name))
                except OSError as e:
                    found[name] = errno.errorcode[e.errno]
            os.write(out_w, json.dumps(found).encode())
        finally:
            os._exit(0)
    os.close(out_w)
    try:
        return json.loads(os.read(out_r, 4096) or b"{}")
    finally:
        os.close(out_r)
        os.waitpid(child, 0)


def test_the_standard_v2_filter_lets_root_read_and_write_the_five_and_nothing_more(
        cgroup2_dir: str, node_dir: str) -> None:
    filters = devices.DeviceFilters()
    try:
        filters.attach_standard(cgroup2_dir)
        found = _probe_as_root_in(cgroup2_dir, node_dir)
        assert devfilter.attached(cgroup2_dir) == [devfilter.prog_id(filters.standard)]
    finally:
        filters.close()
    assert found == {"null": "opened",
                     "nvidia0": "EPERM", "nvidia1": "EPERM", "nvidiactl": "EPERM",
                     "kmsg": "EPERM",
                     # mknod of nothing, not even of a device it may open
                     "m-null": "EPERM", "m-nvidia0": "EPERM", "m-nvidia1": "EPERM",
                     "m-loop0": "EPERM"}


def test_a_gpu_filter_replaces_the_standard_one_and_refuses_every_other_gpu_even_to_root(
        cgroup2_dir: str, node_dir: str) -> None:
    filters = devices.DeviceFilters()
    try:
        filters.attach_standard(cgroup2_dir)
        filters.attach_gpu(cgroup2_dir, (("nvidia0", 195, 0), ("nvidiactl", 195, 255)))
        programs = devfilter.attached(cgroup2_dir)
        found = _probe_as_root_in(cgroup2_dir, node_dir)
        standard = devfilter.prog_id(filters.standard)
    finally:
        filters.close()
    assert len(programs) == 1 and programs != [standard]
    assert found == {"nvidia0": "ENXIO", "nvidiactl": "ENXIO",  # allowed: no driver here
                     "nvidia1": "EPERM", "kmsg": "EPERM",  # refused by the program
                     "null": "opened",
                     "m-nvidia0": "made", "m-null": "made",  # as v1's "rwm"
                     "m-nvidia1": "EPERM", "m-loop0": "EPERM"}


def test_a_gpu_filter_is_freed_with_its_cgroup_and_the_standard_one_is_kept(
        cgroup2_dir: str) -> None:
    filters = devices.DeviceFilters()
    try:
        filters.attach_gpu(cgroup2_dir, (("nvidia0", 195, 0),))
        (gpu_program,) = devfilter.attached(cgroup2_dir)
        assert devfilter.loaded(gpu_program)  # held by the cgroup alone now
        os.rmdir(cgroup2_dir)
        deadline = time.monotonic() + 5  # released by the kernel's worker, soon after
        while devfilter.loaded(gpu_program) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not devfilter.loaded(gpu_program)
        assert devfilter.loaded(devfilter.prog_id(filters.standard))
    finally:
        filters.close()
        os.makedirs(cgroup2_dir, exist_ok=True)  # for the fixture to remove


def test_a_filter_that_cannot_be_attached_or_loaded_fails_with_a_clear_error(
        cgroup2_dir: str, tmp_path: Any) -> None:
    filters = devices.DeviceFilters()
    try:
        with pytest.raises(devfilter.BpfError) as attaching:
            filters.attach_gpu(str(tmp_path), (("nvidia0", 195, 0),))  # not a cgroup
        with pytest.raises(devices.DeviceError):
            filters.attach_gpu(cgroup2_dir, (("mem", 1, 1),))
    finally:
        filters.close()
    assert attaching.value.errno == errno.EBADF
    assert f"BPF_PROG_ATTACH of the device filter to {tmp_path}" in str(attaching.value)
    assert devfilter.attached(cgroup2_dir) == []  # nothing half-done
    with pytest.raises(devfilter.BpfError) as loading:
        devfilter.load(devfilter.insn(0x95))  # returns r0 without setting it
    assert "BPF_PROG_LOAD" in str(loading.value) and "verifier: " in str(loading.value)
