"""The coordinator sends a GPU job only to a worker whose signed GPUs can run it.

Real worker apps in memory (``fakes.Pool``); one of them is given GPUs (a
``GpuPool`` as its discovery would have made it).  The coordinator does not
parse submissions: it learns a job's ``gpu`` request from the first worker
that cannot meet it, then tries only workers whose GPUs, as they signed them
in their health answers, satisfy it.
"""

from __future__ import annotations

import json
from typing import Any

from sandrun.jobs.gpus import Gpu, GpuPool, Inventory
from tests.coordinator.fakes import Pool

GiB = 1024 ** 3
A100 = Gpu(index=0, name="NVIDIA A100", uuid="GPU-aaaa", memory_bytes=80 * GiB,
           compute_capability="8.0", driver_version="550.54.15", cuda_version="12.4",
           nodes=(("nvidia0", 195, 0), ("nvidiactl", 195, 255), ("nvidia-uvm", 508, 0)))
T4 = Gpu(index=0, name="Tesla T4", uuid="GPU-tttt", memory_bytes=15 * GiB,
         compute_capability="7.5", driver_version="550.54.15", cuda_version="12.4",
         nodes=(("nvidia0", 195, 0), ("nvidiactl", 195, 255), ("nvidia-uvm", 508, 0)))
HOLD = "HOLD  # stays running until the test finishes it"


def pool_with_gpus(tmp_path: Any) -> Pool:
    """Three workers: w0 without a GPU, w1 with a T4, w2 with an A100."""
    pool = Pool(str(tmp_path), 3)
    pool.workers[1].manager.gpus = GpuPool(Inventory((T4,)))
    pool.workers[2].manager.gpus = GpuPool(Inventory((A100,)))
    pool.check()
    return pool


def submit(pool: Pool, gpu: dict[str, Any] | None, client: str) -> Any:
    manifest: dict[str, Any] = {"entrypoint": "main.py"}
    if gpu is not None:
        manifest["gpu"] = gpu
    body = json.dumps({"manifest": manifest, "files": {"main.py": HOLD}}).encode()
    return pool.request("POST", "/submit", body,
                        {"Content-Type": "application/json", "X-Forwarded-For": client})


def test_the_pool_shows_each_workers_signed_gpus(tmp_path: Any) -> None:
    pool = pool_with_gpus(tmp_path)
    loads = [pool.pool_entry(i)["load"] for i in range(3)]
    assert "gpus" not in loads[0]
    assert [g["name"] for g in loads[1]["gpus"]] == ["Tesla T4"]
    assert [g["memory_bytes"] for g in loads[2]["gpus"]] == [80 * GiB]


def test_gpu_jobs_go_only_to_workers_whose_gpus_satisfy_them(tmp_path: Any) -> None:
    pool = pool_with_gpus(tmp_path)
    # Each submission finds the least loaded worker first; the big-GPU job still
    # lands on w2 every time, and a job needing any GPU never on w0.
    big = [submit(pool, {"required": True, "min_vram_gb": 40}, f"192.0.2.{i}")
           for i in range(3)]
    assert [r.status for r in big] == [200, 200, 200], [r.body for r in big]
    assert [pool.worker_for(r.json()["job_id"]) for r in big] == [2, 2, 2]
    anyone = [submit(pool, {"required": True}, f"192.0.2.{10 + i}") for i in range(4)]
    assert {pool.worker_for(r.json()["job_id"]) for r in anyone} <= {1, 2}
    # A job that needs no GPU can go anywhere, w0 included.
    plain = [submit(pool, None, f"192.0.2.{20 + i}") for i in range(3)]
    assert 0 in {pool.worker_for(r.json()["job_id"]) for r in plain}


def test_a_gpu_job_no_worker_can_run_is_a_503_saying_why_for_each(tmp_path: Any) -> None:
    pool = pool_with_gpus(tmp_path)
    reply = submit(pool, {"required": True, "min_vram_gb": 100}, "192.0.2.1")
    assert reply.status == 503, reply.body
    details = reply.json()["details"]
    for label in ("w0", "w1", "w2"):
        assert f"{label}: gpu." in details, details
    assert "this worker has no GPU" in details and "gpu.min_vram_gb" in details
    reply = submit(pool, {"required": True, "compute_capability": "9.0"}, "192.0.2.2")
    assert reply.status == 503 and "compute capability 9.0" in reply.json()["details"]
