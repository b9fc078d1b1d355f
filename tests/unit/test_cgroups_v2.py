"""cgroup v2 delegation and statistics, on a fake v2 tree in a temporary directory.

The kernel's rules (no internal processes, controllers given down by the
parent) are what ``locate_v2`` and ``CgroupManager`` must respect; here the
tree only holds the files they read, so each case of where a worker can be
started is pinned without a v2 host.  The real kernel is exercised by the
integration tests on a v2 host (``scripts/vm-check.sh``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandrun.sandbox import cgroups
from sandrun.sandbox.cgroups import CgroupManager, DelegationError, JobCgroup, locate_v2

ALL = "cpuset cpu io memory hugetlb pids rdma misc"
WORKER, LAUNCHER, SSHD, SHELL = 4100, 4101, 812, 813


class FakeTree:
    """A v2 hierarchy with just the files Sandrun reads; ``where`` is our /proc/self/cgroup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "cgroup.controllers").write_text(ALL + "\n")
        (root / "cgroup.procs").write_text("1\n2\n")
        (root / "cgroup.subtree_control").write_text("")
        self.proc_file = root.parent / "proc-self-cgroup"

    def cgroup(self, path: str, procs: tuple[int, ...] = (), controllers: str = ALL) -> Path:
        d = self.root / path.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.controllers").write_text(controllers + "\n")
        (d / "cgroup.type").write_text("domain\n")
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
        (d / "cgroup.subtree_control").write_text("")
        return d

    def start_in(self, path: str) -> str:
        self.proc_file.write_text(f"0::{path}\n")
        return str(self.proc_file)

    def manager(self, ours: frozenset[int] = frozenset({WORKER})) -> CgroupManager:
        return CgroupManager("sandrun-test", root=str(self.root), ours=ours,
                             proc_file=str(self.proc_file))


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    root = tmp_path / "cgroup"
    root.mkdir()
    return FakeTree(root)


