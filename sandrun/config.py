"""The worker's configuration: one frozen object built by ``cli.py``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sandrun.daemon import ConnectionPolicy

MB = 1000 * 1000
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Server-side limits; ``GET /`` reports them under ``limits``."""

    max_upload_bytes: int = 100 * MB  # whole request body, bytes
    max_archive_members: int = 10_000  # members per uploaded archive
    max_extracted_bytes: int = 500 * MB  # bytes after decompression, all archives of a job
    max_name_bytes: int = 255  # longest path component in an upload
    max_path_bytes: int = 1024  # longest relative path in an upload
    default_timeout: int = 300  # seconds, when the manifest gives none
    max_timeout: int = 3600  # seconds; more is a 400, not clamped
    default_memory_mb: int = 512  # MB of RAM, swap off
    max_memory_mb: int = 2048  # MB; more is a 400
    max_cpu_seconds: float = 3600.0  # largest cpu_seconds a manifest may ask for
    default_cpus: float = 1.0  # CPU bandwidth of a job (cores), when the manifest gives none
    max_cpus: float = field(default_factory=lambda: float(os.cpu_count() or 1))  # most cpus
    max_pids: int = 128  # processes and threads per job
    max_open_files: int = 1024  # RLIMIT_NOFILE, hard
    output_cap_bytes: int = 10 * MiB  # captured per stream, then output_limit
    job_dir_mb: int = 512  # tmpfs size of the job directory
    job_dir_inodes: int = 65_536  # files and directories the job directory's tmpfs may hold
    tmp_mb: int = 64  # tmpfs size of /tmp inside the job
    shm_mb: int = 64  # tmpfs size of /dev/shm inside the job
    max_stdin_bytes: int = 1 * MiB  # manifest stdin

    def as_json(self) -> dict[str, int | float]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class QuotaConfig:
    """Per-client-IP fairness; see ``jobs/ratelimit.py``."""

    cpu_seconds_per_minute: float = 10.0
    max_active_jobs: int = 2
    jobs_per_hour: int = 20
    idle_reset_seconds: float = 3600.0
    exempt: tuple[str, ...] = ()  # addresses or CIDR networks no quota applies to


@dataclass(frozen=True)
class WorkerConfig:
    listen: str = "tcp:8443:interface=127.0.0.1"
    max_concurrent: int = field(default_factory=lambda: os.cpu_count() or 1)
    queue_size: int = 100
    max_finished_jobs: int = 5000  # finished jobs held for download; past it the oldest go
    limits: Limits = field(default_factory=Limits)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    state_dir: str = "/run/sandrun"  # tmpfs for job data is mounted beneath
    storage_bytes: int = 0  # all job data at once; 0 = a quarter of RAM
    worker_key: str | None = None
    join: str | None = None  # a coordinator URL to announce this worker to (open enrollment)
    advertise: str | None = None  # this worker's URL as the coordinator reaches it
    trusted_proxies: tuple[str, ...] = ()
    # Prometheus metrics: on their own listener (an endpoint string) when set, and then
    # never on the API's; otherwise at the API's /metrics, to these addresses or networks.
    metrics_listen: str | None = None
    metrics_allow: tuple[str, ...] = ("127.0.0.0/8", "::1")
    env_dir: str = "/var/lib/sandrun/environments"  # built templates (sandrun env --root)
    deps_dir: str = "/var/cache/sandrun/deps"  # jobs' fetched dependencies, by file hash
    deps_cache_bytes: int = 4096 * MiB  # all of deps_dir; least recently used entries go
    # Connections and uploads in flight clients may hold; header and idle timeouts.
    connections: ConnectionPolicy = field(default_factory=ConnectionPolicy)
    allow_unlimited_swap: bool = False  # start where a job's swap cannot be capped at 0
    gpu_dev_dir: str = "/dev"  # where the NVIDIA device nodes of the GPUs found by NVML are
