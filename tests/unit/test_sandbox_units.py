"""The sandbox's pure parts, without root: outcome classification, BPF files, the wire format."""

from __future__ import annotations

import json
import os
import signal

import pytest
from twisted.internet.task import Clock

from sandrun.sandbox import mounts, seccomp
from sandrun.sandbox.policy import JOB_DIR, SANDBOX_PATH, LaunchRequest, MiB, SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox, _RunningJob, classify
from sandrun.wire import Reason


def exited(code: int) -> int:
    return code << 8


def killed(sig: int, core: bool = False) -> int:
    return sig | (0x80 if core else 0)


# -- classify --------------------------------------------------------------------------------


@pytest.mark.parametrize("status,kill_reason,oom,expected", [
    (exited(0), None, False, (Reason.COMPLETED, 0, None)),
    (exited(1), None, False, (Reason.EXIT_NONZERO, 1, None)),
    (exited(255), None, False, (Reason.EXIT_NONZERO, 255, None)),
    (killed(signal.SIGSEGV), None, False, (Reason.SIGNALED, None, signal.SIGSEGV)),
    (killed(signal.SIGABRT, core=True), None, False, (Reason.SIGNALED, None, signal.SIGABRT)),
    (killed(signal.SIGSYS), None, False, (Reason.SIGNALED, None, signal.SIGSYS)),
    (killed(signal.SIGXFSZ), None, False, (Reason.DISK_LIMIT, None, signal.SIGXFSZ)),
    (killed(signal.SIGKILL), None, True, (Reason.MEMORY_LIMIT, None, signal.SIGKILL)),
    # The OOM killer may take a child while the main process exits on its own.
    (exited(1), None, True, (Reason.MEMORY_LIMIT, 1, None)),
    (killed(signal.SIGKILL), Reason.TIMEOUT, False, (Reason.TIMEOUT, None, signal.SIGKILL)),
    (killed(signal.SIGKILL), Reason.CPU_LIMIT, False, (Reason.CPU_LIMIT, None, signal.SIGKILL)),
    (killed(signal.SIGKILL), Reason.CANCELLED, False, (Reason.CANCELLED, None, signal.SIGKILL)),
    # Whoever asked for the kill decides, even over an OOM seen on the way down...
    (killed(signal.SIGKILL), Reason.OUTPUT_LIMIT, True,
     (Reason.OUTPUT_LIMIT, None, signal.SIGKILL)),
    # ...and even when the job exited by itself before the kill landed.
    (exited(0), Reason.TIMEOUT, False, (Reason.TIMEOUT, 0, None)),
])
def test_classify_turns_every_ending_into_one_reason(
        status: int, kill_reason: Reason | None, oom: bool,
        expected: tuple[Reason, int | None, int | None]) -> None:
    assert classify(status, kill_reason, oom) == expected


def test_classify_reports_exit_code_or_signal_never_both() -> None:
    for status in (exited(0), exited(7), killed(signal.SIGTERM), killed(signal.SIGKILL)):
        _, code, sig = classify(status, None, False)
        assert (code is None) != (sig is None)


# -- output cap, on a supervisor that has no launcher -------------------------------------------


def _job(cap: int) -> tuple[Sandbox, _RunningJob, list[tuple[str, bytes]]]:
    sandbox = Sandbox(Clock(), "/nonexistent", "unit", 1)
    delivered: list[tuple[str, bytes]] = []
    job = _RunningJob("j", SandboxPolicy(output_cap_bytes=cap),
                      lambda stream, data: delivered.append((stream, data)))
    sandbox.jobs["j"] = job
    return sandbox, job, delivered


def test_output_over_the_cap_is_cut_at_the_cap_and_kills_once() -> None:
    sandbox, job, delivered = _job(10)
    sandbox._on_output(job, "stdout", b"12345678")
    sandbox._on_output(job, "stdout", b"abcdef")
    sandbox._on_output(job, "stdout", b"more")
    assert b"".join(d for _, d in delivered) == b"12345678ab"
    assert job.truncated == {"stdout": True, "stderr": False}
    assert job.kill_reason == Reason.OUTPUT_LIMIT
    assert len(job.timers) == 1  # one kill (and its one retry timer), not one per chunk


def test_output_that_fills_the_cap_exactly_is_killed_at_the_next_byte() -> None:
    sandbox, job, delivered = _job(8)
    sandbox._on_output(job, "stderr", b"12345678")
    assert job.kill_reason is None and job.truncated["stderr"] is False
    sandbox._on_output(job, "stderr", b"9")
    assert job.kill_reason == Reason.OUTPUT_LIMIT
    assert job.truncated == {"stdout": False, "stderr": True}
    assert delivered == [("stderr", b"12345678")]


