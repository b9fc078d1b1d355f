"""Worker memory: RSS idle and with 50 jobs queued or running.

Starts ``sandrun serve --max-concurrent 2 --queue-size 100`` (quotas raised so one
client may hold 50 jobs) and reads VmRSS of the worker and of its launcher child,
summed:

- idle: just started, before any request;
- warm idle: after one job ran and was deleted (first-use costs: the thread pool,
  lazily imported modules, caches), the base the per-job figure is taken from;
- loaded: with 50 sleeping jobs submitted (``sh sleep.sh`` running ``sleep 600``),
  2 running and 48 queued, read 10 times over a second, the median taken;
- after: every job cancelled with DELETE, one more job run, read again.

Per job = (loaded - warm idle) / 50.  Target: under 1 MB per job.  Job data itself
is on tmpfs (one mount per job) and not in any process's RSS: the table also gives
what the state directory and the job tmpfs mounts hold.

The figures are VmRSS, which counts a page once in every process that maps it:
the launcher's pages are mostly libpython (mapped by the worker too) and memory
its pre-forked spares share with it copy-on-write.  A second table, at idle,
gives each of the worker's processes (the worker, the launcher, its spares and
the upload parser's fork server, ``sandrun.api.unpacker``, which the total above
leaves out) with its RSS, its PSS (each shared page divided among the processes
that map it) and its private pages, from ``/proc/PID/smaps_rollup``.

Usage (as root): ``python3 bench/memory.py [--jobs 50]``
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT

import argparse
import shutil
import statistics
import time
from typing import Any

from bench.common import Worker, children, cmdline, export_tree, print_table, write_json

TARGET_KB_PER_JOB = 1000  # 1 MB
SLEEPER = {"manifest": {"entrypoint": "sleep.sh", "interpreter": "sh", "timeout": 900},
           "files": {"sleep.sh": "exec sleep 600\n"}}
HELLO = {"manifest": {"entrypoint": "main.py"}, "files": {"main.py": 'print("hello")\n'}}


def smaps_kb(pid: int) -> dict[str, int]:
    """RSS, PSS and private KiB of one process (``/proc/PID/smaps_rollup``)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0),
            "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def by_process(worker: Worker) -> dict[str, list[dict[str, int]]]:
    """``smaps_kb`` of the worker, its launcher, the launcher's spares and the unpacker."""
    launcher = worker.launcher_pid()
    spares = children(launcher) if launcher else []
    unpackers = [c for c in children(worker.pid) if "sandrun.api.unpacker" in cmdline(c)]
    found: dict[str, list[dict[str, int]]] = {}
    for name, pids in (("worker", [worker.pid]), ("launcher", [launcher] if launcher else []),
                       ("spares", spares), ("unpacker", unpackers)):
        found[name] = []
        for pid in pids:
            try:
                found[name].append(smaps_kb(pid))
            except (FileNotFoundError, ProcessLookupError):
                pass  # a spare taken by a job meanwhile
    return found


