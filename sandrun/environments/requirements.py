"""A job's dependency file, parsed strictly into what the worker may fetch.

The worker fetches a job's dependencies on the host, so the file is hostile
input to ``pip``, ``npm`` and ``gem``.  Each format is reduced to a plain
list of registry packages and rewritten; anything that would make a tool
read host files, reach a URL of the job's choosing, or build (and so run)
package code is refused with a message naming the line:

- ``requirements.txt``: ``name[extras] <specifiers> ; <marker>`` lines only.
  No options (``-r``, ``-e``, ``--index-url``, ``--no-binary``...), no direct
  URLs (``pkg @ https://...``), no local paths or VCS links.
- ``package.json``: only ``dependencies``, each a registry name with a
  version range or tag; no ``file:``, ``git``, ``http``, ``npm:`` aliases or
  ``user/repo`` specs.  Scripts are never run (``--ignore-scripts``).
- ``Gemfile``: Ruby code, so it is never evaluated; only ``source
  "https://rubygems.org"``, ``ruby "..."`` and ``gem "name", "req"...`` lines.

The cache key is the SHA-256 of the file exactly as uploaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_PACKAGES",
    "DependencyError",
    "Requirements",
    "cache_key",
    "parse_requirements",
]

MAX_FILE_BYTES = 256 * 1024  # a dependency file larger than this is refused
MAX_PACKAGES = 200  # packages a file may list (not counting their dependencies)

KINDS = {"requirements.txt": "pip", "package.json": "npm", "Gemfile": "gem"}


class DependencyError(Exception):
    """The job's dependencies cannot be had: the job ends with ``install_failed``.

    ``output`` is what the tool printed (for the job's log, never the worker's).
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.output = output


@dataclass(frozen=True)
class Requirements:
    """What to fetch for one job."""

    kind: str  # "pip", "npm" or "gem"
    source: bytes  # the file as uploaded: what the cache key covers
    # pip: one requirement line each; npm: "name@range"; gem: "name\0req, req"
    packages: tuple[str, ...]

    @property
    def key(self) -> str:
        return cache_key(self.source)

    def rewritten(self) -> bytes:
        """The file the fetch tool reads: only what was accepted."""
        if self.kind == "pip":
            return ("\n".join(self.packages) + "\n").encode()
        if self.kind == "npm":
            deps = dict(p.rsplit("@", 1) for p in self.packages)
            return json.dumps({"name": "sandrun-job-dependencies", "version": "0.0.0",
                               "private": True, "dependencies": deps}, indent=1).encode()
        return ("\n".join(self.packages) + "\n").encode()


def cache_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_requirements(filename: str, data: bytes) -> Requirements:
    """Parse ``data`` as the dependency file named ``filename`` (its basename decides)."""
    basename = filename.rsplit("/", 1)[-1]
    kind = KINDS.get(basename)
    if kind is None:
        raise DependencyError(f"{filename}: must be one of {', '.join(sorted(KINDS))}")
    if len(data) > MAX_FILE_BYTES:
        raise DependencyError(f"{basename}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DependencyError(f"{basename}: not UTF-8 text") from None
    if "\x00" in text:
        raise DependencyError(f"{basename}: contains NUL")
    packages = {"pip": _pip, "npm": _npm, "gem": _gem}[kind](text)
    if len(packages) > MAX_PACKAGES:
        raise DependencyError(f"{basename}: more than {MAX_PACKAGES} packages")
    return Requirements(kind, data, packages)


# -- requirements.txt ---------------------------------------------------------------------

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_SPEC = r"(?:===|==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_PIP_LINE = re.compile(
    rf"(?P<name>{_NAME})\s*(?P<extras>\[\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\])?\s*"
    rf"(?P<specs>{_SPEC}(?:\s*,\s*{_SPEC})*)?\s*"
    r"(?:;\s*(?P<marker>[A-Za-z0-9_.'\"<>=!~ ()-]+))?")


