"""Resource exhaustion is contained: the job fails or is refused, the host and worker are fine.

Every bomb here runs only after ``proven_limits`` showed, with benign
probes, that the per-job pids and memory limits hold; and the whole session
sits under the suite's own outer cgroup cap (see ``conftest``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import pytest_twisted

from sandrun.sandbox.policy import MiB, SandboxPolicy
from sandrun.wire import Reason

from .conftest import JobRunner, check_memory_limit, check_pids_limit, processes_of


async def assert_host_fine(runner: JobRunner) -> None:
    """The host can still fork, and the sandbox still runs a job."""
    assert subprocess.run(["/bin/true"], timeout=5).returncode == 0
    ran = await runner.run(("/bin/true",))
    assert ran.reason == Reason.COMPLETED, ran.describe()


# -- the limits themselves, on benign probes -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_pids_limit_stops_a_benign_probe_with_EAGAIN(runner: JobRunner) -> None:
    await check_pids_limit(runner)


@pytest_twisted.ensureDeferred
async def test_the_memory_limit_allows_what_fits_and_stops_what_does_not(
        runner: JobRunner) -> None:
    await check_memory_limit(runner)


# -- processes and threads ---------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_shell_fork_bomb_hits_the_pids_limit_and_leaves_nothing(
        runner: JobRunner, proven_limits: None) -> None:
    policy = SandboxPolicy(pids_max=64, timeout_seconds=15)
    # The bomb goes off in a background subshell, the shell's one fork while nothing
    # else runs; then the shell becomes sleep (exec needs no new process) while the
    # bomb runs against the limit.  (Called directly, the bomb's pipeline would need
    # a second fork of the shell, which could find the limit already reached.)
    ran = await runner.run(("bash", "-c", "( :(){ :|:& };: ) & exec sleep 2"), policy=policy)
    assert (ran.reason, ran.result.exit_code) == (Reason.COMPLETED, 0), ran.describe()
    assert b"Resource temporarily unavailable" in ran.stderr, ran.describe()
    assert 2 <= ran.ended - ran.started < 10
    assert processes_of(runner.uids) == []
    await assert_host_fine(runner)


PYTHON_FORK_BOMB = """
import os, time
said = False
while True:
    try:
        os.fork()
    except OSError as e:
        if not said:
            said = True
            os.write(2, os.strerror(e.errno).encode() + b"\\n")
        time.sleep(0.01)
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_python_fork_bomb_is_held_by_the_pids_limit_until_the_timeout(
        runner: JobRunner, proven_limits: None) -> None:
    policy = SandboxPolicy(pids_max=64, timeout_seconds=2)
    ran = await runner.python(PYTHON_FORK_BOMB, policy=policy)
    assert ran.reason == Reason.TIMEOUT, ran.describe()
    assert ran.result.signal == signal.SIGKILL
    assert b"Resource temporarily unavailable" in ran.stderr, ran.describe()
    assert ran.ended - ran.started < 2 + 1.0
    assert processes_of(runner.uids) == []
    await assert_host_fine(runner)


THREAD_BOMB = """
import threading, time
n = 0
try:
    while n < 10000:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        n += 1
except RuntimeError as e:
    print("stopped", n, e, flush=True)
import os
os._exit(0)
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_thread_bomb_is_stopped_by_the_pids_limit(
        runner: JobRunner, proven_limits: None) -> None:
    ran = await runner.python(THREAD_BOMB, policy=SandboxPolicy(pids_max=64,
                                                                timeout_seconds=10))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.out.startswith("stopped "), ran.describe()
    assert "can't start new thread" in ran.out
    assert 40 <= int(ran.out.split()[1]) < 64  # threads count as tasks
    await assert_host_fine(runner)


MEMORY_BOMB = """
chunks = []
while True:
    chunks.append(bytearray(1 << 20))
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_memory_bomb_ends_with_memory_limit(
        runner: JobRunner, proven_limits: None) -> None:
    ran = await runner.python(MEMORY_BOMB, policy=SandboxPolicy(memory_bytes=96 * MiB,
                                                                timeout_seconds=20))
    assert ran.reason == Reason.MEMORY_LIMIT, ran.describe()
    assert ran.result.signal == signal.SIGKILL
    # The peak is the cgroup's, so it is near the limit and never above it.
    assert 80 * MiB <= ran.result.memory_peak_bytes <= 96 * MiB
    await assert_host_fine(runner)


