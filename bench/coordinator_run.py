"""What a coordinator's ``POST /run`` costs it in memory: C loud jobs at once, two trees.

Starts one real worker (``sandrun serve`` as root, quotas raised, a key) and, in
turn, a fresh coordinator in front of it from each of two trees: ``--reference``
(by default the last commit whose coordinator read the worker's ``/logs`` and
``/outputs`` whole and built its answer in memory) and ``--commit`` (by default
this working tree, which relays them into its answer as they are read).  For each,
C clients send ``POST /run`` at once for a job that prints ``--mib`` MiB to stdout
(printable text, or ``--escaped``: ``\\x01`` bytes, six bytes of JSON each), and

read
    every client reads its answer as it comes;
stalled
    every client sends its request and then reads nothing for ``--stall`` seconds
    (a slow or hostile client), then reads it all.

While it runs, the coordinator's resident memory (VmRSS) is sampled every 20 ms;
the table gives its peak over the baseline of the fresh process, the wall time of
the C answers, and checks every answer's ``stdout`` byte for byte.  Rounds
alternate the trees so both see the same (shared, noisy) machine; each
measurement is a new coordinator process (a Python process keeps memory it once
used, so only a fresh one's peak says what one burst costs).

Usage (as root)::

    python3 bench/coordinator_run.py                      # 8 clients, 10 MiB, 2 rounds
    python3 bench/coordinator_run.py -c 8 --mib 10 --escaped --rounds 1
    python3 bench/coordinator_run.py --reference main~5 --commit HEAD
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT  # run as a script: import bench.* from the repository root

import argparse
import http.client
import json
import shutil
import socket
import tempfile
import threading
import time
from typing import Any

from bench.common import RAISED_QUOTAS, Worker, export_tree, print_table, vm_rss_kb, write_json
from bench.coordinator import Coordinator, keygen

# The parent of the change that streams /run answers: its coordinator reads them whole.
REFERENCE = "ab36556~1"


def loud_job(mib: int, escaped: bool) -> tuple[bytes, bytes]:
    """The /run body of a job printing ``mib`` MiB, and the stdout it prints."""
    line = b"\x01" * 63 + b"\n" if escaped else b"%-63s\n" % b"a line of the job's output"
    count = mib * 1024 * 1024 // len(line) - 1  # under the worker's 10 MiB cap
    code = (f"import os\nline = {line!r}\nblock = line * 1024\n"
            f"for _ in range({count // 1024}):\n    os.write(1, block)\n"
            f"os.write(1, line * {count % 1024})\n")
    body = json.dumps({"manifest": {"entrypoint": "main.py"},
                       "files": {"main.py": code}}).encode()
    return body, line * count


class Sampler:
    """The peak VmRSS of ``pid`` while it runs, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = vm_rss_kb(pid)
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while self.running:
            self.peak = max(self.peak, vm_rss_kb(self.pid))
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def burst(port: int, clients: int, body: bytes, stall: float) -> tuple[list[bytes], float]:
    """C /run requests at once; every answer whole, and the seconds until the last."""
    conns = []
    for _ in range(clients):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.connect()
        assert conn.sock is not None
        if stall:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conns.append(conn)
    answers: list[bytes] = [b""] * clients
    started = time.monotonic()

    def one(i: int) -> None:
        conns[i].request("POST", "/run", body, {"Content-Type": "application/json"})
        if stall:
            time.sleep(stall)
        reply = conns[i].getresponse()
        answers[i] = reply.read() if reply.status == 200 else \
            f"HTTP {reply.status}: ".encode() + reply.read()[:200]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    for conn in conns:
        conn.close()
    return answers, elapsed


