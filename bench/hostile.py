"""Hostile clients: ``/health`` latency idle and while each attack runs, worker RSS around it.

Starts ``sandrun serve`` (default limits and connection policy, quotas raised so
the attacks are not simply rate-limited away) and, for each attack, probes
``GET /health`` every 20 ms on fresh connections from its own address
(127.0.0.3) while the attack runs from others, then prints p50/p99/max of
those answers next to the idle figure measured the same way first (the
reference), and the worker's RSS before and after:

- ``sparse-map``: for 5 s, one after another, gzip'd tars whose pax header
  declares a GNU sparse member with a map of 4 million entries (an unprotected
  worker grew 73 MB -> 806 MB and answered after 21.7 s, once);
- ``pax-digits``: the same with archives of six 64 KiB all-digit pax headers
  (CVE-2024-6232: the quadratic regex held the GIL for about a minute per upload);
- ``idle-connections``: 1,100 connections that never send a byte, from 8
  addresses (an unprotected worker under ``ulimit -n 1024`` stopped answering);
- ``slowloris``: 200 connections sending a header line every second;
- ``bodies-to-health``: 3 parallel 60 MB bodies to ``POST /health``, 20 rounds
  (an unprotected worker spooled each one whole before its 405);
- ``parallel-uploads``: 6 parallel 60 MB ``/submit`` bodies from one address.

``--commit REF`` runs the worker from that commit instead (``export_tree``), to
compare with a tree from before the protections; attacks that an old tree
would take minutes over are cut off at ``--attack-timeout`` seconds.

Usage (as root): ``python3 bench/hostile.py [--only sparse-map,pax-digits] [--commit REF]``
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT

import argparse
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from bench.common import RAISED_QUOTAS, Worker, export_tree, percentile, print_table, write_json
from tests import hostile_archives as ha
from tests.bodies import multipart

PROBE = "127.0.0.3"
MANIFEST = '{"entrypoint": "main.py"}'


class Probe:
    """``GET /health`` every ``every`` seconds on a new connection; latencies, failures."""

    def __init__(self, worker: Worker, every: float = 0.02) -> None:
        self.worker, self.every = worker, every
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection((self.worker.host, self.worker.port), timeout=60,
                                              source_address=(PROBE, 0)) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    ok = s.recv(16).startswith(b"HTTP/1.1 200")
                    while s.recv(65536):
                        pass
            except OSError:
                ok = False
            self.latencies.append(time.monotonic() - started)
            self.failures += not ok
            self._stop.wait(self.every)


def post(worker: Worker, body: bytes, content_type: str, source: str,
         path: str = "/submit", timeout: float = 600) -> int:
    """One request on its own connection; its status (0 when it got none)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        with socket.create_connection((worker.host, worker.port), timeout=timeout,
                                      source_address=(source, 0)) as s:
            s.sendall(head)
            view = memoryview(body)
            try:
                for i in range(0, len(view), 1 << 20):
                    s.sendall(view[i:i + (1 << 20)])
            except OSError:
                pass  # answered and closed before the whole body went: the point
            answer = s.recv(64)
            return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else 0
    except (OSError, ValueError, IndexError):
        return 0


def archive_attack(archive: bytes, seconds: float = 5.0) -> Callable[[Worker, float], list[int]]:
    """Upload ``archive`` again and again, one at a time, for ``seconds``."""
    def run(worker: Worker, timeout: float) -> list[int]:
        body, kind = multipart({"manifest": MANIFEST}, [("evil.tgz", archive)])
        statuses = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            statuses.append(post(worker, body, kind, "127.0.0.2", timeout=timeout))
        return statuses
    return run


def idle_connections(worker: Worker, timeout: float, count: int = 1100) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            try:
                socks.append(socket.create_connection(
                    (worker.host, worker.port), timeout=5,
                    source_address=(f"127.0.2.{i % 8 + 1}", 0)))
            except OSError:
                break
            if i % 50 == 49:
                time.sleep(0.01)
        time.sleep(3)
        return [len(socks)]
    finally:
        for s in socks:
            s.close()


def slowloris(worker: Worker, timeout: float, count: int = 200) -> list[int]:
    socks = []
    for i in range(count):
        s = socket.create_connection((worker.host, worker.port), timeout=5,
                                     source_address=(f"127.0.3.{i % 8 + 1}", 0))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    try:
        for _ in range(int(min(timeout, 15))):
            time.sleep(1)
            for s in socks:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
        return [count]
    finally:
        for s in socks:
            s.close()


def parallel(request: Callable[[], int], count: int) -> list[int]:
    results: list[int] = [0] * count

    def one(i: int) -> None:
        results[i] = request()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def bodies_to_health(worker: Worker, timeout: float) -> list[int]:
    body = b"x" * 60_000_000
    statuses: list[int] = []
    for _ in range(20):
        statuses += parallel(lambda: post(worker, body, "application/octet-stream",
                                          "127.0.0.2", "/health", timeout), 3)
    return statuses


def parallel_uploads(worker: Worker, timeout: float) -> list[int]:
    body, kind = multipart({"manifest": MANIFEST}, [("main.py", b"print(1)"),
                                                    ("data.bin", b"x" * 60_000_000)])
    return parallel(lambda: post(worker, body, kind, "127.0.0.2", timeout=timeout), 6)


ATTACKS: dict[str, Callable[[Worker, float], list[int]]] = {
    "sparse-map": archive_attack(ha.sparse_map_bomb()),
    "pax-digits": archive_attack(ha.digit_pax_headers()),
    "idle-connections": idle_connections,
    "slowloris": slowloris,
    "bodies-to-health": bodies_to_health,
    "parallel-uploads": parallel_uploads,
}


