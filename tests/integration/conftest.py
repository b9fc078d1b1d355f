"""Fixtures for the sandbox tests against the real kernel: root, cgroups, real processes.

The whole session runs inside an outer cgroup of its own (``outer_cap``), made
before the launcher starts, so every job cgroup lives beneath it: if a per-job
limit ever failed, a fork or memory bomb would still stop at the suite's cap
instead of at the host's.  The per-job limits are then proven with benign
probes (``proven_limits``) before any bomb relies on them.

After every test, ``no_leftovers`` checks that no process of the sandbox's
uids and no job cgroup remains; at the end of the session the same is
checked for the whole 60000-60099 range within this suite's cgroups.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from bench.common import job_cgroups_in
from sandrun.sandbox.policy import MiB, SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox, SandboxResult
from sandrun.wire import Reason

CGROUP_ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("memory", "pids", "cpuacct")
# Distinct from the default 60000 so a worker started by someone else on this
# host is never mistaken for one of ours; still inside 60000-60099.
UID_BASE = 60080
SLOTS = 4
SUITE_MEMORY_BYTES = 3 * 1024 * MiB  # the outer cap around every job of the session
SUITE_PIDS_MAX = 2048
DEFAULT_POLICY = SandboxPolicy(memory_bytes=256 * MiB, pids_max=64, timeout_seconds=20.0)


def _why_not() -> str | None:
    """Why the sandbox cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "needs root: namespaces, mounts, cgroups and uid changes"
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        return None
    missing = [c for c in V1_CONTROLLERS if not os.path.isdir(os.path.join(CGROUP_ROOT, c))]
    if missing:
        return f"no cgroup v2 and cgroup v1 lacks {', '.join(missing)}"
    return None


# -- the outer cap ------------------------------------------------------------------------


def _own_cgroup(controller: str | None) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller is None and controllers == "":
                return path
            if controller is not None and controller in controllers.split(","):
                return path
    raise RuntimeError(f"not in a {controller or 'v2'} cgroup")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class OuterCap:
    """The suite's own cgroups; ``bases`` maps a controller to where job cgroups go."""

    version: int
    dirs: dict[str, str]  # controller -> the suite's cgroup directory
    home: dict[str, str]  # controller -> the cgroup the test process came from
    instance: str

    def instance_dirs(self) -> list[str]:
        return sorted({os.path.join(d, self.instance) for d in self.dirs.values()})


def _make_outer_cap(instance: str) -> OuterCap:
    name = f"sandrun-suite-{uuid.uuid4().hex[:8]}"
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        parent, home = _v2_place_for_suite()
        suite = os.path.join(parent, name)
        os.mkdir(suite)
        _write(os.path.join(suite, "memory.max"), str(SUITE_MEMORY_BYTES))
        _write(os.path.join(suite, "pids.max"), str(SUITE_PIDS_MAX))
        _write(os.path.join(suite, "cgroup.procs"), str(os.getpid()))
        # The launcher moves this process and itself into suite/supervisor, and
        # makes the instance's directory beside it.
        return OuterCap(2, {"memory": suite}, {"memory": home}, instance)
    dirs, home = {}, {}
    for controller in V1_CONTROLLERS:
        own = os.path.join(CGROUP_ROOT, controller, _own_cgroup(controller).lstrip("/"))
        suite = os.path.join(own, name)
        os.mkdir(suite)
        dirs[controller], home[controller] = suite, own
    _write(os.path.join(dirs["memory"], "memory.limit_in_bytes"), str(SUITE_MEMORY_BYTES))
    memsw = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
    if os.path.exists(memsw):
        _write(memsw, str(SUITE_MEMORY_BYTES))
    _write(os.path.join(dirs["pids"], "pids.max"), str(SUITE_PIDS_MAX))
    for suite in dirs.values():
        _write(os.path.join(suite, "cgroup.procs"), str(os.getpid()))
    return OuterCap(1, dirs, home, instance)


