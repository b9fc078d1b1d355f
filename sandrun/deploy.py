"""``sandrun install-service``: install the systemd units shipped in ``sandrun/systemd``.

``sandrun.service`` runs the worker with ``Delegate=yes`` (its job cgroups go
beneath its own, see ``sandbox.cgroups``), restarts it on failure, keeps its
key and templates in ``/var/lib/sandrun`` and fetched dependencies in
``/var/cache/sandrun``; ``sandrun-coordinator.service`` runs the coordinator
unprivileged.  The units name this installation's own commands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

UNIT_DIR = "/etc/systemd/system"
UNITS_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "systemd")
WORKER_UNIT = "sandrun.service"
COORDINATOR_UNIT = "sandrun-coordinator.service"
WORKERS_FILE = "/etc/sandrun/workers.json"


def command_path(name: str, module: str) -> str:
    """This installation's ``name`` command: beside our Python (a venv), on the PATH, or -m."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return os.path.abspath(found) if found else f"{sys.executable} -m {module}"


def unit_text(unit: str) -> str:
    with open(os.path.join(UNITS_SOURCE, unit)) as f:
        text = f.read()
    return (text.replace("@SANDRUN_COORDINATOR@", command_path("sandrun-coordinator",
                                                                "coordinator"))
            .replace("@SANDRUN@", command_path("sandrun", "sandrun")))


def systemd_runs() -> bool:
    return shutil.which("systemctl") is not None and os.path.isdir("/run/systemd/system")


def install_service(coordinator: bool = False, start: bool = True, unit_dir: str = UNIT_DIR,
                    run: Callable[..., Any] = subprocess.run,
                    systemd: Callable[[], bool] = systemd_runs) -> int:
    """Write the unit, reload systemd, enable and start it (unless ``start`` is false)."""
    unit = COORDINATOR_UNIT if coordinator else WORKER_UNIT
    path = os.path.join(unit_dir, unit)
    os.makedirs(unit_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(unit_text(unit))
    os.chmod(path + ".tmp", 0o644)
    os.replace(path + ".tmp", path)
    print(f"installed {path}")
    if not systemd():
        print("systemd is not running here: start it with `systemctl enable --now "
              f"{unit}` on a host that runs systemd")
        return 0
    run(["systemctl", "daemon-reload"], check=True)
    if coordinator and not os.path.exists(WORKERS_FILE):
        print(f"write the pool to {WORKERS_FILE} (see workers.json.example), then: "
              f"systemctl enable --now {unit}")
        return 0
    if start:
        run(["systemctl", "enable", "--now", unit], check=True)
        print(f"started {unit}: `systemctl status {unit}`, `journalctl -u {unit}`")
    else:
        print(f"start it with: systemctl enable --now {unit}")
    return 0
