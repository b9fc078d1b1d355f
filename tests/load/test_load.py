"""The bounded load test: many jobs with mixed outcomes through a real worker.

``SANDRUN_LOAD_JOBS`` jobs (300 by default, the short form CI runs in about a
minute; ``SANDRUN_LOAD_JOBS=1000`` for the full test) are submitted over HTTP by
20 client threads, each bound to its own loopback address (127.0.0.10-29), each
keeping up to ``WINDOW`` jobs in flight, so the worker's queue, its per-IP
accounting and its 4 sandbox slots are all busy at once.  Quotas are raised
(``RAISED_QUOTAS``); the output cap is 64 KiB so a flooding job hits it fast.

Every job must end with the reason its kind predicts, with its own output (each
prints a token of its own, so cross-talk between jobs would show); every job is
then collected (downloaded or DELETEd) and must be gone.  Afterwards nothing of
any job may remain: no process of a job uid in the worker's cgroups, no mount
under the state directory but the worker's own tmpfs, no job cgroup, no busy
slot, no upload spool file; the worker's RSS must be back near idle; after
SIGTERM not even the worker's own tmpfs may remain.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench.common import (
    RAISED_QUOTAS,
    Client,
    Worker,
    pid_alive,
    processes_mentioning,
    wait_for,
)

JOBS = int(os.environ.get("SANDRUN_LOAD_JOBS", "300"))
CLIENTS = [f"127.0.0.{n}" for n in range(10, 30)]
WINDOW = 6  # jobs each client keeps in flight: 120 at once, so the queue fills
SLOTS = 4
OUTPUT_CAP = 64 * 1024  # bytes, as --output-cap-mb 0.0625
RSS_SLACK_KB = 30 * 1024

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts a real worker: needs root")


@dataclass(frozen=True)
class Kind:
    name: str
    reason: str
    job: Callable[[str], dict[str, Any]]  # token -> JSON submission
    check: Callable[[dict[str, Any], dict[str, Any], str], None]  # (status, logs, token)


def _success_py(token: str) -> dict[str, Any]:
    return {"manifest": {"entrypoint": "main.py", "timeout": 60},
            "files": {"main.py": f"print('ok', {token!r})\n"}}


def _success_sh(token: str) -> dict[str, Any]:
    return {"manifest": {"entrypoint": "run.sh", "interpreter": "sh", "timeout": 60,
                         "outputs": ["out.txt"]},
            "files": {"run.sh": f"echo ok {token}\necho {token} > out.txt\n"}}


def _exit_1(token: str) -> dict[str, Any]:
    return {"manifest": {"entrypoint": "fail.sh", "interpreter": "sh", "timeout": 60},
            "files": {"fail.sh": f"echo failing {token} >&2\nexit 1\n"}}


def _timeout(token: str) -> dict[str, Any]:
    return {"manifest": {"entrypoint": "hang.sh", "interpreter": "sh", "timeout": 1},
            "files": {"hang.sh": f"echo hanging {token}\nexec sleep 60\n"}}


def _memory_hog(token: str) -> dict[str, Any]:
    return {"manifest": {"entrypoint": "hog.py", "memory_mb": 32, "timeout": 60},
            "files": {"hog.py": f"print('hogging', {token!r}, flush=True)\n"
                                "chunks = []\n"
                                "while True:\n"
                                "    chunks.append(bytearray(1 << 20))\n"}}


def _flood(token: str) -> dict[str, Any]:
    return {"manifest": {"entrypoint": "flood.sh", "interpreter": "sh", "timeout": 60},
            "files": {"flood.sh": f"echo flooding {token}\nexec yes {token}\n"}}


def _check_success(status: dict[str, Any], logs: dict[str, Any], token: str) -> None:
    assert logs["stdout"] == f"ok {token}\n", logs
    assert status["execution_metadata"]["exit_code"] == 0


def _check_success_sh(status: dict[str, Any], logs: dict[str, Any], token: str) -> None:
    _check_success(status, logs, token)
    assert set(status["output_files"]) == {"out.txt"}, status["output_files"]


def _check_exit_1(status: dict[str, Any], logs: dict[str, Any], token: str) -> None:
    assert status["execution_metadata"]["exit_code"] == 1, status
    assert logs["stderr"] == f"failing {token}\n", logs


def _check_timeout(status: dict[str, Any], logs: dict[str, Any], token: str) -> None:
    assert logs["stdout"] == f"hanging {token}\n", logs
    # Every process gone within 1 s of the limit (the spec's bound).
    assert 1000 <= status["execution_metadata"]["wall_time_ms"] < 2000, status


def _check_memory(status: dict[str, Any], logs: dict[str, Any], token: str) -> None:
    assert logs["stdout"] == f"hogging {token}\n", logs
    assert status["execution_metadata"]["memory_peak_bytes"] <= 32 * 1024 * 1024, status


def _check_flood(status: dict[str, Any], logs: dict[str, Any], token: str) -> None:
    assert logs["truncated"]["stdout"] is True, logs["truncated"]
    out = logs["stdout"]
    assert len(out) == OUTPUT_CAP, len(out)
    assert out.startswith(f"flooding {token}\n{token}\n{token}\n"), out[:200]


KINDS = [
    Kind("success-py", "completed", _success_py, _check_success),
    Kind("success-sh", "completed", _success_sh, _check_success_sh),
    Kind("exit-1", "exit_nonzero", _exit_1, _check_exit_1),
    Kind("timeout", "timeout", _timeout, _check_timeout),
    Kind("memory", "memory_limit", _memory_hog, _check_memory),
    Kind("output", "output_limit", _flood, _check_flood),
]
# Out of every 20 jobs: 8 succeed, 4 exit 1, 2 time out, 3 hit memory, 3 hit output.
MIX = [0, 1, 2, 4, 5, 0, 1, 3, 2, 4, 0, 1, 5, 2, 4, 0, 1, 3, 2, 5]


@dataclass
class Outcome:
    index: int
    kind: Kind
    token: str
    source: str
    job_id: str | None = None
    status: dict[str, Any] | None = None
    error: str | None = None


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker(*RAISED_QUOTAS, "--max-concurrent", str(SLOTS),
               "--output-cap-mb", str(OUTPUT_CAP / 2**20)).start()
    try:
        yield w
    finally:
        w.stop()
        w.remove_state_dir()


def run_client(worker: Worker, source: str, mine: list[Outcome]) -> None:
    """Submit ``mine`` in windows of ``WINDOW``; wait for, check and collect each."""
    client = worker.client(source=source, timeout=60)
    try:
        for start in range(0, len(mine), WINDOW):
            batch = mine[start:start + WINDOW]
            for o in batch:
                code, answer = client.json("POST", "/submit", o.kind.job(o.token))
                if code != 200:
                    o.error = f"submit: {code} {answer}"
                    continue
                o.job_id = answer["job_id"]
            for o in batch:
                if o.job_id is None:
                    continue
                try:
                    o.status, _ = client.wait(o.job_id, poll=0.02, backoff=1.5, max_poll=0.2,
                                              timeout=60)
                    collect(client, o)
                except Exception as e:  # noqa: BLE001 - reported per job below
                    o.error = f"{type(e).__name__}: {e}"
    finally:
        client.close()


def collect(client: Client, o: Outcome) -> None:
    """Check the outcome, fetch the result as a client would, and see that it is gone."""
    assert o.status is not None and o.job_id is not None
    reason = o.status["execution_metadata"]["reason"]
    assert reason == o.kind.reason, f"{o.kind.name}: {reason}: {o.status}"
    assert o.status["status"] == ("completed" if o.kind.reason == "completed" else "failed")
    code, logs = client.json("GET", f"/logs/{o.job_id}")
    assert code == 200, logs
    o.kind.check(o.status, logs, o.token)
    if o.kind.name == "success-sh":
        code, body = client.request("GET", f"/download/{o.job_id}")  # deletes once sent
        assert code == 200 and gzip.decompress(body), code
    else:
        code, _ = client.json("DELETE", f"/jobs/{o.job_id}")
        assert code == 200
    code, _ = client.json("GET", f"/status/{o.job_id}")
    assert code == 404, f"{o.job_id} still there after it was collected"


def state_files(worker: Worker) -> list[str]:
    found = []
    for sub in ("uploads", "jobs"):
        path = os.path.join(worker.state_dir, sub)
        found += [os.path.join(sub, n) for n in os.listdir(path)]
    return found


@pytest.mark.timeout(150 + JOBS // 2)
def test_jobs_with_mixed_outcomes_from_20_addresses_all_end_right_and_leave_nothing(
        worker: Worker) -> None:
    # Warm up with one job of each kind, so idle RSS is taken after first-use costs.
    warm = [Outcome(-1, k, f"warm{n}", "127.0.0.1") for n, k in enumerate(KINDS)]
    run_client(worker, "127.0.0.1", warm)
    assert [o.error for o in warm] == [None] * len(KINDS), [o.error for o in warm]
    time.sleep(0.5)
    idle_kb = worker.rss_kb()["total"]

    outcomes = [Outcome(i, KINDS[MIX[i % len(MIX)]], f"t{i:05d}x", CLIENTS[i % len(CLIENTS)])
                for i in range(JOBS)]
    threads = [threading.Thread(target=run_client,
                                args=(worker, src, [o for o in outcomes if o.source == src]))
               for src in CLIENTS]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started

    failures = [f"#{o.index} {o.kind.name} {o.job_id}: {o.error}" for o in outcomes if o.error]
    assert not failures, f"{len(failures)} of {JOBS} jobs went wrong:\n" + "\n".join(
        failures[:20])
    assert all(o.status is not None for o in outcomes), "a job was never seen finished"
    assert len({o.job_id for o in outcomes}) == JOBS, "job ids were reused"
    by_reason = Counter(o.status["execution_metadata"]["reason"]  # type: ignore[index]
                        for o in outcomes)
    print(f"\n{JOBS} jobs in {elapsed:.1f} s ({JOBS / elapsed:.1f} jobs/s): {dict(by_reason)}")

    # Each address was accounted for separately, and holds no job any more.
    for source in CLIENTS:
        client = worker.client(source=source)
        code, stats = client.json("GET", "/stats")
        client.close()
        assert code == 200
        mine = sum(1 for o in outcomes if o.source == source)
        assert stats["your_quota"]["jobs_this_hour"] == mine, (source, stats)
        assert stats["your_quota"]["active_jobs"] == 0, (source, stats)
    assert stats["system"]["queue_length"] == 0 and stats["system"]["active_jobs"] == 0, stats

    # Nothing of any job remains while the worker runs.
    assert wait_for(worker.job_processes, within=1.0) == [], "job processes remain"
    assert wait_for(worker.job_cgroups, within=1.0) == [], "job cgroups remain"
    assert worker.mounts() == [worker.state_dir], "job mounts remain"
    assert state_files(worker) == [], "job directories or upload spool files remain"
    worker_fds = os.listdir(f"/proc/{worker.pid}/fd")
    spooled = [os.readlink(f"/proc/{worker.pid}/fd/{fd}") for fd in worker_fds]
    assert not [p for p in spooled if p.startswith(worker.state_dir + "/")], spooled

    # Memory back near idle.
    rss = wait_for(lambda: max(0, worker.rss_kb()["total"] - idle_kb - RSS_SLACK_KB),
                   within=5.0, step=0.5)
    after_kb = worker.rss_kb()["total"]
    print(f"worker+launcher RSS: {idle_kb} KiB idle, {after_kb} KiB after the load")
    assert rss == 0, f"RSS {after_kb} KiB, idle was {idle_kb} KiB"

    # The worker still serves, and a stop leaves not even its own tmpfs.
    again = [Outcome(-2, KINDS[0], "again", "127.0.0.1")]
    run_client(worker, "127.0.0.1", again)
    assert again[0].error is None, again[0].error
    launcher = worker.launcher_pid()
    assert worker.stop() == 0, worker.log_tail()
    assert worker.mounts() == []
    assert launcher is not None and not pid_alive(launcher)
    assert processes_mentioning(worker.state_dir) == []
    assert worker.job_cgroups() == []
    assert worker.job_processes() == []
