"""``sandrun install-service`` and the one-line journal log, without systemd."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from sandrun import deploy
from sandrun.daemon import journal_line


def read_unit(tmp_path: Path, unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (tmp_path / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_worker_unit_delegates_its_cgroup_restarts_and_names_this_installs_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    assert deploy.install_service(unit_dir=str(tmp_path), systemd=lambda: True,
                                  run=lambda argv, check: calls.append(argv)) == 0
    unit = read_unit(tmp_path, "sandrun.service")
    assert unit["Delegate"] == ["yes"] and unit["Restart"] == ["on-failure"]
    assert unit["StateDirectory"] == ["sandrun"] and unit["CacheDirectory"] == ["sandrun"]
    # Options that would take away what the sandbox needs are absent.
    for option in ("ProtectControlGroups", "ProtectKernelTunables", "RestrictNamespaces",
                   "PrivateDevices", "CapabilityBoundingSet", "MemoryDenyWriteExecute",
                   "ProtectHostname"):
        assert option not in unit, option
    serve = unit["ExecStart"][0].split()
    assert serve[0] == deploy.command_path("sandrun", "sandrun") and serve[1] == "serve"
    assert os.path.isabs(serve[0])
    assert "--worker-key" in serve and "$SANDRUN_ARGS" in serve
    assert "@" not in (tmp_path / "sandrun.service").read_text().replace("\\@", "")
    assert calls == [["systemctl", "daemon-reload"],
                     ["systemctl", "enable", "--now", "sandrun.service"]]


def test_the_coordinator_unit_runs_unprivileged_and_waits_for_a_pool_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(deploy, "WORKERS_FILE", str(tmp_path / "absent.json"))
    deploy.install_service(coordinator=True, unit_dir=str(tmp_path), systemd=lambda: True,
                           run=lambda argv, check: calls.append(argv))
    unit = read_unit(tmp_path, "sandrun-coordinator.service")
    assert unit["DynamicUser"] == ["yes"] and unit["CapabilityBoundingSet"] == [""]
    assert "--workers /etc/sandrun/workers.json" in unit["ExecStart"][0]
    assert calls == [["systemctl", "daemon-reload"]]  # not started without a pool
    assert "absent.json" in capsys.readouterr().out


def test_a_journal_line_is_one_line_with_a_priority_even_with_a_traceback() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        failure = Failure()
    event: dict[str, Any] = {"log_format": "job {n} failed", "n": 3, "log_level": LogLevel.error,
                             "log_namespace": "sandrun.jobs", "log_failure": failure}
    line = journal_line(event)
    assert line.endswith("\n") and line.count("\n") == 1
    assert line.startswith("<3>sandrun.jobs: job 3 failed: ")
    assert "ValueError: bad | thing" in line
    info = {"log_format": "listening", "log_level": LogLevel.info, "log_namespace": "x"}
    assert journal_line(info) == "<6>x: listening\n"


def test_logging_to_a_plain_stderr_keeps_the_time_stamped_format() -> None:
    from sandrun import daemon

    assert not daemon._stderr_is_journal() or "JOURNAL_STREAM" in os.environ
    stream = io.StringIO()
    from twisted.logger import textFileLogObserver

    textFileLogObserver(stream)({"log_format": "x", "log_level": LogLevel.info,
                                 "log_time": 0.0, "log_namespace": "n"})
    assert stream.getvalue().startswith("1970-")
