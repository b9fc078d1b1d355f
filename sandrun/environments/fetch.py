"""Fetch a job's dependencies on the host, into a cache keyed by the file's hash.

The worker only resolves and downloads; nothing it fetches runs on the host:

- pip: ``pip download --only-binary=:all:`` with the sandbox's own
  interpreter (so wheel tags and markers match what the job runs).  A
  package with no wheel is refused, never built: building an sdist runs its
  ``setup.py``.
- npm: ``npm install --ignore-scripts`` with git, remote-URL, file and
  directory specs disallowed, into a throw-away npm cache.
- gem: ``gem fetch --platform ruby`` per gem and its runtime dependencies;
  a gem with native extensions is refused (building one runs its extconf.rb).

Each fetch has a deadline and a size cap, runs in a fresh directory beside
the cache and is renamed into place only when complete, so a cache entry is
either absent or whole.  Everything is world-readable and root-owned: jobs
bind an entry read-only at ``/opt/deps`` and install from it inside their
sandbox with the network off.

The cache is capped (``max_total_bytes``): after each new fetch the least
recently used entries (a hit refreshes an entry's time) are deleted until it
fits, except entries a running job binds.  A fetch is killed when its job is
cancelled (``stop``), and the tools' CPU time is measured for the client's quota.

Blocking: the worker calls ``fetch`` from a thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sandrun.environments.process import Finished, run_bounded, tree_size
from sandrun.environments.requirements import DependencyError, Requirements

__all__ = ["DEFAULT_CACHE_ROOT", "SANDBOX_PYTHON", "DependencyCache", "Fetched"]

DEFAULT_CACHE_ROOT = "/var/cache/sandrun/deps"
SANDBOX_PYTHON = "/usr/bin/python3"  # the interpreter jobs run (the host's /usr, bound read-only)
MiB = 1024 * 1024
INFO = "sandrun-fetched.json"  # in each entry: what was fetched, for cache hits
# Environment variables pip may keep from the worker's: index and TLS settings only.
PIP_ENV_KEPT = frozenset({"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS",
                          "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY",
                          "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_CONFIG_FILE"})
_GEM_SPEC = """
require "rubygems/package"
require "json"
puts JSON.generate(ARGV.map { |path|
  s = Gem::Package.new(path).spec
  {file: File.basename(path), name: s.name, version: s.version.to_s, platform: s.platform.to_s,
   extensions: s.extensions,
   deps: s.runtime_dependencies.map { |d| [d.name, d.requirement.to_s] }}
})
"""
_GEM_CHECK = """
require "json"
specs = JSON.parse(STDIN.read)
have = specs.map { |s| [s["name"], Gem::Version.new(s["version"])] }.to_h
specs.each { |s| s["deps"].each { |name, req|
  v = have[name]
  unless v && Gem::Requirement.new(*req.split(/\\s*,\\s*/)).satisfied_by?(v)
    puts "#{s["name"]} #{s["version"]} needs #{name} #{req}, but #{name} #{v || "is missing"}"
  end
} }
"""


@dataclass(frozen=True)
class Fetched:
    """One complete cache entry: what a job binds at /opt/deps."""

    kind: str
    path: str  # host directory
    packages: tuple[str, ...]  # what was fetched: wheel, package or gem file names
    notes: tuple[str, ...] = ()  # warnings for the job's log
    cached: bool = False  # True when no fetch was needed
    cpu_seconds: float = 0.0  # what fetching used this time, charged to the client


@dataclass(frozen=True)
class GemSpec:
    """What a fetched .gem declares, read from its metadata."""

    file: str  # the .gem's file name
    name: str
    version: str
    extensions: tuple[str, ...]  # extconf.rb and the like: non-empty means native code
    deps: tuple[tuple[str, str], ...]  # runtime dependencies: (name, "req, req")


class DependencyCache:
    """Fetches dependency sets once per distinct file and keeps them on disk."""

    def __init__(self, root: str = DEFAULT_CACHE_ROOT, *, timeout: float = 180.0,
                 max_bytes: int = 1024 * MiB, python: str = SANDBOX_PYTHON,
                 pip_args: tuple[str, ...] = (), npm: str = "npm",
                 npm_args: tuple[str, ...] = (), gem: str = "gem", ruby: str = "ruby",
                 gem_source: str = "https://rubygems.org/",
                 environ: Mapping[str, str] | None = None,
                 max_total_bytes: int = 0) -> None:
        self.root = root
        self.timeout = timeout  # seconds one fetch may take, all its tools together
        # Bytes all entries may hold (0: no cap); beyond, the least recently used entries
        # no running job binds are deleted, after each new fetch.
        self.max_total_bytes = max_total_bytes
        self._in_use: dict[str, int] = {}  # entry path -> jobs binding it now
        self._prune_lock = threading.Lock()
        self.max_bytes = max_bytes  # bytes one fetch may download and unpack
        self.python = python
        self.pip_args = pip_args  # index options, e.g. ("--index-url", URL)
        self.npm, self.npm_args = npm, npm_args
        self.gem, self.ruby, self.gem_source = gem, ruby, gem_source
        self.environ = dict(os.environ if environ is None else environ)
        self._locks: dict[str, threading.Lock] = {}
        self._local = threading.local()  # the calling thread's stop event and CPU used
        self._npm_allow: tuple[str, ...] | None = None  # found once: see npm_allow_flags
        self._locks_guard = threading.Lock()

    def entry(self, requirements: Requirements) -> str:
        return os.path.join(self.root, requirements.kind, requirements.key)

    def fetch(self, requirements: Requirements, stop: threading.Event | None = None) -> Fetched:
        """The complete entry for ``requirements``, fetching it first if needed.

        Raises ``DependencyError`` with a message for the job's ``/status``
        and the tool's output for its logs.  Setting ``stop`` (the job was
        cancelled) kills the tools within a tenth of a second.  The result's
        ``cpu_seconds`` is what the tools used, for the client's quota.
        """
        self._local.stop, self._local.cpu = stop, 0.0
        try:
            fetched = self._fetch(requirements)
        finally:
            self._local.stop = None
        if not fetched.cached and self.max_total_bytes:
            self.prune(self.max_total_bytes, min_idle_seconds=0.0)
        return dataclasses.replace(fetched, cpu_seconds=self._local.cpu)

    def release(self, path: str) -> None:
        """A job that bound the entry at ``path`` has ended: it may be evicted again."""
        with self._locks_guard:
            left = self._in_use.get(path, 0) - 1
            if left > 0:
                self._in_use[path] = left
            else:
                self._in_use.pop(path, None)

    def _hold(self, path: str) -> None:
        with self._locks_guard:
            self._in_use[path] = self._in_use.get(path, 0) + 1

    def _fetch(self, requirements: Requirements) -> Fetched:
        final = self.entry(requirements)
        with self._lock(final):
            found = _read_info(final, cached=True)
            if found is not None:
                os.utime(final)  # last use, for pruning
                self._hold(final)
                return found
            kind_dir = os.path.dirname(final)
            os.makedirs(kind_dir, mode=0o755, exist_ok=True)
            work = tempfile.mkdtemp(prefix=".fetch-", dir=kind_dir)
            try:
                fetched = {"pip": self._pip, "npm": self._npm, "gem": self._gem}[
                    requirements.kind](requirements, work, time.monotonic() + self.timeout)
                if tree_size(work) > self.max_bytes:  # a fetch faster than the size checks
                    raise DependencyError("the dependencies are larger than "
                                          + _size(self.max_bytes))
                with open(os.path.join(work, INFO), "w") as f:
                    json.dump({"kind": fetched.kind, "packages": list(fetched.packages),
                               "notes": list(fetched.notes)}, f)
                _publish(work)
                os.rename(work, final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            self._hold(final)
            return Fetched(fetched.kind, final, fetched.packages, fetched.notes)

    def prune(self, max_total_bytes: int, min_idle_seconds: float = 2 * 3600.0) -> int:
        """Delete least recently used entries, idle at least ``min_idle_seconds`` and
        bound by no running job, until the cache fits; returns how many.

        Entries (and fetches under way) only: whatever else is in the root stays.
        """
        with self._prune_lock:
            entries = []
            for kind in ("pip", "npm", "gem"):
                kind_dir = os.path.join(self.root, kind)
                if os.path.isdir(kind_dir):
                    for name in os.listdir(kind_dir):
                        path = os.path.join(kind_dir, name)
                        try:
                            entries.append((os.stat(path).st_mtime, tree_size(path), path))
                        except OSError:
                            continue
            total = sum(size for _, size, _ in entries)
            removed = 0
            now = time.time()
            for mtime, size, path in sorted(entries):
                if total <= max_total_bytes or now - mtime < min_idle_seconds:
                    break
                if os.path.basename(path).startswith(".fetch-"):
                    continue  # a fetch under way; counted, never removed here
                with self._locks_guard:
                    if self._in_use.get(path):
                        continue
                with self._lock(path):  # not while it is fetched or looked up
                    shutil.rmtree(path, ignore_errors=True)
                total -= size
                removed += 1
            return removed

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _run(self, argv: list[str], cwd: str, env: Mapping[str, str], deadline: float,
             watch: str) -> Finished:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DependencyError(f"fetching the dependencies took longer than "
                                  f"{self.timeout:g} s")
        finished = run_bounded(argv, cwd=cwd, env=env, timeout=remaining, watch=watch,
                               max_bytes=self.max_bytes, stop=getattr(self._local, "stop", None))
        self._local.cpu = getattr(self._local, "cpu", 0.0) + finished.cpu_seconds
        if finished.stopped:
            raise DependencyError("the job was cancelled while its dependencies were fetched",
                                  finished.output)
        if finished.timed_out:
            raise DependencyError(f"fetching the dependencies took longer than "
                                  f"{self.timeout:g} s", finished.output)
        if finished.too_big:
            raise DependencyError("the dependencies are larger than "
                                  + _size(self.max_bytes), finished.output)
        return finished

    # -- pip ------------------------------------------------------------------------------

    def _pip_env(self, work: str) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items()
               if not k.startswith("PIP_") or k in PIP_ENV_KEPT}
        tmp = os.path.join(work, ".tmp")  # pip's downloads land here first: under the cap
        os.makedirs(tmp, exist_ok=True)
        env.update(TMPDIR=tmp, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                   PYTHONNOUSERSITE="1")
        return env

    def _pip(self, requirements: Requirements, work: str, deadline: float) -> Fetched:
        with open(os.path.join(work, "requirements.txt"), "wb") as f:
            f.write(requirements.rewritten())
        wheels = os.path.join(work, "wheels")
        os.mkdir(wheels)
        env = self._pip_env(work)
        argv = [self.python, "-m", "pip", "download", "--only-binary=:all:", "--no-cache-dir",
                "--progress-bar", "off", *self.pip_args, "--dest", wheels,
                "--requirement", "requirements.txt"]
        finished = self._run(argv, work, env, deadline, work)
        shutil.rmtree(os.path.join(work, ".tmp"), ignore_errors=True)
        if not finished.ok:
            raise DependencyError(self._pip_failure(finished.output, env, work, deadline),
                                  finished.output)
        files = sorted(os.listdir(wheels))
        stray = [name for name in files if not name.endswith(".whl")]
        if stray:  # --only-binary makes this impossible; refuse rather than trust it
            raise DependencyError(f"not a wheel: {', '.join(stray)}", finished.output)
        return Fetched("pip", work, tuple(files))

    def _pip_failure(self, output: str, env: Mapping[str, str], work: str,
                     deadline: float) -> str:
        """The clearest message for a failed ``pip download``."""
        missing = re.search(r"No matching distribution found for ([^\s]+)", output)
        if missing is None:
            errors = [line for line in output.splitlines() if line.startswith("ERROR")]
            return "pip could not fetch the requirements: " + (
                errors[-1][len("ERROR: "):] if errors else output.strip()[-300:])
        name = re.split(r"[\[<>=!~;\s]", missing.group(1), maxsplit=1)[0]
        # Is there a version at all, sdists included?  ``pip index`` only lists links:
        # it runs no package code.
        try:
            listing = self._run([self.python, "-m", "pip", "index", "versions", name,
                                 *self.pip_args], work, env, min(deadline,
                                                                 time.monotonic() + 30), work)
            has_versions = listing.ok and "Available versions" in listing.output
        except DependencyError:
            has_versions = False
        if has_versions:
            return (f"{name} publishes no wheel for this worker's Python (CPython, "
                    "manylinux x86_64) for the versions asked, only a source distribution "
                    "(setup.py); Sandrun installs wheels only and never builds packages on "
                    "the worker: pick a version or package that has a wheel")
        return (f"{name}: no such package, or no version matching the requirement, on the "
                "package index")

    # -- npm ------------------------------------------------------------------------------

    def _npm(self, requirements: Requirements, work: str, deadline: float) -> Fetched:
        with open(os.path.join(work, "package.json"), "wb") as f:
            f.write(requirements.rewritten())
        env = {k: v for k, v in self.environ.items() if not k.lower().startswith("npm_config_")}
        env.update(NO_UPDATE_NOTIFIER="1")
        if self._npm_allow is None:
            self._npm_allow = npm_allow_flags(self.npm, env)
        argv = [self.npm, "install", "--ignore-scripts", "--no-audit", "--no-fund",
                "--no-update-notifier", "--omit=dev", "--no-package-lock",
                *self._npm_allow, "--git=/bin/false",
                "--cache", os.path.join(work, ".npm-cache"), *self.npm_args]
        finished = self._run(argv, work, env, deadline, work)
        shutil.rmtree(os.path.join(work, ".npm-cache"), ignore_errors=True)
        if not finished.ok:
            errors = [line for line in finished.output.splitlines()
                      if line.startswith(("npm error", "npm ERR!"))]
            detail = " ".join(e.split(" ", 2)[-1] for e in errors[:3]) or \
                finished.output.strip()[-300:]
            raise DependencyError(f"npm could not fetch the dependencies: {detail}",
                                  finished.output)
        modules = os.path.join(work, "node_modules")
        os.makedirs(modules, exist_ok=True)
        packages, notes = _npm_inventory(modules)
        return Fetched("npm", work, packages, notes)

    # -- gem ------------------------------------------------------------------------------

    def _gem(self, requirements: Requirements, work: str, deadline: float) -> Fetched:
        gems_dir = os.path.join(work, "gems")
        os.mkdir(gems_dir)
        env = {k: v for k, v in self.environ.items() if not k.startswith(("GEM_", "BUNDLE_"))}
        env.update(HOME=work)  # no ~/.gemrc, no plugins from a user gem directory
        wanted = [(p.split("\0", 1)[0], p.split("\0", 1)[1]) for p in requirements.packages]
        specs: dict[str, GemSpec] = {}
        while wanted:
            name, requirement = wanted.pop(0)
            if name in specs:
                continue
            before = set(os.listdir(gems_dir))
            argv = [self.gem, "fetch", name, "--platform", "ruby", "--clear-sources",
                    "--source", self.gem_source]
            if requirement:
                argv += ["--version", requirement]
            finished = self._run(argv, gems_dir, env, deadline, work)
            new = sorted(set(os.listdir(gems_dir)) - before)
            if not finished.ok or len(new) != 1 or "ERROR" in finished.output:
                lines = finished.output.strip().splitlines() or ["no gem was downloaded"]
                detail = re.sub(r"^ERROR:\s*", "", lines[0])
                raise DependencyError(f"gem {name} {requirement}".strip()
                                      + f": could not fetch it: {detail}", finished.output)
            spec = self._gem_spec(os.path.join(gems_dir, new[0]), work, env, deadline)
            if spec.extensions:
                raise DependencyError(
                    f"gem {spec.name} {spec.version} has native extensions "
                    f"({', '.join(spec.extensions)}), which Sandrun does not build; only "
                    "pure-Ruby gems are supported")
            specs[name] = spec
            wanted += list(spec.deps)
        check = subprocess.run([self.ruby, "-e", _GEM_CHECK], input=json.dumps(
            [{"name": s.name, "version": s.version, "deps": s.deps} for s in specs.values()]),
            capture_output=True, text=True, env=env, timeout=30, check=False)
        if check.returncode != 0 or check.stdout.strip():
            raise DependencyError("the gems' requirements conflict: " + (
                check.stdout.strip().splitlines() or [check.stderr.strip()])[0])
        return Fetched("gem", work, tuple(sorted(s.file for s in specs.values())))

    def _gem_spec(self, path: str, work: str, env: Mapping[str, str],
                  deadline: float) -> GemSpec:
        # Gem::Package reads the gem's YAML metadata with RubyGems' safe loader: no gem code.
        finished = self._run([self.ruby, "-e", _GEM_SPEC, path], work, env, deadline, work)
        try:
            raw = json.loads(finished.output.strip().splitlines()[-1])[0]
            return GemSpec(str(raw["file"]), str(raw["name"]), str(raw["version"]),
                           tuple(str(e) for e in raw["extensions"]),
                           tuple((str(n), str(r)) for n, r in raw["deps"]))
        except (ValueError, IndexError, KeyError, TypeError):
            raise DependencyError(f"{os.path.basename(path)}: unreadable gem",
                                  finished.output) from None


NPM_ALLOW_FLAGS = ("--allow-git=none", "--allow-remote=none", "--allow-file=none",
                   "--allow-directory=none")


def npm_allow_flags(npm: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """npm's ``--allow-*=none`` flags if the installed npm knows them, else none.

    Older npm takes an unknown flag for a config value and ignores it, so passing
    them blindly would only look safe; there, the manifest's own specs are still
    refused by ``requirements`` (no git, URL, file or directory specs) and git
    itself is ``/bin/false``.  Asked once per worker from ``npm config ls -l``.
    """
    try:
        listing = subprocess.run([npm, "config", "ls", "-l"], capture_output=True, text=True,
                                 env=dict(env), timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    known = {line.split("=", 1)[0].strip() for line in listing.stdout.splitlines()}
    names = [flag[2:].split("=", 1)[0] for flag in NPM_ALLOW_FLAGS]
    return NPM_ALLOW_FLAGS if all(name in known for name in names) else ()


def _npm_inventory(modules: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(``name@version`` of each installed package, warnings about skipped scripts)."""
    packages, notes = [], []
    for top, dirs, files in os.walk(modules):
        dirs[:] = [d for d in dirs if d != ".bin"]
        if "package.json" not in files or top == modules:
            continue
        try:
            with open(os.path.join(top, "package.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or "name" not in meta:
            continue
        packages.append(f"{meta['name']}@{meta.get('version', '?')}")
        scripts = meta.get("scripts")
        scripts = scripts if isinstance(scripts, dict) else {}
        hooks = [h for h in ("preinstall", "install", "postinstall") if h in scripts]
        if hooks or "binding.gyp" in files:
            notes.append(f"{meta['name']}: its {'/'.join(hooks) or 'native build'} step was "
                         "not run (scripts are never run); it may not work")
        dirs[:] = [d for d in dirs if d == "node_modules"]  # nested deps only
    return tuple(sorted(packages)), tuple(notes)


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


def _publish(path: str) -> None:
    """Make an entry readable by every job uid and writable by none."""
    for top, dirs, files in os.walk(path):
        os.chmod(top, 0o755)
        for name in files:
            full = os.path.join(top, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755 if os.stat(full).st_mode & 0o111 else 0o644)


def _read_info(path: str, cached: bool) -> Fetched | None:
    try:
        with open(os.path.join(path, INFO)) as f:
            info = json.load(f)
        return Fetched(info["kind"], path, tuple(info["packages"]), tuple(info["notes"]),
                       cached)
    except (OSError, ValueError, KeyError, TypeError):
        return None

