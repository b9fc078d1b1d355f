"""Run a package tool (pip, npm, gem) on the host with a deadline and a size cap.

Blocking: the worker calls it from a thread, the admin command directly.
The tool runs in a session of its own, so on timeout or overflow the whole
process group is killed (``pip`` and ``npm`` start children of their own).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Finished", "run_bounded", "tree_size"]

TAIL_BYTES = 64 * 1024  # how much of the tool's output is kept for messages
SIZE_CHECK_SECONDS = 0.5  # between walks of the watched directory
STOP_CHECK_SECONDS = 0.1  # how soon a set ``stop`` kills the tool


@dataclass(frozen=True)
class Finished:
    returncode: int | None  # None when killed for time or size
    output: str  # the last TAIL_BYTES of stdout and stderr together
    timed_out: bool = False
    too_big: bool = False
    stopped: bool = False  # killed because ``stop`` was set (the job was cancelled)
    cpu_seconds: float = 0.0  # the tool's CPU time, its reaped children included

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def tree_size(path: str) -> int:
    """Bytes of every regular file under ``path`` (links not followed)."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


def run_bounded(argv: Sequence[str], *, cwd: str, env: Mapping[str, str], timeout: float,
                watch: str | None = None, max_bytes: int | None = None,
                on_line: Callable[[str], None] | None = None,
                stop: threading.Event | None = None) -> Finished:
    """Run ``argv``; kill its process group past ``timeout``, once ``watch`` holds
    more than ``max_bytes``, or within ``STOP_CHECK_SECONDS`` of ``stop`` being set.
    ``on_line`` gets each output line as it comes."""
    proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    tail = bytearray()
    pending = b""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + SIZE_CHECK_SECONDS
    timed_out = too_big = stopped = False
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if stop is not None and stop.is_set():
                stopped = True
                break
            if watch is not None and max_bytes is not None and now >= next_check:
                next_check = now + SIZE_CHECK_SECONDS
                if tree_size(watch) > max_bytes:
                    too_big = True
                    break
            if not selector.select(min(STOP_CHECK_SECONDS, deadline - now)):
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                break
            tail += data
            del tail[:-TAIL_BYTES]
            if on_line is not None:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
    if timed_out or too_big or stopped:
        _kill_group(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if pending and on_line is not None:
        on_line(pending.decode("utf-8", "replace"))
    return Finished(None if timed_out or too_big or stopped else returncode,
                    tail.decode("utf-8", "replace"), timed_out, too_big, stopped,
                    usage.ru_utime + usage.ru_stime)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
