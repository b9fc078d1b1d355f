"""What a job may use: one frozen policy, and the request the launcher receives."""

from __future__ import annotations

from dataclasses import dataclass, field

# typing.TYPE_CHECKING without importing typing, which the launcher (a small
# process that forks every job) does not load.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MiB = 1024 * 1024
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_DIR = "/job"  # where the job directory appears inside the sandbox; the working directory


@dataclass(frozen=True)
class GpuGrant:
    """The one GPU a job is given: its nodes in /dev, allowed by the device cgroup."""

    uuid: str  # what NVIDIA_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES say ("GPU-...")
    # (name under /dev, major, minor): nvidiaN, nvidiactl, nvidia-uvm[, nvidia-uvm-tools]
    nodes: tuple[tuple[str, int, int], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "nodes": [list(n) for n in self.nodes]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GpuGrant:
        return cls(uuid=data["uuid"], nodes=tuple((str(name), int(major), int(minor))
                                                  for name, major, minor in data["nodes"]))


@dataclass(frozen=True)
class SandboxPolicy:
    """Every limit the launcher and supervisor apply to one job."""

    memory_bytes: int = 512 * MiB  # cgroup memory limit, bytes; swap off; tmpfs pages count
    pids_max: int = 128  # cgroup pids.max: processes and threads
    cpus: float = 1.0  # CPU bandwidth (cgroup cpu.max / cfs_quota_us): cores, 1.0 = one core
    timeout_seconds: float = 300.0  # wall clock, then every process of the job is killed
    cpu_seconds: float | None = None  # total CPU time of the job's cgroup; None = no cap
    output_cap_bytes: int = 10 * MiB  # captured per stream (stdout, stderr), then output_limit
    tmp_bytes: int = 64 * MiB  # tmpfs size of /tmp
    shm_bytes: int = 64 * MiB  # tmpfs size of /dev/shm
    open_files: int = 1024  # RLIMIT_NOFILE, soft and hard
    file_size_bytes: int = 512 * 1000 * 1000  # RLIMIT_FSIZE, largest file the job may write
    stack_bytes: int = 8 * MiB  # RLIMIT_STACK, soft and hard
    hostname: str = "sandrun"  # UTS namespace host name
    gpu: GpuGrant | None = None  # the job's GPU (see devices.py); None = no GPU device at all


@dataclass(frozen=True)
class LaunchRequest:
    """One job for the launcher: what to run, as whom, where, under which policy."""

    argv: tuple[str, ...]  # argv[0] is looked up on the sandbox PATH, or relative to /job
    env: tuple[tuple[str, str], ...]  # the manifest's variables; the sandbox adds its own
    job_dir: str  # host path, bound read-write at /job
    uid: int  # unprivileged uid of the job's slot
    gid: int  # its gid
    policy: SandboxPolicy = field(default_factory=SandboxPolicy)
    # (host path, sandbox path) read-only extras; targets must be /opt/env or /opt/deps
    ro_binds: tuple[tuple[str, str], ...] = ()

    def environment(self) -> dict[str, str]:
        env = dict(self.env)
        env.update(PATH=SANDBOX_PATH, HOME=JOB_DIR, LANG="C.UTF-8", LC_ALL="C.UTF-8",
                   TMPDIR="/tmp", TERM="dumb")
        if self.policy.gpu is not None:
            env.update(NVIDIA_VISIBLE_DEVICES=self.policy.gpu.uuid,
                       CUDA_VISIBLE_DEVICES=self.policy.gpu.uuid)
        return env

    def to_wire(self) -> dict[str, Any]:
        # Not dataclasses.asdict, which deep-copies: this is on every launch.
        policy = dict(self.policy.__dict__)
        if self.policy.gpu is not None:
            policy["gpu"] = self.policy.gpu.to_wire()
        return {"argv": list(self.argv), "env": [list(kv) for kv in self.env],
                "job_dir": self.job_dir, "uid": self.uid, "gid": self.gid,
                "policy": policy, "ro_binds": [list(b) for b in self.ro_binds]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LaunchRequest:
        return cls(argv=tuple(data["argv"]), env=tuple(tuple(kv) for kv in data["env"]),
                   job_dir=data["job_dir"], uid=data["uid"], gid=data["gid"],
                   policy=_policy_from_wire(data["policy"]),
                   ro_binds=tuple(tuple(b) for b in data["ro_binds"]))


def _policy_from_wire(data: dict[str, Any]) -> SandboxPolicy:
    if data.get("gpu") is not None:
        data = dict(data, gpu=GpuGrant.from_wire(data["gpu"]))
    return SandboxPolicy(**data)
