"""The worker's GPUs: found once at start through NVML, lent to one job at a time.

Discovery uses NVML through ``nvidia-ml-py`` (the ``pynvml`` module), an
optional dependency: without it, or without a driver, the worker has no GPU,
which is the default.  For each GPU it reads the index, name, UUID, memory,
compute capability, the driver's version and the CUDA version it supports,
and the minor number of its ``/dev/nvidiaN``; it then finds the device nodes a
job needs (``nvidiaN``, ``nvidiactl``, ``nvidia-uvm``, and ``nvidia-uvm-tools``
if there is one) as character devices, and their numbers, which the sandbox
recreates in the job's own ``/dev`` (see ``sandbox/mounts.py``) and allows in
its device cgroup (``sandbox/devices.py``).  A GPU whose nodes are missing is
left out.  The driver's user-space libraries must lie under ``/usr``, the only
host directory a job sees (read-only); if NVML was loaded from elsewhere no
GPU is lent (fail closed) and ``/health`` says why.

``GpuPool`` counts them as resources: ``acquire`` gives a free GPU that
satisfies a job's request (``sandrun.gpuwire``), ``release`` takes it back;
``unmet`` says which field no GPU of this worker could ever satisfy.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from sandrun import gpuwire
from sandrun.sandbox.policy import GpuGrant

CONTROL_NODES = ("nvidiactl", "nvidia-uvm")  # needed by every CUDA program
OPTIONAL_NODES = ("nvidia-uvm-tools",)  # profiling; given when the host has it
LIBRARY_ROOT = "/usr/"  # what a job sees of the host's files


@dataclass(frozen=True)
class Gpu:
    """One GPU of this worker, as discovered."""

    index: int  # NVML's index
    name: str
    uuid: str  # "GPU-...": what the job is told in NVIDIA/CUDA_VISIBLE_DEVICES
    memory_bytes: int  # total device memory
    compute_capability: str  # "8.0"
    driver_version: str  # "550.54.15"
    cuda_version: str  # the newest CUDA the driver supports, "12.4"
    nodes: tuple[tuple[str, int, int], ...]  # (name under /dev, major, minor) a job gets

    def as_json(self) -> dict[str, Any]:
        return gpuwire.describe(self.index, self.name, self.uuid, self.memory_bytes,
                                self.compute_capability, self.driver_version,
                                self.cuda_version)

    def grant(self) -> GpuGrant:
        return GpuGrant(uuid=self.uuid, nodes=self.nodes)


@dataclass(frozen=True)
class Inventory:
    """What discovery found: the usable GPUs, and what it could not use, in words."""

    gpus: tuple[Gpu, ...] = ()
    problems: tuple[str, ...] = ()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cuda_version(number: int) -> str:
    """NVML's 12040 as "12.4"."""
    return f"{number // 1000}.{number % 1000 // 10}"


def _node(dev_dir: str, name: str) -> tuple[str, int, int] | None:
    try:
        info = os.stat(os.path.join(dev_dir, name))
    except OSError:
        return None
    if not stat.S_ISCHR(info.st_mode):
        return None
    return name, os.major(info.st_rdev), os.minor(info.st_rdev)


def _loaded_libraries(maps_file: str) -> list[str]:
    """Paths of the NVIDIA libraries this process has mapped (NVML's, once it is loaded)."""
    try:
        with open(maps_file) as f:
            paths = {line.split()[-1] for line in f if "libnvidia" in line or "libcuda" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def discover(nvml: Any = None, dev_dir: str = "/dev",
             maps_file: str = "/proc/self/maps") -> Inventory:
    """Find this host's GPUs; ``nvml`` is the ``pynvml`` module (imported if None)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return Inventory(problems=("nvidia-ml-py is not installed",))
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 (NVMLError and its many subclasses: no GPU)
        return Inventory(problems=(f"NVML could not start: {e}",))
    try:
        outside = [p for p in _loaded_libraries(maps_file) if not p.startswith(LIBRARY_ROOT)]
        if outside:
            why = (f"the driver's libraries ({', '.join(outside)}) are outside /usr, which "
                   "is all of the host a job can see: no GPU job can run")
            return Inventory(problems=(why,))
        return _read_gpus(nvml, dev_dir)
    except Exception as e:  # noqa: BLE001 (a driver error: fail closed, no GPU)
        return Inventory(problems=(f"NVML: {e}",))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 (nothing to do about it)
            pass


def _read_gpus(nvml: Any, dev_dir: str) -> Inventory:
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    cuda = _cuda_version(int(nvml.nvmlSystemGetCudaDriverVersion()))
    control = [_node(dev_dir, name) for name in CONTROL_NODES]
    optional = [n for n in (_node(dev_dir, name) for name in OPTIONAL_NODES) if n]
    gpus: list[Gpu] = []
    problems: list[str] = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        minor = int(nvml.nvmlDeviceGetMinorNumber(handle))
        own = _node(dev_dir, f"nvidia{minor}")
        missing = [name for name, node in ((f"nvidia{minor}", own),
                                          *zip(CONTROL_NODES, control)) if node is None]
        if missing:
            problems.append(f"GPU {index}: no character device {', '.join(missing)} "
                            f"in {dev_dir}")
            continue
        major_cc, minor_cc = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        nodes = tuple(n for n in (own, *control, *optional) if n is not None)
        gpus.append(Gpu(index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                        compute_capability=f"{major_cc}.{minor_cc}", driver_version=driver,
                        cuda_version=cuda, nodes=nodes))
    return Inventory(tuple(gpus), tuple(problems))


@dataclass
class GpuPool:
    """This worker's GPUs as resources: each lent to one job at a time."""

    inventory: Inventory = field(default_factory=Inventory)
    busy: dict[int, str] = field(default_factory=dict)  # GPU index -> job id

    def report(self) -> dict[str, Any]:
        """For ``/health`` and ``/``: every GPU, which are lent, and what is not usable."""
        gpus = []
        for gpu in self.inventory.gpus:
            entry = gpu.as_json()
            entry["busy"] = gpu.index in self.busy
            gpus.append(entry)
        body: dict[str, Any] = {"gpus": gpus}
        if self.inventory.problems:
            body["gpu_problems"] = list(self.inventory.problems)
        return body

    def usable(self) -> bool:
        """Whether any GPU job can run here."""
        return bool(self.inventory.gpus)

    def unmet(self, request: dict[str, Any] | None) -> tuple[str, str] | None:
        """``(field, why)`` if a required GPU could never be had here (a 400)."""
        return gpuwire.unmet([g.as_json() for g in self.inventory.gpus], request)

    def acquire(self, job_id: str, request: dict[str, Any]) -> Gpu | None:
        """A free GPU that satisfies ``request``, now lent to ``job_id``; None if none is free."""
        for gpu in self.inventory.gpus:
            if gpu.index not in self.busy and gpuwire.satisfies(gpu.as_json(), request):
                self.busy[gpu.index] = job_id
                return gpu
        return None

    def release(self, job_id: str) -> None:
        for index, holder in list(self.busy.items()):
            if holder == job_id:
                del self.busy[index]
