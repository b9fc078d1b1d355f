"""The job's init, the parts that need no namespace: where a command line lies, and
how a job's own node names are checked before any device is made for it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandrun.sandbox import devices, pid1

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_arg_area_is_where_the_kernel_reads_the_command_line() -> None:
    start, end = pid1.arg_area()
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read()
    assert end - start == len(cmdline)


def test_prepare_leaves_a_command_line_and_name_without_any_host_path() -> None:
    # In a child of its own: prepare() blocks signals, leaves the session, renames.
    code = ("import os; from sandrun.sandbox import pid1\n"
            "pid1.prepare(pid1.arg_area())\n"
            "print(open('/proc/self/cmdline', 'rb').read().rstrip(b'\\0').decode(),"
            " open('/proc/self/comm').read().strip(), os.getsid(0) == os.getpid())\n")
    out = subprocess.run([sys.executable, "-c", code, "/secret/host/path"], check=True,
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=REPO)).stdout
    assert out == "sandrun-init sandrun-init True\n"


@pytest.mark.parametrize("nodes", [
    (("mem", 1, 1),), (("nvidia0/../mem", 1, 1),), (("nvidia-modeset", 195, 254),),
    (("nvidia0", 0, 0),), (("nvidiactl", 195, -1),),
])
def test_only_nvidia_node_names_with_plausible_numbers_are_accepted(
        nodes: tuple[tuple[str, int, int], ...]) -> None:
    with pytest.raises(devices.DeviceError):
        devices.check_nodes(nodes)


def test_the_device_rules_allow_the_standard_five_and_the_given_nodes_only() -> None:
    nodes = (("nvidia3", 195, 3), ("nvidiactl", 195, 255), ("nvidia-uvm", 508, 0))
    devices.check_nodes(nodes)
    assert devices.rules(nodes) == ["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm",
                                    "c 1:9 rwm", "c 195:3 rwm", "c 195:255 rwm",
                                    "c 508:0 rwm"]
