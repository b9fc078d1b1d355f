"""An in-memory pool: real worker apps (``WorkerAPI`` + ``JobManager``) with a scripted
sandbox, wired to a real coordinator app through in-memory HTTP, all on one ``Clock``.

- ``FakeSandbox`` runs nothing. A job whose entrypoint contains ``HOLD`` stays running
  until the test calls ``finish``; any other job prints ``hello``, writes
  ``out.txt`` (and ``big.bin`` when the code says ``BIG``) and completes at once; one
  whose code says ``LOUD`` prints ``LOUD_STDOUT`` and ``LOUD_STDERR`` instead (megabytes
  of every byte value, invalid UTF-8 included).
  A sandbox with ``tamper`` set does one thing differently ("stdout": prints
  ``HELLO``; "output": writes another ``out.txt``; "exit_code": exits 1), and its
  worker signs that result with its own key, as a faulty or dishonest worker would.
- ``FakeNetwork`` is an ``IAgent`` that sends each request to the worker app at the
  URL's host and port, or fails with "connection refused" for one that is down.
- ``Pool`` builds the workers, the network and the coordinator (its real
  ``CoordinatorAPI``, ``WorkerRegistry``, ``HealthChecker``, ``WorkerClient``) and
  offers a synchronous client: ``pool.get("/pool").json()``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer

from coordinator.config import CoordinatorConfig, PoolQuota, WorkerEntry
from coordinator.health import HealthChecker
from coordinator.jobids import worker_tag
from coordinator.proxy import CoordinatorAPI
from coordinator.registry import WorkerRegistry
from coordinator.worker_client import WorkerClient
from sandrun import identity as ident
from sandrun.api.app import WorkerAPI
from sandrun.api.uploads import request_factory
from sandrun.config import Limits, QuotaConfig, WorkerConfig
from sandrun.jobs.manager import JobManager
from sandrun.jobs.ratelimit import RateLimiter
from sandrun.jobs.runtimes import Runtime, RuntimeList
from sandrun.sandbox.supervisor import SandboxResult, Slot
from sandrun.wire import Reason
from tests.contract import check_response
from tests.unit.worker_fakes import FakeStorage

START = 1_700_000_000.0
BIG_BYTES = 3 * 1024 * 1024
# Every byte value (control characters escape to 6 bytes of JSON) and some multi-byte text.
LOUD_STDOUT = (bytes(range(256)) + "é€😀 \"quoted\" \\ \n".encode()) * 12_000  # ~3.3 MiB
LOUD_STDERR = b"\x01\n" * 300_000


def synchronous(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kwargs)


@dataclass
class FakeRun:
    job_id: str
    job_dir: str
    on_output: Callable[[str, bytes], None]
    done: defer.Deferred[SandboxResult] = field(default_factory=defer.Deferred)

    def finish(self, reason: Reason = Reason.COMPLETED, exit_code: int | None = 0) -> None:
        if not self.done.called:
            self.done.callback(SandboxResult(reason, exit_code, None, 0.25, 4096, 12.5))


class FakeSandbox:
    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.tamper: str | None = None  # "stdout", "output" or "exit_code"
        self._slots = 0

    def take_slot(self) -> Slot:
        self._slots += 1
        return Slot(self._slots, os.getuid(), os.getgid())

    def return_slot(self, slot: Slot) -> None:
        pass

    def problem(self) -> str | None:
        return None

    def run(self, job_id: str, argv: tuple[str, ...], env: Any, job_dir: str, policy: Any,
            on_output: Callable[[str, bytes], None], stdin: bytes = b"",
            ro_binds: Any = (), slot: Slot | None = None) -> defer.Deferred[SandboxResult]:
        run = FakeRun(job_id, job_dir, on_output)
        self.runs[job_id] = run
        code = _read(os.path.join(job_dir, argv[-1])) if argv else ""
        if "HOLD" not in code:
            if "LOUD" in code:
                on_output("stdout", LOUD_STDOUT)
                on_output("stderr", LOUD_STDERR)
            else:
                on_output("stdout", b"HELLO\n" if self.tamper == "stdout" else b"hello\n")
            with open(os.path.join(job_dir, "out.txt"), "w") as f:
                f.write("forged" if self.tamper == "output" else "result")
            if "BIG" in code:
                with open(os.path.join(job_dir, "big.bin"), "wb") as f:
                    f.write(bytes(range(256)) * (BIG_BYTES // 256))
            if self.tamper == "exit_code":
                run.finish(Reason.EXIT_NONZERO, 1)
            else:
                run.finish()
        return run.done

    def kill(self, job_id: str, reason: Reason) -> None:
        run = self.runs.get(job_id)
        if run is not None:
            run.finish(reason, None)

    def cpu_seconds(self, job_id: str) -> float | None:
        return 0.0

    def holding(self) -> list[FakeRun]:
        return [r for r in self.runs.values() if not r.done.called]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


RUNTIMES = (Runtime("python3", "python", "3.11.2", "/usr/bin/python3", (".py",), ("python",)),)
ROOMY = QuotaConfig(cpu_seconds_per_minute=1000.0, max_active_jobs=100, jobs_per_hour=1000)


class FakeWorker:
    """One real worker app on the shared clock; ``restart()`` gives a fresh process."""

    def __init__(self, root: str, clock: task.Clock, identity: ident.WorkerIdentity | None,
                 max_concurrent: int = 2, queue_size: int = 10,
                 quotas: QuotaConfig = ROOMY) -> None:
        self.root, self.clock, self.identity = root, clock, identity
        self.max_concurrent, self.queue_size, self.quotas = max_concurrent, queue_size, quotas
        self.restart()

    def restart(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        config = WorkerConfig(max_concurrent=self.max_concurrent, queue_size=self.queue_size,
                              limits=Limits(), quotas=self.quotas, state_dir=self.root,
                              trusted_proxies=("127.0.0.1",))
        self.sandbox = FakeSandbox()
        self.storage = FakeStorage(self.root)
        self.manager = JobManager(self.clock, self.sandbox, self.storage,  # type: ignore[arg-type]
                                  config, RateLimiter(self.quotas), self.identity,
                                  blocking=synchronous)
        self.manager.start()
        self.api = WorkerAPI(self.manager, config, self.identity,
                             runtimes=RuntimeList(synchronous, lambda: RUNTIMES))
        self.agent = RequestTraversalAgent(self.api.resource())
        self.agent._serverFactory.requestFactory = request_factory(
            config.limits, self.storage.uploads_dir)
        self.requests: list[tuple[bytes, bytes]] = []


@implementer(IAgent)
class FakeNetwork:
    """Routes by host:port to in-memory workers; a worker marked down refuses connections."""

    def __init__(self) -> None:
        self.workers: dict[str, FakeWorker] = {}
        self.down: set[str] = set()

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> defer.Deferred[Any]:
        netloc = urlsplit(uri.decode()).netloc
        worker = self.workers.get(netloc)
        if worker is None or netloc in self.down:
            return defer.fail(error.ConnectionRefusedError(netloc))
        worker.requests.append((method, urlsplit(uri.decode()).path.encode()))
        return worker.agent.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        for worker in self.workers.values():
            worker.agent.flush()


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        assert self.header("content-type") == "application/json", (self.headers, self.body)
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def endpoint(index: int) -> str:
    return f"http://10.0.0.{index + 1}:8443"


class Pool:
    """Workers, network and coordinator; worker ``i`` listens at ``endpoint(i)``."""

    def __init__(self, root: str, count: int = 3, *, max_concurrent_jobs: int | None = None,
                 quotas: PoolQuota | None = None, worker_quotas: QuotaConfig = ROOMY,
                 identities: list[ident.WorkerIdentity | None] | None = None,
                 configured_ids: list[str] | None = None, queue_size: int = 10,
                 **config: Any) -> None:
        self.root = root
        self.clock = task.Clock()
        self.clock.advance(START)
        self.network = FakeNetwork()
        self.identities = identities if identities is not None else \
            [ident.WorkerIdentity.generate() for _ in range(count)]
        self.workers: list[FakeWorker] = []
        for i, identity in enumerate(self.identities):
            worker = FakeWorker(os.path.join(root, f"w{i}"), self.clock, identity,
                                queue_size=queue_size, quotas=worker_quotas)
            self.workers.append(worker)
            self.network.workers[urlsplit(endpoint(i)).netloc] = worker
        ids = configured_ids or [i.worker_id for i in self.identities if i is not None]
        self.entries = tuple(WorkerEntry(worker_id, endpoint(i), max_concurrent_jobs, f"w{i}")
                             for i, worker_id in enumerate(ids))
        self.config = CoordinatorConfig(health_interval=5.0, health_timeout=2.0,
                                        trusted_proxies=("127.0.0.1",),
                                        quotas=quotas or PoolQuota(1000.0, 100, 1000),
                                        **config)
        self.cooperator = task.Cooperator(scheduler=lambda f: self.clock.callLater(0, f))
        self.start_coordinator()

    def start_coordinator(self) -> None:
        """A fresh coordinator process: new registry, nothing remembered."""
        self.registry = WorkerRegistry(self.entries,
                                       max_disagreements=self.config.max_disagreements)
        self.client = WorkerClient(self.clock, HTTPClient(self.network),
                                   cooperator=self.cooperator)
        self.health = HealthChecker(self.clock, self.registry, self.client,
                                    self.config.health_interval, self.config.health_timeout)
        self.api = CoordinatorAPI(self.clock, self.registry, self.client, self.config,
                                  refresh=self.health.check_now)
        self.stub = StubTreq(self.api.resource())

    def worker_for(self, job_id: str) -> int:
        """Which worker runs ``job_id`` (listed or open: by the tag of its key)."""
        tag = job_id.split(".")[0]
        return next(i for i, identity in enumerate(self.identities)
                    if identity is not None and worker_tag(identity.worker_id) == tag)

    def workers_for(self, job_id: str) -> list[int]:
        """Where each replica of a (replicated) job runs, first replica first."""
        return [self.worker_for(part) for part in job_id.split("~")]

    # -- driving -------------------------------------------------------------------

    def settle(self, d: defer.Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(500):
            if results:
                break
            self.stub.flush()
            self.network.flush()
            self.clock.advance(0)
        assert results, "no answer (something never finished)"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def check(self) -> None:
        """One health round."""
        self.settle(self.health.check_all())

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        d = self.stub.request(method, "http://coordinator.test" + path, data=body,
                              headers=hdrs)
        response = self.settle(d)
        content = self.settle(response.content())
        reply = Reply(response.code,
                     {k.decode().lower(): [v.decode("latin-1") for v in vs]
                      for k, vs in response.headers.getAllRawHeaders()}, content)
        # Every answer a test sees is checked against the OpenAPI document.
        check_response("coordinator", method, path, reply.status, reply.header("content-type"),
                       reply.body)
        return reply

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def begin(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> defer.Deferred[Any]:
        """Send a request and return at once (``/run``, ``?wait=``); ``reply`` waits."""
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        d: defer.Deferred[Any] = self.stub.request(method, "http://coordinator.test" + path,
                                                   data=body, headers=hdrs)
        self.pump()
        return d

    def pump(self) -> None:
        for _ in range(50):
            self.stub.flush()
            self.network.flush()
            self.clock.advance(0)

    def answered(self, d: defer.Deferred[Any]) -> bool:
        self.pump()
        seen: list[Any] = []

        def note(result: Any) -> Any:
            seen.append(result)
            return result

        d.addBoth(note)
        return bool(seen)

    def reply(self, d: defer.Deferred[Any]) -> Reply:
        response = self.settle(d)
        content = self.settle(response.content())
        return Reply(response.code,
                     {k.decode().lower(): [v.decode("latin-1") for v in vs]
                      for k, vs in response.headers.getAllRawHeaders()}, content)

    def post_submit(self, code: str = "print(1)", client: str = "192.0.2.10",
                    manifest: dict[str, Any] | None = None) -> Reply:
        document = {"manifest": manifest or {"entrypoint": "main.py"},
                    "files": {"main.py": code}}
        return self.request("POST", "/submit", json.dumps(document).encode(),
                            {"Content-Type": "application/json", "X-Forwarded-For": client})

    def submit(self, code: str = "print(1)", client: str = "192.0.2.10",
               manifest: dict[str, Any] | None = None) -> str:
        reply = self.post_submit(code, client, manifest)
        assert reply.status == 200, (reply.status, reply.body)
        job_id: str = reply.json()["job_id"]
        return job_id

    def pool(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/pool").json()
        return result

    def pool_entry(self, index: int) -> dict[str, Any]:
        return next(w for w in self.pool()["workers"] if w["name"] == f"w{index}")
