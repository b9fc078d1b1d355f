"""``sandrun env build NAME``: install a template's pinned wheels into a new prefix.

An admin command, run apart from the worker (so it never blocks the API and
never runs at request time).  Steps, each reported through ``progress``:

1. ``pip install --only-binary=:all: --target <tmp>/site-packages`` with the
   sandbox's interpreter (``/usr/bin/python3``: wheel tags and the ``.pyc``
   files it compiles match what jobs run; a read-only prefix could not
   cache them later);
2. record every installed distribution in ``sandrun-env.json``;
3. import the template's modules as ``nobody`` to prove the build works;
4. write ``READY``, rename the build into ``.builds/`` and swap the
   ``<name>`` symlink to it atomically; keep the previous build (jobs that
   started on it still bind it) and delete older ones.
"""

from __future__ import annotations

import datetime
import email.parser
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable

from sandrun.environments.fetch import SANDBOX_PYTHON, _publish
from sandrun.environments.process import run_bounded
from sandrun.environments.registry import (
    BUILDS,
    MANIFEST,
    READY,
    SITE_PACKAGES,
    BuiltEnvironment,
    Registry,
    read_manifest,
)
from sandrun.environments.templates import Template

__all__ = ["BuildError", "build", "check", "installed_distributions"]

NOBODY = 65534
Progress = Callable[[str], None]


class BuildError(Exception):
    """A template could not be built or checked; the message says why."""


