"""A fake ``pynvml`` (nvidia-ml-py) for tests: the GPUs it reports come from a JSON document.

Put this directory first on ``PYTHONPATH`` of a worker and set ``SANDRUN_FAKE_NVML`` to
``{"driver": "550.54.15", "cuda": 12040, "gpus": [{"name", "uuid", "memory_bytes",
"compute_capability": [8, 0], "minor": 0}, ...]}`` (or ``{"fail": "message"}`` for a
driver that does not start).  Unit tests use ``FakeNvml`` directly.  Only the calls
``sandrun.jobs.gpus.discover`` makes exist.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


class FakeNvml:
    """The module's functions over one document; ``calls`` records init and shutdown."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if "fail" in self.document:
            raise NVMLError(self.document["fail"])

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.document.get("driver", "550.54.15"))

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return int(self.document.get("cuda", 12040))

    def nvmlDeviceGetCount(self) -> int:
        return len(self.document.get("gpus", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return dict(self.document["gpus"][index])

    def nvmlDeviceGetMinorNumber(self, handle: dict[str, Any]) -> int:
        return int(handle.get("minor", 0))

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> bytes:
        return str(handle.get("name", "Fake GPU")).encode()  # older nvidia-ml-py: bytes

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:
        return str(handle["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> Any:
        total = int(handle["memory_bytes"])
        return SimpleNamespace(total=total, free=total, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, handle: dict[str, Any]) -> tuple[int, int]:
        major, minor = handle.get("compute_capability", [8, 0])
        return int(major), int(minor)


def _from_environment() -> FakeNvml:
    text = os.environ.get("SANDRUN_FAKE_NVML", '{"gpus": []}')
    return FakeNvml(json.loads(text))


_module = _from_environment()
nvmlInit = _module.nvmlInit
nvmlShutdown = _module.nvmlShutdown
nvmlSystemGetDriverVersion = _module.nvmlSystemGetDriverVersion
nvmlSystemGetCudaDriverVersion = _module.nvmlSystemGetCudaDriverVersion
nvmlDeviceGetCount = _module.nvmlDeviceGetCount
nvmlDeviceGetHandleByIndex = _module.nvmlDeviceGetHandleByIndex
nvmlDeviceGetMinorNumber = _module.nvmlDeviceGetMinorNumber
nvmlDeviceGetName = _module.nvmlDeviceGetName
nvmlDeviceGetUUID = _module.nvmlDeviceGetUUID
nvmlDeviceGetMemoryInfo = _module.nvmlDeviceGetMemoryInfo
nvmlDeviceGetCudaComputeCapability = _module.nvmlDeviceGetCudaComputeCapability
