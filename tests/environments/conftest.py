"""A real sandbox for the environment tests: root, cgroups, the host's interpreters.

Its own launcher with its own uids (60070-60071) and worker instance name,
so it never meets the sandbox of ``tests/integration`` when both run in one
session.  The jobs here are benign (installs and imports): the hostile cases
are ``tests/integration``'s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from sandrun.sandbox.supervisor import Sandbox

UID_BASE = 60070
SLOTS = 2
CGROUP_ROOT = "/sys/fs/cgroup"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: namespaces, mounts, cgroups and uid changes"
    if not os.path.isdir(CGROUP_ROOT):
        return "no cgroup filesystem"
    return None


def _instance_dirs(instance: str) -> list[str]:
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                found.append(os.path.join(CGROUP_ROOT, path.lstrip("/"), instance))
            for controller in controllers.split(","):
                if controller in ("memory", "pids", "cpuacct"):
                    found.append(os.path.join(CGROUP_ROOT, controller, path.lstrip("/"),
                                              instance))
    return found


def _remove_tree(path: str) -> None:
    for _ in range(100):
        try:
            for top, dirs, _files in os.walk(path, topdown=False):
                for d in dirs:
                    os.rmdir(os.path.join(top, d))
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


@pytest.fixture(scope="session")
def env_sandbox(twisted_greenlet: Any) -> Iterator[Sandbox]:
    why = _why_not()
    if why:
        pytest.skip(why)
    from twisted.internet import reactor

    instance = f"sandrun-envtest-{uuid.uuid4().hex[:8]}"
    state_dir = tempfile.mkdtemp(prefix="sandrun-envstate-")
    sandbox = Sandbox(reactor, state_dir, instance, SLOTS, uid_base=UID_BASE)
    pytest_twisted.blockon(sandbox.start())
    yield sandbox
    sandbox.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    for directory in _instance_dirs(instance):
        _remove_tree(directory)
