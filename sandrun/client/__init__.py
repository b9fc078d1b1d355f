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
