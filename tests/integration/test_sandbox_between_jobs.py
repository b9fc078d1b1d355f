"""Jobs that run at the same time: distinct uids, and nothing seen, signalled or shared."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import SandboxUnavailable
from sandrun.wire import Reason

from .conftest import JobRunner, processes_of

FIRST = """
import ctypes, os, socket, time
libc = ctypes.CDLL(None, use_errno=True)
open("/tmp/first-secret", "w").write("first")
open("/dev/shm/first-secret", "w").write("first")
assert libc.shmget(0x5A50, 4096, 0o1000 | 0o666) >= 0
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind("\\0sandrun-between-jobs")
listener.listen()
print("ready", os.getuid(), flush=True)
time.sleep(float(os.environ["HOLD"]))
print("first done", flush=True)
"""

SECOND = """
import ctypes, errno, json, os, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
first_pid = int(sys.argv[1])
seen = {"uid": os.getuid(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "tmp": os.listdir("/tmp"), "shm": os.listdir("/dev/shm")}
def outcome(call):
    try:
        call()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
seen["kill_first"] = outcome(lambda: os.kill(first_pid, signal.SIGKILL))
seen["kill_all"] = outcome(lambda: os.kill(-1, signal.SIGKILL))
rc = libc.ptrace(16, first_pid, None, None)  # PTRACE_ATTACH
seen["ptrace_first"] = "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
rc = libc.shmget(0x5A50, 0, 0)
seen["shm_key"] = "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
seen["abstract_socket"] = outcome(lambda: client.connect("\\0sandrun-between-jobs"))
print(json.dumps(seen))
"""


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_two_jobs_at_once_cannot_see_signal_trace_or_share_with_each_other(
        runner: JobRunner) -> None:
    first_id, first = runner.start(("python3", "-I", "-S", "-c", FIRST),
                                   env=(("HOLD", "3"),))
    # Once it is ready, it has made its files, segment and socket.
    await runner.wait_output(first_id, b"ready")
    # Its command and the sandbox's init (PID 1 of its namespace), both as its uid.
    first_procs = sorted(processes_of(runner.uids), key=lambda p: p[2])
    assert [name for _, _, name in first_procs] == ["python3", "sandrun-init"]
    first_host_pid, first_uid, _ = first_procs[0]
    assert first_procs[1][1] == first_uid
    second = await runner.run(("python3", "-I", "-S", "-c", SECOND, str(first_host_pid)))
    assert second.reason == Reason.COMPLETED, second.describe()
    seen = json.loads(second.out)
    assert seen["uid"] in runner.uids and seen["uid"] != first_uid
    assert seen["pids"] == [1, 2]
    assert seen["tmp"] == [] and seen["shm"] == []
    # The first job's host pid means nothing in the second's PID namespace.
    assert seen["kill_first"] == "ESRCH"
    assert seen["kill_all"] == "ESRCH"
    assert seen["ptrace_first"] == "EPERM"
    assert seen["shm_key"] == "ENOENT"
    assert seen["abstract_socket"] == "ECONNREFUSED"
    done = await first
    assert done.reason == Reason.COMPLETED, done.describe()
    assert done.lines() == [f"ready {first_uid}", "first done"]


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_jobs_at_once_get_distinct_uids_and_a_job_past_the_slots_is_refused(
        runner: JobRunner) -> None:
    started = [runner.start(("bash", "-c", "id -u; sleep 30"),
                            policy=SandboxPolicy(timeout_seconds=30))
               for _ in runner.uids]
    for job_id, _ in started:
        await runner.wait_output(job_id, b"\n")
    with pytest.raises(SandboxUnavailable):
        runner.start(("/bin/true",))
    for job_id, _ in started:
        runner.sandbox.kill(job_id, Reason.CANCELLED)
    results = await defer.gatherResults([d for _, d in started])
    assert {r.reason for r in results} == {Reason.CANCELLED}
    assert sorted(int(r.out) for r in results) == list(runner.uids)
    # Every slot is free again.
    ran = await runner.run(("/bin/true",))
    assert ran.reason == Reason.COMPLETED