def build(template: Template, registry: Registry, *, python: str = SANDBOX_PYTHON,
          pip_args: tuple[str, ...] = (), timeout: float = 3600.0,
          progress: Progress = print) -> BuiltEnvironment:
    """Build ``template`` under ``registry.root``; returns the new current build."""
    builds = registry.builds_dir()
    os.makedirs(builds, mode=0o755, exist_ok=True)
    os.chmod(registry.root, 0o755)
    os.chmod(builds, 0o755)
    with open(os.path.join(builds, f"{template.name}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another build of {template.name} is running") from None
        work = tempfile.mkdtemp(prefix=f".tmp-{template.name}-", dir=builds)
        try:
            return _build(template, registry, work, python, pip_args, timeout, progress)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def _build(template: Template, registry: Registry, work: str, python: str,
           pip_args: tuple[str, ...], timeout: float, progress: Progress) -> BuiltEnvironment:
    site = os.path.join(work, SITE_PACKAGES)
    started = time.monotonic()
    progress(f"[1/4] installing {len(template.packages)} pinned packages of {template.name} "
             f"(wheels only) with {python}")
    old_umask = os.umask(0o022)
    try:
        finished = run_bounded(
            [python, "-m", "pip", "install", "--only-binary=:all:", "--no-input",
             "--disable-pip-version-check", "--progress-bar", "off",
             "--no-warn-script-location", "--root-user-action=ignore", *pip_args, "--target", site,
             *template.packages],
            cwd=work, env=_pip_env(), timeout=timeout, on_line=lambda l: progress("    " + l))
    finally:
        os.umask(old_umask)
    if not finished.ok:
        raise BuildError(f"pip failed for {template.name}" +
                         (f" (no result after {timeout:g} s)" if finished.timed_out else ""))
    _publish(work)

    installed = installed_distributions(site)
    progress(f"[2/4] {len(installed)} distributions installed: {', '.join(installed)}")
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    progress(f"[3/4] importing {', '.join(template.imports) or 'nothing'} as nobody")
    _check_imports(python, site, template.imports, progress)

    build_id = f"{template.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    manifest = {"name": template.name, "description": template.description,
                "packages": list(template.packages), "fingerprint": template.fingerprint,
                "installed": installed, "python": version,
                "built_at": datetime.datetime.now(datetime.UTC)
                .strftime("%Y-%m-%dT%H:%M:%SZ")}
    _write(os.path.join(work, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    _write(os.path.join(work, READY), build_id + "\n")  # last: the build is complete
    final = os.path.join(registry.builds_dir(), build_id)
    os.rename(work, final)
    _swap_link(registry.link(template.name), os.path.join(BUILDS, build_id))
    _remove_old_builds(registry, template.name, build_id)
    built = read_manifest(final)
    assert built is not None
    progress(f"[4/4] {template.name} ready in {time.monotonic() - started:.0f} s: {final}")
    return built


def check(registry: Registry, name: str, *, python: str = SANDBOX_PYTHON,
          progress: Progress = print) -> BuiltEnvironment:
    """Import the current build's modules again; raises ``BuildError`` if any fails."""
    template = registry.template(name)
    built = registry.built(name)
    if built is None:
        raise BuildError(f"{name} is not built; run: sandrun env build {name}")
    if built.fingerprint != template.fingerprint:
        progress(f"warning: {name} was built from another package list; rebuild it")
    progress(f"importing {', '.join(template.imports) or 'nothing'} from {built.prefix}")
    _check_imports(python, built.site_packages, template.imports, progress)
    return built


def installed_distributions(site: str) -> list[str]:
    """``Name==version`` of every ``*.dist-info`` under ``site``, sorted."""
    found = []
    for entry in sorted(os.listdir(site)):
        if not entry.endswith(".dist-info"):
            continue
        try:
            with open(os.path.join(site, entry, "METADATA"), encoding="utf-8") as f:
                meta = email.parser.Parser().parse(f, headersonly=True)
        except OSError:
            continue
        found.append(f"{meta['Name']}=={meta['Version']}")
    return sorted(found, key=str.lower)


def _check_imports(python: str, site: str, modules: tuple[str, ...],
                   progress: Progress) -> None:
    # As nobody, so the packages' import-time code never runs as root; -I -S with a bare
    # environment, so only the prefix can satisfy an import.  The prefix is handed over as
    # an open directory (/proc/self/fd/N): its parents need not be open to nobody.
    code = ("import importlib, sys; prefix = sys.argv[1]; sys.path.insert(0, prefix)\n"
            "for name in sys.argv[2:]:\n"
            "    m = importlib.import_module(name)\n"
            "    if not (m.__file__ or '').startswith(prefix + '/'):\n"
            "        sys.exit(f'{name} came from {m.__file__}, not from the prefix')\n"
            "    print(f'    {name} {getattr(m, \"__version__\", \"\")}'.rstrip(), flush=True)\n")
    root = os.geteuid() == 0
    fd = os.open(site, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = subprocess.run(
            [python, "-I", "-S", "-c", code, f"/proc/self/fd/{fd}", *modules], cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8",
                 "MPLCONFIGDIR": "/tmp"}, pass_fds=(fd,),
            user=NOBODY if root else None, group=NOBODY if root else None,
            extra_groups=[] if root else None, capture_output=True, text=True, timeout=600,
            check=False)
    finally:
        os.close(fd)
    for line in result.stdout.splitlines():
        progress(line)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise BuildError(f"importing failed: {lines[-1]}")


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") or k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                                                 "PIP_FIND_LINKS", "PIP_TRUSTED_HOST",
                                                 "PIP_CERT", "PIP_DEFAULT_TIMEOUT",
                                                 "PIP_PROXY", "PIP_CONFIG_FILE")}
    env.update(PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _swap_link(link: str, target: str) -> None:
    if os.path.lexists(link) and not os.path.islink(link):
        raise BuildError(f"{link} exists and is not a symlink; move it away")
    tmp = f"{link}.new-{uuid.uuid4().hex[:8]}"
    os.symlink(target, tmp)
    os.rename(tmp, link)  # atomic: a job sees the old build or the new one


def _build_id_pattern(name: str) -> re.Pattern[str]:
    name = re.escape(name)
    return re.compile(rf"{name}-\d{{8}}T\d{{6}}-[0-9a-f]{{6}}|(\.tmp-){name}-[^-]+")


def _remove_old_builds(registry: Registry, name: str, current: str) -> None:
    """Keep ``current`` and the newest other complete build (running jobs may still bind
    it); delete the rest, and what killed builds left behind."""
    builds = registry.builds_dir()
    pattern = _build_id_pattern(name)
    complete, abandoned = [], []
    for entry in os.listdir(builds):
        match = pattern.fullmatch(entry)
        if match is None or entry == current:
            continue
        if match.group(1):
            abandoned.append(entry)
        elif os.path.isfile(os.path.join(builds, entry, READY)):
            complete.append(entry)
        else:
            abandoned.append(entry)
    complete.sort(key=lambda entry: os.stat(os.path.join(builds, entry)).st_mtime)
    for entry in complete[:-1] + abandoned:
        shutil.rmtree(os.path.join(builds, entry), ignore_errors=True)