# -- filling file systems -------------------------------------------------------------------------


FILL = """
import errno, os, sys
written = 0
try:
    with open(sys.argv[1], "wb") as f:
        while True:
            f.write(b"x" * 65536)
            f.flush()
            written += 65536
except OSError as e:
    print(errno.errorcode[e.errno], written, flush=True)
"""


@pytest.mark.parametrize("path,policy,cap", [
    ("/tmp/fill", SandboxPolicy(tmp_bytes=4 * MiB, timeout_seconds=20), 4 * MiB),
    ("/dev/shm/fill", SandboxPolicy(shm_bytes=4 * MiB, timeout_seconds=20), 4 * MiB),
], ids=["tmp", "dev-shm"])
@pytest_twisted.ensureDeferred
async def test_filling_a_scratch_tmpfs_fails_inside_the_job_with_ENOSPC(
        runner: JobRunner, path: str, policy: SandboxPolicy, cap: int) -> None:
    ran = await runner.run(("python3", "-I", "-S", "-c", FILL, path), policy=policy)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    code, written = ran.out.split()
    assert code == "ENOSPC"
    assert cap - 256 * 1024 <= int(written) <= cap
    await assert_host_fine(runner)


@pytest_twisted.ensureDeferred
async def test_filling_the_job_directory_fails_inside_the_job_with_ENOSPC(
        runner: JobRunner, tmpfs_job_dir: str) -> None:
    ran = await runner.run(("python3", "-I", "-S", "-c", FILL, "/job/fill"),
                           job_dir=tmpfs_job_dir)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    code, written = ran.out.split()
    assert code == "ENOSPC"
    assert 7 * MiB <= int(written) <= 8 * MiB
    assert os.path.getsize(os.path.join(tmpfs_job_dir, "fill")) <= 8 * MiB
    await assert_host_fine(runner)


MANY_FILES = """
import errno, os, sys, time
os.chdir(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
n = 0
try:
    while time.monotonic() < deadline:
        with open(str(n), "wb") as f:
            f.write(b"x")
        n += 1
    print("time", n, flush=True)
except OSError as e:
    print(errno.errorcode[e.errno], n, flush=True)
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_millions_of_tiny_files_stop_at_the_job_directorys_inode_limit(
        runner: JobRunner, tmpfs_job_dir: str) -> None:
    ran = await runner.run(("python3", "-I", "-S", "-c", MANY_FILES, "/job", "20"),
                           job_dir=tmpfs_job_dir)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    code, count = ran.out.split()
    assert code == "ENOSPC"
    assert 1900 <= int(count) < 2000  # the tmpfs has 2000 inodes, its root takes one
    await assert_host_fine(runner)


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_millions_of_tiny_files_in_tmp_stop_at_its_size(runner: JobRunner) -> None:
    # Every one-byte file takes a page of the 4 MiB /tmp: about a thousand fit.
    ran = await runner.run(("python3", "-I", "-S", "-c", MANY_FILES, "/tmp", "20"),
                           policy=SandboxPolicy(tmp_bytes=4 * MiB, timeout_seconds=25))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    code, count = ran.out.split()
    assert code == "ENOSPC"
    assert 900 <= int(count) <= 1024
    await assert_host_fine(runner)


OPEN_FILES = """
import errno, resource
fds = []
try:
    while True:
        fds.append(open("/dev/null", "rb"))
except OSError as e:
    print(errno.errorcode[e.errno], len(fds), flush=True)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
except (ValueError, OSError) as e:
    print("raise refused", flush=True)