def kernel_files(d: Path) -> None:
    """What the kernel would put in a directory the manager makes."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        (d / name).write_text("")


def test_a_login_sessions_scope_is_refused_in_one_line_that_says_what_to_do(
        tree: FakeTree) -> None:
    scope = tree.cgroup("/user.slice/user-0.slice/session-3.scope", (SSHD, SHELL, WORKER))
    proc = tree.start_in("/user.slice/user-0.slice/session-3.scope")
    with pytest.raises(DelegationError) as caught:
        locate_v2(str(tree.root), frozenset({WORKER}), proc)
    message = str(caught.value)
    assert "\n" not in message
    assert "/user.slice/user-0.slice/session-3.scope" in message
    assert "2 processes that are not Sandrun's" in message
    assert "systemd-run --scope -p Delegate=yes" in message and "systemd unit" in message
    # Nothing was touched: no leaf made, nobody moved, no controller enabled.
    with pytest.raises(DelegationError):
        tree.manager()
    assert sorted(os.listdir(scope)) == ["cgroup.controllers", "cgroup.procs",
                                         "cgroup.subtree_control", "cgroup.type"]
    assert (scope / "cgroup.subtree_control").read_text() == ""


def test_a_cgroup_without_the_cpu_controller_is_refused_by_name(tree: FakeTree) -> None:
    tree.cgroup("/system.slice/sandrun.service", (WORKER,), controllers="memory pids")
    tree.start_in("/system.slice/sandrun.service")
    with pytest.raises(DelegationError, match=r"the cpu controller not available in "
                                              r"/system\.slice/sandrun\.service.*Delegate=yes"):
        tree.manager()


def test_a_read_only_cgroup_tree_is_refused_with_what_a_container_needs(
        tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.cgroup("/", ())
    # As a container without --privileged sees it: /sys/fs/cgroup mounted read-only.
    monkeypatch.setattr(cgroups.os, "access", lambda path, mode: False)
    with pytest.raises(DelegationError, match=r"cgroup v2: / is not writable here.*"
                                              r"--privileged --cgroupns=private"):
        locate_v2(str(tree.root), frozenset({WORKER}), tree.start_in("/"))


def test_missing_controllers_are_all_named(tree: FakeTree) -> None:
    tree.cgroup("/svc", (WORKER,), controllers="io")
    with pytest.raises(DelegationError, match="the memory, pids, cpu controllers not"):
        locate_v2(str(tree.root), frozenset({WORKER}), tree.start_in("/svc"))


def test_a_delegated_cgroup_moves_only_our_processes_into_a_leaf_beside_the_jobs(
        tree: FakeTree) -> None:
    unit = tree.cgroup("/system.slice/sandrun.service", (WORKER,))
    tree.start_in("/system.slice/sandrun.service")
    kernel_files(unit / "supervisor")
    kernel_files(unit / "sandrun-test")
    manager = tree.manager(frozenset({WORKER, LAUNCHER}))  # the launcher is not in it yet
    assert manager.version == 2
    assert manager.bases == {k: str(unit / "sandrun-test") for k in ("memory", "pids", "cpu")}
    assert (unit / "supervisor" / "cgroup.procs").read_text() == str(WORKER)
    assert (unit / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (unit / "sandrun-test" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"


def test_started_again_from_its_own_leaf_it_uses_the_same_subtree_not_a_deeper_one(
        tree: FakeTree) -> None:
    unit = tree.cgroup("/system.slice/sandrun.service")
    tree.cgroup("/system.slice/sandrun.service/supervisor", (WORKER,))
    subtree, movers = locate_v2(str(tree.root), frozenset({WORKER}),
                                tree.start_in("/system.slice/sandrun.service/supervisor"))
    assert subtree == str(unit) and movers == []


def test_started_from_the_root_cgroup_it_moves_nobody_and_paths_have_no_trailing_slash(
        tree: FakeTree) -> None:
    tree.start_in("/")
    kernel_files(tree.root / "sandrun-test")
    subtree, movers = locate_v2(str(tree.root), frozenset({WORKER}), str(tree.proc_file))
    assert subtree == str(tree.root) and movers == []  # kernel threads and init stay put
    manager = tree.manager()
    assert manager.bases["memory"] == str(tree.root / "sandrun-test")
    assert not (tree.root / "supervisor").exists()
    assert (tree.root / "cgroup.procs").read_text() == "1\n2\n"


def test_a_containers_own_cgroup_namespace_root_is_not_taken_for_the_real_root(
        tree: FakeTree) -> None:
    # In a container with its own cgroup namespace "/" is a non-root cgroup: it has
    # a cgroup.type, and the no-internal-processes rule applies to it.
    (tree.root / "cgroup.type").write_text("domain\n")
    (tree.root / "cgroup.procs").write_text(f"{WORKER}\n")
    subtree, movers = locate_v2(str(tree.root), frozenset({WORKER, LAUNCHER}),
                                tree.start_in("/"))
    assert subtree == str(tree.root) and movers == [WORKER]
    (tree.root / "cgroup.procs").write_text(f"{WORKER}\n77\n")
    with pytest.raises(DelegationError, match="1 process that is not Sandrun's"):
        locate_v2(str(tree.root), frozenset({WORKER}), tree.start_in("/"))


def test_memory_events_report_an_oom_kill_and_cpu_stat_the_time_used(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text(
        "low 0\nhigh 0\nmax 1432\noom 3\noom_kill 1\noom_group_kill 0\n")
    (tmp_path / "cpu.stat").write_text(
        "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n")
    group = JobCgroup(2, {k: str(tmp_path) for k in ("memory", "pids", "cpu")}, cpu_base=0.5)
    assert group.oom_killed()
    assert group.cpu_seconds() == pytest.approx(2.0)
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 0\n")
    assert not group.oom_killed()  # memory.max was reached, but nothing was killed for it


def test_keyed_files_skip_what_is_not_a_number() -> None:
    assert cgroups.parse_keyed("oom_kill 2\nweird\nlow x\n\n") == {"oom_kill": 2}


class Exec(Exception):
    """os.execv was called (and would not have returned)."""


def refuse(*args: object, **kwargs: object) -> None:
    raise DelegationError("cgroup v2: /user.slice/session-3.scope also holds 2 processes that "
                          "are not Sandrun's; run it as its systemd unit")


def test_serve_from_a_login_session_re_runs_itself_in_a_delegated_scope(
        tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandrun import cli

    execs: list[list[str]] = []
    monkeypatch.setattr(cgroups, "ROOT", str(tree.root))
    monkeypatch.setattr(cgroups, "locate_v2", refuse)
    monkeypatch.setattr(cli.os.path, "isdir", lambda path: path == "/run/systemd/system")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/systemd-run")
    environ: dict[str, str] = {}
    monkeypatch.setattr(cli.os, "environ", environ)

    def execv(path: str, argv: list[str]) -> None:
        execs.append(argv)
        raise Exec

    monkeypatch.setattr(cli.os, "execv", execv)
    with pytest.raises(Exec):
        cli.ensure_own_cgroup(["/opt/sandrun/bin/python", "-m", "sandrun", "serve"])
    assert execs == [["/usr/bin/systemd-run", "--scope", "--quiet", "--collect", "-p",
                      "Delegate=yes", "--description=sandrun", "--",
                      "/opt/sandrun/bin/python", "-m", "sandrun", "serve"]]
    assert environ[cli.IN_SCOPE] == "1"  # so that the re-run never loops


def test_without_systemd_or_once_in_its_scope_it_exits_with_the_one_line(
        tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandrun import cli

    monkeypatch.setattr(cgroups, "ROOT", str(tree.root))
    monkeypatch.setattr(cgroups, "locate_v2", refuse)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SystemExit) as exited:
        cli.ensure_own_cgroup(["sandrun", "serve"])
    assert str(exited.value.code).startswith("sandrun: cannot start: cgroup v2: /user.slice/")
    assert "\n" not in str(exited.value.code)


def test_what_our_processes_started_is_ours_too_and_moves_with_them(tree: FakeTree) -> None:
    # The worker's own children (a launcher, a short-lived probe) are born in its cgroup.
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    try:
        tree.cgroup("/system.slice/sandrun.service", (os.getpid(), child.pid))
        _, movers = locate_v2(str(tree.root), frozenset({os.getpid()}),
                                    tree.start_in("/system.slice/sandrun.service"))
        assert movers == sorted([os.getpid(), child.pid])
        tree.cgroup("/system.slice/sandrun.service", (os.getpid(), child.pid, SSHD))
        with pytest.raises(DelegationError, match="1 process that is not Sandrun's"):
            locate_v2(str(tree.root), frozenset({os.getpid()}), str(tree.proc_file))
    finally:
        child.kill()
        child.wait()