def test_each_stream_has_its_own_cap() -> None:
    sandbox, job, delivered = _job(4)
    sandbox._on_output(job, "stdout", b"1234")
    sandbox._on_output(job, "stderr", b"abcd")
    assert job.kill_reason is None
    assert delivered == [("stdout", b"1234"), ("stderr", b"abcd")]


# -- seccomp programs ----------------------------------------------------------------------------


def test_programs_survive_the_trip_through_one_file() -> None:
    programs = [bytes(range(16)), b"\xff" * 8, bytes(8 * 300)]
    assert seccomp.split_programs(seccomp.join_programs(programs)) == programs


@pytest.mark.parametrize("data", [
    b"",  # nothing at all
    (12).to_bytes(4, "little") + bytes(12),  # not whole instructions
    (16).to_bytes(4, "little") + bytes(8),  # cut short
    (0).to_bytes(4, "little"),  # an empty program
    seccomp.join_programs([bytes(8)]) + b"\x01",  # trailing junk
], ids=["empty", "partial-instruction", "truncated", "zero-length", "trailing"])
def test_a_corrupt_program_file_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        seccomp.split_programs(data)


def test_the_built_filters_are_whole_bpf_programs() -> None:
    programs = seccomp.build_filters()
    assert len(programs) == 2
    for program in programs:
        assert len(program) % 8 == 0 and 0 < len(program) // 8 < 4096  # BPF_MAXINSNS


def test_no_blocked_system_call_is_on_the_allow_list() -> None:
    assert not set(seccomp.ALLOWED_SYSCALLS) & set(seccomp.BLOCKED_SYSCALLS)
    for name in ("clone", "clone3", "socket", "socketpair", "personality"):
        # allowed only with argument checks, never wholesale
        assert name not in seccomp.ALLOWED_SYSCALLS
    for spec_name in ("ptrace", "mount", "unshare", "setns", "bpf", "userfaultfd",
                      "io_uring_setup", "kexec_load", "init_module", "open_by_handle_at"):
        assert spec_name in seccomp.BLOCKED_SYSCALLS


# -- the launch request on the wire ---------------------------------------------------------------


def test_a_launch_request_round_trips_through_json() -> None:
    request = LaunchRequest(
        argv=("python3", "main.py", "é"), env=(("A", "1"), ("B", "x=y")),
        job_dir="/var/lib/sandrun/jobs/abc", uid=60001, gid=60001,
        policy=SandboxPolicy(memory_bytes=64 * MiB, pids_max=10, timeout_seconds=1.5,
                             cpu_seconds=0.25, output_cap_bytes=100, tmp_bytes=MiB,
                             shm_bytes=2 * MiB, open_files=64, file_size_bytes=1000,
                             stack_bytes=MiB, hostname="h"),
        ro_binds=(("/srv/env", "/opt/env"),))
    again = LaunchRequest.from_wire(json.loads(json.dumps(request.to_wire())))
    assert again == request
    assert again.policy.cpu_seconds == 0.25


def test_a_default_request_round_trips_with_no_cpu_cap() -> None:
    request = LaunchRequest(argv=("true",), env=(), job_dir="/j", uid=1, gid=2)
    again = LaunchRequest.from_wire(json.loads(json.dumps(request.to_wire())))
    assert again == request and again.policy.cpu_seconds is None


def test_a_request_with_an_unknown_policy_field_is_refused() -> None:
    wire = LaunchRequest(argv=("true",), env=(), job_dir="/j", uid=1, gid=1).to_wire()
    wire["policy"]["privileged"] = True
    with pytest.raises(TypeError):
        LaunchRequest.from_wire(wire)