print(resource.getrlimit(resource.RLIMIT_NOFILE))
"""


@pytest_twisted.ensureDeferred
async def test_opening_files_without_end_stops_at_EMFILE_1024(runner: JobRunner) -> None:
    ran = await runner.python(OPEN_FILES)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.lines() == ["EMFILE 1021", "raise refused", "(1024, 1024)"], ran.describe()


# -- time --------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_cpu_spin_past_cpu_seconds_ends_with_cpu_limit(runner: JobRunner) -> None:
    policy = SandboxPolicy(cpu_seconds=0.5, timeout_seconds=10)
    ran = await runner.python("while True: pass", policy=policy)
    assert ran.reason == Reason.CPU_LIMIT, ran.describe()
    assert ran.result.signal == signal.SIGKILL
    assert 0.5 <= ran.result.cpu_seconds < 1.5
    assert ran.ended - ran.started < 3


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_cpu_spread_over_processes_counts_towards_cpu_seconds(runner: JobRunner) -> None:
    policy = SandboxPolicy(cpu_seconds=1.0, timeout_seconds=10)
    ran = await runner.run(("bash", "-c", "(while :; do :; done) & (while :; do :; done) & wait"),
                           policy=policy)
    assert ran.reason == Reason.CPU_LIMIT, ran.describe()
    assert ran.result.cpu_seconds >= 1.0


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_sleep_past_the_timeout_ends_with_timeout_and_nothing_left_within_a_second(
        runner: JobRunner) -> None:
    ran = await runner.run(("sleep", "30"), policy=SandboxPolicy(timeout_seconds=1))
    gone_at = time.monotonic()
    assert processes_of(runner.uids) == []
    assert ran.reason == Reason.TIMEOUT, ran.describe()
    assert ran.result.signal == signal.SIGKILL
    wall_seconds = ran.result.wall_time_ms / 1000
    assert wall_seconds >= 1.0 and wall_seconds < 2.0, wall_seconds
    assert gone_at - ran.started < 1 + 1.0


DAEMON = """
import os, signal, time, sys
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        os.write(w, str(os.getpid()).encode())
        while True:
            time.sleep(1)
    os._exit(0)