def _v2_place_for_suite() -> tuple[str, str]:
    """Where the suite's capped cgroup can go on v2, and where this process is now.

    A cgroup that holds processes cannot give its children limits (the "no
    internal processes" rule), so the suite's cgroup goes: into the root
    cgroup if we are there; beside ours if our parent already gives its
    children ``memory``, ``pids`` and ``cpu`` (``scripts/test.sh`` runs
    pytest in such a ``runner`` leaf); into ours if we are alone in it, after
    moving into a leaf.  Otherwise the suite refuses to run uncapped.
    """
    own = os.path.normpath(os.path.join(CGROUP_ROOT, _own_cgroup(None).lstrip("/")))
    if not os.path.exists(os.path.join(own, "cgroup.type")):  # the real root cgroup
        return own, own
    wanted = {"memory", "pids", "cpu"}
    parent = os.path.dirname(own)
    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
        if wanted <= set(f.read().split()):
            return parent, own
    with open(os.path.join(own, "cgroup.procs")) as f:
        alone = f.read().split() == [str(os.getpid())]
    if not alone:
        raise RuntimeError(
            f"cgroup v2: {own} holds other processes, so the suite cannot make its capped "
            "cgroup there: run it with scripts/test.sh")
    leaf = os.path.join(own, "pytest")
    os.makedirs(leaf, exist_ok=True)
    _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
    _write(os.path.join(own, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
    return own, leaf


def _remove_outer_cap(cap: OuterCap) -> None:
    for controller, home in cap.home.items():
        _write(os.path.join(home, "cgroup.procs"), str(os.getpid()))
    for directory in cap.instance_dirs():
        if os.path.isdir(directory):
            _rmdir_tree(directory)
    for suite in set(cap.dirs.values()):
        _rmdir_tree(suite)


def _rmdir_tree(path: str) -> None:
    for top, dirs, _ in os.walk(path, topdown=False):
        for d in dirs:
            _rmdir_retry(os.path.join(top, d))
    _rmdir_retry(path)


def _rmdir_retry(path: str) -> None:
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    os.rmdir(path)


# -- what a test can observe on the host ----------------------------------------------------


# The name of this session's outer cgroup, once made: another session of this suite
# may run at the same time on the host, with the same uids, and is none of ours.
_SUITE: list[str] = []


def processes_of(uids: range) -> list[tuple[int, int, str]]:
    """(pid, uid, command) of every process of this session whose real uid is in ``uids``.

    "Of this session": inside its outer cgroup, which no job can leave, or
    outside every session's (an escape, which must show up too).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        if uid in uids and _ours(int(entry)):
            found.append((int(entry), uid, fields["Name"].strip()))
    return found


def _ours(pid: int) -> bool:
    """In this session's cgroup, or in no session's at all (which no job should be)."""
    groups = _cgroup_text(pid)
    return not _SUITE or _SUITE[0] in groups or "sandrun-suite-" not in groups


def job_cgroups(cap: OuterCap, prefixes: tuple[str, ...] = ()) -> list[str]:
    """Every job cgroup under this suite's instance directories (``job_cgroups_in``).

    Between jobs the launcher also keeps ``spare-*`` groups for its spare
    processes; at the end of the session none may be left either: ``prefixes``
    adds every directory whose name starts with one of them.
    """
    found = set()
    for directory in cap.instance_dirs():
        found.update(job_cgroups_in(directory))
        if prefixes and os.path.isdir(directory):
            found.update(os.path.join(directory, n) for n in os.listdir(directory)
                         if n.startswith(prefixes))
    return sorted(found)


def wait_until_clean(uids: range, cap: OuterCap, within: float = 1.0) -> tuple[
        list[tuple[int, int, str]], list[str]]:
    """Poll briefly for leftovers; returns what is still there after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        procs, groups = processes_of(uids), job_cgroups(cap)
        if (not procs and not groups) or time.monotonic() > deadline:
            return procs, groups
        time.sleep(0.01)


# -- running jobs -----------------------------------------------------------------------------


@dataclass
class Ran:
    """One finished job as the tests see it."""

    result: SandboxResult
    stdout: bytes
    stderr: bytes
    chunks: list[tuple[float, str, bytes]]  # (time.monotonic() at the callback, stream, data)
    started: float  # time.monotonic() when Sandbox.run was called
    ended: float  # time.monotonic() when its Deferred fired

    @property
    def reason(self) -> Reason:
        return self.result.reason

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    def lines(self) -> list[str]:
        return self.out.splitlines()

    def describe(self) -> str:
        return (f"{self.result!r}\nstdout: {self.stdout[-2000:]!r}\n"
                f"stderr: {self.stderr[-2000:]!r}")


@dataclass
class JobRunner:
    """Runs jobs through the session's one started ``Sandbox``."""

    sandbox: Sandbox
    reactor: Any
    base: str  # host directory the job directories are made in
    uids: range  # the sandbox's slot uids
    cap: OuterCap
    made: list[str] = field(default_factory=list)
    live: dict[str, list[tuple[float, str, bytes]]] = field(default_factory=dict)

    def new_dir(self, files: dict[str, bytes | str] | None = None) -> str:
        path = tempfile.mkdtemp(prefix="job-", dir=self.base)
        os.chmod(path, 0o755)
        for name, content in (files or {}).items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        self.made.append(path)
        return path

    def start(self, argv: tuple[str, ...] | list[str], *, job_dir: str | None = None,
              policy: SandboxPolicy = DEFAULT_POLICY, env: tuple[tuple[str, str], ...] = (),
              stdin: bytes = b"", ro_binds: tuple[tuple[str, str], ...] = (),
              job_id: str | None = None) -> tuple[str, defer.Deferred[Ran]]:
        """Start a job; returns its id and a Deferred that fires with ``Ran``."""
        job_id = job_id or uuid.uuid4().hex
        chunks: list[tuple[float, str, bytes]] = []
        self.live[job_id] = chunks
        started = time.monotonic()
        d = self.sandbox.run(job_id, tuple(argv), env, job_dir or self.new_dir(), policy,
                             lambda stream, data: chunks.append((time.monotonic(), stream, data)),
                             stdin=stdin, ro_binds=ro_binds)

        def done(result: SandboxResult) -> Ran:
            del self.live[job_id]
            return Ran(result, b"".join(c for _, s, c in chunks if s == "stdout"),
                       b"".join(c for _, s, c in chunks if s == "stderr"), chunks, started,
                       time.monotonic())

        return job_id, d.addCallback(done)

    def run(self, argv: tuple[str, ...] | list[str], **kwargs: Any) -> defer.Deferred[Ran]:
        return self.start(argv, **kwargs)[1]

    def python(self, code: str, **kwargs: Any) -> defer.Deferred[Ran]:
        """Run a Python script inside (``-I -S``: nothing from site or the environment)."""
        return self.run(("python3", "-I", "-S", "-c", code), **kwargs)

    def sleep(self, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(self.reactor, seconds, lambda: None)

    def cgroup_dirs(self, job_id: str) -> dict[str, str]:
        """The running job's cgroup directories, as the launcher reported them."""
        job = self.sandbox.jobs[job_id]
        assert job.cgroup is not None, "the job has not started yet"
        return dict(job.cgroup.dirs)

    async def wait_output(self, job_id: str, text: bytes, within: float = 10.0) -> None:
        """Until the running job has printed ``text`` on stdout."""
        deadline = time.monotonic() + within
        while text not in b"".join(c for _, s, c in self.live[job_id] if s == "stdout"):
            assert time.monotonic() < deadline, f"the job never printed {text!r}"
            await self.sleep(0.01)

    async def wait_started(self, job_id: str, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while self.sandbox.jobs[job_id].cgroup is None:  # KeyError: it has already ended
            assert time.monotonic() < deadline, "the job never started"
            await self.sleep(0.01)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def outer_cap() -> Iterator[OuterCap]:
    why = _why_not()
    if why:
        pytest.skip(why)
    cap = _make_outer_cap(f"sandrun-test-{uuid.uuid4().hex[:8]}")
    _SUITE.append(os.path.basename(next(iter(cap.dirs.values()))))
    yield cap
    _remove_outer_cap(cap)


@pytest.fixture(scope="session")
def sandbox(outer_cap: OuterCap, twisted_greenlet: Any) -> Iterator[Sandbox]:
    from twisted.internet import reactor

    state_dir = tempfile.mkdtemp(prefix="sandrun-state-")
    sb = Sandbox(reactor, state_dir, outer_cap.instance, SLOTS, uid_base=UID_BASE)
    pytest_twisted.blockon(sb.start())
    yield sb
    sb.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    procs, groups = wait_until_clean(range(60000, 60100), outer_cap, within=2.0)
    groups += job_cgroups(outer_cap, ("spare-",))
    assert not procs, f"processes of job uids left at the end of the session: {procs}"
    assert not groups, f"job cgroups left at the end of the session: {groups}"


def _cgroup_text(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read()
    except OSError:
        return ""


@pytest.fixture(scope="session")
def runner(sandbox: Sandbox, outer_cap: OuterCap) -> Iterator[JobRunner]:
    from twisted.internet import reactor

    base = tempfile.mkdtemp(prefix="sandrun-jobs-")
    os.chmod(base, 0o755)
    yield JobRunner(sandbox, reactor, base, range(UID_BASE, UID_BASE + SLOTS), outer_cap)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that ran jobs: no job process and no job cgroup remain."""
    yield
    if "runner" not in request.fixturenames:
        return
    job_runner: JobRunner = request.getfixturevalue("runner")
    # A test that failed half-way may leave jobs running: end them, so that the
    # next test starts clean, and say so.
    running = dict(job_runner.sandbox.jobs)
    for job_id in running:
        job_runner.sandbox.kill(job_id, Reason.CANCELLED)
    if running:
        pytest_twisted.blockon(defer.DeferredList([job.done for job in running.values()]))
    procs, groups = wait_until_clean(job_runner.uids, job_runner.cap)
    assert not procs, f"job processes outlived their job: {procs}"
    assert not groups, f"job cgroups outlived their job: {groups}"
    assert not running, f"the test left jobs running: {sorted(running)}"


@pytest.fixture
def job_dir(runner: JobRunner) -> str:
    return runner.new_dir()


@pytest.fixture
def tmpfs_job_dir(runner: JobRunner) -> Iterator[str]:
    """A job directory on its own 8 MiB tmpfs with at most 2000 inodes."""
    path = runner.new_dir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=2000,mode=0755",
                    "sandrun-test-jobdir", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


@pytest.fixture(scope="session")
def cc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Compile C source with the host's gcc (static): ``cc(source) -> path``."""
    out = tmp_path_factory.mktemp("cc")

    def compile_c(source: str, static: bool = True) -> str:
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        binary = out / digest
        if not binary.exists():
            src = out / f"{digest}.c"
            src.write_text(source)
            built = subprocess.run(["gcc", "-O1", "-Wall", *(["-static"] if static else []),
                                    "-o", str(binary), str(src)], capture_output=True, text=True)
            assert built.returncode == 0, built.stderr
        return str(binary)

    return compile_c


def install(binary: str, job_dir: str, name: str) -> str:
    """Copy a host-built binary into the job directory; returns its path inside."""
    shutil.copy(binary, os.path.join(job_dir, name))
    os.chmod(os.path.join(job_dir, name), 0o755)
    return f"/job/{name}"


@pytest.fixture(scope="session")
def proven_limits(runner: JobRunner) -> None:
    """Prove, with benign probes, that the pids and memory limits hold before a bomb relies on them."""
    pytest_twisted.blockon(defer.ensureDeferred(check_pids_limit(runner)))
    pytest_twisted.blockon(defer.ensureDeferred(check_memory_limit(runner)))


# Holds until the test has looked at the job's cgroup from the host and made /job/go.
WAIT_FOR_GO = """
import os, time
deadline = time.monotonic() + 10
while not os.path.exists("/job/go") and time.monotonic() < deadline:
    time.sleep(0.01)
"""

PIDS_PROBE = WAIT_FOR_GO + """
import errno
n = 0
while n < 200:
    try:
        pid = os.fork()
    except OSError as e:
        print("stopped", n, errno.errorcode[e.errno], flush=True)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
else:
    print("never stopped", n, flush=True)
"""


def go(job_dir: str) -> None:
    with open(os.path.join(job_dir, "go"), "w"):
        pass


async def check_pids_limit(runner: JobRunner) -> None:
    """At most ``pids_max`` tasks: the 200-child probe stops early with EAGAIN."""
    policy = SandboxPolicy(pids_max=20, timeout_seconds=20)
    job_dir = runner.new_dir()
    job_id, d = runner.start(("python3", "-I", "-S", "-c", PIDS_PROBE), policy=policy,
                             job_dir=job_dir)
    await runner.wait_started(job_id)
    with open(os.path.join(runner.cgroup_dirs(job_id)["pids"], "pids.max")) as f:
        assert f.read().strip() == "20"
    go(job_dir)
    ran = await d
    assert ran.reason == Reason.COMPLETED, ran.describe()
    words = ran.out.split()
    assert words[0] == "stopped" and words[2] == "EAGAIN", ran.describe()
    assert 10 <= int(words[1]) < 20, ran.describe()  # python itself is one of the 20


MEMORY_PROBE = WAIT_FOR_GO + """
import sys
chunks = []
for i in range(int(sys.argv[1])):
    chunks.append(bytearray(1 << 20))  # zero-filled, so every page is touched
print("allocated", len(chunks), flush=True)
"""


async def check_memory_limit(runner: JobRunner) -> None:
    """A 64 MiB job may use 32 MiB, and is stopped with memory_limit well before 160 MiB."""
    policy = SandboxPolicy(memory_bytes=64 * MiB, timeout_seconds=20)
    job_dir = runner.new_dir()
    job_id, d = runner.start(("python3", "-I", "-S", "-c", MEMORY_PROBE, "32"), policy=policy,
                             job_dir=job_dir)
    await runner.wait_started(job_id)
    with open(os.path.join(runner.cgroup_dirs(job_id)["memory"],
                           "memory.limit_in_bytes" if runner.cap.version == 1
                           else "memory.max")) as f:
        assert int(f.read()) == 64 * MiB
    go(job_dir)
    ran = await d
    assert ran.reason == Reason.COMPLETED and ran.out == "allocated 32\n", ran.describe()
    ran = await runner.run(("python3", "-I", "-S", "-c", MEMORY_PROBE, "160"), policy=policy,
                           job_dir=runner.new_dir({"go": ""}))
    assert ran.reason == Reason.MEMORY_LIMIT, ran.describe()
    assert ran.result.signal == signal.SIGKILL
    assert "allocated" not in ran.out
