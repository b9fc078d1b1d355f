"""Typed results of the Sandrun API, parsed from its JSON documents.

Each dataclass mirrors one document of ``shared/spec/api.md`` and has a
``from_json`` that accepts what the server sends: missing optional fields are
None, a document of the wrong shape is a ``ProtocolError``.  ``Job`` keeps the
document it came from in ``raw``, unchanged, because a signature covers exactly
what the server sent (see ``sandrun.identity.verify_result``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sandrun.client.errors import ProtocolError
from sandrun.wire import JobStatus

__all__ = [
    "Cancelled",
    "Done",
    "ExecutionMetadata",
    "Job",
    "Logs",
    "OutputChunk",
    "OutputFile",
    "Outputs",
    "StatusUpdate",
    "StreamEvent",
    "Submitted",
    "WorkerMetadata",
    "parse_frame",
]

_FINISHED = {JobStatus.COMPLETED.value, JobStatus.FAILED.value}


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError("Unexpected response", f"{what} is not a JSON object")
    return value


def _str(document: Mapping[str, Any], key: str, what: str) -> str:
    value = document.get(key)
    if not isinstance(value, str):
        raise ProtocolError("Unexpected response", f"{what} has no string {key!r}")
    return value


def _opt(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(key)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        return None
    return value if isinstance(value, kind) else None


@dataclass(frozen=True)
class Submitted:
    """``POST /submit`` accepted the job."""

    job_id: str
    status: str
    position: int | None

    @classmethod
    def from_json(cls, document: Any) -> Submitted:
        d = _object(document, "the submit answer")
        return cls(_str(d, "job_id", "the submit answer"), _opt(d, "status", str) or "queued",
                   _opt(d, "position", int))


@dataclass(frozen=True)
class ExecutionMetadata:
    """How the job ran; all None until it has finished."""

    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    wall_time_ms: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    environment: str | None = None
    interpreter: str | None = None
    message: str | None = None
    timeout: int | None = None  # the limits it ran under (``limits``), defaults filled
    memory_mb: int | None = None
    cpu_seconds_limit: float | None = None

    @classmethod
    def from_json(cls, document: Any) -> ExecutionMetadata:
        d = _object(document or {}, "execution_metadata")
        given = d.get("limits")
        limits: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        return cls(cpu_seconds=_opt(d, "cpu_seconds", (int, float)),
                   memory_peak_bytes=_opt(d, "memory_peak_bytes", int),
                   wall_time_ms=_opt(d, "wall_time_ms", (int, float)),
                   exit_code=_opt(d, "exit_code", int), signal=_opt(d, "signal", int),
                   reason=_opt(d, "reason", str), environment=_opt(d, "environment", str),
                   interpreter=_opt(d, "interpreter", str), message=_opt(d, "message", str),
                   timeout=_opt(limits, "timeout", int),
                   memory_mb=_opt(limits, "memory_mb", int),
                   cpu_seconds_limit=_opt(limits, "cpu_seconds", (int, float)))


@dataclass(frozen=True)
class OutputFile:
    """One output: from ``/outputs`` (with ``mime_type`` and ``download_url``) or ``/status``."""

    path: str
    size_bytes: int
    sha256: str
    mime_type: str | None = None
    download_url: str | None = None

    @classmethod
    def from_json(cls, document: Any, path: str | None = None) -> OutputFile:
        d = _object(document, "an output file")
        return cls(path=path if path is not None else _str(d, "path", "an output file"),
                   size_bytes=_opt(d, "size_bytes", int) or 0,
                   sha256=_opt(d, "sha256", str) or "",
                   mime_type=_opt(d, "mime_type", str), download_url=_opt(d, "download_url", str))


@dataclass(frozen=True)
class WorkerMetadata:
    """Which worker ran the job and, when it has a key, its signature over the result."""

    worker_id: str | None = None
    signature: str | None = None
    signed: str | None = None

    @classmethod
    def from_json(cls, document: Any) -> WorkerMetadata:
        d = _object(document or {}, "worker_metadata")
        return cls(_opt(d, "worker_id", str), _opt(d, "signature", str), _opt(d, "signed", str))


@dataclass(frozen=True)
class Job:
    """``GET /status/{job_id}``."""

    job_id: str
    status: str
    queue_position: int | None
    submitted_at: str | None
    started_at: str | None
    finished_at: str | None
    execution: ExecutionMetadata
    job_hash: str | None
    output_files: Mapping[str, OutputFile]
    worker: WorkerMetadata
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, document: Any) -> Job:
        d = _object(document, "the status document")
        files = _object(d.get("output_files") or {}, "output_files")
        return cls(
            job_id=_str(d, "job_id", "the status document"),
            status=_str(d, "status", "the status document"),
            queue_position=_opt(d, "queue_position", int),
            submitted_at=_opt(d, "submitted_at", str), started_at=_opt(d, "started_at", str),
            finished_at=_opt(d, "finished_at", str),
            execution=ExecutionMetadata.from_json(d.get("execution_metadata")),
            job_hash=_opt(d, "job_hash", str),
            output_files={path: OutputFile.from_json(info, path) for path, info in files.items()},
            worker=WorkerMetadata.from_json(d.get("worker_metadata")),
            raw=json.loads(json.dumps(d)),  # a private copy: callers may not mutate ours
        )

    @property
    def finished(self) -> bool:
        return self.status in _FINISHED

    @property
    def succeeded(self) -> bool:
        """The entrypoint ran and exited 0."""
        return self.status == JobStatus.COMPLETED.value

    @property
    def reason(self) -> str | None:
        return self.execution.reason

    @property
    def exit_code(self) -> int | None:
        return self.execution.exit_code


@dataclass(frozen=True)
class Logs:
    """``GET /logs/{job_id}``: everything captured so far."""

    job_id: str
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    install: str = ""  # the dependency install step's own log

    @classmethod
    def from_json(cls, document: Any) -> Logs:
        d = _object(document, "the logs document")
        cut = d.get("truncated")
        truncated: Mapping[str, Any] = cut if isinstance(cut, Mapping) else {}
        return cls(_str(d, "job_id", "the logs document"), _opt(d, "stdout", str) or "",
                   _opt(d, "stderr", str) or "", truncated.get("stdout") is True,
                   truncated.get("stderr") is True, _opt(d, "install", str) or "")


@dataclass(frozen=True)
class Outputs:
    """``GET /outputs/{job_id}``: the files that match the manifest's ``outputs``."""

    job_id: str
    status: str
    files: tuple[OutputFile, ...]

    @classmethod
    def from_json(cls, document: Any) -> Outputs:
        d = _object(document, "the outputs document")
        listed = d.get("files")
        if not isinstance(listed, list):
            raise ProtocolError("Unexpected response", "the outputs document has no file list")
        return cls(_str(d, "job_id", "the outputs document"), _opt(d, "status", str) or "",
                   tuple(OutputFile.from_json(f) for f in listed))

    def __iter__(self) -> Any:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class RunResult:
    """``POST /run``: the finished job's status, its output and its outputs, at once.

    ``kept`` says whether the job stays on the server for download (its files'
    ``download_url``); without it, it is already deleted.
    """

    job: Job
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    outputs: tuple[OutputFile, ...]
    kept: bool

    @classmethod
    def from_json(cls, document: Any) -> RunResult:
        d = _object(document, "the run result")
        cut = d.get("truncated")
        truncated: Mapping[str, Any] = cut if isinstance(cut, Mapping) else {}
        listed = d.get("outputs")
        return cls(job=Job.from_json(d), stdout=_opt(d, "stdout", str) or "",
                   stderr=_opt(d, "stderr", str) or "",
                   stdout_truncated=truncated.get("stdout") is True,
                   stderr_truncated=truncated.get("stderr") is True,
                   outputs=tuple(OutputFile.from_json(f) for f in listed)
                   if isinstance(listed, list) else (),
                   kept=d.get("kept") is not False)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def status(self) -> str:
        return self.job.status

    @property
    def succeeded(self) -> bool:
        return self.job.succeeded

    @property
    def reason(self) -> str | None:
        return self.job.reason

    @property
    def exit_code(self) -> int | None:
        return self.job.exit_code