def state_used_mb(worker: Worker) -> float:
    st = os.statvfs(worker.state_dir)
    return (st.f_blocks - st.f_bfree) * st.f_frsize / 1e6


def measure(worker: Worker, name: str, attack: Callable[[Worker, float], list[int]] | None,
            seconds: float, timeout: float) -> dict[str, Any]:
    rss_before = worker.rss_kb()["worker"]
    peak_state = state_used_mb(worker)
    statuses: list[int] = []
    with Probe(worker) as probe:
        started = time.monotonic()
        if attack is None:
            time.sleep(seconds)
        else:
            done = threading.Event()

            def run() -> None:
                statuses.extend(attack(worker, timeout))
                done.set()

            threading.Thread(target=run, daemon=True).start()
            while not done.wait(0.1) and time.monotonic() - started < timeout:
                peak_state = max(peak_state, state_used_mb(worker))
        elapsed = time.monotonic() - started
    lat = probe.latencies
    return {"attack": name, "seconds": round(elapsed, 1), "probes": len(lat),
            "failed": probe.failures, "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000, "max_ms": max(lat) * 1000,
            "rss_before_mb": rss_before / 1024, "rss_after_mb": worker.rss_kb()["worker"] / 1024,
            "state_peak_mb": peak_state, "statuses": sorted(set(statuses))}


def unpack_cost(runs: int) -> list[tuple[Any, ...]]:
    """What parsing a submission in a child costs: in process vs ``Unpacker``, per upload."""
    import tempfile

    from sandrun.api import uploads
    from sandrun.api.unpacker import Unpacker
    from sandrun.config import Limits
    from tests.bodies import tar_bytes

    cases = {
        "JSON, one small file": (
            b'{"manifest": {"entrypoint": "main.py"}, "files": {"main.py": "print(1)"}}',
            "application/json"),
        "multipart, 1 MB tar.gz of 20 files": multipart(
            {"manifest": MANIFEST},
            [("job.tgz", tar_bytes({"main.py": "print(1)",
                                    **{f"data/{i}.bin": os.urandom(50_000)
                                       for i in range(20)}}))]),
    }
    unpacker = Unpacker(Limits())
    unpacker.start()
    rows = []
    scratch = tempfile.mkdtemp(prefix="sandrun-unpack-bench-")
    try:
        for name, (body, kind) in cases.items():
            timings: dict[str, list[float]] = {"here": [], "child": []}
            for i in range(runs):
                for where in ("here", "child"):
                    work = os.path.join(scratch, f"{where}-{i}")
                    os.makedirs(work + "/work")
                    os.makedirs(work + "/staging")
                    spooled: Any = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed below)
                        64 * 1024, dir=scratch)
                    spooled.write(body)
                    started = time.perf_counter()
                    if where == "here":
                        spooled.seek(0)
                        uploads.parse_submission(kind.encode(), spooled, work + "/work",
                                                 work + "/staging", Limits())
                    else:
                        unpacker.parse(kind.encode(), spooled, work + "/work",
                                       work + "/staging")
                    timings[where].append(time.perf_counter() - started)
                    spooled.close()
                    shutil.rmtree(work)
            here, child = (percentile(timings[k], 50) * 1000 for k in ("here", "child"))
            rows.append((name, runs, here, child, child - here, child / here))
    finally:
        unpacker.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print_table("Parsing one submission: in the worker's thread vs in a forked child (p50)",
                ["submission", "runs", "in process ms", "child ms", "added ms", "ratio"], rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated attacks (default: all): "
                        + ", ".join(ATTACKS))
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="how long the idle reference is probed (default 5)")
    parser.add_argument("--attack-timeout", type=float, default=120.0,
                        help="an attack still running after this long is left (default 120)")
    parser.add_argument("--commit", help="run the worker from this commit (default: this tree)")
    parser.add_argument("--unpack-runs", type=int, default=100,
                        help="submissions parsed each way for the unpack cost table (default "
                             "100; 0 skips it)")
    args = parser.parse_args()
    cost = unpack_cost(args.unpack_runs) if args.unpack_runs else []
    names = args.only.split(",") if args.only else list(ATTACKS)
    tree, source = export_tree(args.commit) if args.commit else (None, "working tree")
    worker = Worker(*RAISED_QUOTAS, "--max-concurrent", "2", tree=tree).start()
    rows: list[dict[str, Any]] = []
    try:
        idle = measure(worker, "idle (reference)", None, args.idle_seconds, 0)
        rows.append(idle)
        for name in names:
            rows.append(measure(worker, name, ATTACKS[name], 0, args.attack_timeout))
            time.sleep(1)
    finally:
        worker.stop()
        worker.remove_state_dir()
        if tree:
            shutil.rmtree(tree, ignore_errors=True)
    p99_idle = idle["p99_ms"] or 1e-9
    print_table(
        f"/health while a hostile client attacks ({source}; probe every 20 ms, new connection)",
        ["attack", "s", "probes", "failed", "p50 ms", "p99 ms", "max ms", "p99 / idle",
         "RSS before MB", "RSS after MB", "state peak MB", "answers"],
        [(r["attack"], r["seconds"], r["probes"], r["failed"], r["p50_ms"], r["p99_ms"],
          r["max_ms"], r["p99_ms"] / p99_idle, r["rss_before_mb"], r["rss_after_mb"],
          r["state_peak_mb"], ",".join(map(str, r["statuses"])) or "-") for r in rows])
    write_json("hostile", {"source": source, "rows": rows,
                           "unpack_cost": [dict(zip(("submission", "runs", "in_process_ms",
                                                     "child_ms", "added_ms", "ratio"), row))
                                           for row in cost]})


if __name__ == "__main__":
    main()
