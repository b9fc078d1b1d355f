"""What a job needs from its environment: binds, variables and an install step.

``Environments.prepare(manifest, job_work_dir)`` runs on the host before the
job's sandbox starts (in a thread: it may fetch).  It returns an
``EnvironmentPlan``:

- ``ro_binds``: the template's build at ``/opt/env`` and the fetched
  dependency set at ``/opt/deps``, both read-only;
- ``env``: ``PYTHONPATH``, ``NODE_PATH``, ``GEM_PATH`` additions (merged with
  the manifest's by ``job_env``);
- ``install_argv``: a command the worker runs inside the job's sandbox,
  network off, before the job itself; it installs from ``/opt/deps`` into
  ``/job/.deps`` (pip, gem) or links ``/job/node_modules`` (npm).  Its
  output belongs in the job's logs; a non-zero exit is ``install_failed``.

Jobs' own installs come first on the search paths: they layer on top of the
template.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from sandrun.environments.fetch import DependencyCache, Fetched
from sandrun.environments.registry import SITE_PACKAGES, BuiltEnvironment, Registry
from sandrun.environments.requirements import MAX_FILE_BYTES, DependencyError, parse_requirements

__all__ = [
    "DEPS_MOUNT",
    "DEPS_OUTPUT",
    "ENV_MOUNT",
    "JOB_DEPS",
    "EnvironmentPlan",
    "Environments",
    "merge_env",
    "prepare",
]

ENV_MOUNT = "/opt/env"  # the template's build, read-only
DEPS_MOUNT = "/opt/deps"  # the job's fetched dependencies, read-only
JOB_DEPS = "/job/.deps"  # where the install step puts pip and gem packages
DEPS_OUTPUT = ".deps/"  # the same, as an output pattern: not one of the job's outputs
PATH_VARIABLES = ("PYTHONPATH", "NODE_PATH", "GEM_PATH")

_NPM_LINK = (
    'if [ -e /job/node_modules ] || [ -L /job/node_modules ]; then '
    'echo "sandrun: the job already has node_modules; remove it from the upload to use '
    'the dependencies of package.json" >&2; exit 1; fi; '
    'ln -s /opt/deps/node_modules /job/node_modules && '
    'echo "sandrun: node_modules linked from the fetched dependencies"')


class ManifestLike(Protocol):
    """What a plan reads of ``sandrun.jobs.manifest.Manifest`` (no import of jobs)."""

    @property
    def environment(self) -> str | None: ...

    @property
    def requirements(self) -> str | None: ...

    @property
    def env(self) -> tuple[tuple[str, str], ...]: ...


@dataclass(frozen=True)
class EnvironmentPlan:
    environment: str | None  # the template mounted; None: the host's interpreters alone
    ro_binds: tuple[tuple[str, str], ...] = ()  # (host path, sandbox path)
    env: tuple[tuple[str, str], ...] = ()  # variables to add, before the manifest's
    install_argv: tuple[str, ...] | None = None  # run inside the sandbox before the job
    log: str = ""  # what fetching printed, for the job's stderr log
    output_excludes: tuple[str, ...] = ()  # paths in the job dir that are not outputs
    packages: tuple[str, ...] = field(default=(), compare=False)  # fetched, for the record
    fetch_cpu_seconds: float = field(default=0.0, compare=False)  # charged to the client

    def job_env(self, manifest_env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        return merge_env(manifest_env, self.env)


def merge_env(manifest_env: tuple[tuple[str, str], ...],
              additions: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The manifest's variables win; for search paths its entries come first, ours after."""
    merged = dict(additions)
    for name, value in manifest_env:
        if name in PATH_VARIABLES and name in merged and value:
            merged[name] = f"{value}:{merged[name]}"
        else:
            merged[name] = value
    return tuple(sorted(merged.items()))


