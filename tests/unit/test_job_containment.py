"""Containment pieces without a kernel: CPU bandwidth files, swap detection, sync denied."""

from __future__ import annotations

import os
from typing import Any

import pytest

from sandrun.sandbox import cgroups, seccomp


@pytest.mark.parametrize("cpus,quota", [(1.0, 100_000), (0.5, 50_000), (2.5, 250_000),
                                        (0.001, 1000)])
def test_a_cpu_limit_is_written_as_v2_cpu_max(tmp_path: Any, cpus: float, quota: int) -> None:
    (tmp_path / "cpu.max").write_text("max 100000")
    cgroups.set_cpu_limit(2, str(tmp_path), cpus)
    assert (tmp_path / "cpu.max").read_text() == f"{quota} 100000"


def test_a_cpu_limit_is_written_as_v1_cfs_quota_and_period(tmp_path: Any) -> None:
    (tmp_path / "cpu.cfs_period_us").write_text("100000")
    (tmp_path / "cpu.cfs_quota_us").write_text("-1")
    cgroups.set_cpu_limit(1, str(tmp_path), 1.0)
    assert (tmp_path / "cpu.cfs_period_us").read_text() == "100000"
    assert (tmp_path / "cpu.cfs_quota_us").read_text() == "100000"


def test_a_failed_cpu_limit_raises_so_the_job_does_not_run(tmp_path: Any) -> None:
    with pytest.raises(OSError):
        cgroups.set_cpu_limit(2, os.path.join(str(tmp_path), "gone"), 1.0)


@pytest.mark.parametrize("text,on", [
    ("Filename\tType\tSize\tUsed\tPriority\n", False),
    ("Filename\tType\tSize\tUsed\tPriority\n/swapfile file 1048572 0 -2\n", True),
    ("", False),
])
def test_swap_is_on_when_proc_swaps_lists_an_area(text: str, on: bool) -> None:
    assert cgroups.swap_on(text) is on


def test_sync_and_syncfs_are_denied_while_fsync_stays_allowed() -> None:
    assert {"sync", "syncfs"} <= set(seccomp.BLOCKED_SYSCALLS)
    assert not {"sync", "syncfs"} & set(seccomp.ALLOWED_SYSCALLS)
    assert {"fsync", "fdatasync"} <= set(seccomp.ALLOWED_SYSCALLS)


def manager_without_swap_caps(monkeypatch: Any, proc_swaps: str) -> cgroups.CgroupManager:
    manager = object.__new__(cgroups.CgroupManager)
    manager.v1_memsw = manager.v2_swap = False
    monkeypatch.setattr(cgroups, "_read", lambda path: proc_swaps)
    return manager


def test_a_host_with_swap_on_and_no_per_job_cap_is_refused_at_start(monkeypatch: Any) -> None:
    on = "Filename\tType\tSize\tUsed\tPriority\n/swapfile file 1048572 0 -2\n"
    assert manager_without_swap_caps(monkeypatch, on).swap_unlimited() is True
    assert manager_without_swap_caps(monkeypatch, on.splitlines()[0] + "\n") \
        .swap_unlimited() is False
    capped = manager_without_swap_caps(monkeypatch, on)
    capped.v1_memsw = True
    assert capped.swap_unlimited() is False