def measure(scratch: str, worker: Worker, worker_id: str, tree: str, label: str,
            mode: str, args: argparse.Namespace, body: bytes, stdout: str) -> dict[str, Any]:
    coordinator = Coordinator(scratch, [(worker, worker_id)], name=f"coordinator-{label}",
                              tree=tree).start()
    try:
        time.sleep(0.5)  # its first health round is over
        baseline = vm_rss_kb(coordinator.pid)
        sampler = Sampler(coordinator.pid)
        answers, elapsed = burst(coordinator.port, args.clients, body,
                                 args.stall if mode == "stalled" else 0.0)
        peak = sampler.stop()
    finally:
        coordinator.stop()
    exact = 0
    errors = []
    for answer in answers:
        try:
            if json.loads(answer)["stdout"] == stdout:
                exact += 1
        except (ValueError, KeyError):
            errors.append(answer[:120].decode("latin-1"))
    return {"tree": label, "mode": mode, "baseline_kib": baseline, "peak_kib": peak,
            "growth_mib": (peak - baseline) / 1024, "seconds": elapsed,
            "answer_mib": max(len(a) for a in answers) / 2**20, "exact": exact,
            "errors": errors[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--clients", type=int, default=8)
    parser.add_argument("--mib", type=int, default=10, help="stdout per job (default 10)")
    parser.add_argument("--escaped", action="store_true",
                        help="print \\x01 bytes (6 bytes of JSON each) instead of text")
    parser.add_argument("--stall", type=float, default=5.0,
                        help="seconds a stalled client reads nothing (default 5)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reference", default=REFERENCE,
                        help=f"the tree to compare against (default {REFERENCE})")
    parser.add_argument("--commit", default=None,
                        help="the tree measured (default: this working tree)")
    parser.add_argument("--max-concurrent", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--name", default="coordinator_run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/coordinator_run.py starts a real worker and must run as root")
    scratch = tempfile.mkdtemp(prefix="sandrun-bench-run-")
    reference, reference_sha = export_tree(args.reference)
    current, current_label = export_tree(args.commit) if args.commit else (_ROOT, "tree")
    trees = [(reference, f"ref {reference_sha}"), (current, current_label)]
    key = os.path.join(scratch, "worker.pem")
    worker_id = keygen(key)
    worker = Worker(*RAISED_QUOTAS, "--max-concurrent", str(args.max_concurrent),
                    "--worker-key", key, "--trusted-proxy", "127.0.0.1").start()
    body, stdout_bytes = loud_job(args.mib, args.escaped)
    stdout = stdout_bytes.decode()
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            for mode in ("read", "stalled"):
                for tree, label in trees:
                    rows.append(measure(scratch, worker, worker_id, tree, label, mode, args,
                                        body, stdout))
                    r = rows[-1]
                    print(f"  {label:14} {mode:8} +{r['growth_mib']:7.1f} MiB "
                          f"{r['seconds']:6.2f} s exact {r['exact']}/{args.clients}",
                          flush=True)
    finally:
        worker.stop()
        worker.remove_state_dir()
        shutil.rmtree(reference, ignore_errors=True)
        if args.commit:
            shutil.rmtree(current, ignore_errors=True)
    summary: dict[str, Any] = {}
    for mode in ("read", "stalled"):
        for _, label in trees:
            mine = [r for r in rows if r["mode"] == mode and r["tree"] == label]
            summary[f"{label} {mode}"] = {
                "growth_mib_max": max(r["growth_mib"] for r in mine),
                "seconds_median": sorted(r["seconds"] for r in mine)[len(mine) // 2],
                "exact": sum(r["exact"] for r in mine), "answers": len(mine) * args.clients}
    table = [(key, v["growth_mib_max"], v["seconds_median"], f"{v['exact']}/{v['answers']}")
             for key, v in summary.items()]
    kind = "\\x01 bytes (6 bytes of JSON each)" if args.escaped else "text"
    print_table(f"Coordinator RSS, {args.clients} concurrent POST /run of a job printing "
                f"{args.mib} MiB of {kind}, {args.rounds} rounds",
                ("tree, clients", "peak RSS growth MiB", "seconds (median)",
                 "stdout exact"), table, notes=[
                    ("read: clients read as answers come; stalled: they read nothing for "
                     f"{args.stall:g} s first"),
                    "growth: peak VmRSS of a fresh coordinator over its baseline"])
    ratios = {}
    for mode in ("read", "stalled"):
        ref = summary[f"{trees[0][1]} {mode}"]["growth_mib_max"]
        cur = summary[f"{trees[1][1]} {mode}"]["growth_mib_max"]
        ratios[mode] = ref / cur if cur > 0 else None
        print(f"{mode}: reference grows {ref:.1f} MiB, measured tree {cur:.1f} MiB"
              + (f" ({ref / cur:.0f}x less)" if cur > 0 else ""))
    write_json(args.name, {"clients": args.clients, "mib": args.mib, "escaped": args.escaped,
                           "stall_s": args.stall, "runs": rows, "summary": summary,
                           "growth_ratio_reference_over_measured": ratios})


if __name__ == "__main__":
    main()