def test_the_sandbox_variables_win_over_the_manifests() -> None:
    request = LaunchRequest(argv=("env",), env=(("PATH", "/evil"), ("HOME", "/"),
                                                ("MINE", "kept")),
                            job_dir="/j", uid=1, gid=1)
    assert request.environment() == {"PATH": SANDBOX_PATH, "HOME": JOB_DIR,
                                     "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                                     "TMPDIR": "/tmp", "TERM": "dumb", "MINE": "kept"}



# -- the loopback request ------------------------------------------------------------------------


def test_the_loopback_request_sets_interface_1_up_and_asks_for_an_ack() -> None:
    import struct

    from sandrun.sandbox.network import loopback_up_request

    message = loopback_up_request()
    length, kind, flags, _seq, _ = struct.unpack_from("=IHHII", message)
    assert length == len(message)
    assert kind == 16  # RTM_NEWLINK
    assert flags == 0x1 | 0x4  # NLM_F_REQUEST | NLM_F_ACK
    # struct ifinfomsg: family, pad, type, index, flags, change
    _, _, _, index, if_flags, change = struct.unpack_from("=BBHiII", message, 16)
    assert (index, if_flags, change) == (1, 0x1, 0x1)  # lo, IFF_UP, only IFF_UP changes


# -- a timer that fires late -------------------------------------------------------------------


def _exited(sandbox: Sandbox, job: _RunningJob, wall_ms: float, status: int) -> None:
    job.open_streams = 0
    job.exit_event = {"event": "exited", "wait_status": status, "wall_time_ms": wall_ms,
                      "cpu_seconds": 0.01, "memory_peak_bytes": 4096, "oom_killed": False}
    sandbox._maybe_done(job)


def test_a_job_that_ended_within_its_time_is_not_a_timeout_though_the_timer_ran_first() -> None:
    sandbox = Sandbox(Clock(), "/nonexistent", "unit", 1)
    job = _RunningJob("j", SandboxPolicy(timeout_seconds=5), lambda stream, data: None)
    sandbox.jobs["j"] = job
    job.kill_reason = Reason.TIMEOUT  # the reactor was busy past the deadline
    _exited(sandbox, job, 2100.0, exited(0))
    result = job.done.result
    assert (result.reason, result.exit_code) == (Reason.COMPLETED, 0)


def test_a_job_killed_at_its_timeout_is_a_timeout() -> None:
    sandbox = Sandbox(Clock(), "/nonexistent", "unit", 1)
    job = _RunningJob("j", SandboxPolicy(timeout_seconds=5), lambda stream, data: None)
    sandbox.jobs["j"] = job
    job.kill_reason = Reason.TIMEOUT
    _exited(sandbox, job, 5003.0, killed(signal.SIGKILL))
    result = job.done.result
    assert (result.reason, result.signal) == (Reason.TIMEOUT, signal.SIGKILL)


def test_the_loopback_request_is_byte_for_byte_what_pyroute2_encodes() -> None:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWLINK
    from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

    from sandrun.sandbox.network import loopback_up_request

    msg = ifinfmsg()
    msg["index"] = 1
    msg["flags"] = IFF_UP
    msg["change"] = IFF_UP
    msg["header"]["type"] = RTM_NEWLINK
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = 1
    msg.encode()
    assert loopback_up_request() == bytes(msg.data)


# -- the sandbox's /etc ------------------------------------------------------------------------


def test_the_sandbox_etc_has_each_pythons_own_directory_and_nothing_unlisted(tmp_path) -> None:
    # A host /etc as Ubuntu 24.04 (python3.12) or Debian 12 (python3.11) lays it out.
    host = tmp_path / "etc"
    for name in ("python3", "python3.11", "python3.12", "ssl/certs", "ssl/private"):
        (host / name).mkdir(parents=True)
    (host / "python3.12" / "sitecustomize.py").write_text("# apport hook\n")
    (host / "python3.11" / "sitecustomize.py").write_text("# 3.11\n")
    (host / "python3" / "debian_config").write_text("[DEFAULT]\n")
    (host / "ssl" / "certs" / "ca.pem").write_text("cert\n")
    (host / "ssl" / "private" / "key.pem").write_text("secret\n")
    (host / "shadow").write_text("root:secret\n")
    (host / "localtime").symlink_to("/usr/share/zoneinfo/Nowhere")   # dangling here
    dest = tmp_path / "sandbox-etc"

    mounts.prepare_etc(str(dest), range(1000, 1002), {1000: 1000, 1001: 1001},
                       host_etc=str(host))

    assert (dest / "python3.12" / "sitecustomize.py").read_text() == "# apport hook\n"
    assert (dest / "python3.11" / "sitecustomize.py").read_text() == "# 3.11\n"
    assert (dest / "python3" / "debian_config").exists()
    assert (dest / "ssl" / "certs" / "ca.pem").exists()
    assert os.readlink(dest / "localtime") == "/usr/share/zoneinfo/Nowhere"
    assert not (dest / "shadow").exists()
    assert not (dest / "ssl" / "private").exists()
    assert "job1001:x:1001:1001:" in (dest / "passwd").read_text()
