"""What this worker can run: each interpreter a manifest may name, with its version.

``GET /runtimes`` answers from here, so clients and the web page can offer a
language list.  Versions are asked of the interpreters themselves, once, when
the worker starts (``probe``, which blocks: run it in a thread), looked up on
the sandbox's own ``PATH``: the sandbox sees the host's ``/usr`` read-only, so
what runs here runs there.  An interpreter that is not installed, or does not
answer within ``PROBE_TIMEOUT`` seconds, is left out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from sandrun.jobs.manifest import ALLOWED_INTERPRETERS, EXTENSION_INTERPRETERS
from sandrun.sandbox.policy import SANDBOX_PATH

log = Logger()
PROBE_TIMEOUT = 10.0  # seconds one interpreter may take to print its version

# How each interpreter prints its own version, bare (no banner), on stdout.
VERSION_COMMANDS: Mapping[str, tuple[str, ...]] = {
    "python3": ("python3", "-c", "import platform; print(platform.python_version())"),
    "node": ("node", "-e", "process.stdout.write(process.versions.node)"),
    "bash": ("bash", "-c", 'IFS=.; echo "${BASH_VERSINFO[*]:0:3}"'),
    "ruby": ("ruby", "-e", "print RUBY_VERSION"),
    "Rscript": ("Rscript", "-e", "cat(as.character(getRversion()))"),
    "perl": ("perl", "-e", "printf '%vd', $^V"),
    "php": ("php", "-r", "echo PHP_VERSION;"),
}
# Names a manifest's interpreter may be given under (besides its own), by interpreter.
LANGUAGES: Mapping[str, str] = {"python3": "python", "node": "javascript", "bash": "bash",
                                "sh": "sh", "ruby": "ruby", "Rscript": "r", "perl": "perl",
                                "php": "php"}


@dataclass(frozen=True)
class Runtime:
    interpreter: str  # the name the sandbox runs (manifest ``interpreter``)
    language: str  # a plain language name, as Piston's /runtimes gives
    version: str | None  # None only for a POSIX sh that cannot say (dash)
    path: str  # where it was found on the sandbox PATH
    extensions: tuple[str, ...]  # entrypoint suffixes that pick it
    aliases: tuple[str, ...]  # other names a manifest may give

    def as_json(self) -> dict[str, object]:
        return {"language": self.language, "interpreter": self.interpreter,
                "version": self.version, "path": self.path,
                "extensions": list(self.extensions), "aliases": list(self.aliases)}


def probe(timeout: float = PROBE_TIMEOUT) -> tuple[Runtime, ...]:
    """Every installed interpreter with its version.  Blocks (runs each one)."""
    found = []
    for name in dict.fromkeys(ALLOWED_INTERPRETERS.values()):
        path = shutil.which(name, path=SANDBOX_PATH)
        if path is None:
            continue
        version = _version_of(name, path, timeout)
        if version is None and name != "sh":
            continue  # there, but it does not run: nothing a job could use
        found.append(Runtime(
            interpreter=name, language=LANGUAGES.get(name, name), version=version, path=path,
            extensions=tuple(sorted(e for e, i in EXTENSION_INTERPRETERS.items() if i == name)),
            aliases=tuple(sorted(a for a, i in ALLOWED_INTERPRETERS.items()
                                 if i == name and a != name))))
    return tuple(found)


def _version_of(name: str, path: str, timeout: float) -> str | None:
    command = VERSION_COMMANDS.get(name)
    if command is None:  # sh: whichever shell it is, by the version of that shell's package
        return _shell_version(path)
    try:
        done = subprocess.run((path, *command[1:]), capture_output=True, timeout=timeout,
                              env={"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": "/"},
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.decode("utf-8", "replace").strip()
    return text if done.returncode == 0 and text and len(text) < 64 else None


def _shell_version(path: str) -> str | None:
    """``sh`` has no ``--version``: the version of the shell it links to, when bash or
    of its package (dash) as dpkg knows it."""
    real = os.path.realpath(path)
    shell = os.path.basename(real)
    if shell == "bash":
        return _version_of("bash", real, PROBE_TIMEOUT)
    dpkg = shutil.which("dpkg-query", path=SANDBOX_PATH)
    if dpkg is None:
        return None
    try:
        done = subprocess.run((dpkg, "-W", "-f", "${Version}", shell), capture_output=True,
                              timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.decode("utf-8", "replace").strip()
    return f"{shell} {text}" if done.returncode == 0 and text else None


class RuntimeList:
    """The probe's answer, asked once (off the reactor thread through ``blocking``).

    ``start`` begins the probe (the worker calls it at start); ``get`` fires
    with the runtimes once known, at once thereafter.
    """

    def __init__(self, blocking: Callable[..., defer.Deferred[Any]],
                 probe: Callable[[], tuple[Runtime, ...]] = probe) -> None:
        self._blocking = blocking
        self._probe = probe
        self._found: tuple[Runtime, ...] | None = None
        self._waiting: list[defer.Deferred[tuple[Runtime, ...]]] | None = None

    def start(self) -> None:
        if self._found is not None or self._waiting is not None:
            return
        self._waiting = []

        def found(runtimes: tuple[Runtime, ...]) -> None:
            self._found = runtimes
            waiting, self._waiting = self._waiting or [], None
            for d in waiting:
                d.callback(runtimes)

        def failed(failure: Any) -> None:
            log.failure("probing the interpreters failed", failure)
            found(())

        self._blocking(self._probe).addCallbacks(found, failed)

    def get(self) -> defer.Deferred[tuple[Runtime, ...]]:
        if self._found is not None:
            return defer.succeed(self._found)
        self.start()
        if self._found is not None:  # a synchronous runner answered already
            return defer.succeed(self._found)
        d: defer.Deferred[tuple[Runtime, ...]] = defer.Deferred()
        assert self._waiting is not None
        self._waiting.append(d)
        return d
