"""Helpers shared by the HTTP benchmarks and the load and fault tests.

- statistics (``percentile``, ``summary``), a plain-text table and JSON results
  under ``bench/results/``;
- ``Client``: one raw keep-alive ``http.client`` connection, optionally bound to a
  source address (the worker's quotas are per client IP, so the load test speaks
  from 20 loopback addresses);
- ``Worker``: a real ``sandrun serve`` subprocess on a free port and a fresh state
  directory, with what a test needs to see from the host: its RSS (worker and
  launcher), the mounts under its state directory, its job cgroups and the
  processes of its jobs.

Stdlib only, so a benchmark adds nothing to the numbers it measures but its own
client work.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import http.client
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
CGROUP_ROOT = "/sys/fs/cgroup"
JOB_UIDS = range(60000, 60100)  # every slot uid a worker may give a job
TERMINAL = ("completed", "failed")
_LISTENING = re.compile(r"sandrun worker listening on \S+:(\d+)")

# Quotas raised for benchmarks and load tests: the defaults (2 active jobs, 20 an hour,
# 10 CPU-seconds a minute per IP) would turn a benchmark into a 429 test.
RAISED_QUOTAS = ("--cpu-quota", "100000", "--max-active-per-ip", "100000",
                 "--jobs-per-hour", "100000000", "--queue-size", "1000")


# -- statistics and reporting ------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) with linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, mean, min and max of ``values``."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "mean": sum(values) / len(values),
            "min": min(values), "max": max(values)}


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]],
                notes: Sequence[str] = ()) -> str:
    """Print (and return) an aligned plain-text table, with notes beneath it."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title, "-" * len(title)]
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"  {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def machine() -> dict[str, Any]:
    """Where a result was measured: cores, memory, kernel, Python, cgroup version, commit."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5,
                                check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "cgroup": 2 if os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers") else 1,
            "commit": commit, "load_avg_at_start": os.getloadavg()}


def write_json(name: str, data: dict[str, Any]) -> str:
    """Write ``bench/results/<name>.json`` (the latest run) and return its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    document = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime()),
                "machine": machine(), **data}
    with open(path, "w") as f:
        json.dump(document, f, indent=2, sort_keys=False)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}", flush=True)
    return path


