"""A job's state, its output log, and the one table of allowed transitions."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandrun.jobs.manifest import Manifest
from sandrun.jobs.workspace import OutputFile
from sandrun.wire import JobStatus, Reason

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
}


class InvalidTransition(Exception):
    pass


LogListener = Callable[[str, bytes], None]
EndListener = Callable[["Job"], None]


class JobLog:
    """Everything a job printed, in arrival order, and who is listening.

    Chunks are kept whole (the sandbox already capped each stream), so a
    subscriber that joins late replays the backlog and then sees each new
    chunk exactly once, in order.
    """

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []
        self.sizes = {"stdout": 0, "stderr": 0}
        self.listeners: list[LogListener] = []

    def append(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data))
        self.sizes[stream] += len(data)
        for listener in list(self.listeners):
            listener(stream, data)

    def text(self, stream: str | None = None) -> str:
        data = b"".join(d for s, d in self.chunks if stream is None or s == stream)
        return data.decode("utf-8", errors="replace")


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    id: str
    manifest: Manifest
    client: str  # rate-limit key of the submitter
    base_dir: str  # the job's tmpfs (see storage.py)
    job_hash: str
    submitted_at: float
    status: JobStatus = JobStatus.QUEUED
    reason: Reason | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    cpu_seconds: float = 0.0
    memory_peak_bytes: int = 0
    wall_time_ms: float = 0.0
    message: str | None = None
    truncated: dict[str, bool] = field(default_factory=lambda: {"stdout": False,
                                                                "stderr": False})
    outputs: list[OutputFile] = field(default_factory=list)
    signed: str | None = None
    signature: str | None = None
    log: JobLog = field(default_factory=JobLog)
    end_listeners: list[EndListener] = field(default_factory=list)
    deleted: bool = False

    def move_to(self, status: JobStatus) -> None:
        if status not in TRANSITIONS[self.status]:
            raise InvalidTransition(f"{self.status.value} -> {status.value}")
        self.status = status

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.FAILED)

    def execution_metadata(self) -> dict[str, Any]:
        return {"cpu_seconds": round(self.cpu_seconds, 6),
                "memory_peak_bytes": self.memory_peak_bytes,
                "wall_time_ms": round(self.wall_time_ms, 3),
                "exit_code": self.exit_code, "signal": self.signal,
                "reason": self.reason.value if self.reason else None,
                "message": self.message,
                "environment": self.manifest.environment,
                "interpreter": self.manifest.interpreter}

    def signed_result(self, worker_id: str | None) -> dict[str, Any]:
        """The fields a signature covers (see ``identity.RESULT_FIELDS``)."""
        return {"job_id": self.id, "job_hash": self.job_hash, "worker_id": worker_id,
                "status": self.status.value,
                "reason": self.reason.value if self.reason else None,
                "exit_code": self.exit_code, "cpu_seconds": round(self.cpu_seconds, 6),
                "memory_peak_bytes": self.memory_peak_bytes,
                "wall_time_ms": round(self.wall_time_ms, 3),
                "finished_at": iso(self.finished_at),
                "outputs": {o.path: o.sha256 for o in self.outputs}}
