"""Python clients for Sandrun.

``SandrunClient`` (blocking, stdlib HTTP, ``websockets`` for live output) and,
for Twisted programs, ``sandrun.client.txclient.TxSandrunClient`` (treq;
imported on demand so that this package does not load Twisted).

    from sandrun.client import SandrunClient

    client = SandrunClient("http://127.0.0.1:8443")
    submitted = client.submit_code("print('hello')", "python")
    job = client.wait(submitted.job_id, timeout=60)
    print(job.exit_code, client.logs(job.job_id).stdout)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandrun.client.errors import (
        BadRequestError,
        ConflictError,
        NotFoundError,
        PayloadTooLargeError,
        ProtocolError,
        QueueFullError,
        RateLimitedError,
        SandrunConnectionError,
        SandrunError,
        ServerError,
        ServiceUnavailableError,
        StreamUnavailableError,
        UnsafeArchiveError,
        UnsupportedMediaTypeError,
        WaitTimeoutError,
    )
    from sandrun.client.models import (
        Cancelled,
        Done,
        ExecutionMetadata,
        Job,
        Logs,
        OutputChunk,
        OutputFile,
        Outputs,
        RunResult,
        StatusUpdate,
        StreamEvent,
        Submitted,
        WorkerMetadata,
    )
    from sandrun.client.pack import IgnoreRules, PackResult, extract_archive, pack_directory
    from sandrun.client.sync import DEFAULT_URL, SandrunClient, server_url_from_env

__all__ = [
    "DEFAULT_URL",
    "BadRequestError",
    "Cancelled",
    "ConflictError",
    "Done",
    "ExecutionMetadata",
    "IgnoreRules",
    "Job",
    "Logs",
    "NotFoundError",
    "OutputChunk",
    "OutputFile",
    "Outputs",
    "PackResult",
    "PayloadTooLargeError",
    "ProtocolError",
    "QueueFullError",
    "RateLimitedError",
    "RunResult",
    "SandrunClient",
    "SandrunConnectionError",
    "SandrunError",
    "ServerError",
    "ServiceUnavailableError",
    "StatusUpdate",
    "StreamEvent",
    "StreamUnavailableError",
    "Submitted",
    "UnsafeArchiveError",
    "UnsupportedMediaTypeError",
    "WaitTimeoutError",
    "WorkerMetadata",
    "extract_archive",
    "pack_directory",
    "server_url_from_env",
]

# Each name's submodule, imported on first use (PEP 562): ``sandrun`` builds its whole
# command line, this package's commands included, in every process, the worker too,
# which should not hold the client's modules for that.
_EXPORTS = {
    "BadRequestError": "errors",
    "Cancelled": "models",
    "ConflictError": "errors",
    "DEFAULT_URL": "sync",
    "Done": "models",
    "ExecutionMetadata": "models",
    "IgnoreRules": "pack",
    "Job": "models",
    "Logs": "models",
    "NotFoundError": "errors",
    "OutputChunk": "models",
    "OutputFile": "models",
    "Outputs": "models",
    "PackResult": "pack",
    "PayloadTooLargeError": "errors",
    "ProtocolError": "errors",
    "QueueFullError": "errors",
    "RateLimitedError": "errors",
    "RunResult": "models",
    "SandrunClient": "sync",
    "SandrunConnectionError": "errors",
    "SandrunError": "errors",
    "ServerError": "errors",
    "ServiceUnavailableError": "errors",
    "StatusUpdate": "models",
    "StreamEvent": "models",
    "StreamUnavailableError": "errors",
    "Submitted": "models",
    "UnsafeArchiveError": "errors",
    "UnsupportedMediaTypeError": "errors",
    "WaitTimeoutError": "errors",
    "WorkerMetadata": "models",
    "extract_archive": "pack",
    "pack_directory": "pack",
    "server_url_from_env": "sync",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