# -- a tiny fast HTTP client -----------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection to a worker; reconnects once if it was closed.

    Not thread-safe: use one per thread.  ``source`` binds the local address, so one
    host can look like many clients to the worker's per-IP quotas.
    """

    def __init__(self, host: str, port: int, source: str | None = None,
                 timeout: float = 30.0) -> None:
        self.host, self.port, self.source, self.timeout = host, port, source, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(
            self.host, self.port, timeout=self.timeout,
            source_address=(self.source, 0) if self.source else None)
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError, http.client.CannotSendRequest):
                # The server closed an idle keep-alive connection: once more on a new one.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, document: Any = None) -> tuple[int, Any]:
        body = None if document is None else json.dumps(document).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, data = self.request(method, path, body, headers)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, {"raw": data[:200].decode("latin-1")}

    def submit(self, manifest: dict[str, Any], files: dict[str, Any]) -> tuple[int, Any]:
        return self.json("POST", "/submit", {"manifest": manifest, "files": files})

    def status(self, job_id: str) -> dict[str, Any]:
        code, doc = self.json("GET", f"/status/{job_id}")
        if code != 200:
            raise RuntimeError(f"/status/{job_id}: {code} {doc}")
        return doc  # type: ignore[no-any-return]

    def wait(self, job_id: str, poll: float = 0.001, timeout: float = 120.0,
             backoff: float = 1.0, max_poll: float = 0.05) -> tuple[dict[str, Any], int]:
        """Poll ``/status`` until the job is terminal; returns (status, polls made).

        Sleeps ``poll`` seconds before each poll, multiplied by ``backoff`` after each
        unfinished answer up to ``max_poll``: completion is seen at most one sleep and one
        round trip after it happened.
        """
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            time.sleep(poll)
            doc = self.status(job_id)
            polls += 1
            if doc["status"] in TERMINAL:
                return doc, polls
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job_id} still {doc['status']} after {timeout} s")
            poll = min(poll * backoff, max(max_poll, poll))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_ws(host: str, port: int, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Learn a job's end from its WebSocket (``?format=json``): returns the ``done`` frame.

    A minimal stdlib client (one new TCP connection, the handshake, unmasked server
    frames read until ``done``), so the measurement holds no client library's costs.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall((f"GET /logs/{job_id}/stream?format=json HTTP/1.1\r\n"
                      f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                      ).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the WebSocket handshake")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))

        def need(n: int) -> bytes:
            nonlocal buf
            while len(buf) < n:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed before the done frame")
                buf += chunk
            data, buf = buf[:n], buf[n:]
            return data

        message = b""
        while True:
            b0, b1 = need(2)
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(need(2), "big")
            elif length == 127:
                length = int.from_bytes(need(8), "big")
            payload = need(length)
            opcode = b0 & 0x0F
            if opcode == 8:
                raise ConnectionError(f"closed before the done frame: {payload[2:]!r}")
            if opcode in (0, 1):
                message += payload
                if b0 & 0x80:
                    frame = json.loads(message)
                    message = b""
                    if frame.get("type") == "done":
                        # A masked close frame (code 1000), then hang up.
                        mask = os.urandom(4)
                        body = (1000).to_bytes(2, "big")
                        sock.sendall(bytes([0x88, 0x80 | len(body)]) + mask
                                     + bytes(c ^ mask[i % 4] for i, c in enumerate(body)))
                        return frame  # type: ignore[no-any-return]


def raw_request(host: str, port: int, head: bytes, body: bytes = b"",
                source: str | None = None) -> None:
    """Send raw bytes and close without reading: a client that goes away."""
    with socket.create_connection((host, port), source_address=(source, 0) if source else None
                                  ) as sock:
        sock.sendall(head + body)


# -- a real worker -----------------------------------------------------------------------------


def export_tree(ref: str) -> tuple[str, str]:
    """A clean copy of the sources at ``ref`` (``git archive``) and the commit it names.

    Benchmarks measure a commit, not whatever is half-edited in the checkout: pass the
    directory as ``Worker(tree=...)`` (it goes first on the worker's PYTHONPATH, ahead of
    the editable install).
    """
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = tempfile.mkdtemp(prefix=f"sandrun-{sha}-")
    archive = subprocess.Popen(["git", "-C", ROOT, "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", tree], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return tree, sha


def instance_name(state_dir: str) -> str:
    """The worker's cgroup directory name (as ``sandrun.service.instance_name``)."""
    return "sandrun-" + hashlib.sha256(state_dir.encode()).hexdigest()[:12]


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Worker:
    """A real ``sandrun serve`` as a subprocess (run as root), on a free loopback port.

    ``state_dir`` is fresh unless given (a restart passes the old one).  ``stop`` sends
    SIGTERM and waits; ``kill`` sends SIGKILL and leaves everything as a crash would.
    """

    def __init__(self, *flags: str, state_dir: str | None = None, host: str = "127.0.0.1",
                 log_path: str | None = None, tree: str | None = None) -> None:
        self.flags = flags
        # The sources the worker runs from: this checkout, or SANDRUN_TREE (see export_tree).
        self.tree = tree or os.environ.get("SANDRUN_TREE") or ROOT
        self.host = host
        self.port = 0  # the worker picks a free one; read from its start-up line
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="sandrun-bench-")
        self.instance = instance_name(os.path.abspath(self.state_dir))
        self.log_path = log_path or self.state_dir.rstrip("/") + ".log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cgroup_bases: list[str] = []
        self.cgroup: str | None = None  # cgroup v2: the worker's own (worker_cgroup)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Worker:
        self.cgroup = worker_cgroup(f"bench-{self.instance}")
        argv = in_cgroup([sys.executable, "-m", "sandrun", "serve", "--state-dir",
                          self.state_dir, "--listen", f"{self.host}:0", *self.flags],
                         self.cgroup)
        log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        env = dict(os.environ,
                   PYTHONPATH=self.tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.tree)
        deadline = time.monotonic() + timeout
        while not self.port:
            with open(self.log_path, "rb") as f:
                f.seek(log_start)
                match = _LISTENING.search(f.read().decode(errors="replace"))
            if match:
                self.port = int(match.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start ({self.proc.poll()}):\n"
                                   + self.log_tail())
            else:
                time.sleep(0.02)
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n"
                                       + self.log_tail())
                try:
                    code, _ = client.json("GET", "/health")
                    if code == 200 and self.launcher_pid() is not None:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("worker did not answer /health:\n" + self.log_tail())
                time.sleep(0.05)
        finally:
            client.close()
        self.cgroup_bases = self._cgroup_bases()
        return self

    def client(self, source: str | None = None, timeout: float = 30.0) -> Client:
        return Client(self.host, self.port, source, timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-chars:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def launcher_pid(self) -> int | None:
        for child in children(self.pid):
            if "sandrun.sandbox.launcher" in cmdline(child):
                return child
        return None

    def rss_kb(self) -> dict[str, int]:
        """VmRSS of the worker and of its launcher, in KiB, and their sum."""
        worker = vm_rss_kb(self.pid)
        launcher_pid = self.launcher_pid()
        launcher = vm_rss_kb(launcher_pid) if launcher_pid else 0
        return {"worker": worker, "launcher": launcher, "total": worker + launcher}

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: the worker kills its jobs and removes its mounts."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("worker did not stop within "
                                   f"{timeout} s of SIGTERM:\n{self.log_tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of the worker's own clean-up runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def remove_state_dir(self) -> None:
        """After ``stop``: unmount what is left (a failed test), remove the directory, the
        log and the worker's (empty) instance cgroups."""
        for mount in reversed(self.mounts()):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if os.path.exists(self.log_path):
            os.unlink(self.log_path)
        for base in self.cgroup_bases:
            try:
                os.rmdir(base)
            except OSError:
                pass
        remove_worker_cgroup(self.cgroup)

    # -- what the host sees ----------------------------------------------------------------

    def mounts(self) -> list[str]:
        """Mount points at or under the state directory, in the host's mount namespace."""
        return mounts_under(self.state_dir)

    def job_cgroups(self) -> list[str]:
        """Job cgroups under this worker's instance directories (see ``job_cgroups_in``)."""
        found: list[str] = []
        for base in self.cgroup_bases or self._cgroup_bases():
            found += job_cgroups_in(base)
        return sorted(found)

    def _cgroup_bases(self) -> list[str]:
        """Where the launcher makes job cgroups: ``<its cgroup>/<instance>`` per hierarchy."""
        pid = self.launcher_pid() or self.pid
        bases = []
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                names = controllers.split(",") if controllers else [""]
                for name in names:
                    if name in ("memory", "pids", "cpuacct", ""):
                        top = os.path.join(CGROUP_ROOT, name) if name else CGROUP_ROOT
                        if name == "" and not os.path.exists(
                                os.path.join(CGROUP_ROOT, "cgroup.controllers")):
                            continue
                        base = os.path.join(top, path.lstrip("/"))
                        # On v2 the launcher may have moved itself into a supervisor leaf.
                        if os.path.basename(base) == "supervisor":
                            base = os.path.dirname(base)
                        bases.append(os.path.join(base, self.instance))
        return sorted(set(bases))

    def job_processes(self) -> list[tuple[int, int, str]]:
        """Processes that are this worker's jobs: a job uid and inside its instance cgroup,
        or a job uid in no Sandrun cgroup at all (an escapee of unknown origin)."""
        return job_processes(self.instance)


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line holds ``text`` (a worker's state directory is in
    its own, its launcher's and every pre-forked spare's command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        line = cmdline(int(entry))
        if text in line and pid_alive(int(entry)):
            found.append((int(entry), line[:200]))
    return found


def mounts_under(path: str) -> list[str]:
    path = os.path.abspath(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path or point.startswith(path + "/"):
                found.append(point)
    return found


def job_cgroups_in(base: str) -> list[str]:
    """A worker instance directory's job cgroups.

    On v1 a job's cgroup is renamed ``job-<id>``.  v2 cannot rename a cgroup:
    there the job keeps its spare's ``spare-<n>`` name, and is told from an
    unused spare by the limits it was given (a spare's ``pids.max`` is ``max``).
    """
    found = []
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(base, name)
        if name.startswith("job-"):
            found.append(path)
        elif name.startswith("spare-"):
            try:
                with open(os.path.join(path, "pids.max")) as f:
                    limited = f.read().strip() != "max"
            except FileNotFoundError:  # v1 (pids lives elsewhere) or just removed
                limited = False
            if limited and os.path.exists(os.path.join(path, "cgroup.type")):
                found.append(path)
    return sorted(found)


def worker_cgroup(name: str) -> str | None:
    """cgroup v2: a cgroup of its own for a worker started here, as a service has; or None.

    On v2 a worker needs a cgroup that holds no process but its own (see
    ``sandrun.sandbox.cgroups``).  Made beside the cgroup we are in when our
    parent gives its children the controllers (``scripts/test.sh``'s
    ``runner`` leaf, a suite's ``supervisor`` leaf), or beneath the root
    cgroup; None on v1 or anywhere else (the worker then finds its own way).
    The same ``name`` gives the same cgroup: a restarted worker finds its
    predecessor's job cgroups.
    """
    if not os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        return None
    with open("/proc/self/cgroup") as f:
        path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    own = os.path.normpath(os.path.join(CGROUP_ROOT, path.lstrip("/")))
    parent = own
    if os.path.exists(os.path.join(own, "cgroup.type")):  # not the root cgroup
        parent = os.path.dirname(own)
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            if not {"memory", "pids", "cpu"} <= set(f.read().split()):
                return None
    cgroup = os.path.join(parent, name)
    os.makedirs(cgroup, exist_ok=True)
    return cgroup


def in_cgroup(argv: list[str], cgroup: str | None) -> list[str]:
    """``argv`` started inside ``cgroup`` (it joins before it execs; its pid is the same).

    On v2 a predecessor (a worker that ran there and was killed) left ``cgroup`` with
    controllers given to its children, so no process may join it again: a restart
    joins the predecessor's ``supervisor`` leaf, which the worker takes as the same
    subtree (``sandrun.sandbox.cgroups.locate_v2``), and finds the job cgroups it left.
    """
    if cgroup is None:
        return argv
    return ["sh", "-c", 'c="$0"; [ -d "$c/supervisor" ] && c="$c/supervisor"; '
            'echo $$ > "$c/cgroup.procs" && exec "$@"', cgroup, *argv]


def remove_worker_cgroup(cgroup: str | None) -> None:
    """Remove a stopped worker's cgroup and its supervisor leaf (if nothing is left in them)."""
    if cgroup is None:
        return
    for path in (os.path.join(cgroup, "supervisor"), cgroup):
        try:
            os.rmdir(path)
        except OSError:
            pass


def job_processes(instance: str) -> list[tuple[int, int, str]]:
    """(pid, uid, name) of processes with a job uid that belong to ``instance``.

    Other workers may run on the same host (other tests, other benchmarks); their jobs
    sit under their own ``sandrun-*`` cgroups and are not ours to judge.  A job-uid
    process under no ``sandrun-*`` cgroup at all is reported as well.  Zombies are not:
    a job whose launcher died is reparented to the host's init, which reaps it when it
    gets to it (this machine's init takes its time).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
            with open(f"/proc/{entry}/cgroup") as f:
                groups = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        if uid not in JOB_UIDS or fields["State"].split()[0] in ("Z", "X"):
            continue  # a zombie has ended: it holds no memory, files or cgroup, only a pid
        if instance in groups or "sandrun-" not in groups:
            found.append((int(entry), uid, fields["Name"].strip()))
    return found


def wait_for(predicate: Any, within: float, step: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something falsy or ``within`` s pass; returns
    its last value (so callers assert on what was still there)."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def glob_job_cgroups(instance: str) -> list[str]:
    """Every ``job-*`` directory below any ``<instance>`` cgroup on the host (slow: walks)."""
    return sorted(glob.glob(f"{CGROUP_ROOT}/*/**/{instance}/job-*", recursive=True))


# -- who used the CPUs ---------------------------------------------------------------------------


def process_cpu(pid: int | None, children: bool = False) -> float:
    """CPU seconds (user + system) of a process, and of its reaped children if asked."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def host_busy_cpu() -> float:
    """CPU seconds every core of the host spent not idle, since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Splits the host's CPU time over a run: worker, launcher, jobs, this client, others.

    Jobs are the launcher's reaped children; anything else busy on the host (other
    people's work on a shared machine, kernel threads tearing down namespaces) is
    ``others``: a run with a large ``others_cores`` was measured on a busy machine.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.launcher = worker.launcher_pid()
        self.before = self._read()
        self.started = time.monotonic()

    def _read(self) -> dict[str, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        launcher_all = process_cpu(self.launcher, children=True)
        launcher = process_cpu(self.launcher)
        return {"worker": process_cpu(self.worker.pid), "launcher": launcher,
                "jobs": launcher_all - launcher,
                "client": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
                "host": host_busy_cpu()}

    def stop(self) -> dict[str, float]:
        after = self._read()
        seconds = time.monotonic() - self.started
        used = {k: after[k] - self.before[k] for k in after}
        ours = sum(v for k, v in used.items() if k != "host")
        used["others"] = max(0.0, used["host"] - ours)
        result = {f"{k}_cpu_s": round(v, 3) for k, v in used.items()}
        result["seconds"] = round(seconds, 3)
        result["others_cores"] = round(used["others"] / seconds, 2)
        return result


# -- profiles ------------------------------------------------------------------------------------

# Where a sample of the worker is spent, by the first matching frame in its stack (innermost
# first wins): a coarse map of the per-job path.
PROFILE_BUCKETS = (
    ("netns pool (a fresh network namespace per job)", "NetnsPool."),
    # The launcher's own names (they follow sandrun/sandbox/launcher.py as it changes).
    ("job setup between fork and exec (child)", "Launcher._launch"),
    ("job setup between fork and exec (child)", "Launcher._child"),
    ("spare: warm-up and shared root (child)", "_warm_up ("),
    ("spare: warm-up and shared root (child)", "Launcher._zygote"),
    ("launcher: fork the next spare", "Launcher._fork_zygote"),
    ("launcher: spawn (cgroup, hand-over)", "Launcher._spawn"),
    ("launcher: reap, stats, clean-up", "Launcher._reap"),
    ("launcher: reap, stats, clean-up", "Launcher._remove_doomed"),
    ("launcher: reap, stats, clean-up", "Launcher._release_namespaces"),
    ("launcher: reap, stats, clean-up", "Launcher._warm_up_stats"),
    ("launcher: other", "sandrun/sandbox/launcher.py"),
    ("submit: parse body, write files (thread)", "parse_submission"),
    ("submit: tmpfs mount per job", "Storage.create"),
    ("delete: tmpfs umount per job", "Storage.delete"),
    ("list outputs (thread)", "list_outputs"),
    ("sandbox.run: chown, pipes, send", "Sandbox.run"),
    ("job end: sign, log, release", "JobManager._end"),
    ("status/logs documents", "WorkerAPI.status"),
    ("WebSocket handshake and stream", "sandrun/api/stream.py"),
    ("WebSocket handshake and stream", "sandrun/api/websocket.py"),
    ("HTTP routing and handlers", "KleinResource.render"),
    ("logging", "twisted/logger/"),
    ("HTTP parse and write (twisted.web/tcp)", "twisted/"),
    ("thread pool idle/handoff", "threading.py"),
)


# Innermost frames of a thread that waits rather than works (py-spy counts a thread blocked
# on a lock or in poll() as active): such samples are left out of the CPU figures.
IDLE_FRAMES = ("Condition.wait (", "Launcher.serve (", "EPollReactor.doPoll (",
               "Event.wait (", "_wait_for_tstate_lock (")
_GENERIC_BUCKETS = 3  # the last ones: only when no specific frame is in the stack


def _bucket(frames: list[str]) -> str:
    """The bucket of the innermost specific frame, else of the innermost generic one."""
    specific, generic = PROFILE_BUCKETS[:-_GENERIC_BUCKETS], PROFILE_BUCKETS[-_GENERIC_BUCKETS:]
    for buckets in (specific, generic):
        for frame in reversed(frames):
            for name, key in buckets:
                if key in frame:
                    return name
    return "other"


class Profiler:
    """``py-spy record`` of a worker and its launcher, raw collapsed stacks (when installed)."""

    def __init__(self, pid: int, path: str, rate: int = 100) -> None:
        self.pid, self.path, self.rate = pid, path, rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Profiler:  # noqa: PYI034 - a final class in all but name
        spy = shutil.which("py-spy")
        if spy is None:
            print("py-spy not installed (pip install py-spy): no profile", flush=True)
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Blocking (the default): py-spy stops the process for each sample, which costs a
        # little but tells a thread waiting in poll() from one that runs; --nonblocking
        # counted the launcher's idle poll loop as work.
        self.proc = subprocess.Popen([spy, "record", "-p", str(self.pid), "--subprocesses",
                                      "--threads", "-r", str(self.rate),
                                      "-f", "raw", "-o", self.path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached before the measured work starts
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.seconds = time.monotonic() - self.started
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def summary(self, jobs: int) -> dict[str, Any]:
        """CPU per job by bucket (a sample is 1/rate s of one thread on a CPU)."""
        if self.proc is None or not os.path.exists(self.path):
            return {}
        per_bucket: dict[str, int] = {}
        threads: dict[str, int] = {}
        total = idle = 0
        with open(self.path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                n = int(count)
                if stack.rsplit(";", 1)[-1].startswith(IDLE_FRAMES):
                    idle += n
                    continue
                total += n
                process = "launcher" if "sandrun.sandbox.launcher" in stack else "worker"
                if process == "launcher":
                    thread = "launcher"
                elif "ReactorBase.run" in stack:
                    thread = "worker: reactor thread"
                elif "NetnsPool." in stack:
                    thread = "worker: netns pool thread"
                else:
                    thread = "worker: thread pool"
                threads[thread] = threads.get(thread, 0) + n
                name = _bucket(stack.split(";"))
                per_bucket[name] = per_bucket.get(name, 0) + n
        to_ms = 1000.0 / self.rate / max(1, jobs)
        return {"raw": self.path, "rate_hz": self.rate,
                "seconds": self.seconds, "jobs": jobs, "samples": total, "idle_samples": idle,
                "cpu_ms_per_job": total * to_ms,
                "by_thread_ms_per_job": {k: v * to_ms for k, v in
                                         sorted(threads.items(), key=lambda kv: -kv[1])},
                "by_bucket_ms_per_job": {k: v * to_ms for k, v in
                                         sorted(per_bucket.items(), key=lambda kv: -kv[1])}}


def print_profile(title: str, profile: dict[str, Any]) -> None:
    if not profile:
        return
    rows = [(f"[{name}]", ms) for name, ms in profile["by_thread_ms_per_job"].items()]
    rows += [(name, ms) for name, ms in profile["by_bucket_ms_per_job"].items()]
    print_table(title, ("where (py-spy samples, worker + launcher)", "CPU ms/job"), rows,
                notes=[(f"{profile['samples']} samples at {profile['rate_hz']} Hz over "
                        f"{profile['seconds']:.1f} s, {profile['jobs']} jobs "
                        f"({profile['idle_samples']} more in waits, left out); "
                        f"raw stacks: {profile['raw']}"),
                       ("a bucket is the innermost matching frame of each sample; py-spy "
                        "samples are wall time of threads not waiting, an upper bound on CPU")])
