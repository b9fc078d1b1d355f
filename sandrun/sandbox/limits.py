"""Per-process resource limits (rlimits) applied before exec."""

from __future__ import annotations

import resource

from sandrun.sandbox.policy import SandboxPolicy


def apply_rlimits(policy: SandboxPolicy) -> None:
    """Set soft and hard limits; the job cannot raise them again."""
    for which, value in (
        (resource.RLIMIT_NOFILE, policy.open_files),
        (resource.RLIMIT_FSIZE, policy.file_size_bytes),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_STACK, policy.stack_bytes),
        # Backstop only: pids.max in the cgroup is the real bound on processes.
        (resource.RLIMIT_NPROC, policy.pids_max * 2),
    ):
        resource.setrlimit(which, (value, value))
