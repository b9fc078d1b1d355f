"""In-memory stand-ins for the worker's unit tests: no root, no kernel, no real time.

- ``FakeSandbox`` has ``Sandbox``'s interface (``run``/``kill``/``cpu_seconds``);
  each job is a ``FakeRun`` that the test scripts: print, write files, finish.
- ``FakeStorage`` has ``Storage``'s interface over plain directories.
- ``Harness`` wires a real ``JobManager`` (on a ``task.Clock``) and a real
  ``WorkerAPI`` behind ``treq.testing.StubTreq``, with the worker's own
  request class (``UploadRequest``) so caps and body parsing are the real ones,
  and offers a synchronous client: ``h.get("/health").json()``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.python.failure import Failure

from sandrun import identity as ident
from sandrun.api.app import WorkerAPI
from sandrun.api.uploads import request_factory
from sandrun.config import Limits, QuotaConfig, WorkerConfig
from sandrun.environments import DependencyCache, Environments, Registry
from sandrun.jobs.gpus import GpuPool
from sandrun.jobs.manager import JobManager
from sandrun.jobs.ratelimit import RateLimiter
from sandrun.jobs.storage import StorageFull
from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import SandboxResult, SandboxUnavailable, Slot
from sandrun.wire import Reason
from tests.bodies import multipart, tar_bytes  # noqa: F401 - re-exported for the tests
from tests.contract import check_response


def synchronous(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """A ``BlockingRunner`` that runs on the spot (tests have no thread pool)."""
    return defer.maybeDeferred(f, *args, **kwargs)


@dataclass
class FakeRun:
    job_id: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    job_dir: str
    policy: SandboxPolicy
    stdin: bytes
    on_output: Callable[[str, bytes], None]
    sandbox: FakeSandbox
    done: defer.Deferred[SandboxResult] = field(default_factory=defer.Deferred)
    cpu: float = 0.0

    def print(self, data: str | bytes, stream: str = "stdout") -> None:
        self.on_output(stream, data.encode() if isinstance(data, str) else data)

    def write(self, path: str, data: str | bytes = b"") -> None:
        """Leave a file in the job directory, as the job would."""
        full = os.path.join(self.job_dir, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)

    def finish(self, reason: Reason = Reason.COMPLETED, exit_code: int | None = 0,
               signal: int | None = None, cpu_seconds: float | None = None,
               memory_peak_bytes: int = 4096, wall_time_ms: float = 12.5) -> None:
        if reason != Reason.COMPLETED and exit_code == 0:
            exit_code = 1 if reason == Reason.EXIT_NONZERO else None
        self.sandbox.running.pop(self.job_id, None)
        self.done.callback(SandboxResult(
            reason, exit_code, signal, self.cpu if cpu_seconds is None else cpu_seconds,
            memory_peak_bytes, wall_time_ms))

    @property
    def finished(self) -> bool:
        return self.done.called


class FakeSandbox:
    """Runs nothing; records each job and lets the test decide how it ends.

    ``script``, if set, is called with each new run and may finish it at once.
    ``unavailable`` makes ``run`` raise like a sandbox whose launcher died.
    ``kill`` ends a running job with the kill's reason (SIGKILL), as the real
    one does, unless ``kills_take_effect`` is False (then the test finishes it).
    """

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.running: dict[str, FakeRun] = {}
        self.kills: list[tuple[str, Reason]] = []
        self.script: Callable[[FakeRun], None] | None = None
        self.unavailable = False
        self.kills_take_effect = True
        self.slots_held: set[int] = set()  # taken and not yet returned
        self.slot_uses: list[tuple[str, int]] = []  # (job id, slot) of each run

    def take_slot(self) -> Slot:
        if self.unavailable:
            raise SandboxUnavailable("no launcher")
        number = next(n for n in range(1000) if n not in self.slots_held)
        self.slots_held.add(number)
        return Slot(number, os.getuid(), os.getgid())

    def return_slot(self, slot: Slot) -> None:
        self.slots_held.discard(slot.number)

    def problem(self) -> str | None:
        return "the sandbox launcher is not running" if self.unavailable else None

    def run(self, job_id: str, argv: tuple[str, ...], env: tuple[tuple[str, str], ...],
            job_dir: str, policy: SandboxPolicy, on_output: Callable[[str, bytes], None],
            stdin: bytes = b"", ro_binds: tuple[tuple[str, str], ...] = (),
            slot: Slot | None = None) -> defer.Deferred[SandboxResult]:
        if self.unavailable:
            raise SandboxUnavailable("no launcher")
        if slot is not None:
            self.slot_uses.append((job_id, slot.number))
        run = FakeRun(job_id, argv, env, job_dir, policy, stdin, on_output, self)
        self.runs[job_id] = run
        self.running[job_id] = run
        if self.script is not None:
            self.script(run)
        return run.done

    def kill(self, job_id: str, reason: Reason) -> None:
        self.kills.append((job_id, reason))
        run = self.running.get(job_id)
        if run is not None and self.kills_take_effect:
            run.finish(reason, exit_code=None, signal=9)

    def cpu_seconds(self, job_id: str) -> float | None:
        run = self.running.get(job_id)
        return None if run is None else run.cpu


class FakeStorage:
    """``Storage`` over plain directories under ``root`` (no tmpfs, no root needed)."""

    def __init__(self, root: str) -> None:
        self.jobs_dir = os.path.join(root, "jobs")
        self.uploads_dir = os.path.join(root, "uploads")
        os.makedirs(self.jobs_dir, exist_ok=True)
        os.makedirs(self.uploads_dir, exist_ok=True)
        self.full = False

    def pack_path(self, job_id: str) -> str:
        return os.path.join(self.jobs_dir, job_id + ".tar.gz")

    def create(self, job_id: str) -> str:
        if self.full:
            raise StorageFull("the worker holds as much job data as it may")
        base = os.path.join(self.jobs_dir, job_id)
        os.mkdir(base)
        os.mkdir(os.path.join(base, "work"))
        os.mkdir(os.path.join(base, "staging"))
        return base

    def delete(self, job_id: str) -> None:
        shutil.rmtree(os.path.join(self.jobs_dir, job_id), ignore_errors=True)
        for path in (self.pack_path(job_id), self.pack_path(job_id) + ".part"):
            if os.path.exists(path):
                os.unlink(path)

    def exists(self, job_id: str) -> bool:
        return os.path.isdir(os.path.join(self.jobs_dir, job_id))

    def job_ids(self) -> list[str]:
        return sorted(n for n in os.listdir(self.jobs_dir)
                      if not n.endswith((".log", ".tar.gz", ".part")))

    def logs(self) -> list[str]:
        """Output log files left beside the job directories."""
        return sorted(n for n in os.listdir(self.jobs_dir) if n.endswith(".log"))

    total_bytes = 1 << 30

    def used_bytes(self) -> int:
        return 0

    def measure(self, job_id: str) -> int:
        return 0


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]  # lower-case names
    body: bytes

    def json(self) -> Any:
        assert self.header("content-type") == "application/json", self.headers
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


SMALL_LIMITS = Limits(max_upload_bytes=200_000, max_archive_members=50,
                      max_extracted_bytes=300_000, max_timeout=60, max_memory_mb=256,
                      default_memory_mb=128, default_timeout=30)
ROOMY_QUOTAS = QuotaConfig(cpu_seconds_per_minute=1000.0, max_active_jobs=100,
                           jobs_per_hour=1000)


class Harness:
    """A real JobManager and WorkerAPI, a fake sandbox and storage, a Clock, StubTreq."""

    def __init__(self, root: str, *, limits: Limits = SMALL_LIMITS,
                 quotas: QuotaConfig = ROOMY_QUOTAS, max_concurrent: int = 2,
                 queue_size: int = 10, identity: ident.WorkerIdentity | None = None,
                 trusted_proxies: tuple[str, ...] = (), start: bool = True,
                 environments: Environments | None = None,
                 gpus: GpuPool | None = None,
                 max_finished_jobs: int = 5000) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)  # a plausible wall clock for timestamps
        self.config = WorkerConfig(max_concurrent=max_concurrent, queue_size=queue_size,
                                   max_finished_jobs=max_finished_jobs,
                                   limits=limits, quotas=quotas, state_dir=root,
                                   trusted_proxies=trusted_proxies)
        self.sandbox = FakeSandbox()
        self.storage = FakeStorage(root)
        self.limiter = RateLimiter(quotas)
        self.identity = identity
        # Nothing built and an empty cache under root: never the host's own registry.
        self.environments = environments or Environments(
            Registry(os.path.join(root, "environments")),
            DependencyCache(os.path.join(root, "deps")))
        self.manager = JobManager(self.clock, self.sandbox, self.storage,  # type: ignore[arg-type]
                                  self.config, self.limiter, identity, blocking=synchronous,
                                  environments=self.environments, gpus=gpus)
        if start:
            self.manager.start()
        self.api = WorkerAPI(self.manager, self.config, identity)
        self.stub = StubTreq(self.api.resource())
        # The worker's own request class, so body caps and multipart parsing are real.
        self.stub._agent._serverFactory.requestFactory = request_factory(
            limits, self.storage.uploads_dir, self.api.early_refusal)

    def with_limits(self, **changes: Any) -> Limits:
        return replace(self.config.limits, **changes)

    # -- the client ------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        return self.reply(self.begin(method, path, body, headers))

    def begin(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> defer.Deferred[Any]:
        """Send a request and return at once: ``reply`` waits for its answer.

        For requests answered later (``/run``, ``?wait=``): the test acts on
        the job or the clock in between.
        """
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        d: defer.Deferred[Any] = self.stub.request(  # type: ignore[attr-defined]
            method, "http://worker.test" + path, data=body, headers=hdrs)
        self.stub.flush()
        return d

    def answered(self, d: defer.Deferred[Any]) -> bool:
        """Whether the response to a ``begin`` request has come (its headers, at least)."""
        self.stub.flush()
        seen: list[Any] = []

        def note(result: Any) -> Any:
            seen.append(result)
            return result

        d.addBoth(note)
        return bool(seen)

    def reply(self, d: defer.Deferred[Any]) -> Reply:
        response = self._settle(d)
        content = self._settle(response.content())
        reply = Reply(response.code,
                     {k.decode().lower(): [v.decode("latin-1") for v in vs]
                      for k, vs in response.headers.getAllRawHeaders()}, content)
        # Every answer a test sees is checked against the OpenAPI document.
        sent = response.request
        uri = urlsplit(sent.absoluteURI.decode())
        check_response("worker", sent.method.decode(), uri.path + ("?" + uri.query if uri.query
                                                                   else ""),
                       reply.status, reply.header("content-type"), reply.body)
        return reply

    def _settle(self, d: defer.Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(50):
            if results:
                break
            self.stub.flush()
        assert results, "no response (the handler never finished)"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def delete(self, path: str) -> Reply:
        return self.request("DELETE", path)

    def post_json(self, document: Any, path: str = "/submit") -> Reply:
        return self.request("POST", path, json.dumps(document).encode(),
                            {"Content-Type": "application/json"})

    def post_multipart(self, fields: dict[str, str] | None = None,
                       files: list[tuple[str, bytes]] | None = None) -> Reply:
        body, content_type = multipart(fields or {}, files or [])
        return self.request("POST", "/submit", body, {"Content-Type": content_type})

    def submit(self, files: dict[str, str] | None = None,
               manifest: dict[str, Any] | None = None) -> str:
        reply = self.post_json({"manifest": manifest or {},
                                "files": files if files is not None else {"main.py": "pass"}})
        assert reply.status == 200, (reply.status, reply.body)
        job_id: str = reply.json()["job_id"]
        return job_id

    def run_of(self, job_id: str) -> FakeRun:
        return self.sandbox.runs[job_id]

    def status(self, job_id: str) -> dict[str, Any]:
        reply = self.get(f"/status/{job_id}")
        assert reply.status == 200, (reply.status, reply.body)
        result: dict[str, Any] = reply.json()
        return result
