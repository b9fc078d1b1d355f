"""Uploads parsed in a short-lived child process with its own limits, like a job.

Every byte of a submission (multipart framing, JSON, tar and gzip headers,
the manifest) is parsed by ``uploads.parse_submission``.  Run in the worker,
a parser bug or a pathological input could hold the GIL (and so the reactor)
or grow the worker's memory; run here, it can only use up its own child:

- a small fork server (``python -m sandrun.api.unpacker``, started once with
  the parsing modules imported, single-threaded) receives each request over a
  Unix socket, with the body's file descriptor and the write end of an answer
  pipe (``socket.send_fds``), and forks one child per submission: a fork, not
  an interpreter start;
- the child sets ``RLIMIT_AS`` (memory), ``RLIMIT_CPU`` (CPU seconds, then
  ``SIGKILL``), no core dumps and an alarm (wall seconds) before it reads a
  byte, writes what it stored into the job's directory, answers and exits;
- it answers with plain data (one JSON line, then a NUL-separated table of the
  stored files), never a pickle: a process that parsed hostile bytes is not
  trusted to run code in the worker.

A child that runs past a limit answers nothing; that is a 400 naming the
limits: the upload, not the worker, was at fault.  ``Unpacker.parse`` blocks
(run it in a thread, as the worker's ``blocking`` does) and waits in
``poll``, off the GIL.

A JSON body of at most ``IN_PROCESS_JSON_BYTES`` (a snippet: what most jobs
are) is parsed in the calling thread instead: a child costs a fork and ~7.5 ms
per submission, and such a body cannot cost the worker much.  Its size is
known before a byte is parsed; ``json`` parses it in time linear in its size,
into at most ~25x its size in objects (~6 MiB for ``[{},{},...]``); nesting
past the recursion limit, integers past 4,300 digits, invalid UTF-8,
``NaN`` and duplicate keys are 400s (``manifest.loads_strict``); no tar or
gzip is involved.  Archives, multipart bodies and larger JSON still go to a
child.
"""

from __future__ import annotations

import gc
import io
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

from python_multipart.multipart import parse_options_header

from sandrun.api import uploads
from sandrun.config import Limits, MiB
from sandrun.jobs.manifest import ManifestError, parse_manifest
from sandrun.jobs.workspace import InputFiles, UploadError

__all__ = ["IN_PROCESS_JSON_BYTES", "UnpackLimits", "Unpacker"]

_MAX_REQUEST_BYTES = 64 * 1024  # one request: paths, the content type and the limits
_MAX_ANSWER_BYTES = 80 * MiB  # manifest (<= 1 MiB) and the file table (10,000 paths)
_READ = 256 * 1024
# A JSON body up to this size is parsed in the worker's thread, not in a child (above).
IN_PROCESS_JSON_BYTES = 256 * 1024


@dataclass(frozen=True)
class UnpackLimits:
    """What one unpacking child may use."""

    memory_bytes: int = 512 * MiB  # RLIMIT_AS (address space; the child starts near 60 MiB)
    cpu_seconds: int = 60  # RLIMIT_CPU; a 500 MB archive needs a few seconds
    wall_seconds: int = 120  # an alarm in the child; the parent waits a little longer

    def describe(self) -> str:
        return (f"{self.memory_bytes // MiB} MiB of memory, {self.cpu_seconds} CPU seconds "
                f"and {self.wall_seconds} s")


