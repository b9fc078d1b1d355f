"""Which jobs are "small" (``storage.is_small``): their chown and listing stay on the reactor.

Real tmpfs mounts, as the worker makes them (root only); and the job manager's choice
between the calling thread and its thread pool, with a counting ``blocking``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from sandrun.jobs import storage as store
from sandrun.jobs.manifest import Manifest
from sandrun.sandbox import namespaces as ns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    base = tmp_path / "job"
    base.mkdir()
    ns.mount("tmpfs", str(base), "tmpfs", ns.MS_NOSUID | ns.MS_NODEV,
             "size=4194304,mode=0711,nr_inodes=1024")
    try:
        (base / "work").mkdir()
        (base / "staging").mkdir()
        yield base
    finally:
        ns.umount(str(base))


def test_a_snippet_is_small_and_many_files_or_many_bytes_are_not(tmpfs: Path) -> None:
    (tmpfs / "work/main.py").write_text("print(1)\n")
    assert store.is_small(str(tmpfs))
    for i in range(store.SMALL_JOB_INODES):
        (tmpfs / f"work/f{i}").write_bytes(b"")
    assert not store.is_small(str(tmpfs))
    for i in range(store.SMALL_JOB_INODES):
        (tmpfs / f"work/f{i}").unlink()
    assert store.is_small(str(tmpfs))
    (tmpfs / "work/data").write_bytes(b"x" * (store.SMALL_JOB_BYTES + 4096))
    assert not store.is_small(str(tmpfs))


def test_a_directory_that_is_no_capped_tmpfs_is_never_small(tmp_path: Path) -> None:
    assert not store.is_small(str(tmp_path))  # the host's file system: thousands of inodes
    assert not store.is_small(str(tmp_path / "missing"))


class _Job:
    def __init__(self, base: str, requirements: str | None) -> None:
        self.base_dir = base
        self.manifest = Manifest(entrypoint="main.py", interpreter="python3",
                                 requirements=requirements)


def test_the_manager_calls_here_for_a_small_job_and_in_its_pool_otherwise(
        tmpfs: Path) -> None:
    from sandrun.jobs.manager import JobManager

    pooled: list[Any] = []
    manager: Any = JobManager.__new__(JobManager)  # only ``blocking`` is used here
    manager.blocking = lambda f, *a, **k: pooled.append(f) or defer.succeed(f(*a, **k))
    (tmpfs / "work/main.py").write_text("print(1)\n")

    here = JobManager._blocking_for(manager, _Job(str(tmpfs), None))(lambda: "ran")
    assert here.result == "ran" and pooled == []
    fetch = JobManager._blocking_for(manager, _Job(str(tmpfs), "requirements.txt"))
    assert fetch(lambda: "fetched").result == "fetched" and len(pooled) == 1
    (tmpfs / "work/data").write_bytes(b"x" * (store.SMALL_JOB_BYTES + 4096))
    big = JobManager._blocking_for(manager, _Job(str(tmpfs), None))
    assert big(lambda: "listed").result == "listed" and len(pooled) == 2
