"""GPU jobs on a real GPU host: each job gets its GPU, and only its GPU.

NOT YET RUN ON A GPU: written and checked for syntax where it was built (no NVIDIA GPU
there); run it on a host with an NVIDIA driver before trusting the GPU path.

Starts ``sandrun serve`` (quotas raised, as many concurrent jobs as GPUs + 1), reads the
GPUs it found from ``/health``, then:

1. one job per GPU, all at once, each asking for its GPU by ``device_id``: it allocates
   256 MiB on its device with PyTorch (or CuPy, whichever the sandbox's ``python3``
   imports), fills it, and reports the devices CUDA shows it, the device's name, UUID and
   memory, its ``/dev/nvidia*`` nodes and ``CUDA_VISIBLE_DEVICES``; then it starts a
   second Python with ``CUDA_VISIBLE_DEVICES`` removed, which must still see at most that
   one GPU (the device nodes and the device cgroup, not the variable, do the isolating);
2. checks: every job completed, saw exactly one device, the UUID the worker lent it, only
   its own ``nvidiaN`` node, and (with two GPUs or more) no two jobs the same GPU;
3. a job asking for more memory than any GPU has gets a 400 naming ``gpu.min_vram_gb``.

Prints a table and ``PASS``/``FAIL`` per check; results go to ``bench/results/gpu.json``.
Exit status 0 only if every check passed.

Needs root, the NVIDIA driver with its device nodes, ``nvidia-ml-py`` for the worker's
Python (``pip install 'sandrun[gpu]'``), and PyTorch or CuPy importable by the host's
``/usr/bin/python3`` (installed under ``/usr``, which is all of the host a job sees, e.g.
``pip install --break-system-packages cupy-cuda12x``).  Run from the repository root::

    python3 bench/gpu.py [--mib 256]
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import RAISED_QUOTAS, Worker, print_table, write_json

PROBE = r"""
import json, os, subprocess, sys, time
mib = int(sys.argv[1])
out = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
       "nodes": sorted(n for n in os.listdir("/dev") if n.startswith("nvidia"))}
started = time.monotonic()
try:
    import torch
    out["library"] = "torch " + torch.__version__
    out["count"] = torch.cuda.device_count()
    block = torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
    block.fill_(7)
    torch.cuda.synchronize()
    out["allocated_bytes"] = int(torch.cuda.memory_allocated())
    out["checksum_ok"] = bool((block[:1024] == 7).all().item())
    props = torch.cuda.get_device_properties(0)
    out["name"], out["total_memory"] = props.name, int(props.total_memory)
    uuid = getattr(props, "uuid", None)
    out["uuid"] = None if uuid is None else "GPU-" + str(uuid)
    count_code = "import torch; print(torch.cuda.device_count())"
except ImportError:
    import cupy
    out["library"] = "cupy " + cupy.__version__
    out["count"] = cupy.cuda.runtime.getDeviceCount()
    block = cupy.full(mib * 1024 * 1024, 7, dtype=cupy.uint8)
    cupy.cuda.Device(0).synchronize()
    out["allocated_bytes"] = int(block.nbytes)
    out["checksum_ok"] = bool((block[:1024] == 7).all())
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    out["name"] = name.decode() if isinstance(name, bytes) else str(name)
    out["total_memory"] = int(props["totalGlobalMem"])
    raw = props.get("uuid")
    out["uuid"] = None if not raw else "GPU-" + "-".join(
        raw.hex()[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))
    count_code = "import cupy; print(cupy.cuda.runtime.getDeviceCount())"
out["cuda_seconds"] = round(time.monotonic() - started, 3)
env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES",
                                                         "NVIDIA_VISIBLE_DEVICES")}
escaped = subprocess.run([sys.executable, "-c", count_code], env=env, capture_output=True,
                         text=True, timeout=120)
