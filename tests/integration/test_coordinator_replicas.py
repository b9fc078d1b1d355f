"""Redundant execution on a real pool: three real workers, a dishonest worker with a real
key (``forging_worker.py``: a real worker runs its jobs, it signs a different stdout
hash), a coordinator with open enrollment, and later a real worker that joins with
``sandrun serve --join``.  All are separate processes but the forger (a thread here).

- ``replicas: 4`` puts a copy on every listed worker, the forger included: the job
  fails with ``replica_disagreement`` and only the forger counts a disagreement; at
  ``--max-disagreements 2`` it is suspended and gets nothing more.
- ``replicas: 3`` on the three honest workers agrees, and ``sandrun verify`` (the real
  command) accepts the coordinator's answer, every replica under its own key.
- A worker that is not in workers.json joins by ``--join`` and proves its key; it
  then runs extra replicas only, never a job of its own.

Runs as root (workers mount tmpfs and make cgroups).  About 30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench.common import remove_worker_cgroup
from sandrun.identity import WorkerIdentity
from tests.integration.forging_worker import FORGED_STDOUT_SHA256, ForgingWorker
from tests.integration.test_coordinator_pool import (
    POOL_FLAGS,
    REPO,
    CoordinatorProcess,
    PoolWorker,
    environment,
    keygen,
    wait_for,
)
from tests.integration.worker import request, why_no_worker

pytestmark = pytest.mark.skipif(why_no_worker() is not None, reason=why_no_worker() or "")

CODE = "print('same everywhere')\nopen('out.txt', 'w').write('42')\n"


@dataclass
class Pool:
    scratch: str
    workers: dict[str, PoolWorker]
    forger: ForgingWorker
    coordinator: CoordinatorProcess

    def submit(self, replicas: int) -> Any:
        body = json.dumps({"manifest": {"entrypoint": "main.py", "outputs": ["out.txt"],
                                        "replicas": replicas},
                           "files": {"main.py": CODE}}).encode()
        return request(self.coordinator.url, "POST", "/submit", body,
                       {"Content-Type": "application/json"})

    def accepted(self, replicas: int) -> str:
        reply = self.submit(replicas)
        assert reply.status == 200, (reply.status, reply.body, self.coordinator.log()[-2000:])
        job_id: str = reply.json()["job_id"]
        return job_id

    def entries(self) -> dict[str, dict[str, Any]]:
        listed = self.coordinator.get("/pool").json()["workers"]
        return {w["endpoint"]: w for w in listed}

    def tags_of(self, job_id: str) -> set[str]:
        return {part.split(".")[0] for part in job_id.split("~")}


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    scratch = tempfile.mkdtemp(prefix="sandrun-replicas-")
    workers: dict[str, PoolWorker] = {}
    entries: list[dict[str, Any]] = []
    for name in ("r1", "r2", "r3"):
        key = os.path.join(scratch, f"{name}.pem")
        worker_id = keygen(key)
        workers[name] = PoolWorker(name, scratch, key)
        entries.append({"name": name, "worker_id": worker_id, "endpoint": workers[name].url})
    forger = ForgingWorker(WorkerIdentity.generate(), workers["r1"].url)
    entries.append({"name": "forger", "worker_id": forger.identity.worker_id,
                    "endpoint": forger.url})
    workers_path = os.path.join(scratch, "workers.json")
    with open(workers_path, "w") as f:
        json.dump(entries, f)
    coordinator = CoordinatorProcess(scratch, workers_path, (
        *POOL_FLAGS, "--open-enrollment", "--max-disagreements", "2", "--max-replicas", "4"))
    try:
        for worker in workers.values():
            worker.start()
        for worker in workers.values():
            worker.wait_healthy()
        forger.start()
        coordinator.start_and_wait()
        yield Pool(scratch, workers, forger, coordinator)
        assert coordinator.stop() == 0, coordinator.log()
        for worker in workers.values():
            assert worker.stop() == 0, worker.log()
    finally:
        forger.stop()
        for process in [coordinator, *workers.values()]:
            if process.proc is not None and process.running():
                process.kill()
        for worker in workers.values():
            for point in reversed(worker.mounts()):
                subprocess.run(["umount", "-l", point], check=False)
            remove_worker_cgroup(worker.cgroup)
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_worker_that_signs_a_forged_result_is_caught_counted_and_then_left_out(
        pool: Pool) -> None:
    wait_for(lambda: pool.entries()[pool.forger.url]["healthy"], 10, "forger healthy")
    for _ in range(2):
        job = pool.accepted(4)  # one copy on each listed worker: the forger too
        status = pool.coordinator.wait(job)
        assert status["status"] == "failed", status
        assert status["execution_metadata"]["reason"] == "replica_disagreement"
        consensus = status["consensus"]
        assert consensus["disagreeing"] == [pool.forger.identity.worker_id]
        assert consensus["differing"] == ["stdout_sha256"] and len(consensus["agreeing"]) == 3
        # The forger's own signature is valid: only the comparison caught it.
        forged = next(r for r in consensus["results"]
                      if r["worker_id"] == pool.forger.identity.worker_id)
        assert forged["signature_verified"] is True
        assert json.loads(forged["signed"])["stdout_sha256"] == FORGED_STDOUT_SHA256
        assert pool.coordinator.get(f"/outputs/{job}").status == 409
    entry = pool.entries()[pool.forger.url]
    assert entry["reputation"]["disagreements"] == 2 and entry["reputation"]["suspended"]
    assert entry["healthy"] is True and entry["routable"] is False
    honest = [pool.entries()[w.url]["reputation"] for w in pool.workers.values()]
    assert [r["agreements"] for r in honest] == [2, 2, 2]
    assert [r["disagreements"] for r in honest] == [0, 0, 0]
    # Suspended, it is no longer used: four distinct listed workers are not to be had.
    forged_before = pool.forger.forged
    assert pool.submit(4).status == 503
    singles = [pool.coordinator.accepted(CODE) for _ in range(4)]
    forger_tag = entry["tag"]
    assert all(forger_tag not in pool.tags_of(j) for j in singles)
    for job in singles:
        pool.coordinator.wait(job)
    assert pool.forger.forged == forged_before


def test_three_replicas_on_real_workers_agree_and_sandrun_verify_accepts_the_answer(
        pool: Pool) -> None:
    job = pool.accepted(3)
    status = pool.coordinator.wait(job)
    assert status["status"] == "completed" and status["signature_verified"] is True
    consensus = status["consensus"]
    assert consensus["agreed"] is True and len(consensus["agreeing"]) == 3
    assert pool.forger.identity.worker_id not in consensus["agreeing"]
    saved = os.path.join(pool.scratch, "consensus.json")
    with open(saved, "w") as f:
        json.dump(status, f)
    checked = subprocess.run([sys.executable, "-m", "sandrun", "verify", saved], check=False,
                             capture_output=True, text=True, cwd=REPO, env=environment())
    assert checked.returncode == 0, (checked.stdout, checked.stderr)
    assert checked.stdout.startswith("valid: 3 replicas agree")
    outputs = pool.coordinator.get(f"/outputs/{job}").json()["files"]
    assert [f["path"] for f in outputs] == ["out.txt"]


def test_a_worker_joins_with_join_and_then_runs_extra_replicas_only(pool: Pool) -> None:
    key = os.path.join(pool.scratch, "joiner.pem")
    joiner_id = keygen(key)
    joiner = PoolWorker("joiner", pool.scratch, key)
    joiner.argv += ["--join", pool.coordinator.url, "--advertise", joiner.url]
    joiner.start()
    try:
        joiner.wait_healthy()
        wait_for(lambda: (pool.entries().get(joiner.url) or {}).get("routable"), 20,
                 "the joining worker enrolled")
        entry = pool.entries()[joiner.url]
        assert entry["open"] is True and entry["worker_id"] == joiner_id
        assert "announced to" in joiner.log()
        # Four replicas: the three listed honest workers and the open one (the forger is
        # suspended).  Single jobs never go to an open worker.
        job = pool.accepted(4)
        assert entry["tag"] in pool.tags_of(job)
        status = pool.coordinator.wait(job)
        assert status["consensus"]["agreed"] is True, status["consensus"]
        singles = [pool.coordinator.accepted(CODE) for _ in range(4)]
        assert all(entry["tag"] not in pool.tags_of(j) for j in singles)
        for single in singles:
            pool.coordinator.wait(single)
        assert pool.entries()[joiner.url]["reputation"]["agreements"] == 1
    finally:
        assert joiner.stop() == 0, joiner.log()
        for point in reversed(joiner.mounts()):
            subprocess.run(["umount", "-l", point], check=False)
        remove_worker_cgroup(joiner.cgroup)


def test_a_reload_with_its_key_still_listed_readmits_a_suspended_worker(pool: Pool) -> None:
    assert pool.entries()[pool.forger.url]["reputation"]["suspended"] is True
    pool.coordinator.signal(signal.SIGHUP)
    entry = wait_for(lambda: (e := pool.entries()[pool.forger.url])["routable"] and e, 10,
                     "the forger re-admitted")
    assert entry["reputation"]["strikes"] == 0 and entry["reputation"]["disagreements"] == 2