def tmpfs_used_kb(worker: Worker) -> int:
    used = 0
    for mount in worker.mounts():
        st = os.statvfs(mount)
        used += (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
    return used


def sample(worker: Worker, times: int = 10, every: float = 0.1) -> dict[str, int]:
    """Median of several readings of each figure (RSS moves as the reactor works)."""
    readings = []
    for _ in range(times):
        readings.append(worker.rss_kb())
        time.sleep(every)
    return {key: int(statistics.median(r[key] for r in readings)) for key in readings[0]}


def run_one(worker: Worker) -> None:
    client = worker.client()
    code, answer = client.json("POST", "/submit", HELLO)
    assert code == 200, answer
    status, _ = client.wait(answer["job_id"], poll=0.01)
    assert status["status"] == "completed", status
    client.json("DELETE", f"/jobs/{answer['job_id']}")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs queued or running (50)")
    parser.add_argument("--commit", metavar="REF",
                        help="run the worker from a clean export of this commit "
                             "(default: the working tree)")
    parser.add_argument("--name", default="memory", help="results file bench/results/NAME.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/memory.py starts a real worker and must run as root")

    flags = ("--max-concurrent", "2", "--queue-size", "100", "--cpu-quota", "100000",
             "--max-active-per-ip", "100000", "--jobs-per-hour", "100000000")
    tree, source = export_tree(args.commit) if args.commit else (None, "working tree")
    worker = Worker(*flags, tree=tree).start()
    try:
        time.sleep(0.5)
        idle = sample(worker)
        processes = by_process(worker)
        run_one(worker)
        time.sleep(0.5)
        warm = sample(worker)
        tmpfs_idle = tmpfs_used_kb(worker)

        client = worker.client()
        ids = []
        for _ in range(args.jobs):
            code, answer = client.json("POST", "/submit", SLEEPER)
            assert code == 200, answer
            ids.append(answer["job_id"])
        deadline = time.monotonic() + 10
        while True:
            states = [client.status(i)["status"] for i in ids]
            if states.count("running") == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        counts = {s: states.count(s) for s in set(states)}
        time.sleep(0.5)
        loaded = sample(worker)
        tmpfs_loaded = tmpfs_used_kb(worker)
        mounts_loaded = len(worker.mounts())

        for i in ids:
            code, _ = client.json("DELETE", f"/jobs/{i}")
            assert code == 200
        client.close()
        run_one(worker)
        time.sleep(1.0)
        after = sample(worker)
    finally:
        worker.stop()
        worker.remove_state_dir()
        if tree:
            shutil.rmtree(tree, ignore_errors=True)

    per_job = (loaded["total"] - warm["total"]) / args.jobs
    rows = [(name, s["worker"], s["launcher"], s["total"])
            for name, s in (("idle (fresh)", idle), ("idle (after one job)", warm),
                            (f"{args.jobs} jobs held", loaded), ("after DELETE of all", after))]
    met = per_job < TARGET_KB_PER_JOB
    print_table("Worker memory, VmRSS (KiB)", ("", "worker", "launcher", "total"), rows, notes=[
        f"per job: {per_job:.1f} KiB (target < {TARGET_KB_PER_JOB} KB): "
        + ("met" if met else "MISSED"),
        f"jobs by state while held: {counts}",
        (f"tmpfs in use (state dir and job mounts): {tmpfs_idle} KiB idle, {tmpfs_loaded} KiB "
         f"with the jobs, in {mounts_loaded} mounts (RAM, but in no process's RSS)"),
        "worker flags: " + " ".join(flags)])
    process_rows = [(f"{name} ({len(found)})" if len(found) != 1 else name,
                     sum(p["rss"] for p in found), sum(p["pss"] for p in found),
                     sum(p["private"] for p in found))
                    for name, found in processes.items()]
    counted = [r for r in process_rows if r[0] in ("worker", "launcher")]
    print_table("Idle (fresh), by process (KiB)", ("", "RSS", "PSS", "private"), process_rows,
                notes=[f"worker + launcher: RSS {sum(r[1] for r in counted)}, "
                       f"PSS {sum(r[2] for r in counted)}; all of these processes: "
                       f"PSS {sum(r[2] for r in process_rows)}"])
    result: dict[str, Any] = {
        "sources": source,
        "jobs": args.jobs, "states": counts, "rss_kb": {"idle": idle, "warm_idle": warm,
                                                        "loaded": loaded, "after": after},
        "per_job_kb": per_job, "target_kb_per_job": TARGET_KB_PER_JOB, "met": met,
        "tmpfs_kb": {"idle": tmpfs_idle, "loaded": tmpfs_loaded}, "mounts_loaded": mounts_loaded,
        "idle_by_process_kb": processes,
        "worker_flags": list(flags)}
    write_json(args.name, result)


if __name__ == "__main__":
    main()
