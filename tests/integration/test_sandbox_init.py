"""The job runs as PID 2 under the sandbox's init and behaves as it would outside.

Against the real kernel: signals a program sends itself with a default action
end it, orphans are reaped, signals sent to PID 1 reach the job, and the
job's end, a cancel or a timeout still end everything in the namespace.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
import pytest_twisted

from sandrun.sandbox.policy import SandboxPolicy
from sandrun.wire import Reason

from .conftest import JobRunner, processes_of


@pytest.mark.parametrize("command", ["kill $$; sleep 5", "kill -TERM $$; sleep 5"])
@pytest_twisted.ensureDeferred
async def test_kill_of_its_own_shell_ends_the_job_with_sigterm(runner: JobRunner,
                                                               command: str) -> None:
    ran = await runner.run(("bash", "-c", command))
    assert (ran.reason, ran.result.exit_code, ran.result.signal) == (
        Reason.SIGNALED, None, signal.SIGTERM), ran.describe()
    assert ran.ended - ran.started < 4


@pytest_twisted.ensureDeferred
async def test_abort_ends_the_job_with_sigabrt(runner: JobRunner) -> None:
    ran = await runner.python("import os; os.abort()")
    assert (ran.reason, ran.result.signal) == (Reason.SIGNALED, signal.SIGABRT), ran.describe()


SIGINT_ITSELF = "import os, signal; os.kill(os.getpid(), signal.SIGINT)"


@pytest_twisted.ensureDeferred
async def test_python_sending_itself_sigint_ends_as_it_does_outside(runner: JobRunner) -> None:
    # Outside as a program started from a terminal: SIGINT at its default action (a
    # suite started in the background of a non-interactive shell inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler).
    outside = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", SIGINT_ITSELF],
                             capture_output=True, timeout=10, check=False,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ran = await runner.python(SIGINT_ITSELF)
    inside = ran.result.exit_code if ran.result.exit_code is not None else -ran.result.signal
    assert inside == outside.returncode, ran.describe()
    assert (b"KeyboardInterrupt" in ran.stderr) == (b"KeyboardInterrupt" in outside.stderr)
    assert b"KeyboardInterrupt" in ran.stderr


@pytest_twisted.ensureDeferred
async def test_a_writer_past_the_file_size_limit_ends_with_sigxfsz_and_disk_limit(
        runner: JobRunner) -> None:
    # Not Python, which ignores SIGXFSZ itself and sees EFBIG, inside as outside.
    ran = await runner.run(("bash", "-c", "exec head -c 300000 /dev/zero > /tmp/big"),
                           policy=SandboxPolicy(file_size_bytes=100_000))
    assert (ran.reason, ran.result.signal) == (Reason.DISK_LIMIT, signal.SIGXFSZ), ran.describe()


ORPHANS = """
import os, time
for i in range(200):
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            os._exit(0)  # an orphan once its parent has left: the init's to reap
        os._exit(0)
    os.waitpid(child, 0)
deadline = time.monotonic() + 5
while True:
    states = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                pass  # reaped by the init since the listing
    if len(states) == 2 or time.monotonic() > deadline:
        break
    time.sleep(0.01)
print("forked", i + 1, "zombies", states.count("Z"), "processes", len(states))
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_200_orphaned_zombies_are_reaped_and_do_not_exhaust_pids_max(
        runner: JobRunner) -> None:
    ran = await runner.python(ORPHANS, policy=SandboxPolicy(pids_max=32, timeout_seconds=20))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    # The job (PID 2) and its init are left; every orphan was reaped.
    assert ran.out == "forked 200 zombies 0 processes 2\n", ran.describe()


FORWARDED = """
import os, signal, time
got = []
names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
for name in names:
    signal.signal(getattr(signal, name), lambda sig, frame: got.append(signal.Signals(sig).name))
for name in names:
    os.kill(1, getattr(signal, name))
    deadline = time.monotonic() + 5
    while len(got) < names.index(name) + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
print(" ".join(got))
"""


@pytest_twisted.ensureDeferred
async def test_term_int_hup_quit_usr1_and_usr2_sent_to_pid_1_reach_the_job(
        runner: JobRunner) -> None:
    ran = await runner.python(FORWARDED)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.out == "SIGTERM SIGINT SIGHUP SIGQUIT SIGUSR1 SIGUSR2\n", ran.describe()


@pytest_twisted.ensureDeferred
async def test_sigkill_and_sigstop_from_the_job_do_not_touch_its_init(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "kill -KILL 1; kill -STOP 1; sleep 0.2; echo alive"))
    assert (ran.reason, ran.out) == (Reason.COMPLETED, "alive\n"), ran.describe()


@pytest_twisted.ensureDeferred
async def test_the_job_starts_in_its_own_process_group_with_no_signal_blocked_or_ignored(
        runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", ("ps -o pid=,pgid=,sid= -p $$; "
                                           "grep -E '^Sig(Blk|Ign)' /proc/$$/status")))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    lines = ran.lines()
    assert lines[0].split() == ["2", "2", "1"], ran.describe()
    assert lines[1] == "SigBlk:\t0000000000000000", ran.describe()
    # No standard signal is ignored (SIGPIPE and SIGXFSZ, which Python ignores, are at
    # their defaults).  glibc's posix_spawn sets its own two internal real-time signals
    # (32, 33) to ignored, which no program can ask for through glibc and which glibc
    # and musl install their handlers for when they use them.
    ignored = int(lines[2].split()[1], 16)
    assert ignored & ~((1 << 31) | (1 << 32)) == 0, ran.describe()


GROUPS = """
trap '' TERM INT HUP
sleep 60 &
setsid sleep 60 &
( trap '' TERM; exec sleep 60 ) &
echo ready
wait
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_the_workers_cancel_ends_the_jobs_process_groups_and_sessions(
        runner: JobRunner) -> None:
    job_id, d = runner.start(("bash", "-c", GROUPS))
    await runner.wait_output(job_id, b"ready")
    runner.sandbox.kill(job_id, Reason.CANCELLED)
    ran = await d
    assert ran.reason == Reason.CANCELLED, ran.describe()
    assert ran.ended - ran.started < 5
    assert processes_of(runner.uids) == []


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_job_that_ignores_term_is_killed_at_its_timeout(runner: JobRunner) -> None:
    ran = await runner.python(
        "import signal, time\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "print('ignoring', flush=True)\n"
        "time.sleep(60)\n", policy=SandboxPolicy(timeout_seconds=1))
    assert (ran.reason, ran.out) == (Reason.TIMEOUT, "ignoring\n"), ran.describe()
    assert ran.ended - ran.started < 3
    assert processes_of(runner.uids) == []


@pytest_twisted.ensureDeferred
async def test_the_jobs_exit_ends_whatever_it_left_running(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "sleep 60 & setsid sleep 60 & exit 4"))
    assert (ran.reason, ran.result.exit_code) == (Reason.EXIT_NONZERO, 4), ran.describe()
    assert ran.ended - ran.started < 3
    assert processes_of(runner.uids) == []
