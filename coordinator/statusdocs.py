"""Status documents the coordinator writes itself (the workers write every other one)."""

from __future__ import annotations

import datetime
from typing import Any

from coordinator.jobids import JobRef
from sandrun.wire import JobStatus, Reason


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def lost_status(job_id: str, ref: JobRef, worker_id: str | None, why: str) -> dict[str, Any]:
    """The /status of a job whose worker is gone: failed, ``worker_lost``, nothing signed."""
    return {
        "job_id": job_id, "status": JobStatus.FAILED.value, "queue_position": 0,
        "submitted_at": iso(ref.dispatched_at), "started_at": None, "finished_at": None,
        "execution_metadata": {"cpu_seconds": None, "memory_peak_bytes": None,
                               "wall_time_ms": None, "exit_code": None, "signal": None,
                               "reason": Reason.WORKER_LOST.value, "message": why,
                               "environment": None, "interpreter": None,
                               "stdout_sha256": None, "stderr_sha256": None},
        "job_hash": None, "output_files": {},
        "worker_metadata": {"worker_id": worker_id, "signature": None, "signed": None,
                            "job_id": ref.worker_job_id},
        "signature_verified": False,
    }
