"""``/download/{id}`` packs a job's outputs once, however many requests ask."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from sandrun.api.packs import PackOnce


@dataclass
class FakeJob:
    id: str


class Packing:
    """A blocking runner the test finishes by hand, and a packer that counts."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.packed = 0
        self.alive = {"job-1"}
        self.measured: list[str] = []  # job ids whose storage was measured after a pack

    def blocking(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((f, args))
        self._pending = (d, f, args)
        return d

    def finish(self) -> None:
        d, f, args = self._pending
        try:
            d.callback(f(*args))
        except Exception:  # noqa: BLE001
            d.errback()

    def pack(self, job: Any, path: str) -> None:
        self.packed += 1
        with open(path, "wb") as f:
            f.write(b"pack of " + job.id.encode())

    def once(self) -> PackOnce:
        return PackOnce(self.blocking, self.pack,
                        lambda job_id: os.path.join(self.root, job_id + ".tar.gz"),
                        lambda job_id: job_id in self.alive, self.measured.append)


def test_requests_during_a_pack_wait_for_that_one_pack_and_later_ones_reuse_it(
        tmp_path: Any) -> None:
    p = Packing(str(tmp_path))
    packs = p.once()
    got: list[str] = []
    for _ in range(6):
        packs.get(FakeJob("job-1")).addCallback(got.append)
    assert len(p.calls) == 1 and got == []
    p.finish()
    assert got == [os.path.join(str(tmp_path), "job-1.tar.gz")] * 6
    packs.get(FakeJob("job-1")).addCallback(got.append)
    assert p.packed == 1 and len(got) == 7
    assert p.measured == ["job-1"]  # the pack counts in the worker's storage
    assert sorted(os.listdir(str(tmp_path))) == ["job-1.tar.gz"]  # no partial left


def test_a_pack_finished_after_its_job_was_deleted_is_removed(tmp_path: Any) -> None:
    p = Packing(str(tmp_path))
    got: list[str] = []
    p.once().get(FakeJob("job-1")).addCallback(got.append)
    p.alive.clear()
    p.finish()
    assert os.listdir(str(tmp_path)) == []


def test_a_failed_pack_fails_every_waiter_and_leaves_no_partial_file(tmp_path: Any) -> None:
    p = Packing(str(tmp_path))

    def broken(job: Any, path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    p.pack = broken  # type: ignore[method-assign]
    packs = p.once()
    errors: list[Any] = []
    for _ in range(2):
        packs.get(FakeJob("job-1")).addErrback(errors.append)
    p.finish()
    assert [e.check(OSError) for e in errors] == [OSError, OSError]
    assert os.listdir(str(tmp_path)) == []
