"""Packing a job directory for upload, and unpacking downloaded outputs safely.

Packing honours ``.gitignore`` and then ``.sandrunignore`` at the top of the
directory (a ``.sandrunignore`` rule wins), both with ``.gitignore`` rules:

- blank lines and lines starting with ``#`` are skipped; ``\\#`` and ``\\!``
  escape a leading ``#`` or ``!``;
- ``!pattern`` re-includes what an earlier pattern excluded (the last
  matching pattern wins), except beneath an excluded directory, which is
  never entered;
- a trailing ``/`` matches directories only;
- a pattern with a ``/`` at its start or in its middle is anchored at the
  top of the directory; otherwise it matches a name at any depth;
- ``*`` and ``?`` stay within one path component, ``[...]`` is a character
  class, ``**`` as a whole component crosses directories.

``DEFAULT_IGNORE`` is applied first (version control, ``.env`` secrets,
virtual environments, ``node_modules/``, caches, ``sandrun-outputs/``); either
file can re-include any of it with ``!`` (``!.env``).
Symbolic links and special files are never packed (the worker refuses them);
they are reported in ``PackResult.skipped``.

Unpacking (``extract_archive``, ``write_output``) treats the archive as
hostile: regular files and directories only, no absolute names, no ``..``,
and nothing is written through a symbolic link already in the destination
(every component is opened with ``O_NOFOLLOW`` relative to its parent).
Pure stdlib.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from sandrun.client.errors import UnsafeArchiveError

__all__ = [
    "DEFAULT_IGNORE",
    "IGNORE_FILE",
    "IgnoreRules",
    "PackResult",
    "PackedFile",
    "extract_archive",
    "pack_directory",
    "safe_relative_path",
    "write_output",
]

IGNORE_FILE = ".sandrunignore"
GITIGNORE = ".gitignore"
DEFAULT_IGNORE: tuple[str, ...] = (
    ".git*", ".hg/", ".svn/",  # version control (.git/, .gitignore, .gitmodules, .github/)
    ".env", ".env.*",  # secrets kept beside the code
    ".venv/", "node_modules/",  # installed dependencies: the worker installs its own
    "__pycache__/", "*.pyc", ".DS_Store",
    "/sandrun-outputs/",  # where ``sandrun run`` puts downloaded outputs
    "/" + IGNORE_FILE,
)
_CHUNK = 1024 * 1024


# -- ignore rules -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negated: bool
    directory_only: bool


class IgnoreRules:
    """An ordered list of gitignore-style patterns; ``ignored(path, is_dir)`` decides."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self._rules: list[_Rule] = []
        for line in patterns:
            rule = _parse_rule(line)
            if rule is not None:
                self._rules.append(rule)

    @classmethod
    def for_directory(cls, root: str, ignore_file: str | None = IGNORE_FILE,
                      defaults: Iterable[str] = DEFAULT_IGNORE,
                      gitignore: str | None = GITIGNORE) -> IgnoreRules:
        """The defaults, then ``root/.gitignore``, then ``root/ignore_file``, if they exist."""
        lines = list(defaults)
        for name in (gitignore, ignore_file):
            if name:
                try:
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        lines.extend(f.read().splitlines())
                except FileNotFoundError:
                    pass
        return cls(lines)

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether ``path`` (relative, ``/``-separated) is excluded by the last rule matching it."""
        verdict = False
        for rule in self._rules:
            if rule.directory_only and not is_dir:
                continue
            if rule.regex.fullmatch(path):
                verdict = not rule.negated
        return verdict


def _parse_rule(line: str) -> _Rule | None:
    text = line.rstrip("\n")
    # Trailing spaces are dropped unless escaped with a backslash.
    while text.endswith(" ") and not text.endswith("\\ "):
        text = text[:-1]
    if not text or text.startswith("#"):
        return None
    negated = text.startswith("!")
    if negated or text.startswith(("\\#", "\\!")):  # "!" negates; a backslash escapes
        text = text[1:]
    directory_only = text.endswith("/")
    text = text.rstrip("/")
    if not text:
        return None
    anchored = "/" in text
    text = text.lstrip("/")
    body = _glob_regex(text)
    prefix = "" if anchored or text.startswith("**/") else "(?:[^/]+/)*"
    try:
        regex = re.compile(prefix + body, re.DOTALL)
    except re.error:  # e.g. a reversed range "[z-a]": the pattern matches only itself
        regex = re.compile(prefix + re.escape(text), re.DOTALL)
    return _Rule(regex, negated, directory_only)


def _glob_regex(pattern: str) -> str:
    segments = pattern.split("/")
    pieces = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            pieces.append("[^/]+(?:/[^/]+)*" if last else "(?:[^/]+/)*")
        else:
            pieces.append(_segment_regex(segment) + ("" if last else "/"))
    return "".join(pieces)


def _segment_regex(segment: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        c = segment[i]
        if c == "\\" and i + 1 < len(segment):
            out.append(re.escape(segment[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            # A "]" right after "[" (or "[!") is part of the class, as in fnmatch.
            end = segment.find("]", i + 3 if segment[i + 1:i + 2] in ("!", "^") else i + 2)
            if end == -1:
                out.append(re.escape(c))
            else:
                inner = segment[i + 1:end]
                if inner[:1] in ("!", "^"):
                    inner = "^" + inner[1:]
                out.append("[" + inner.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


# -- packing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedFile:
    path: str
    size: int
    sha256: str


@dataclass
class PackResult:
    """What went into the archive, and what was left out (path, why)."""

    files: list[PackedFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def pack_directory(root: str, out: IO[bytes], ignore: IgnoreRules | None = None) -> PackResult:
    """Write the files under ``root`` (minus ignored ones) to ``out`` as a ``.tar.gz``.

    Member names are relative to ``root``; modes are 0o755 for files their
    owner may execute, else 0o644; owner names and ids are dropped.
    """
    rules = ignore if ignore is not None else IgnoreRules.for_directory(root)
    result = PackResult()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for relpath, full, info in _walk(root, rules, result):
            if stat.S_ISDIR(info.st_mode):
                member = _tarinfo(relpath, info, tarfile.DIRTYPE)
                tar.addfile(member)
                continue
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as e:
                result.skipped.append((relpath, f"cannot open: {e.strerror}"))
                continue
            with os.fdopen(fd, "rb") as f:
                opened = os.fstat(f.fileno())
                if not stat.S_ISREG(opened.st_mode):
                    result.skipped.append((relpath, "not a regular file"))
                    continue
                member = _tarinfo(relpath, opened, tarfile.REGTYPE)
                hashing = _Hashing(f)
                tar.addfile(member, hashing)
                result.files.append(PackedFile(relpath, opened.st_size, hashing.hexdigest()))
    return result


def _walk(root: str, rules: IgnoreRules,
          result: PackResult) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, full path, lstat) of everything to pack, parents first, sorted."""
    pending = [""]
    while pending:
        directory = pending.pop()
        full_dir = os.path.join(root, directory) if directory else root
        try:
            names = sorted(os.listdir(full_dir))
        except OSError as e:
            result.skipped.append((directory or ".", f"cannot list: {e.strerror}"))
            continue
        subdirs = []
        for name in names:
            relpath = f"{directory}/{name}" if directory else name
            full = os.path.join(full_dir, name)
            try:
                info = os.lstat(full)
            except OSError as e:
                result.skipped.append((relpath, f"cannot stat: {e.strerror}"))
                continue
            is_dir = stat.S_ISDIR(info.st_mode)
            if rules.ignored(relpath, is_dir):
                continue
            if stat.S_ISLNK(info.st_mode):
                result.skipped.append((relpath, "symbolic link"))
            elif is_dir:
                yield relpath, full, info
                subdirs.append(relpath)
            elif stat.S_ISREG(info.st_mode):
                yield relpath, full, info
            else:
                result.skipped.append((relpath, "not a regular file"))
        pending.extend(reversed(subdirs))