print("daemon", os.read(r, 32).decode(), flush=True)
if sys.argv[1] == "wait":
    time.sleep(60)
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_double_forked_daemon_dies_when_its_job_ends(runner: JobRunner) -> None:
    ran = await runner.run(("python3", "-I", "-S", "-c", DAEMON, "exit"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.out.startswith("daemon ")  # it was running when the job's main process left
    assert processes_of(runner.uids) == []


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_double_forked_daemon_dies_with_its_job_at_the_timeout(
        runner: JobRunner) -> None:
    ran = await runner.run(("python3", "-I", "-S", "-c", DAEMON, "wait"),
                           policy=SandboxPolicy(timeout_seconds=1))
    assert ran.reason == Reason.TIMEOUT, ran.describe()
    assert ran.out.startswith("daemon ")
    assert processes_of(runner.uids) == []


IGNORE_AND_HOP = """
trap '' TERM INT HUP QUIT USR1 USR2
echo ready
# keep replacing ourselves with a fresh child, so no pid stays the same
while :; do ( trap '' TERM INT HUP; sleep 0.05 ) & wait; done
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_processes_that_ignore_signals_and_hop_pids_are_killed_at_the_timeout(
        runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", IGNORE_AND_HOP),
                           policy=SandboxPolicy(timeout_seconds=1))
    assert processes_of(runner.uids) == []
    assert ran.reason == Reason.TIMEOUT, ran.describe()
    assert ran.out == "ready\n"
    assert ran.ended - ran.started < 1 + 1.0


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_cancelled_job_ends_with_cancelled_and_nothing_left(runner: JobRunner) -> None:
    job_id, d = runner.start(("sleep", "30"))
    await runner.wait_started(job_id)
    runner.sandbox.kill(job_id, Reason.CANCELLED)
    ran = await d
    assert ran.reason == Reason.CANCELLED, ran.describe()
    assert ran.ended - ran.started < 2
    assert processes_of(runner.uids) == []


# -- output -------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv,stream", [
    (("yes", "flood"), "stdout"),
    (("bash", "-c", "yes flood >&2"), "stderr"),
    (("python3", "-I", "-S", "-c",
      "import sys\nwhile True: sys.stdout.buffer.write(b'x' * 1048576)"), "stdout"),
], ids=["stdout", "stderr", "one-line-without-newline"])
@pytest_twisted.ensureDeferred
async def test_an_output_flood_ends_with_output_limit_and_exactly_the_cap_captured(
        runner: JobRunner, argv: tuple[str, ...], stream: str) -> None:
    cap = 1 * MiB
    rss_before = _rss()
    ran = await runner.run(argv, policy=SandboxPolicy(output_cap_bytes=cap,
                                                      timeout_seconds=10))
    assert ran.reason == Reason.OUTPUT_LIMIT, ran.describe()
    captured = ran.stdout if stream == "stdout" else ran.stderr
    assert len(captured) == cap
    assert ran.result.truncated == {"stdout": stream == "stdout", "stderr": stream == "stderr"}
    assert ran.ended - ran.started < 5
    # The worker kept what it captured and no more: the cap, not the flood.
    assert _rss() - rss_before < 32 * MiB
    assert processes_of(runner.uids) == []


@pytest_twisted.ensureDeferred
async def test_output_just_under_the_cap_is_complete_and_not_truncated(
        runner: JobRunner) -> None:
    ran = await runner.run(("head", "-c", "65535", "/dev/zero"),
                           policy=SandboxPolicy(output_cap_bytes=65536))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.stdout == b"\0" * 65535
    assert ran.result.truncated == {"stdout": False, "stderr": False}


# -- IPC ------------------------------------------------------------------------------------------


SYSV_LEAK = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT = 0o1000
shm = libc.shmget(0x5A4D, 1 << 20, IPC_CREAT | 0o600)
sem = libc.semget(0x5A4E, 1, IPC_CREAT | 0o600)
msg = libc.msgget(0x5A4F, IPC_CREAT | 0o600)
assert min(shm, sem, msg) >= 0, ctypes.get_errno()
addr = libc.shmat(shm, None, 0)
print(open("/proc/sysvipc/shm").read().count("\\n") - 1, flush=True)
# and leave all three behind
"""

SYSV_LOOK = """
for kind in ("shm", "sem", "msg"):
    print(kind, open("/proc/sysvipc/" + kind).read().count("\\n") - 1)
"""


def _host_ipc() -> dict[str, set[str]]:
    found = {}
    for kind in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{kind}") as f:
            found[kind] = {line.split()[1] for line in f.readlines()[1:]}
    return found


@pytest_twisted.ensureDeferred
async def test_sysv_ipc_objects_left_behind_are_gone_for_the_host_and_the_next_job(
        runner: JobRunner) -> None:
    before = _host_ipc()
    ran = await runner.python(SYSV_LEAK)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.out == "1\n"  # the segment existed, in the job's own IPC namespace
    assert _host_ipc() == before
    ran = await runner.python(SYSV_LOOK)
    assert ran.lines() == ["shm 0", "sem 0", "msg 0"], ran.describe()


@pytest_twisted.ensureDeferred
async def test_a_launcher_with_a_real_time_policy_hands_none_to_its_jobs(
        runner: JobRunner) -> None:
    launcher = runner.sandbox._proc
    assert launcher is not None
    try:
        os.sched_setscheduler(launcher.pid, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        # systemd's RestrictRealtime=yes (sandrun.service has it) forbids real-time
        # policies to everything in the unit: the case cannot arise there.
        pytest.skip("this process may not set a real-time policy (RestrictRealtime=yes?)")
    try:
        # More jobs than spares: the later ones run in spares forked while it was real-time.
        policies = []
        for _ in range(6):
            ran = await runner.python("import os; print(os.sched_getscheduler(0))")
            assert ran.reason == Reason.COMPLETED, ran.describe()
            policies.append(int(ran.stdout))
    finally:
        os.sched_setscheduler(launcher.pid, os.SCHED_OTHER, os.sched_param(0))
    assert policies == [os.SCHED_OTHER] * 6