class Environments:
    """The worker's one collaborator for templates and per-job dependencies."""

    def __init__(self, registry: Registry | None = None,
                 cache: DependencyCache | None = None) -> None:
        self.registry = registry or Registry()
        self.cache = cache or DependencyCache()

    def describe(self) -> dict[str, Any]:
        """The ``GET /environments`` document."""
        return self.registry.describe()

    def release(self, plan: EnvironmentPlan) -> None:
        """The job that ran with ``plan`` has ended: its dependency set may be evicted."""
        for host, inside in plan.ro_binds:
            if inside == DEPS_MOUNT:
                self.cache.release(host)

    def check(self, manifest: ManifestLike) -> str | None:
        """Raise ``EnvironmentUnavailable`` (a 400) unless the job's template can be had;
        the template the job gets (None: the host's interpreters alone)."""
        built = self.registry.require(manifest.environment)
        return built.name if built is not None else None

    def prepare(self, manifest: ManifestLike, job_work_dir: str,
                stop: threading.Event | None = None) -> EnvironmentPlan:
        """The plan for one job.  Blocking (fetches); call it from a thread.

        Raises ``EnvironmentUnavailable`` when the template went away since
        submission, ``DependencyError`` when the dependencies cannot be had;
        both end the job with ``install_failed``.
        """
        built = self.registry.require(manifest.environment)
        fetched = None
        if manifest.requirements is not None:
            data = read_job_file(job_work_dir, manifest.requirements)
            fetched = self.cache.fetch(parse_requirements(manifest.requirements, data), stop)
        return build_plan(built.name if built is not None else None, built, fetched)


def build_plan(environment: str | None, built: BuiltEnvironment | None,
               fetched: Fetched | None) -> EnvironmentPlan:
    binds: list[tuple[str, str]] = []
    python_path: list[str] = []
    env: dict[str, str] = {}
    install: tuple[str, ...] | None = None
    excludes: tuple[str, ...] = ()
    log: list[str] = []
    if built is not None:
        binds.append((built.prefix, ENV_MOUNT))
        python_path.append(f"{ENV_MOUNT}/{SITE_PACKAGES}")
    if fetched is not None:
        binds.append((fetched.path, DEPS_MOUNT))
        log.append(f"sandrun: {len(fetched.packages)} {fetched.kind} package(s) "
                   f"{'from the cache' if fetched.cached else 'fetched'}: "
                   f"{', '.join(fetched.packages)}")
        log += [f"sandrun: warning: {note}" for note in fetched.notes]
        if fetched.kind == "pip":
            target = f"{JOB_DEPS}/python"
            python_path.insert(0, target)
            install = ("python3", "-I", "-m", "pip", "install", "--no-index", "--find-links",
                       f"{DEPS_MOUNT}/wheels", "--only-binary=:all:", "--no-cache-dir",
                       "--disable-pip-version-check", "--no-input", "--no-warn-script-location",
                       "--progress-bar", "off", "--target", target,
                       "--requirement", f"{DEPS_MOUNT}/requirements.txt")
            excludes = (DEPS_OUTPUT,)
        elif fetched.kind == "npm":
            env["NODE_PATH"] = f"{DEPS_MOUNT}/node_modules"
            install = ("sh", "-c", _NPM_LINK)
            excludes = ("node_modules",)
        else:
            target = f"{JOB_DEPS}/ruby"
            env["GEM_PATH"] = target
            install = ("gem", "install", "--local", "--no-document", "--ignore-dependencies",
                       "--install-dir", target,
                       *(f"{DEPS_MOUNT}/gems/{name}" for name in fetched.packages))
            excludes = (DEPS_OUTPUT,)
    if python_path:
        env["PYTHONPATH"] = ":".join(python_path)
    return EnvironmentPlan(environment, tuple(binds), tuple(sorted(env.items())), install,
                           "".join(line + "\n" for line in log), excludes,
                           fetched.packages if fetched else (),
                           fetched.cpu_seconds if fetched else 0.0)


def read_job_file(job_work_dir: str, relative: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A regular file beneath the job directory, opened without following any link."""
    parts = relative.split("/")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(job_work_dir, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            except OSError:
                raise DependencyError(f"{relative}: no such file in the job") from None
            os.close(fd)
            fd = next_fd
        try:
            file_fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
        except OSError:
            raise DependencyError(f"{relative}: no such file in the job") from None
    finally:
        os.close(fd)
    with os.fdopen(file_fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DependencyError(f"{relative}: not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DependencyError(f"{relative}: larger than {max_bytes} bytes")
    return data


def prepare(manifest: ManifestLike, job_work_dir: str,
            environments: Environments | None = None) -> EnvironmentPlan:
    """``Environments.prepare``; the worker passes its one ``Environments`` (shared
    fetch locks), otherwise the default registry and cache are used."""
    return (environments or Environments()).prepare(manifest, job_work_dir)
