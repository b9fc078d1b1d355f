"""What the coordinator adds: latency and throughput direct to a worker vs through it.

Starts one real worker (``sandrun serve`` as root, per-IP quotas raised, a key,
``--trusted-proxy 127.0.0.1``) and one coordinator in front of it (``python -m
coordinator``, pool-wide quotas raised, the worker's ``max_concurrent_jobs`` high
enough never to refuse), then measures the same things both ways, in one run,
interleaved so both paths see the same machine:

requests
    One request on a keep-alive connection, N times: ``GET /health``, and
    ``GET /status/{id}`` of a finished job (the proxy's fixed cost per request:
    parse, find the worker, forward, verify the signature, rewrite the id).
latency
    The trivial job (``sh true.sh``, ``exit 0``): POST /submit, poll ``/status``
    every ``--poll`` seconds until it ended; ``/logs`` and DELETE after the clock
    stopped.  Through the coordinator a submit also asks the worker for the
    client's quota (``/stats``) before forwarding, and every poll is proxied.
throughput
    C client threads submitting and waiting for the trivial job in a loop (polls
    back off from ``--poll`` by ``--backoff`` up to ``--max-poll``), for
    ``--rounds`` alternating slices of ``--seconds`` at each concurrency, direct
    then through the coordinator, so that both paths see the same machine.
    Each thread speaks from its own loopback address (127.0.1.N), as distinct
    clients do: the coordinator serialises one client's submissions while it
    checks that client's pool-wide quota, so C threads from one address would
    measure that lock rather than the proxy.

replicas
    Three workers behind a second coordinator (``--max-replicas 3``): the trivial
    job with ``replicas`` 1, 2 and 3 (``--replicas``), one at a time (submit to
    seen completed, interleaved) and from C clients (``--replica-concurrency``).
    A replicated job is placed on that many workers one after another, and each
    /status of it asks every replica's worker and compares their signed results,
    so both the submission and every poll cost more.  ``--only-replicas`` runs
    just this part.

The machine is shared and small: the table says how much CPU the coordinator used
and how much other processes on the host used ("others' cores"); on 2 cores the
coordinator competes with the worker and the jobs for CPU, which is part of what
it costs here.

Usage (as root)::

    python3 bench/coordinator.py                 # 200 runs, 3 x 5 s per concurrency
    python3 bench/coordinator.py -n 50 --rounds 1 --concurrency 1,8
    python3 bench/coordinator.py --only-replicas -n 100 --rounds 2 --seconds 3
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT  # run as a script: import bench.* from the repository root

import argparse
import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

from bench.common import (
    RAISED_QUOTAS,
    Client,
    CpuMeter,
    Worker,
    print_table,
    process_cpu,
    summary,
    vm_rss_kb,
    write_json,
)

TRIVIAL = {"manifest": {"entrypoint": "true.sh", "interpreter": "sh"},
           "files": {"true.sh": "exit 0\n"}}
POOL_QUOTAS = ("--cpu-quota", "100000", "--max-active-per-ip", "100000",
               "--jobs-per-hour", "100000000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Coordinator:
    """``python -m coordinator`` in front of one worker."""

    def __init__(self, scratch: str, workers: list[tuple[Worker, str]],
                 flags: tuple[str, ...] = (), name: str = "coordinator",
                 tree: str | None = None) -> None:
        self.port = free_port()
        self.flags = flags
        self.tree = tree or _ROOT  # the sources it runs from (bench.common.export_tree)
        self.workers_path = os.path.join(scratch, f"{name}-workers.json")
        with open(self.workers_path, "w") as f:
            json.dump([{"name": f"bench-{i}", "worker_id": worker_id, "endpoint": worker.url,
                        "max_concurrent_jobs": 10000}
                       for i, (worker, worker_id) in enumerate(workers)], f)
        self.log_path = os.path.join(scratch, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Coordinator:
        env = dict(os.environ,
                   PYTHONPATH=self.tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator", "--workers", self.workers_path,
                 "--listen", f"127.0.0.1:{self.port}", *POOL_QUOTAS, *self.flags],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.tree,
                env=env)
        client = self.client()
        deadline = time.monotonic() + 30
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"coordinator exited:\n{self.log_tail()}")
                try:
                    if client.json("GET", "/health")[0] == 200:
                        return self
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator not healthy:\n{self.log_tail()}")
                time.sleep(0.05)
        finally:
            client.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, source: str | None = None) -> Client:
        return Client("127.0.0.1", self.port, source)

    def log_tail(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-4000:].decode(errors="replace")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def with_replicas(replicas: int) -> dict[str, Any]:
    """The trivial job, run on ``replicas`` workers."""
    return {"manifest": {**TRIVIAL["manifest"], "replicas": replicas},
            "files": TRIVIAL["files"]}


def run_job(client: Client, poll: float, backoff: float = 1.0,
            max_poll: float = 0.02, body: dict[str, Any] = TRIVIAL
            ) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    code, answer = client.json("POST", "/submit", body)
    if code != 200:
        raise RuntimeError(f"submit: {code} {answer}")
    status, _ = client.wait(answer["job_id"], poll=poll, backoff=backoff, max_poll=max_poll)
    return (time.perf_counter() - t0) * 1000, status


def collect(client: Client, job_id: str) -> None:
    for method, path in (("GET", f"/logs/{job_id}"), ("DELETE", f"/jobs/{job_id}")):
        code, doc = client.json(method, path)
        if code != 200:
            raise RuntimeError(f"{method} {path}: {code} {doc}")


def timed(client: Client, method: str, path: str) -> float:
    t0 = time.perf_counter()
    code, _ = client.request(method, path)
    elapsed = (time.perf_counter() - t0) * 1000
    if code != 200:
        raise RuntimeError(f"{method} {path}: {code}")
    return elapsed


def latency(paths: dict[str, Client], args: argparse.Namespace) -> dict[str, Any]:
    series: dict[str, dict[str, list[float]]] = {
        name: {"health": [], "status": [], "job": []} for name in paths}
    errors = 0
    finished: dict[str, str] = {}
    for name, client in paths.items():
        _, status = run_job(client, args.poll)
        finished[name] = status["job_id"]  # kept: /status of a finished job, N times
        for _ in range(args.warmup):
            _, status = run_job(client, args.poll)
            collect(client, status["job_id"])
    for _ in range(args.n):
        for name, client in paths.items():  # interleaved
            got = series[name]
            got["health"].append(timed(client, "GET", "/health"))
            got["status"].append(timed(client, "GET", f"/status/{finished[name]}"))
            t, status = run_job(client, args.poll)
            collect(client, status["job_id"])
            if status["status"] != "completed":
                errors += 1
                continue
            got["job"].append(t)
    for name, client in paths.items():
        client.json("DELETE", f"/jobs/{finished[name]}")
    return {"runs": args.n, "errors": errors,
            "ms": {name: {k: summary(v) for k, v in got.items()} for name, got in series.items()}}


def throughput_at(make_client: Any, concurrency: int, args: argparse.Namespace,
                  worker: Worker, coordinator_pid: int,
                  body: dict[str, Any] = TRIVIAL) -> dict[str, Any]:
    lock = threading.Lock()
    done: list[float] = []
    errors: list[str] = []
    start = time.perf_counter() + 0.2
    deadline = start + args.seconds

    def loop(index: int) -> None:
        # Each thread its own loopback address: its own client to the per-IP quotas, as
        # real clients are (one client's submissions are serialised by the coordinator's
        # pool-wide quota check).
        client = make_client(f"127.0.1.{index + 1}")
        client.json("GET", "/health")
        time.sleep(max(0.0, start - time.perf_counter()))
        while time.perf_counter() < deadline:
            try:
                t, status = run_job(client, args.poll, args.backoff, args.max_poll, body)
                ended = time.perf_counter()
                collect(client, status["job_id"])
            except Exception as e:  # noqa: BLE001 - every failure is an error to count
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                client.close()
                continue
            with lock:
                if status["status"] != "completed":
                    errors.append(status["status"])
                elif ended <= deadline:
                    done.append(t)
        client.close()

    meter = CpuMeter(worker)
    coordinator_before = process_cpu(coordinator_pid)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = meter.stop()
    coordinator_cpu = process_cpu(coordinator_pid) - coordinator_before
    return {"concurrency": concurrency, "completed": len(done),
            "jobs_per_s": len(done) / args.seconds, "errors": len(errors),
            "error_samples": errors[:5], "latency_ms": summary(done), "_latencies": done,
            "coordinator_cores": round(coordinator_cpu / cpu["seconds"], 3),
            # CpuMeter counts the coordinator (not the worker's, not ours) as "others".
            "others_cores": round(max(0.0, cpu["others_cores"]
                                      - coordinator_cpu / cpu["seconds"]), 2),
            "cpu": cpu}


def merge(parts: list[dict[str, Any]], path: str, seconds: float) -> dict[str, Any]:
    """The slices of one path and concurrency as one run."""
    latencies: list[float] = [t for p in parts for t in p.pop("_latencies")]
    completed = sum(p["completed"] for p in parts)
    return {"path": path, "concurrency": parts[0]["concurrency"], "seconds": seconds,
            "completed": completed, "jobs_per_s": completed / seconds,
            "errors": sum(p["errors"] for p in parts),
            "error_samples": [e for p in parts for e in p["error_samples"]][:5],
            "latency_ms": summary(latencies),
            "coordinator_cores": round(sum(p["coordinator_cores"] for p in parts)
                                       / len(parts), 3),
            "others_cores": round(sum(p["others_cores"] for p in parts) / len(parts), 2),
            "slices": parts}


def replicas_bench(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    """The trivial job at each ``--replicas`` level on three workers, one coordinator."""
    levels = [int(r) for r in args.replicas.split(",") if r]
    workers: list[tuple[Worker, str]] = []
    coordinator: Coordinator | None = None
    results: dict[str, Any] = {"levels": levels, "workers": 3}
    try:
        for i in range(3):
            key = os.path.join(scratch, f"replica-{i}.pem")
            worker_id = keygen(key)
            workers.append((Worker(*RAISED_QUOTAS, "--max-concurrent", str(args.max_concurrent),
                                   "--worker-key", key, "--trusted-proxy", "127.0.0.1").start(),
                            worker_id))
        coordinator = Coordinator(scratch, workers, ("--max-replicas", str(max(levels))),
                                  name="replicas").start()
        client = coordinator.client()
        series: dict[int, list[float]] = {r: [] for r in levels}
        errors = 0
        for _ in range(args.warmup):
            for r in levels:
                _, status = run_job(client, args.poll, body=with_replicas(r))
                collect(client, status["job_id"])
        for _ in range(args.n):
            for r in levels:  # interleaved
                t, status = run_job(client, args.poll, body=with_replicas(r))
                collect(client, status["job_id"])
                if status["status"] != "completed":
                    errors += 1
                    continue
                series[r].append(t)
        client.close()
        results["latency"] = {"runs": args.n, "errors": errors,
                              "ms": {str(r): summary(v) for r, v in series.items()}}
        base = results["latency"]["ms"][str(levels[0])]["p50"]
        print_table(f"Replicated job, one at a time, {args.n} runs each, interleaved (ms)",
                    ("replicas", "p50", "p90", "p99", f"p50 / replicas {levels[0]}"),
                    [(r, s["p50"], s["p90"], s["p99"], s["p50"] / base)
                     for r, s in ((r, results["latency"]["ms"][str(r)]) for r in levels)],
                    notes=[(f"errors: {errors}; 3 workers, each poll of /status asks every "
                            "replica's worker")])
        slices: dict[int, list[dict[str, Any]]] = {r: [] for r in levels}
        for _ in range(args.rounds):
            for r in levels:
                slices[r].append(throughput_at(coordinator.client, args.replica_concurrency,
                                               args, workers[0][0], coordinator.pid,
                                               with_replicas(r)))
        runs = [dict(merge(parts, f"replicas {r}", args.seconds * args.rounds), replicas=r)
                for r, parts in slices.items()]
        results["throughput"] = runs
        base_rate = runs[0]["jobs_per_s"] or float("nan")
        print_table(f"Replicated job, {args.replica_concurrency} clients, {args.rounds} "
                    f"alternating slices of {args.seconds:g} s per row",
                    ("replicas", "completed", "jobs/s", f"vs replicas {levels[0]}", "errors",
                     "p50 ms", "p99 ms", "coordinator cores"),
                    [(r["replicas"], r["completed"], r["jobs_per_s"],
                      r["jobs_per_s"] / base_rate, r["errors"],
                      r["latency_ms"].get("p50", float("nan")),
                      r["latency_ms"].get("p99", float("nan")), r["coordinator_cores"])
                     for r in runs],
                    notes=["jobs/s counts replicated jobs (each runs `replicas` times)",
                           (f"{os.cpu_count()} cores shared by 3 workers, the coordinator "
                            "and the clients")])
    finally:
        if coordinator is not None:
            coordinator.stop()
        for worker, _ in workers:
            worker.stop()
            worker.remove_state_dir()
    return results


def keygen(path: str) -> str:
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "sandrun", "keygen", "--out", path],
                         check=True, capture_output=True, env=env, cwd=_ROOT)
    return out.stdout.decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="latency runs per path")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="throughput slice length (default 5 s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating direct/coordinator slices per concurrency (default 3)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--poll", type=float, default=0.001,
                        help="seconds slept before each /status poll")
    parser.add_argument("--backoff", type=float, default=1.5)
    parser.add_argument("--max-poll", type=float, default=0.02)
    parser.add_argument("--max-concurrent", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--name", default="coordinator")
    parser.add_argument("--replicas", default="1,2,3",
                        help="replica levels to compare on three workers ('' skips them)")
    parser.add_argument("--replica-concurrency", type=int, default=4,
                        help="client threads for the replicated throughput (default 4)")
    parser.add_argument("--only-replicas", action="store_true",
                        help="run only the replicated-job part")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if os.geteuid() != 0:
        sys.exit("bench/coordinator.py starts a real worker and must run as root")

    scratch = tempfile.mkdtemp(prefix="sandrun-bench-coordinator-")
    if args.only_replicas:
        write_json(args.name, {"replicas": replicas_bench(args, scratch)})
        return
    key = os.path.join(scratch, "worker.pem")
    worker_id = keygen(key)
    flags = (*RAISED_QUOTAS, "--max-concurrent", str(args.max_concurrent),
             "--worker-key", key, "--trusted-proxy", "127.0.0.1")
    worker = Worker(*flags).start()
    coordinator = Coordinator(scratch, [(worker, worker_id)]).start()
    results: dict[str, Any] = {"worker_flags": list(flags),
                               "coordinator_flags": list(POOL_QUOTAS),
                               "job": "sh true.sh (exit 0)"}
    try:
        direct, via = worker.client(), coordinator.client()
        lat = latency({"direct": direct, "coordinator": via}, args)
        direct.close()
        via.close()
        results["latency"] = lat
        ms = lat["ms"]
        rows = []
        for key_name, label in (("health", "GET /health"), ("status", "GET /status (finished)"),
                                ("job", "job: submit -> seen completed")):
            d, c = ms["direct"][key_name], ms["coordinator"][key_name]
            rows.append((label, d["p50"], c["p50"], c["p50"] - d["p50"], d["p99"], c["p99"]))
        print_table(f"Latency, one at a time, {args.n} runs each, interleaved (ms)",
                    ("", "direct p50", "coord p50", "added p50", "direct p99", "coord p99"),
                    rows, notes=[(f"errors: {lat['errors']}; job completion seen by polling "
                                  f"/status every {args.poll * 1000:g} ms (each poll proxied "
                                  "through the coordinator too)")])
        runs = []
        for c in concurrency:
            # Alternating slices, so both paths see the same (shared, noisy) machine.
            slices: dict[str, list[dict[str, Any]]] = {"direct": [], "coordinator": []}
            for _ in range(args.rounds):
                for name, make in (("direct", worker.client),
                                   ("coordinator", coordinator.client)):
                    slices[name].append(throughput_at(make, c, args, worker, coordinator.pid))
            for name, parts in slices.items():
                runs.append(merge(parts, name, args.seconds * args.rounds))
        results["throughput"] = runs
        rows = [(r["concurrency"], r["path"], r["completed"], r["jobs_per_s"], r["errors"],
                 r["latency_ms"].get("p50", float("nan")),
                 r["latency_ms"].get("p99", float("nan")), r["coordinator_cores"],
                 r["others_cores"]) for r in runs]
        print_table(f"Throughput, trivial job, {args.rounds} alternating slices of "
                    f"{args.seconds:g} s per row",
                    ("clients", "path", "completed", "jobs/s", "errors", "p50 ms", "p99 ms",
                     "coordinator cores", "others' cores"), rows, notes=[
                        (f"{os.cpu_count()} cores in all: worker, launcher, jobs, "
                         "coordinator and these clients share them"),
                        "per job: POST /submit, polls of /status, GET /logs, DELETE",
                        "each client thread has its own source address (127.0.1.N)"])
        summary_rows = {}
        for c in concurrency:
            d = next(r for r in runs if r["concurrency"] == c and r["path"] == "direct")
            v = next(r for r in runs if r["concurrency"] == c and r["path"] == "coordinator")
            summary_rows[str(c)] = {"direct_jobs_per_s": d["jobs_per_s"],
                                    "coordinator_jobs_per_s": v["jobs_per_s"],
                                    "ratio": v["jobs_per_s"] / d["jobs_per_s"]
                                    if d["jobs_per_s"] else None}
        results["summary"] = {
            "added_p50_ms": {k: ms["coordinator"][k]["p50"] - ms["direct"][k]["p50"]
                             for k in ("health", "status", "job")},
            "throughput": summary_rows}
        results["rss_kb_after"] = {"coordinator": vm_rss_kb(coordinator.pid),
                                   **worker.rss_kb()}
    finally:
        coordinator.stop()
        worker.stop()
        worker.remove_state_dir()
    if args.replicas:
        results["replicas"] = replicas_bench(args, scratch)
    write_json(args.name, results)


if __name__ == "__main__":
    main()