out["count_without_variable"] = escaped.stdout.strip() or ("error: " + escaped.stderr[-300:])
print(json.dumps(out))
"""


def run_job(worker: Worker, gpu: dict[str, Any], mib: int) -> dict[str, Any]:
    client = worker.client(timeout=300)
    try:
        code, doc = client.submit(
            {"entrypoint": "probe.py", "args": [str(mib)], "timeout": 600, "memory_mb": 2048,
             "gpu": {"required": True, "device_id": gpu["index"]}},
            {"probe.py": PROBE})
        if code != 200:
            return {"gpu": gpu, "error": f"submit answered {code}: {doc}"}
        started = time.monotonic()
        status, _ = client.wait(doc["job_id"], poll=0.05, timeout=900)
        code, logs = client.json("GET", f"/logs/{doc['job_id']}")
        result: dict[str, Any] = {"gpu": gpu, "status": status, "stderr": logs["stderr"][-2000:],
                                  "seconds": round(time.monotonic() - started, 2)}
        try:
            result["seen"] = json.loads(logs["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            result["error"] = "the job printed no report"
        return result
    finally:
        client.close()


def _uuid(text: str) -> str:
    """A GPU UUID as NVML ("GPU-...") or a CUDA library (maybe without the prefix) gives it."""
    text = text.strip().lower()
    return text.removeprefix("gpu-")


def checks(jobs: list[dict[str, Any]], mib: int) -> list[tuple[str, bool, str]]:
    found: list[tuple[str, bool, str]] = []
    for job in jobs:
        gpu, seen = job["gpu"], job.get("seen", {})
        label = f"GPU {gpu['index']} ({gpu['name']})"
        done = job.get("status", {}).get("status") == "completed" and "error" not in job
        found.append((f"{label}: the job completed", done,
                      job.get("error") or job.get("stderr", "")[-300:]))
        found.append((f"{label}: CUDA shows exactly one device", seen.get("count") == 1,
                      str(seen.get("count"))))
        found.append((f"{label}: told its own GPU", seen.get("visible") == gpu["uuid"],
                      str(seen.get("visible"))))
        if seen.get("uuid"):
            found.append((f"{label}: the device is the GPU lent",
                          _uuid(seen["uuid"]) == _uuid(gpu["uuid"]),
                          f"{seen['uuid']} vs {gpu['uuid']}"))
        own = [n for n in seen.get("nodes", []) if n[len("nvidia"):].isdigit()]
        found.append((f"{label}: only one nvidiaN node", len(own) == 1, ", ".join(own)))
        found.append((f"{label}: {mib} MiB allocated and written",
                      seen.get("allocated_bytes", 0) >= mib * 1024 * 1024
                      and seen.get("checksum_ok") is True, str(seen.get("allocated_bytes"))))
        # A count of 0 or 1, or CUDA failing to start at all, is isolation; 2 or more is not.
        escaped = str(seen.get("count_without_variable"))
        found.append((f"{label}: without CUDA_VISIBLE_DEVICES still at most one device",
                      not escaped.isdigit() or int(escaped) <= 1, escaped))
    uuids = [_uuid(job.get("seen", {}).get("uuid") or "") for job in jobs]
    if len(jobs) > 1 and all(uuids):
        found.append(("jobs at once each had a different GPU", len(set(uuids)) == len(uuids),
                      ", ".join(str(u) for u in uuids)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB each job allocates")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/gpu.py needs root: the sandbox uses namespaces and cgroups")
    worker = Worker("--max-concurrent", "9", *RAISED_QUOTAS).start()
    try:
        client = worker.client()
        _, health = client.json("GET", "/health")
        gpus = [g for g in health.get("gpus", [])]
        print_table("GPUs the worker found", ["index", "name", "memory GB", "cc", "driver",
                                              "CUDA"],
                    [[g["index"], g["name"], g["memory_gb"], g["compute_capability"],
                      g["driver_version"], g["cuda_version"]] for g in gpus])
        if not gpus:
            print("no GPU found:", "; ".join(health.get("gpu_problems", ["(no reason given)"])))
            return 2
        with ThreadPoolExecutor(len(gpus)) as pool:
            jobs = list(pool.map(lambda g: run_job(worker, g, args.mib), gpus[:8]))
        results = checks(jobs, args.mib)
        most = max(g["memory_bytes"] for g in gpus) / 1e9
        code, doc = client.submit({"entrypoint": "probe.py", "gpu": {
            "required": True, "min_vram_gb": round(most + 1000)}}, {"probe.py": "pass"})
        results.append(("a request no GPU can meet is a 400 naming gpu.min_vram_gb",
                        code == 400 and doc.get("field") == "gpu.min_vram_gb", str(doc)))
        client.close()
    finally:
        worker.stop()
        worker.remove_state_dir()
    print_table("Checks", ["check", "result", "detail"],
                [[name, "PASS" if ok else "FAIL", detail[:100]] for name, ok, detail in results])
    for job in jobs:
        seen = job.get("seen", {})
        print(f"GPU {job['gpu']['index']}: {seen.get('library')}, {seen.get('name')}, "
              f"CUDA start + allocation {seen.get('cuda_seconds')} s, job {job.get('seconds')} s")
    path = write_json("gpu", {"gpus": gpus, "jobs": jobs,
                              "checks": [{"check": n, "ok": ok, "detail": d}
                                         for n, ok, d in results]})
    print(f"written to {path}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
