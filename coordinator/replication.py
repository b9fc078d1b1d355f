"""Jobs run on several workers: placing the extra replicas, answering for the job as one.

The first replica is placed like any job, on a listed worker; that worker
parses the manifest and answers ``replicas: N`` (the coordinator reads no
submission).  The coordinator then places N - 1 copies of the same body on
other workers at once, open (enrolled) ones included, each on a distinct
worker.  If
the pool cannot hold them all, every copy already placed is cancelled and the
answer is 503: a job asked to be checked N times is never run fewer.

The client gets one job id naming every replica (``jobids.encode_replicas``).
``/status`` asks each replica's worker for its status and answers the first
replica's document with a ``consensus`` block (``consensus.py``), changed to
``failed``/``replica_disagreement`` (or ``worker_lost``) when the replicas do
not agree.  Each final verdict is counted once in the workers' reputation
(``registry.py``).  Outputs and downloads of a job whose replicas did not
agree answer 409: there is no result to hand out.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import quote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from coordinator.config import CoordinatorConfig
from coordinator.consensus import COMPARED, Ledger, Outcome, ReplicaReport, Verdict, judge
from coordinator.errors import WorkerLost
from coordinator.jobids import JobRef, encode_replicas
from coordinator.registry import WorkerRegistry
from coordinator.scheduling import drain_retry_after
from coordinator.statusdocs import lost_status
from coordinator.uploads import independent_reader
from coordinator.worker_client import (
    MAX_SMALL_JSON_BYTES,
    BadWorkerResponse,
    WorkerClient,
    WorkerTimeout,
    WorkerUnreachable,
    read_body,
    read_json,
)
from sandrun.httpjson import APIError
from sandrun.identity import verify_result
from sandrun.wire import JobStatus, Reason

log = Logger()

Forward = Callable[..., Awaitable[Any]]  # CoordinatorAPI.forward
Place = Callable[..., Coroutine[Any, Any, Any]]  # CoordinatorAPI.place -> Placement


class Replication:
    """Extra replicas at submission, and the consensus of a replicated job's results."""

    def __init__(self, reactor: Any, registry: WorkerRegistry, client: WorkerClient,
                 config: CoordinatorConfig, place: Place, forward: Forward) -> None:
        self.reactor = reactor
        self.registry = registry
        self.client = client
        self.config = config
        self.place = place
        self.forward = forward
        self.ledger = Ledger()

    # -- submitting ------------------------------------------------------------------

    async def submit(self, first: Any, replicas: int, body: Any,
                     headers: dict[bytes, list[bytes]]) -> dict[str, Any]:
        """Place ``replicas - 1`` more copies next to ``first``; the answer for the client."""
        placed = [first]
        if replicas > self.config.max_replicas:
            await self.cancel(placed, headers)
            raise APIError(400, "Invalid manifest",
                           f"replicas: this pool runs at most {self.config.max_replicas}",
                           field="replicas")
        extras = await self.place_extras(replicas - 1, body, headers, {first.state.worker_id})
        placed += [p for p in extras if not isinstance(p, Failure) and p.state is not None]
        if len(placed) < replicas:
            await self.cancel(placed, headers)
            failure = next((p for p in extras if isinstance(p, Failure)), None)
            if failure is not None:
                failure.raiseException()  # as for the first copy: 502, 504...
            if any(p.response is not None and p.response.code == 429 for p in extras):
                raise APIError(429, "Rate limit exceeded",
                               "a worker refused a replica of this job for your quota",
                               retry_after=self.retry_after())
            raise APIError(503, "No worker available",
                           f"the pool has no {replicas} distinct workers with room for "
                           "this job's replicas", retry_after=self.retry_after())
        job_id = encode_replicas([p.ref() for p in placed])
        log.info("job dispatched to {count} replicas", count=replicas)
        answer = dict(first.doc)
        answer["job_id"] = job_id
        answer["replicas"] = replicas
        return answer

    async def place_extras(self, count: int, body: Any, headers: dict[bytes, list[bytes]],
                           tried: set[str]) -> list[Any]:
        """Place ``count`` copies at once, each on another worker; a Placement or a Failure each.

        Every placement picks its worker before it first waits and adds it to
        the shared ``tried``, so no two copies go to one worker; each sends from
        its own reader of the body.
        """
        readers = [independent_reader(body) for _ in range(count)]
        try:
            results = await defer.DeferredList(
                [defer.ensureDeferred(self.place(reader, headers, tried, open_ok=True))
                 for reader in readers], consumeErrors=True)
        finally:
            for reader in readers:
                reader.close()
        return [result for _, result in results]

    def retry_after(self) -> int:
        return drain_retry_after(self.registry.workers(), self.config.health_interval)

    async def cancel(self, placed: list[Any], headers: dict[bytes, list[bytes]]) -> None:
        """Delete copies already placed; a worker that cannot be told keeps it (it expires)."""
        for p in placed:
            try:
                ref = p.ref()
                response = await self.client.request(
                    "DELETE", p.state.entry.endpoint + f"/jobs/{quote(ref.worker_job_id, safe='')}",
                    self.config.request_timeout, headers=headers)
                await read_body(response, MAX_SMALL_JSON_BYTES)
            except (WorkerUnreachable, WorkerTimeout, BadWorkerResponse):
                pass

    # -- one replicated job --------------------------------------------------------------

    async def reports(self, refs: list[JobRef],
                      headers: dict[bytes, list[bytes]]) -> list[ReplicaReport]:
        """Every replica's status, asked of its worker in parallel."""
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._report(ref, headers)) for ref in refs],
            consumeErrors=True)
        return list(results)

    async def _report(self, ref: JobRef, headers: dict[bytes, list[bytes]]) -> ReplicaReport:
        state = self.registry.by_tag(ref.tag)
        if state is None:
            return ReplicaReport("", False, ref.worker_job_id,
                                 lost="its worker is no longer in the pool")
        listed = not state.open
        try:
            response = await self.forward(ref, state, "GET",
                                          f"/status/{quote(ref.worker_job_id, safe='')}",
                                          headers)
            doc = await read_json(response)
        except WorkerLost as e:
            return ReplicaReport(state.worker_id, listed, ref.worker_job_id, lost=str(e))
        except (WorkerTimeout, BadWorkerResponse) as e:
            return ReplicaReport(state.worker_id, listed, ref.worker_job_id,
                                 lost=f"its worker did not answer ({e})")
        if response.code != 200 or not isinstance(doc, dict):
            return ReplicaReport(state.worker_id, listed, ref.worker_job_id,
                                 lost=f"its worker answered HTTP {response.code}")
        return ReplicaReport(state.worker_id, listed, ref.worker_job_id, status=doc)

    def count(self, job_id: str, verdict: Verdict) -> None:
        """Count a final verdict in the workers' reputation, once per job."""
        if not verdict.final or not self.ledger.first_time(job_id):
            return
        now = self.reactor.seconds()
        for worker_id in verdict.agreeing:
            state = self.registry.get(worker_id)
            if state is not None:
                self.registry.record_agreement(state)
        for worker_id in verdict.disagreeing:
            state = self.registry.get(worker_id)
            if state is not None:
                self.registry.record_disagreement(state, now)
        for worker_id in verdict.lost:
            state = self.registry.get(worker_id)
            if state is not None:
                self.registry.record_lost(state)
        for worker_id in verdict.unresolved:
            state = self.registry.get(worker_id)
            if state is not None:
                self.registry.record_unresolved(state)
        if verdict.outcome == Outcome.DISAGREED:
            log.warn("replicas of a job disagree in {fields}; {count} worker(s) "  # noqa: G010
                     "blamed", fields=list(verdict.differing),
                     count=len(verdict.disagreeing))

    async def status(self, job_id: str, refs: list[JobRef],
                     headers: dict[bytes, list[bytes]]) -> dict[str, Any]:
        """The job's /status as one document with its ``consensus`` block."""
        reports = await self.reports(refs, headers)
        verdict = judge(reports)
        self.count(job_id, verdict)
        first, ref = reports[0], refs[0]
        if first.status is None:
            doc = lost_status(job_id, ref, first.worker_id or None, first.lost or "lost")
        else:
            doc = copy.deepcopy(first.status)
            doc["signature_verified"] = verify_result(doc, first.worker_id)
            worker = doc.get("worker_metadata")
            if isinstance(worker, dict):
                worker["job_id"] = doc.get("job_id")
        doc["job_id"] = job_id
        if verdict.outcome == Outcome.PENDING:
            waiting = [r.status.get("status") for r in reports if r.status is not None]
            doc["status"] = JobStatus.QUEUED.value \
                if all(s == JobStatus.QUEUED.value for s in waiting) else JobStatus.RUNNING.value
            doc["finished_at"] = None
        elif verdict.outcome != Outcome.AGREED:
            reason = Reason.REPLICA_DISAGREEMENT if verdict.outcome == Outcome.DISAGREED \
                else Reason.WORKER_LOST
            doc["status"] = JobStatus.FAILED.value
            metadata = doc.setdefault("execution_metadata", {})
            if isinstance(metadata, dict):
                metadata["reason"] = reason.value
                metadata["message"] = verdict.message()
            doc["output_files"] = {}
            doc["signature_verified"] = False
        doc["consensus"] = consensus_block(reports, verdict)
        return doc

    async def wait_all(self, refs: list[JobRef], headers: dict[bytes, list[bytes]],
                       wait: float) -> None:
        """Hold until every replica has ended or ``wait`` seconds passed (``?wait=``)."""
        deadline = self.reactor.seconds() + wait
        for ref in refs:
            remaining = deadline - self.reactor.seconds()
            state = self.registry.by_tag(ref.tag)
            if remaining <= 0:
                return
            if state is None:
                continue
            try:
                response = await self.forward(
                    ref, state, "GET",
                    f"/status/{quote(ref.worker_job_id, safe='')}?wait={remaining:g}",
                    headers, timeout=remaining + self.config.request_timeout)
                await read_body(response, MAX_SMALL_JSON_BYTES)
            except (WorkerLost, WorkerTimeout, BadWorkerResponse):
                pass  # the status that follows reports it

    async def verdict(self, refs: list[JobRef],
                      headers: dict[bytes, list[bytes]]) -> Verdict:
        return judge(await self.reports(refs, headers))

    async def require_agreement(self, job_id: str, refs: list[JobRef],
                                headers: dict[bytes, list[bytes]]) -> None:
        """409 (or 410) when the replicas disagree (or one was lost): there is no result."""
        verdict = await self.verdict(refs, headers)
        self.count(job_id, verdict)
        if verdict.outcome == Outcome.DISAGREED:
            raise APIError(409, "Replicas disagree", verdict.message(),
                           reason=Reason.REPLICA_DISAGREEMENT.value)
        if verdict.outcome == Outcome.LOST:
            raise APIError(410, "Worker lost", verdict.message(),
                           reason=Reason.WORKER_LOST.value)

    async def delete(self, refs: list[JobRef], headers: dict[bytes, list[bytes]]) -> None:
        """Delete every replica but the first (the caller relays the first's answer)."""
        for ref in refs[1:]:
            state = self.registry.by_tag(ref.tag)
            if state is None:
                continue
            try:
                response = await self.forward(ref, state, "DELETE",
                                              f"/jobs/{quote(ref.worker_job_id, safe='')}",
                                              headers)
                await read_body(response, MAX_SMALL_JSON_BYTES)
            except (WorkerLost, WorkerTimeout, BadWorkerResponse):
                pass


def consensus_block(reports: list[ReplicaReport], verdict: Verdict) -> dict[str, Any]:
    """What ``/status`` shows under ``consensus``; enough to check every replica offline."""
    final = verdict.final
    return {
        "replicas": len(reports), "outcome": verdict.outcome.value,
        "agreed": (verdict.outcome == Outcome.AGREED) if final else None,
        "agreeing": list(verdict.agreeing), "disagreeing": list(verdict.disagreeing),
        "unresolved": list(verdict.unresolved),
        "lost": list(verdict.lost), "differing": list(verdict.differing),
        "unsigned": list(verdict.unsigned), "compared": list(COMPARED),
        "results": [r.as_json() for r in reports],
    }
