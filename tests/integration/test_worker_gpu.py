"""GPU jobs end to end through a real worker, with a fake NVML and fake device nodes.

``sandrun serve`` runs with ``tests/fake_nvml`` first on its path (so
``import pynvml`` finds the fake, which reports the GPUs of
``SANDRUN_FAKE_NVML``) and ``--gpu-dev-dir`` on a tmpfs of the test's own
where the GPUs' nodes are made with mknod, with NVIDIA's numbers.  No NVIDIA
driver is loaded here: a job can see and stat its nodes, not use them.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.integration.worker import REPO, Worker, run_worker

GiB = 1024 ** 3
NVML = {"driver": "550.54.15", "cuda": 12040, "gpus": [
    {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-aaaa", "memory_bytes": 80 * GiB,
     "compute_capability": [8, 0], "minor": 0},
    {"name": "Tesla T4", "uuid": "GPU-tttt", "memory_bytes": 15 * GiB,
     "compute_capability": [7, 5], "minor": 1}]}
PROBE = """
import errno, json, os
nodes = {n: [os.major(os.stat('/dev/' + n).st_rdev), os.minor(os.stat('/dev/' + n).st_rdev)]
         for n in sorted(os.listdir('/dev')) if n.startswith('nvidia')}
opened = {}
for n in nodes:
    try:
        os.close(os.open('/dev/' + n, os.O_RDWR))
        opened[n] = "opened"
    except OSError as e:
        opened[n] = errno.errorcode[e.errno]
print(json.dumps({"nodes": nodes, "opened": opened, "visible": os.environ.get(
    "CUDA_VISIBLE_DEVICES"), "nvidia": os.environ.get("NVIDIA_VISIBLE_DEVICES")}))
"""


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    dev = tempfile.mkdtemp(prefix="sandrun-gpu-dev-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=755", "tmpfs", dev],
                   check=True)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "SANDRUN_FAKE_NVML")}
    try:
        for name, major, minor in (("nvidia0", 195, 0), ("nvidia1", 195, 1),
                                   ("nvidiactl", 195, 255), ("nvidia-uvm", 508, 0)):
            os.mknod(os.path.join(dev, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(REPO, "tests", "fake_nvml")] + ([saved["PYTHONPATH"]]
                                                          if saved["PYTHONPATH"] else []))
        os.environ["SANDRUN_FAKE_NVML"] = json.dumps(NVML)
        with run_worker("--max-concurrent", "3", "--gpu-dev-dir", dev,
                        "--max-active-per-ip", "100", "--jobs-per-hour", "1000") as w:
            for name, value in saved.items():  # the worker has them; nothing else needs them
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            yield w
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        subprocess.run(["umount", dev], check=True)
        os.rmdir(dev)


def test_the_worker_reports_the_gpus_nvml_found_in_health_and_root(worker: Worker) -> None:
    health = worker.get("/health").json()
    assert [(g["index"], g["name"], g["memory_bytes"], g["compute_capability"],
             g["driver_version"], g["cuda_version"], g["busy"]) for g in health["gpus"]] == [
        (0, "NVIDIA A100-SXM4-80GB", 80 * GiB, "8.0", "550.54.15", "12.4", False),
        (1, "Tesla T4", 15 * GiB, "7.5", "550.54.15", "12.4", False)]
    assert worker.get("/").json()["gpus"] == health["gpus"]
    assert "gpu_problems" not in health  # lent on cgroup v1 and v2 alike


def test_a_gpu_job_sees_only_its_gpus_node_and_is_told_which(worker: Worker) -> None:
    job_id = worker.submit({"probe.py": PROBE},
                           {"entrypoint": "probe.py", "gpu": {"required": True, "device_id": 1}})
    status = worker.wait(job_id)
    logs = worker.get(f"/logs/{job_id}").json()
    assert status["status"] == "completed", (status, logs)
    seen = json.loads(logs["stdout"])
    # No nvidia-uvm-tools on this host: not given.  GPU 0's node is not there at all.
    # Each node passes the device cgroup (v1) or filter (v2) and reaches the kernel's
    # lookup of a driver, absent here: ENXIO, where a refusal would be EPERM.
    assert seen == {"nodes": {"nvidia1": [195, 1], "nvidiactl": [195, 255],
                              "nvidia-uvm": [508, 0]},
                    "opened": {"nvidia1": "ENXIO", "nvidiactl": "ENXIO", "nvidia-uvm": "ENXIO"},
                    "visible": "GPU-tttt", "nvidia": "GPU-tttt"}


@pytest.mark.parametrize("gpu,field", [
    ({"required": True, "min_vram_gb": 100}, "gpu.min_vram_gb"),
    ({"required": True, "device_id": 2}, "gpu.device_id"),
    ({"required": True, "compute_capability": "9.0"}, "gpu.compute_capability"),
    ({"required": True, "cuda_version": "12.6"}, "gpu.cuda_version"),
])
def test_a_gpu_request_this_worker_can_never_meet_is_a_400_naming_the_field(
        worker: Worker, gpu: dict[str, object], field: str) -> None:
    response = worker.post_json("/submit", {"manifest": {"entrypoint": "main.py", "gpu": gpu},
                                            "files": {"main.py": "pass"}})
    assert response.status == 400, response.body
    assert response.json()["field"] == field


def test_a_second_job_for_the_same_gpu_waits_while_a_job_without_one_runs(
        worker: Worker) -> None:
    big = {"required": True, "min_vram_gb": 40}  # only the A100
    first = worker.submit({"main.py": "import time; time.sleep(60)"},
                          {"entrypoint": "main.py", "gpu": big, "timeout": 120})
    worker.wait(first, until=("running",))
    second = worker.submit({"probe.py": PROBE}, {"entrypoint": "probe.py", "gpu": big})
    plain = worker.submit({"main.py": "print('no gpu')"}, {"entrypoint": "main.py"})
    assert worker.wait(plain)["status"] == "completed"
    assert worker.get(f"/status/{second}").json()["status"] == "queued"
    assert [g["busy"] for g in worker.get("/health").json()["gpus"]] == [True, False]
    # The first job gives its GPU back when it ends (here: cancelled); the second gets it.
    assert worker.delete(f"/jobs/{first}").status == 200
    assert worker.wait(second)["status"] == "completed"
    seen = json.loads(worker.get(f"/logs/{second}").json()["stdout"])
    assert seen["visible"] == "GPU-aaaa" and "nvidia0" in seen["nodes"]
    deadline = time.monotonic() + 5
    while any(g["busy"] for g in worker.get("/health").json()["gpus"]):
        assert time.monotonic() < deadline, "a GPU stayed lent after its job"
        time.sleep(0.05)
