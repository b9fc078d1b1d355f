"""Network namespaces prepared ahead of time: loopback up, nothing else.

Creating a namespace and bringing ``lo`` up over netlink costs about a
millisecond, and importing pyroute2 far more, so neither happens on the
per-job path: a background thread in the launcher keeps a small pool of fresh
namespaces, each held only by a file descriptor and handed to exactly one job.
A namespace that no descriptor or process holds any more is freed by the
kernel, so a crashed launcher leaves none behind.
"""

from __future__ import annotations

import collections
import os
import threading

from sandrun.sandbox import namespaces as ns


class NetnsPool:
    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._ready: collections.deque[int] = collections.deque()
        self._cond = threading.Condition()
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name="netns-pool", daemon=True)
        self._thread.start()

    def _make(self) -> int:
        from pyroute2 import IPRoute  # imported in the thread, off the launch path

        # unshare() moves only the calling thread into the new namespace.
        ns.unshare(ns.CLONE_NEWNET)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=1, state="up")
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            ns.setns(self._home, ns.CLONE_NEWNET)

    def _fill(self) -> None:
        while True:
            with self._cond:
                while len(self._ready) >= self.size and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                fd = self._make()
            except BaseException as e:  # reported to the next job, which then fails closed
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready.append(fd)
                self._cond.notify_all()

    def take(self, timeout: float = 5.0) -> int:
        """A fresh namespace's descriptor, owned by the caller from now on."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self._error, timeout):
                raise OSError("no network namespace ready")
            if not self._ready:
                raise OSError(f"network namespace setup failed: {self._error}")
            fd = self._ready.popleft()
            self._cond.notify_all()
            return fd

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._ready:
                os.close(self._ready.popleft())
            self._cond.notify_all()