@dataclass(frozen=True)
class Cancelled:
    """``DELETE /jobs/{job_id}``: the job's data is gone; ``cancelled`` if it was still live."""

    job_id: str
    deleted: bool
    cancelled: bool

    @classmethod
    def from_json(cls, document: Any) -> Cancelled:
        d = _object(document, "the cancel answer")
        return cls(_str(d, "job_id", "the cancel answer"), d.get("deleted") is True,
                   d.get("cancelled") is True)


# -- live output frames (``/logs/{job_id}/stream?format=json``) --------------------------


@dataclass(frozen=True)
class OutputChunk:
    """Output as the job wrote it; ``stream`` is ``stdout`` or ``stderr``."""

    stream: str
    data: str


@dataclass(frozen=True)
class StatusUpdate:
    """The job's status changed (``queued`` to ``running``, ...)."""

    status: str


@dataclass(frozen=True)
class Done:
    """The last frame: how the job ended."""

    status: str
    reason: str | None = None
    exit_code: int | None = None
    cpu_seconds: float | None = None
    memory_peak_bytes: int | None = None
    wall_time_ms: float | None = None


StreamEvent = OutputChunk | StatusUpdate | Done


def parse_frame(text: str | bytes) -> StreamEvent | None:
    """One JSON frame as an event; None for a frame type this client does not know.

    Unknown types are skipped rather than refused so that a newer server can
    add frames without breaking older clients.
    """
    try:
        d = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("Unexpected stream frame", "a frame is not JSON") from None
    d = _object(d, "a stream frame")
    kind = d.get("type")
    if kind == "output":
        stream = _opt(d, "stream", str) or "stdout"
        return OutputChunk(stream, _opt(d, "data", str) or "")
    if kind == "status":
        return StatusUpdate(_str(d, "status", "a status frame"))
    if kind == "done":
        return Done(status=_str(d, "status", "the done frame"), reason=_opt(d, "reason", str),
                    exit_code=_opt(d, "exit_code", int),
                    cpu_seconds=_opt(d, "cpu_seconds", (int, float)),
                    memory_peak_bytes=_opt(d, "memory_peak_bytes", int),
                    wall_time_ms=_opt(d, "wall_time_ms", (int, float)))
    return None
