"""A GPU job gets exactly its GPU: its nodes in /dev, a device cgroup allowing only them.

Against the real kernel, with fake device nodes: there is no NVIDIA driver
here, so opening a node the device cgroup allows fails with ENXIO (no driver
for that number), and one it does not allow fails with EPERM before any
driver is asked.  Nodes are made by the tests with mknod in their own tmpfs,
with the real NVIDIA numbers (195:N, 195:255) and an nvidia-uvm major.
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

import pytest
import pytest_twisted

from sandrun.sandbox import cgroups, devices
from sandrun.sandbox.policy import GpuGrant, SandboxPolicy
from sandrun.wire import Reason

from .conftest import DEFAULT_POLICY, JobRunner

UVM_MAJOR = 508  # dynamic on a real host; any number the kernel has no driver for
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
    assert seen["nodes"] == {
        "nvidia1": [True, 195, 1, "0o666", "ENXIO"],
        "nvidiactl": [True, 195, 255, "0o666", "ENXIO"],
        "nvidia-uvm": [True, UVM_MAJOR, 0, "0o666", "ENXIO"],
        "nvidia-uvm-tools": [True, UVM_MAJOR, 1, "0o666", "ENXIO"]}
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


@pytest_twisted.ensureDeferred
async def test_a_job_without_a_gpu_has_no_nvidia_node_and_no_device_cgroup(
        runner: JobRunner) -> None:
    job_id, d = runner.start(("python3", "-I", "-S", "-c", PROBE, "0.5"))
    await runner.wait_output(job_id, b"}")
    assert "devices" not in runner.cgroup_dirs(job_id)
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
        pytest.skip("no cgroup v1 devices controller (on v2, GPU jobs are refused)")
    groups = devices.DeviceCgroups(f"sandrun-test-devices-{uuid.uuid4().hex[:8]}")
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    child = os.fork()
    if child == 0:  # root, every capability: only the device cgroup stands in the way
        os.close(go_w)
        os.read(go_r, 1)
        found = {}
        for name in ("nvidia0", "nvidia1", "nvidiactl", "kmsg", "null"):
            try:
                os.close(os.open(os.path.join(node_dir, name), os.O_RDWR))
                found[name] = "opened"
            except OSError as e:
                found[name] = errno.errorcode[e.errno]
        os.write(out_w, json.dumps(found).encode())
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
