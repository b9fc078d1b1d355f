"""Launch benchmark: what a sandbox costs per job, against bare fork+exec and bubblewrap.

Measures, in one run and on the same machine, the start-to-exit time of a
trivial command (``/bin/true``, then ``python3 -c pass``):

(a) bare: ``subprocess.run`` of the command;
(b) bwrap: ``bwrap --unshare-all`` with a minimal read-only root;
(c) Sandrun: ``Sandbox.run`` through the engine, one job after another;

taking turns, one run of each per round, so that a busy host weighs on all
three alike (the load average is printed with the results); then a burst of
sequential ``/bin/true`` jobs through the engine for jobs per second.

Overhead is p50 minus bare p50.  Targets (issue 2): Sandrun's p50 overhead at
most bwrap's, and at least 300 sequential ``/bin/true`` jobs a second through
the engine.  Needs root (namespaces, cgroups).  Run from the repository root::

    python3 bench/launch.py [-n 500]     (or: python3 -m bench.launch)

Results also go to ``bench/results/launch.json``.  On a host other work keeps
busy, ``chrt -f 10 python3 bench/launch.py`` runs all three at one real-time
priority (children inherit it), so the figures show what each costs rather
than how the scheduler shares two cores with strangers; say which you ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

# Run as a script, bench/ would be first on the path, and its modules would shadow
# the standard library's (bench/http.py); the repository root takes its place.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH]
sys.path.insert(0, os.path.dirname(_BENCH))

from twisted.internet import defer, task

from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox
from sandrun.wire import Reason

# Absolute paths: "python3" on a host's PATH may be a wrapper (pyenv's is a shell script).
COMMANDS = {"true": ["/bin/true"], "python": ["/usr/bin/python3", "-c", "pass"]}
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
         "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp"]
TARGET_JOBS_PER_SECOND = 300
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "launch.json")


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {"p50": round(ordered[len(ordered) // 2], 3),
            "p90": round(ordered[int(len(ordered) * 0.9)], 3),
            "min": round(ordered[0], 3), "n": len(ordered)}


def run_bare(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1000


@defer.inlineCallbacks
def measure(reactor: Any, n: int, warmup: int, burst: int) -> Any:
    """Latency samples (ms) per command and runner, then jobs per second.

    The three runners take turns, one run each per round, so that whatever
    else the host is doing weighs on all of them alike.  Throughput is a
    separate burst of ``/bin/true`` jobs, one after another through the engine.
    """
    state_dir = tempfile.mkdtemp(prefix="sandrun-bench-")
    job_dir = tempfile.mkdtemp(prefix="sandrun-bench-job-")
    sandbox = Sandbox(reactor, state_dir, f"sandrun-bench-{uuid.uuid4().hex[:8]}", 1)
    yield sandbox.start()
    policy = SandboxPolicy(timeout_seconds=30)
    jobs = iter(range(1 << 30))

    @defer.inlineCallbacks
    def run_sandrun(argv: list[str]) -> Any:
        start = time.perf_counter()
        result = yield sandbox.run(f"bench-{next(jobs)}", tuple(argv), (), job_dir, policy,
                                   lambda stream, data: None)
        if result.reason != Reason.COMPLETED:
            raise RuntimeError(f"{argv} in the sandbox: {result}")
        return (time.perf_counter() - start) * 1000

    samples: dict[str, dict[str, list[float]]] = {
        name: {"bare": [], "bwrap": [], "sandrun": []} for name in COMMANDS}
    try:
        for name, argv in COMMANDS.items():
            for i in range(warmup + n):
                bare = run_bare(argv)
                bwrap = run_bare(BWRAP + argv)
                sandrun = yield run_sandrun(argv)
                if i >= warmup:
                    row = samples[name]
                    row["bare"].append(bare)
                    row["bwrap"].append(bwrap)
                    row["sandrun"].append(sandrun)
        for _ in range(warmup):
            yield run_sandrun(COMMANDS["true"])
        start = time.perf_counter()
        for _ in range(burst):
            yield run_sandrun(COMMANDS["true"])
        jobs_per_second = burst / (time.perf_counter() - start)
    finally:
        sandbox.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(job_dir, ignore_errors=True)
    return samples, jobs_per_second


def report(results: dict[str, Any]) -> str:
    lines = [f"{'command':<10} {'runner':<9} {'p50 ms':>8} {'p90 ms':>8} {'overhead p50':>13}"]
    for name in COMMANDS:
        row = results[name]
        bare = row["bare"]["p50"]
        for runner in ("bare", "bwrap", "sandrun"):
            stats = row[runner]
            overhead = "" if runner == "bare" else f"{stats['p50'] - bare:13.3f}"
            lines.append(f"{name:<10} {runner:<9} {stats['p50']:8.3f} {stats['p90']:8.3f} "
                         f"{overhead}")
        lines.append(f"{'':<10} Sandrun/bwrap overhead ratio: {row['overhead_ratio']:.2f}")
    lines.append(f"sequential /bin/true jobs through the engine: "
                 f"{results['jobs_per_second']:.0f}/s (target >= {TARGET_JOBS_PER_SECOND})")
    met = results["targets_met"]
    lines.append("load average before, after: "
                 f"{' '.join(f'{x:.2f}' for x in results['load_before'])}; "
                 f"{' '.join(f'{x:.2f}' for x in results['load_after'])}")
    lines.append(f"targets: overhead <= bwrap: {'met' if met['overhead'] else 'NOT met'}; "
                 f"jobs/s: {'met' if met['jobs_per_second'] else 'NOT met'}")
    return "\n".join(lines)


def main(reactor: Any, args: argparse.Namespace) -> Any:
    results: dict[str, Any] = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "bwrap": subprocess.run(["bwrap", "--version"], capture_output=True,
                                            text=True).stdout.strip()},
        "n": args.n, "warmup": args.warmup, "burst": args.burst,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_before": os.getloadavg()}
    d = measure(reactor, args.n, args.warmup, args.burst)

    def finish(measured: tuple[dict[str, dict[str, list[float]]], float]) -> None:
        samples, jobs_per_second = measured
        results["load_after"] = os.getloadavg()
        for name in COMMANDS:
            row = results[name] = {runner: percentiles(values)
                                   for runner, values in samples[name].items()}
            bare = row["bare"]["p50"]
            row["overhead_ms"] = {"bwrap": round(row["bwrap"]["p50"] - bare, 3),
                                  "sandrun": round(row["sandrun"]["p50"] - bare, 3)}
            row["overhead_ratio"] = round(row["overhead_ms"]["sandrun"]
                                          / row["overhead_ms"]["bwrap"], 3)
        results["jobs_per_second"] = round(jobs_per_second, 1)
        results["targets_met"] = {
            "overhead": results["true"]["overhead_ms"]["sandrun"]
            <= results["true"]["overhead_ms"]["bwrap"],
            "jobs_per_second": results["jobs_per_second"] >= TARGET_JOBS_PER_SECOND}
        print(report(results))
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"written to {args.json}")

    return d.addCallback(finish)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="measured runs per cell")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured runs first")
    parser.add_argument("--burst", type=int, default=1000,
                        help="sequential /bin/true jobs for the jobs/s figure")
    parser.add_argument("--json", default=RESULTS, help="where to write the results")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/launch.py needs root: the sandbox uses namespaces and cgroups")
    from sandrun.cli import ensure_own_cgroup

    ensure_own_cgroup([sys.executable, *sys.argv], "bench/launch.py")  # cgroup v2
    task.react(main, [arguments])
