"""Wire types shared by the worker, the coordinator and the clients.

A leaf module: it imports nothing from the rest of Sandrun.  The values here
are part of the HTTP contract (``shared/spec/api.md``); changing one changes
what clients see.
"""

from __future__ import annotations

import enum
import json
from typing import Any


class JobStatus(str, enum.Enum):
    """What ``/status`` reports in ``status``."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Reason(str, enum.Enum):
    """Why a job ended; ``completed`` only when the entrypoint exited 0."""

    COMPLETED = "completed"
    EXIT_NONZERO = "exit_nonzero"
    SIGNALED = "signaled"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    CPU_LIMIT = "cpu_limit"
    OUTPUT_LIMIT = "output_limit"
    DISK_LIMIT = "disk_limit"
    CANCELLED = "cancelled"
    SANDBOX_ERROR = "sandbox_error"
    INSTALL_FAILED = "install_failed"
    WORKER_LOST = "worker_lost"
    SHUTDOWN = "shutdown"
    # A coordinator ran the job on several workers (``replicas``) and their signed
    # results differ: no answer is picked.
    REPLICA_DISAGREEMENT = "replica_disagreement"


def canonical_json(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, UTF-8 kept as is.

    This is the exact text that signatures and ``job_hash`` cover, so it
    must never change shape.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