def _tarinfo(name: str, info: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mtime = int(info.st_mtime)
    if kind == tarfile.DIRTYPE:
        member.mode = 0o755
    else:
        member.size = info.st_size
        member.mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
    return member


class _Hashing:
    """A read-only file wrapper that hashes what is read through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# -- safe unpacking ---------------------------------------------------------------------


def safe_relative_path(name: str) -> list[str]:
    """The components of an archive member or output path, or ``UnsafeArchiveError``."""
    if "\x00" in name:
        raise UnsafeArchiveError("Unsafe path", f"{name!r} contains NUL")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise UnsafeArchiveError("Unsafe path", f"{name!r} is absolute or not a POSIX path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError("Unsafe path", f"{name!r} contains '..'")
    if not parts:
        raise UnsafeArchiveError("Unsafe path", f"{name!r} names no file")
    return parts


def extract_archive(fileobj: IO[bytes], dest: str, max_bytes: int | None = None) -> list[str]:
    """Unpack a ``.tar.gz`` (or plain ``.tar``) into ``dest``; the regular files written.

    Refuses, with ``UnsafeArchiveError``, any link, device or FIFO member, an
    absolute or ``..`` name, a path through a symbolic link in ``dest``, and
    more than ``max_bytes`` of content.  Files already written stay when a
    later member is refused.  Existing regular files are overwritten.
    """
    os.makedirs(dest, exist_ok=True)
    written: list[str] = []
    total = 0
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*")  # noqa: SIM115 - the with below closes it
    except tarfile.TarError as e:
        raise UnsafeArchiveError("Bad archive", str(e)) from None
    with tar:
        for member in _members(tar):
            if not (member.isreg() or member.isdir()):
                raise UnsafeArchiveError(
                    "Unsafe archive member", f"{member.name!r}: only files and directories "
                    "are extracted (links and special files are refused)")
            if member.isdir() and member.name.strip("/.") == "":
                continue
            parts = safe_relative_path(member.name)
            if member.isdir():
                os.close(_open_dirs(dest, parts))
                continue
            total += member.size
            if max_bytes is not None and total > max_bytes:
                raise UnsafeArchiveError("Archive too large", f"more than {max_bytes} bytes")
            data = tar.extractfile(member)
            if data is None:
                raise UnsafeArchiveError("Bad archive", f"{member.name!r} has no data")
            _write(dest, parts, _chunks(data), executable=bool(member.mode & 0o100))
            written.append("/".join(parts))
    return written


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UnsafeArchiveError("Bad archive", f"corrupt or truncated ({e})") from None
        if member is None:
            return
        yield member


def write_output(dest: str, relpath: str, chunks: Iterable[bytes]) -> str:
    """Write one downloaded output to ``dest/relpath`` under the same rules; the full path."""
    parts = safe_relative_path(relpath)
    os.makedirs(dest, exist_ok=True)
    _write(dest, parts, chunks, executable=False)
    return os.path.join(dest, *parts)


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        try:
            chunk = f.read(_CHUNK)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UnsafeArchiveError("Bad archive", f"corrupt or truncated ({e})") from None
        if not chunk:
            return
        yield chunk


def _open_dirs(dest: str, parts: list[str]) -> int:
    """A descriptor of ``dest/parts...``, created as needed, never following a symlink."""
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeArchiveError(
                        "Unsafe path", f"{'/'.join(parts)!r}: {part!r} in the destination is a "
                        "symbolic link or not a directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(dest: str, parts: list[str], chunks: Iterable[bytes], executable: bool) -> None:
    parent = _open_dirs(dest, parts[:-1])
    name = parts[-1]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(name, flags, 0o755 if executable else 0o644, dir_fd=parent)
        except FileExistsError:
            # Replace an old regular file (never write through it: it may be a hard link).
            if not stat.S_ISREG(os.lstat(name, dir_fd=parent).st_mode):
                raise UnsafeArchiveError(
                    "Unsafe path", f"{'/'.join(parts)!r} exists in the destination and is "
                    "not a regular file") from None
            os.unlink(name, dir_fd=parent)
            fd = os.open(name, flags, 0o755 if executable else 0o644, dir_fd=parent)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
    finally:
        os.close(parent)
