"""Slots come back on every path, a deep tree is chowned without recursion, /health tells."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

import pytest
from twisted.internet.task import Clock

from sandrun.sandbox import supervisor
from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox, SandboxUnavailable, chown_tree
from sandrun.wire import Reason
from tests.unit.worker_fakes import Harness


def deep_tree(root: str, depth: int) -> str:
    path = root
    for _ in range(depth):
        path = os.path.join(path, "d")
        os.mkdir(path)
    with open(os.path.join(path, "f"), "w") as f:
        f.write("x")
    return path


def test_a_tree_deeper_than_the_recursion_limit_is_chowned_entry_by_entry(
        tmp_path: Any) -> None:
    root = str(tmp_path / "job")
    os.mkdir(root)
    old = os.getcwd()
    os.chdir(root)  # paths deeper than PATH_MAX need not be reachable from here
    try:
        deep_tree(".", 1200)
    finally:
        os.chdir(old)
    try:
        assert chown_tree(root, os.getuid(), os.getgid()) == 1 + 1200 + 1
    finally:
        subprocess.run(["rm", "-rf", root], check=True)  # shutil.rmtree recurses


def test_a_symlink_is_chowned_itself_and_never_followed(tmp_path: Any) -> None:
    root = str(tmp_path / "job")
    os.mkdir(root)
    os.symlink("/", os.path.join(root, "escape"))
    assert chown_tree(root, os.getuid(), os.getgid()) == 2


class _SandboxWithLauncher(Sandbox):
    """A ``Sandbox`` whose launcher end is a socket pair (nothing runs)."""

    def __init__(self, slots: int) -> None:
        super().__init__(Clock(), "/nonexistent", "test", slots)
        self._sock, self.other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


@pytest.mark.parametrize("error", [RecursionError("deep"), ValueError("odd"),
                                   OSError(28, "No space left on device")])
def test_any_error_while_starting_a_run_returns_its_slot(
        tmp_path: Any, monkeypatch: Any, error: Exception) -> None:
    sandbox = _SandboxWithLauncher(slots=2)

    def broken(*args: Any) -> int:
        raise error

    monkeypatch.setattr(supervisor, "chown_tree", broken)
    results = []
    for n in range(3):  # more runs than slots: none may leak
        d = sandbox.run(f"job-{n}", ("true",), (), str(tmp_path), SandboxPolicy(),
                        lambda stream, data: None)
        d.addCallback(results.append)
    assert [r.reason for r in results] == [Reason.SANDBOX_ERROR] * 3
    assert all(r.message and r.message.startswith("spawn: ") for r in results)
    assert sorted(sandbox.free_slots) == [0, 1] and sandbox.problem() is None


def test_a_held_slot_is_not_free_until_returned_and_a_lost_one_is_a_problem() -> None:
    sandbox = _SandboxWithLauncher(slots=2)
    first = sandbox.take_slot()
    second = sandbox.take_slot()
    with pytest.raises(SandboxUnavailable, match="no free slot"):
        sandbox.take_slot()
    sandbox.return_slot(first)
    sandbox.return_slot(first)  # twice is once
    assert sandbox.free_slots == [first.number] and sandbox.problem() is None
    sandbox._held.discard(second.number)  # as a slot leaked by a bug would be
    assert sandbox.problem() == "1 sandbox slot(s) lost"


def test_health_is_503_unhealthy_naming_the_problem_when_no_job_can_run(
        tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    assert h.get("/health").status == 200
    h.sandbox.unavailable = True
    response = h.get("/health")
    assert response.status == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["problem"] == "the sandbox launcher is not running"
