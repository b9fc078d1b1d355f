"""A job's state, its output log, and the one table of allowed transitions."""

from __future__ import annotations

import array
import datetime
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

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

COALESCE_BYTES = 64 * 1024  # output held back is published once it reaches this many bytes
COALESCE_SECONDS = 0.05  # at most one chunk per stream this often while output is dense
# The job's own output, then the dependency install step's (never mixed into the job's).
_STREAMS = ("stdout", "stderr", "install")
PROGRAM_STREAMS = ("stdout", "stderr")


class LogChunks(Sequence[tuple[str, bytes]]):
    """The published chunks, ``(stream, data)``, append-only.

    With a ``path`` the bytes live in that file (on the worker's tmpfs) and
    only a compact index (17 bytes a chunk) is in the worker's memory: a
    finished job's output is kept for up to an hour and must not weigh on the
    worker's own RSS.  A chunk that cannot be written (the tmpfs is full) is
    kept in memory instead.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600)
        self._offsets = array.array("q")  # -1: the chunk is in _memory
        self._sizes = array.array("q")
        self._streams = bytearray()  # index into _STREAMS
        self._memory: dict[int, bytes] = {}
        self._end = 0
        self.closed = False

    def append(self, stream: str, data: bytes) -> None:
        i = len(self._sizes)
        self._streams.append(_STREAMS.index(stream))
        self._sizes.append(len(data))
        if self._fd is not None and not self.closed and _write_at(self._fd, data, self._end):
            self._offsets.append(self._end)
            self._end += len(data)
        else:
            self._offsets.append(-1)
            self._memory[i] = data

    def stream(self, i: int) -> str:
        """Which stream chunk ``i`` belongs to (without reading its data)."""
        return _STREAMS[self._streams[i]]

    def in_memory(self) -> int:
        """How many chunks are held in the worker's memory rather than the file."""
        return len(self._memory)

    def __len__(self) -> int:
        return len(self._sizes)

    @overload
    def __getitem__(self, i: int) -> tuple[str, bytes]: ...

    @overload
    def __getitem__(self, i: slice) -> list[tuple[str, bytes]]: ...

    def __getitem__(self, i: int | slice) -> tuple[str, bytes] | list[tuple[str, bytes]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        stream = _STREAMS[self._streams[i]]
        offset = self._offsets[i]
        if offset < 0:
            return stream, self._memory[i]
        if self._fd is None or self.closed:
            return stream, b""
        return stream, os.pread(self._fd, self._sizes[i], offset)

    def close(self) -> None:
        """Free the file (its tmpfs pages); chunks read as empty from now on."""
        if self.closed:
            return
        self.closed = True
        self._memory.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _write_at(fd: int, data: bytes, offset: int) -> bool:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError:
        return False
    return True


class JobLog:
    """Everything a job printed, in arrival order, and who is listening.

    Published chunks never change, so a subscriber that joins late replays
    the backlog by index and then sees each new chunk exactly once, in order;
    listeners are told of each chunk as it is published.

    With a ``clock``, dense output is coalesced: output that follows a chunk
    published less than ``COALESCE_SECONDS`` ago is held back until then (or
    until ``COALESCE_BYTES`` gathered, the other stream writes, or ``flush``),
    so a job writing one byte at a time makes a few chunks a second rather
    than one per read of its pipe, while sparse output is published at once.
    ``text`` and ``sizes`` always include what is held back.  The manager
    flushes before it reports the job's end.
    """

    def __init__(self, path: str | None = None, clock: Any = None) -> None:  # IReactorTime
        self.chunks = LogChunks(path)
        self.sizes = {"stdout": 0, "stderr": 0, "install": 0}
        # Of every byte kept, per stream: signed in the result (identity.RESULT_FIELDS).
        self.digests = {"stdout": hashlib.sha256(), "stderr": hashlib.sha256(),
                        "install": hashlib.sha256()}
        self.listeners: list[LogListener] = []
        self._clock = clock
        self._pending = bytearray()
        self._pending_stream = "stdout"
        self._timer: Any = None
        self._last_published = float("-inf")

    def append(self, stream: str, data: bytes) -> None:
        self.sizes[stream] += len(data)
        self.digests[stream].update(data)
        if self._clock is None:
            self._publish(stream, data)
            return
        if self._pending and stream != self._pending_stream:
            self.flush()  # the order of the two streams is kept
        self._pending_stream = stream
        self._pending += data
        wait = self._last_published + COALESCE_SECONDS - self._clock.seconds()
        if len(self._pending) >= COALESCE_BYTES or wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(wait, self.flush)

    def flush(self) -> None:
        """Publish what is held back now."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._publish(self._pending_stream, data)

    def _publish(self, stream: str, data: bytes) -> None:
        if self._clock is not None:
            self._last_published = self._clock.seconds()
        self.chunks.append(stream, data)
        for listener in list(self.listeners):
            listener(stream, data)

    def sha256(self, stream: str) -> str:
        """The sha256 hex of everything ``stream`` kept so far."""
        return self.digests[stream].hexdigest()

    def pieces(self, stream: str | None = None) -> Iterator[bytes]:
        """``text``'s bytes as they are now, one chunk at a time (read as consumed): a
        large log is sent without being held whole in memory."""
        wanted = PROGRAM_STREAMS if stream is None else (stream,)
        count = len(self.chunks)
        held = bytes(self._pending) if self._pending and self._pending_stream in wanted \
            else b""

        def read() -> Iterator[bytes]:
            for i in range(count):
                if self.chunks.stream(i) in wanted:
                    yield self.chunks[i][1]
            if held:
                yield held

        return read()

    def text(self, stream: str | None = None) -> str:
        """One stream's text; None: the program's stdout and stderr, in arrival order."""
        wanted = PROGRAM_STREAMS if stream is None else (stream,)
        parts = [d for s, d in self.chunks if s in wanted]
        if self._pending and self._pending_stream in wanted:
            parts.append(bytes(self._pending))
        return b"".join(parts).decode("utf-8", errors="replace")

    def close(self) -> None:
        """The job's data is gone: drop what is held back and free the file."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._pending.clear()
        self.chunks.close()


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
    install_cpu_seconds: float = 0.0  # of the finished dependency install, in cpu_seconds too
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
    quota_exempt: bool = False  # submitted from a --quota-exempt address: never charged
    environment: str | None = None  # the template it gets; None: the host's interpreters alone
    # Uploaded path -> sha256, kept only when the manifest has no ``outputs``: those
    # files, unchanged, are not outputs (only what the job made or changed is).
    inputs: dict[str, str] = field(default_factory=dict)

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
                "environment": self.environment or "none",
                "interpreter": self.manifest.interpreter,
                # The limits it ran under, defaults filled: "timeout (300 s)" can say so.
                "limits": {"timeout": self.manifest.timeout,
                           "memory_mb": self.manifest.memory_mb,
                           "cpu_seconds": self.manifest.cpu_seconds},
                "stdout_sha256": self.log.sha256("stdout") if self.finished else None,
                "stderr_sha256": self.log.sha256("stderr") if self.finished else None}

    def signed_result(self, worker_id: str | None) -> dict[str, Any]:
        """The fields a signature covers (see ``identity.RESULT_FIELDS``)."""
        return {"job_id": self.id, "job_hash": self.job_hash, "worker_id": worker_id,
                "status": self.status.value,
                "reason": self.reason.value if self.reason else None,
                "exit_code": self.exit_code, "cpu_seconds": round(self.cpu_seconds, 6),
                "memory_peak_bytes": self.memory_peak_bytes,
                "wall_time_ms": round(self.wall_time_ms, 3),
                "finished_at": iso(self.finished_at),
                "outputs": {o.path: o.sha256 for o in self.outputs},
                "stdout_sha256": self.log.sha256("stdout"),
                "stderr_sha256": self.log.sha256("stderr")}