def _pip(text: str) -> tuple[str, ...]:
    lines: list[str] = []
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            raise DependencyError(
                f"requirements.txt line {number}: pip options ({line.split()[0]}) are not "
                "supported; list one package per line, e.g. requests==2.32.3")
        match = _PIP_LINE.fullmatch(line)
        if match is None:
            why = ("direct URLs, local paths and VCS links are not supported"
                   if re.search(r"[@/\\:]", line) else "not a requirement like name==1.2")
            raise DependencyError(f"requirements.txt line {number}: {why}: {line[:120]!r}")
        if re.search(r"\.(whl|zip|tar|tgz|tar\.gz|tar\.bz2|tar\.xz)$", match.group("name")):
            raise DependencyError(f"requirements.txt line {number}: local archives are not "
                                  f"supported: {line[:120]!r}")
        lines.append(re.sub(r"\s+", " ", line))
    return tuple(lines)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) with comments dropped and ``\\`` continuations joined."""
    out: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not buffer:
            start = number
        line = re.sub(r"(^|\s)#.*$", "", raw)
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        line = (buffer + line).strip()
        buffer = ""
        if line:
            out.append((start, line))
    if buffer.strip():
        out.append((start, buffer.strip()))
    return out


# -- package.json -------------------------------------------------------------------------

_NPM_NAME = re.compile(r"(@[a-z0-9][a-z0-9._~-]*/)?[A-Za-z0-9][A-Za-z0-9._~-]*")
_NPM_RANGE = re.compile(r"[A-Za-z0-9.*^~<>=|_+ -]*")


def _npm(text: str) -> tuple[str, ...]:
    try:
        document = json.loads(text)
    except ValueError as e:
        raise DependencyError(f"package.json: not JSON ({e})") from None
    if not isinstance(document, dict):
        raise DependencyError("package.json: must be a JSON object")
    deps = document.get("dependencies", {})
    if not isinstance(deps, dict):
        raise DependencyError("package.json: dependencies must be an object")
    packages = []
    for name, spec in deps.items():
        if not _NPM_NAME.fullmatch(name) or len(name) > 214:
            raise DependencyError(f"package.json: dependencies: {name[:120]!r} is not a "
                                  "package name")
        if not isinstance(spec, str) or not _NPM_RANGE.fullmatch(spec) or len(spec) > 200:
            raise DependencyError(
                f"package.json: dependencies.{name}: only registry versions and ranges "
                "(like ^1.2.0 or latest) are supported, not git, file, URL or alias specs")
        packages.append(f"{name}@{spec.strip() or '*'}")
    return tuple(sorted(packages))


# -- Gemfile ------------------------------------------------------------------------------

_Q = r"""(?:"([^"\\]*)"|'([^'\\]*)')"""
_GEM_REQ = re.compile(r"(?:(?:=|!=|>=|<=|>|<|~>)\s*)?[0-9A-Za-z.]+")
_GEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SOURCE = re.compile(rf"source\s*\(?\s*{_Q}\s*\)?")
_RUBY = re.compile(rf"ruby\s*\(?\s*{_Q}\s*\)?")
_GEM = re.compile(rf"gem\s*\(?\s*{_Q}((?:\s*,\s*{_Q})*)\s*\)?")
ALLOWED_GEM_SOURCES = ("https://rubygems.org", "https://rubygems.org/")


def _gem(text: str) -> tuple[str, ...]:
    gems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line or line.startswith("frozen_string_literal") or _RUBY.fullmatch(line):
            continue
        source = _SOURCE.fullmatch(line)
        if source:
            if (source.group(1) or source.group(2)) not in ALLOWED_GEM_SOURCES:
                raise DependencyError(f"Gemfile line {number}: only the worker's gem source "
                                      "is used; write source \"https://rubygems.org\" or "
                                      "leave it out")
            continue
        gem = _GEM.fullmatch(line)
        if gem is None:
            raise DependencyError(
                f"Gemfile line {number}: only `source`, `ruby` and `gem \"name\", "
                "\"requirement\"` lines are supported (no groups, git, path, platforms, "
                f"options or other Ruby code): {line[:120]!r}")
        name = gem.group(1) or gem.group(2)
        requirements = [a or b for a, b in re.findall(_Q, gem.group(3))]
        if not _GEM_NAME.fullmatch(name):
            raise DependencyError(f"Gemfile line {number}: {name!r} is not a gem name")
        for requirement in requirements:
            if not _GEM_REQ.fullmatch(requirement.strip()):
                raise DependencyError(f"Gemfile line {number}: {requirement!r} is not a "
                                      "version requirement like \"~> 1.2\"")
        gems.append(name + "\0" + ", ".join(r.strip() for r in requirements))
    return tuple(gems)
