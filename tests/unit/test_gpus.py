"""GPUs: discovery through a fake NVML, matching, lending, scheduling and refusal.

No root and no GPU: NVML is ``tests/fake_nvml``'s, and the device nodes are
links to ``/dev/null`` (a character device) in the test's own directory.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from sandrun import gpuwire
from sandrun.jobs.gpus import GpuPool, Inventory, discover
from sandrun.sandbox.policy import GpuGrant, LaunchRequest, SandboxPolicy
from sandrun.wire import JobStatus
from tests.fake_nvml.pynvml import FakeNvml
from tests.unit.worker_fakes import Harness

GiB = 1024 ** 3
A100 = {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-aaaa", "memory_bytes": 80 * GiB,
        "compute_capability": [8, 0], "minor": 0}
T4 = {"name": "Tesla T4", "uuid": "GPU-tttt", "memory_bytes": 15 * GiB,
      "compute_capability": [7, 5], "minor": 3}


def fake_dev(tmp_path: Any, names: tuple[str, ...] = ("nvidia0", "nvidia3", "nvidiactl",
                                                       "nvidia-uvm", "nvidia-uvm-tools")) -> str:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in names:
        os.symlink("/dev/null", dev / name)  # a character device, 1:3
    return str(dev)


def maps(tmp_path: Any, *libraries: str) -> str:
    path = tmp_path / "maps"
    path.write_text("".join(f"7f00-7f01 r-xp 0 08:01 1 {lib}\n" for lib in libraries))
    return str(path)


def inventory(tmp_path: Any, *gpus: dict[str, Any]) -> Inventory:
    nvml = FakeNvml({"driver": "550.54.15", "cuda": 12040, "gpus": list(gpus)})
    return discover(nvml, fake_dev(tmp_path), maps(tmp_path))


# -- discovery -----------------------------------------------------------------------------


def test_discovery_reads_every_gpu_its_driver_and_its_nodes(tmp_path: Any) -> None:
    nvml = FakeNvml({"driver": "550.54.15", "cuda": 12040, "gpus": [A100, T4]})
    found = discover(nvml, fake_dev(tmp_path),
                     maps(tmp_path, "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"))
    assert nvml.calls == ["init", "shutdown"]
    assert found.problems == ()
    assert [g.as_json() for g in found.gpus] == [
        {"index": 0, "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-aaaa",
         "memory_bytes": 80 * GiB, "memory_gb": 85.9, "compute_capability": "8.0",
         "driver_version": "550.54.15", "cuda_version": "12.4"},
        {"index": 1, "name": "Tesla T4", "uuid": "GPU-tttt", "memory_bytes": 15 * GiB,
         "memory_gb": 16.1, "compute_capability": "7.5", "driver_version": "550.54.15",
         "cuda_version": "12.4"}]
    # Each GPU's own node (by its minor number) and the shared ones, with their numbers.
    assert found.gpus[1].nodes == (("nvidia3", 1, 3), ("nvidiactl", 1, 3),
                                   ("nvidia-uvm", 1, 3), ("nvidia-uvm-tools", 1, 3))


def test_a_gpu_without_its_device_node_is_left_out_and_said_why(tmp_path: Any) -> None:
    nvml = FakeNvml({"gpus": [A100, T4]})
    found = discover(nvml, fake_dev(tmp_path, ("nvidia3", "nvidiactl", "nvidia-uvm")),
                     maps(tmp_path))
    assert [g.uuid for g in found.gpus] == ["GPU-tttt"]
    assert found.gpus[0].nodes[-1][0] == "nvidia-uvm"  # no -tools on this host: not given
    assert len(found.problems) == 1 and "nvidia0" in found.problems[0]


def test_a_regular_file_is_not_taken_for_a_device_node(tmp_path: Any) -> None:
    dev = fake_dev(tmp_path, ("nvidiactl", "nvidia-uvm"))
    with open(os.path.join(dev, "nvidia0"), "w") as f:
        f.write("not a device")
    found = discover(FakeNvml({"gpus": [A100]}), dev, maps(tmp_path))
    assert found.gpus == () and "nvidia0" in found.problems[0]


def test_no_nvml_or_a_failing_driver_means_no_gpu(tmp_path: Any) -> None:
    found = discover(FakeNvml({"fail": "Driver Not Loaded"}), fake_dev(tmp_path))
    assert found.gpus == () and "Driver Not Loaded" in found.problems[0]


def test_driver_libraries_outside_usr_mean_no_gpu_at_all(tmp_path: Any) -> None:
    nvml = FakeNvml({"gpus": [A100]})
    found = discover(nvml, fake_dev(tmp_path),
                     maps(tmp_path, "/opt/nvidia/lib64/libnvidia-ml.so.550.54.15"))
    assert found.gpus == ()
    assert "/opt/nvidia/lib64/libnvidia-ml.so.550.54.15" in found.problems[0]
    assert nvml.calls == ["init", "shutdown"]


# -- matching ------------------------------------------------------------------------------


def gpu_json(index: int, memory_gb: float, cc: str, cuda: str = "12.4") -> dict[str, Any]:
    return gpuwire.describe(index, "gpu", f"GPU-{index}", int(memory_gb * gpuwire.GB), cc,
                            "550", cuda)


@pytest.mark.parametrize("request_,field", [
    ({"required": True, "device_id": 2}, "gpu.device_id"),
    ({"required": True, "min_vram_gb": 41}, "gpu.min_vram_gb"),
    ({"required": True, "cuda_version": "12.10"}, "gpu.cuda_version"),
    ({"required": True, "compute_capability": "9.0"}, "gpu.compute_capability"),
    # Each field alone is met by some GPU, but not by the same one.
    ({"required": True, "min_vram_gb": 30, "compute_capability": "8.6"},
     "gpu.compute_capability"),
])
def test_a_request_no_gpu_can_meet_names_its_field(request_: dict[str, Any], field: str) -> None:
    gpus = [gpu_json(0, 40, "8.0"), gpu_json(1, 24, "8.6")]
    unmet = gpuwire.unmet(gpus, request_)
    assert unmet is not None and unmet[0] == field, unmet


def test_requests_some_gpu_meets_and_optional_ones_are_never_refused() -> None:
    gpus = [gpu_json(0, 40, "8.0"), gpu_json(1, 24, "8.6", cuda="12.10")]
    for request in ({"required": True}, {"required": True, "device_id": 1},
                    {"required": True, "min_vram_gb": 40, "compute_capability": "7.0"},
                    {"required": True, "cuda_version": "12.9"},  # 12.10 is later than 12.9
                    {"required": False, "min_vram_gb": 1000}):
        assert gpuwire.unmet(gpus, request) is None, request
    assert gpuwire.unmet([], {"required": True}) == ("gpu.required", "this worker has no GPU")


def test_the_pool_lends_each_gpu_to_one_job_at_a_time(tmp_path: Any) -> None:
    pool = GpuPool(inventory(tmp_path, A100, T4))
    big = {"required": True, "min_vram_gb": 40}
    assert pool.acquire("a", big).uuid == "GPU-aaaa"
    assert pool.acquire("b", big) is None  # the only one big enough is lent
    assert pool.acquire("c", {"required": True}).uuid == "GPU-tttt"
    assert [g["busy"] for g in pool.report()["gpus"]] == [True, True]
    pool.release("a")
    assert pool.acquire("b", big).uuid == "GPU-aaaa"


# -- the launch request ---------------------------------------------------------------------


def test_a_gpu_grant_travels_to_the_launcher_and_sets_the_visible_devices() -> None:
    grant = GpuGrant("GPU-aaaa", (("nvidia0", 195, 0), ("nvidiactl", 195, 255)))
    request = LaunchRequest(argv=("nvidia-smi",), env=(), job_dir="/j", uid=1, gid=1,
                            policy=SandboxPolicy(gpu=grant))
    back = LaunchRequest.from_wire(request.to_wire())
    assert back == request
    env = back.environment()
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    plain = LaunchRequest(argv=("true",), env=(), job_dir="/j", uid=1, gid=1)
    assert "CUDA_VISIBLE_DEVICES" not in LaunchRequest.from_wire(plain.to_wire()).environment()


# -- the worker: /health, refusal, scheduling ------------------------------------------------


def test_health_and_root_report_the_gpus(tmp_path: Any) -> None:
    h = Harness(str(tmp_path / "w"), gpus=GpuPool(inventory(tmp_path, A100)))
    health = h.get("/health").json()
    assert [g["uuid"] for g in health["gpus"]] == ["GPU-aaaa"]
    assert health["load"]["gpus"] == health["gpus"]  # signed with the load, for a coordinator
    assert h.get("/").json()["gpus"][0]["compute_capability"] == "8.0"


def test_a_gpu_request_no_gpu_here_can_meet_is_a_400_naming_the_field(tmp_path: Any) -> None:
    h = Harness(str(tmp_path / "w"), gpus=GpuPool(inventory(tmp_path, T4)))
    reply = h.post_json({"manifest": {"gpu": {"required": True, "min_vram_gb": 40}},
                         "files": {"main.py": "pass"}})
    assert reply.status == 400
    body = reply.json()
    assert body["field"] == "gpu.min_vram_gb" and "16.1 GB" in body["details"]
    assert body["gpu"]["min_vram_gb"] == 40  # told back for a coordinator
    assert h.storage.job_ids() == []  # nothing left of it


def test_a_worker_without_gpus_refuses_required_ones_and_runs_optional_ones_without(
        tmp_path: Any) -> None:
    h = Harness(str(tmp_path / "w"))
    reply = h.post_json({"manifest": {"gpu": {"required": True}}, "files": {"main.py": "1"}})
    assert (reply.status, reply.json()["field"]) == (400, "gpu.required")
    job_id = h.submit(manifest={"gpu": {"required": False}})
    assert h.run_of(job_id).policy.gpu is None


def test_gpu_jobs_wait_for_a_free_gpu_while_others_go_ahead(tmp_path: Any) -> None:
    h = Harness(str(tmp_path / "w"), max_concurrent=3, gpus=GpuPool(inventory(tmp_path, A100)))
    first = h.submit(manifest={"gpu": {"required": True}})
    second = h.submit(manifest={"gpu": {"required": True, "compute_capability": "8.0"}})
    plain = h.submit()
    assert h.run_of(first).policy.gpu == GpuGrant("GPU-aaaa", (
        ("nvidia0", 1, 3), ("nvidiactl", 1, 3), ("nvidia-uvm", 1, 3),
        ("nvidia-uvm-tools", 1, 3)))
    # One GPU: the second GPU job waits, keeping its place; the job behind it runs.
    assert h.status(second)["status"] == JobStatus.QUEUED.value
    assert second not in h.sandbox.runs
    assert h.status(plain)["status"] == JobStatus.RUNNING.value
    h.run_of(first).finish()
    assert h.run_of(second).policy.gpu is not None
    assert h.status(second)["status"] == JobStatus.RUNNING.value
