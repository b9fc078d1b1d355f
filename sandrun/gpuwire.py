"""Which GPU can run a job: matching shared by the worker and the coordinator.

A leaf module (nothing else of Sandrun is imported): the worker reports its
GPUs in ``/health`` and ``/`` as ``describe`` makes them, the coordinator reads
them back from there, and both decide with ``unmet`` whether a job's ``gpu``
request (the manifest's ``gpu`` object as the worker validated it) could ever
be satisfied by one of them, and with ``satisfies`` which one fits.

A GPU satisfies a request when it is the requested ``device_id`` (if any),
has at least ``min_vram_gb`` GB (10^9 bytes) of memory, its driver supports
at least ``cuda_version`` and its compute capability is at least
``compute_capability`` (versions compared as numbers: 12.10 > 12.9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

GB = 1000 * 1000 * 1000
FIELDS = ("device_id", "min_vram_gb", "cuda_version", "compute_capability")


def version(text: str) -> tuple[int, ...]:
    """``"12.4"`` as ``(12, 4)``; anything else as ``()`` (which nothing exceeds)."""
    try:
        return tuple(int(part) for part in text.split("."))
    except (AttributeError, ValueError):
        return ()


def _failing(gpu: Mapping[str, Any], request: Mapping[str, Any]) -> str | None:
    """The first field of ``request`` this GPU does not satisfy, or None."""
    device_id = request.get("device_id")
    if device_id is not None and gpu.get("index") != device_id:
        return "device_id"
    min_vram_gb = request.get("min_vram_gb")
    if min_vram_gb is not None and gpu.get("memory_bytes", 0) < min_vram_gb * GB:
        return "min_vram_gb"
    for name in ("cuda_version", "compute_capability"):
        wanted = request.get(name)
        if wanted is not None and version(str(gpu.get(name, ""))) < version(wanted):
            return name
    return None


def satisfies(gpu: Mapping[str, Any], request: Mapping[str, Any]) -> bool:
    return _failing(gpu, request) is None


def unmet(gpus: Sequence[Mapping[str, Any]],
          request: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """``(field, why)`` when a required GPU can never be had from ``gpus``, else None.

    ``field`` names the manifest field to blame (``"gpu.min_vram_gb"``): the
    first, in the order of ``FIELDS``, that every GPU still in the running
    fails.
    A request that is not ``required`` is never refused: it runs without a GPU.
    """
    if not request or not request.get("required"):
        return None
    if not gpus:
        return "gpu.required", "this worker has no GPU"
    left = list(gpus)
    for name in FIELDS:
        if request.get(name) is None:
            continue
        fitting = [g for g in left if _failing(g, {name: request[name]}) is None]
        if not fitting:
            return f"gpu.{name}", _why(name, request[name], left)
        left = fitting
    return None


def _why(name: str, wanted: Any, gpus: Sequence[Mapping[str, Any]]) -> str:
    if name == "device_id":
        indexes = ", ".join(str(g.get("index")) for g in gpus)
        return f"this worker has no GPU {wanted} (it has {indexes})"
    if name == "min_vram_gb":
        most = max(g.get("memory_bytes", 0) for g in gpus) / GB
        return f"no GPU here has {wanted:g} GB of memory (the most is {most:.1f} GB)"
    best = max((str(g.get(name, "")) for g in gpus), key=version)
    what = "CUDA version" if name == "cuda_version" else "compute capability"
    return f"no GPU here has {what} {wanted} or later (the highest is {best})"


def describe(index: int, name: str, uuid: str, memory_bytes: int, compute_capability: str,
             driver_version: str, cuda_version: str) -> dict[str, Any]:
    """One GPU as ``/health`` and ``/`` report it (and ``unmet`` reads it)."""
    return {"index": index, "name": name, "uuid": uuid, "memory_bytes": memory_bytes,
            "memory_gb": round(memory_bytes / GB, 1), "compute_capability": compute_capability,
            "driver_version": driver_version, "cuda_version": cuda_version}