class Unpacker:
    """Parses submissions in children of one fork server; one instance per worker."""

    def __init__(self, limits: Limits, unpack_limits: UnpackLimits | None = None) -> None:
        self.limits = limits
        self.unpack_limits = unpack_limits or UnpackLimits()
        self._lock = threading.Lock()
        self._server: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None

    def start(self) -> None:
        """Start the fork server (again, if it died)."""
        with self._lock:
            if self._server is not None and self._server.poll() is None:
                return
            self._close()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._server = subprocess.Popen(
                    [sys.executable, "-m", "sandrun.api.unpacker", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
            finally:
                theirs.close()
            self._socket = ours

    def stop(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()  # the server sees the end of its socket and exits
            self._socket = None
        if self._server is not None:
            try:
                self._server.wait(5)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None

    def parse(self, kind: bytes | None, body: BinaryIO, work: str,
              staging: str) -> uploads.Submission:
        """``uploads.parse_submission`` in a child (a small JSON body: here); the same
        result and the same errors."""
        if _small_json(kind, body):
            return uploads.parse_submission(kind, body, work, staging, self.limits)
        request = json.dumps({
            "kind": kind.decode("latin-1") if kind is not None else None,
            "work": work, "staging": staging, "limits": asdict(self.limits),
            "unpack": asdict(self.unpack_limits)}).encode()
        body.seek(0)
        try:
            body_fd = body.fileno()  # a SpooledTemporaryFile moves to its file here
        except (AttributeError, io.UnsupportedOperation):  # in memory only: give it a file
            copy = tempfile.TemporaryFile(dir=staging)  # noqa: SIM115 (closed below)
            shutil.copyfileobj(body, copy)
            copy.seek(0)
            try:
                return self.parse(kind, copy, work, staging)
            finally:
                copy.close()
        answer_r, answer_w = os.pipe()
        try:
            self._send(request, [body_fd, answer_w])
            os.close(answer_w)
            answer_w = -1
            answer = _read_all(answer_r, self.unpack_limits.wall_seconds + 5)
        finally:
            os.close(answer_r)
            if answer_w >= 0:
                os.close(answer_w)
        if answer is None or b"\n" not in answer:
            raise UploadError("body", "could not be unpacked within "
                                      f"{self.unpack_limits.describe()}")
        head, table = answer.split(b"\n", 1)
        return _submission(json.loads(head), table, self.limits)

    def _send(self, request: bytes, fds: list[int]) -> None:
        for attempt in (1, 2):
            self.start()
            sock = self._socket
            assert sock is not None
            try:
                socket.send_fds(sock, [request], fds)
                return
            except OSError:
                if attempt == 2:
                    raise
                with self._lock:  # the server died: start another
                    self._close()


def _small_json(kind: bytes | None, body: BinaryIO) -> bool:
    """Whether this body is JSON of at most ``IN_PROCESS_JSON_BYTES`` (parsed here)."""
    if not kind or parse_options_header(kind)[0] != b"application/json":
        return False
    body.seek(0, os.SEEK_END)
    return body.tell() <= IN_PROCESS_JSON_BYTES


def _read_all(fd: int, timeout: float) -> bytes | None:
    """Everything until the writer closes; None past ``timeout`` or the size bound."""
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout
    # poll, not select: a worker holding thousands of jobs has descriptors past 1024.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        chunk = os.read(fd, _READ)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > _MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)


def _submission(head: dict[str, Any], table: bytes, limits: Limits) -> uploads.Submission:
    refused = head.get("refused")
    if refused == "upload":
        raise UploadError(head["member"], head["message"])
    if refused == "manifest":
        raise ManifestError(head["field"], head["message"])
    if refused == "unsupported":
        raise uploads.Unsupported(head["kind"])
    if refused == "memory":
        raise UploadError("body", f"needs more than {head['limit'] // MiB} MiB to unpack")
    if refused is not None:
        raise RuntimeError(f"unpacking failed: {head.get('type', refused)}")
    inputs = InputFiles(limits)
    fields = table.split(b"\x00") if table else []
    for i in range(0, len(fields) - 2, 3):
        inputs.record(fields[i].decode("utf-8", "surrogateescape"), int(fields[i + 1]),
                      fields[i + 2].decode("ascii"))
    # Validated in the child; parsed again here from its canonical form (bounded, cheap).
    return uploads.Submission(parse_manifest(head["manifest"], limits), inputs)


# -- the fork server and its children (no Twisted reactor here) ------------------------------


def serve(sock: socket.socket) -> None:
    """Fork one child per request until the worker closes its end of ``sock``."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this ends
    _warm_up()
    # Everything imported so far is shared with each child; frozen, the child's garbage
    # collector never walks (and so never copies) those pages.
    gc.freeze()
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST_BYTES, 2)
        except InterruptedError:
            continue
        if not message:
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        if os.fork() == 0:
            sock.close()
            _child(message, fds[0], fds[1])  # never returns
        for fd in fds:
            os.close(fd)


def _warm_up() -> None:
    """Parse one small tar.gz submission here, once: what the parsers compile or load on
    first use (regular expressions, hashlib, zlib) is then already in every child."""
    import gzip
    import tarfile

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        info = tarfile.TarInfo("main.py")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"1"))
    boundary = b"warm-up"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n'
            b'{"entrypoint": "main.py"}\r\n--' + boundary + b'\r\nContent-Disposition: '
            b'form-data; name="files"; filename="a.tgz"\r\n\r\n'
            + gzip.compress(tar.getvalue()) + b"\r\n--" + boundary + b"--\r\n")
    with tempfile.TemporaryDirectory() as scratch:
        work, staging = os.path.join(scratch, "work"), os.path.join(scratch, "staging")
        os.mkdir(work)
        os.mkdir(staging)
        uploads.parse_submission(b"multipart/form-data; boundary=" + boundary,
                                 io.BytesIO(body), work, staging, Limits())


def _child(message: bytes, body_fd: int, answer_fd: int) -> None:
    code = 0
    try:
        request = json.loads(message)
        unpack = UnpackLimits(**request["unpack"])
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.alarm(unpack.wall_seconds)  # default action: the child ends
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (unpack.cpu_seconds, unpack.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (unpack.memory_bytes, unpack.memory_bytes))
        answer = _unpack(request, unpack, body_fd)
        with os.fdopen(answer_fd, "wb") as out:
            out.write(answer)
    except BaseException:  # noqa: BLE001 (no answer is the parent's cue)
        code = 1
    os._exit(code)


def _unpack(request: dict[str, Any], unpack: UnpackLimits, body_fd: int) -> bytes:
    kind = request["kind"].encode("latin-1") if request["kind"] is not None else None
    limits = Limits(**request["limits"])
    table = b""
    try:
        with os.fdopen(body_fd, "rb") as body:
            submission = uploads.parse_submission(kind, body, request["work"],
                                                  request["staging"], limits)
        head: dict[str, Any] = {"manifest": submission.manifest.as_json()}
        table = b"\x00".join(
            b"%s\x00%d\x00%s" % (f.path.encode("utf-8", "surrogateescape"), f.size,
                                 f.sha256.encode("ascii"))
            for f in submission.inputs.files)
    except UploadError as e:
        head = {"refused": "upload", "member": e.member, "message": e.message}
    except ManifestError as e:
        head = {"refused": "manifest", "field": e.field, "message": e.message}
    except uploads.Unsupported as e:
        head = {"refused": "unsupported", "kind": e.kind}
    except MemoryError:
        head = {"refused": "memory", "limit": unpack.memory_bytes}
    except Exception as e:  # noqa: BLE001 (the type only: a message could quote job content)
        head = {"refused": "internal", "type": type(e).__name__}
    return json.dumps(head, ensure_ascii=True).encode() + b"\n" + table


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
