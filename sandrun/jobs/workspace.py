"""The job directory on the host side: storing uploads before a job runs, reading outputs after.

The job is hostile, and so is everything it uploads or leaves behind.  Every
file and directory here is created or opened relative to a directory file
descriptor, one path component at a time, with ``O_NOFOLLOW``: an archive
cannot place a symlink (links are refused), and even a link that somehow
exists is never followed.  Archives are read as data: regular files and
directories only, modes reduced to 0o644 or 0o755, byte and member counts
enforced while reading so a decompression bomb stops at the limit.

All functions block on file I/O; the reactor side runs them in a thread.
On :class:`UploadError` the directory may hold part of the upload: the
caller deletes the whole job directory (partial files are not kept).
Pure stdlib, no Twisted.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import itertools
import mimetypes
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Union

from sandrun.config import Limits
from sandrun.jobs.manifest import relative_path_problem
from sandrun.jobs.tarcheck import MAX_EXTENDED_HEADER, ArchiveRefused, CheckedTarStream

__all__ = [
    "CHUNK_BYTES",
    "MAX_OUTPUT_DEPTH",
    "MAX_OUTPUT_FILES",
    "InputFile",
    "InputFiles",
    "OutputFile",
    "OutputNotFound",
    "UploadError",
    "extract_archive",
    "list_outputs",
    "match_outputs",
    "open_output",
    "store_file",
    "write_files_json",
]

Dest = Union[int, str, "os.PathLike[str]"]  # an open directory fd (left open) or a path
Owner = tuple[int, int]  # (uid, gid) given to every file and directory created

CHUNK_BYTES = 64 * 1024  # copy unit: bounds the worker's memory per upload
MAX_OUTPUT_FILES = 10_000  # most files list_outputs reports
MAX_OUTPUT_DEPTH = 64  # directories deeper than this are neither listed nor served
MAX_SCANNED_ENTRIES = 200_000  # directory entries list_outputs looks at before it stops
_OUTPUT_PATH_LIMITS = Limits(max_name_bytes=255, max_path_bytes=4096)  # Linux NAME_MAX, PATH_MAX

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UploadError(Exception):
    """An upload is refused; ``member`` is the archive member or file name at fault."""

    def __init__(self, member: str, message: str) -> None:
        super().__init__(f"{member}: {message}")
        self.member = member
        self.message = message


class OutputNotFound(Exception):
    """No downloadable output at ``path``: missing, unmatched, escaping, linked or not a file."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


@dataclass(frozen=True)
class InputFile:
    """One stored input file, as ``job_hash`` covers it."""

    path: str  # relative to the job directory
    size: int  # bytes
    sha256: str  # hex


@dataclass(frozen=True)
class OutputFile:
    """One output file as ``/outputs`` and ``/status`` report it."""

    path: str
    size_bytes: int
    sha256: str
    mime_type: str
    type: str = "file"


class InputFiles:
    """Everything stored for one job so far, and the job-wide upload limits.

    Shared by every archive, file and JSON entry of one submission: the
    member count (files and directory entries) and the byte count after
    decompression are totals for the job, and a file path may be stored
    only once.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._files: dict[str, InputFile] = {}
        self._claimed: set[str] = set()
        self.members = 0
        self.total_bytes = 0

    @property
    def files(self) -> tuple[InputFile, ...]:
        """Every stored file, in path order (the order ``job_hash`` uses)."""
        return tuple(self._files[path] for path in sorted(self._files))

    def count_member(self, member: str) -> None:
        self.members += 1
        if self.members > self._limits.max_archive_members:
            raise UploadError(member, f"more than {self._limits.max_archive_members} files")

    def check_room(self, member: str, size: int) -> None:
        """Refuse ``size`` more bytes before reading any of them."""
        if size > self._limits.max_extracted_bytes - self.total_bytes:
            raise UploadError(
                member, f"more than {self._limits.max_extracted_bytes} bytes in all"
            )

    def add_bytes(self, member: str, size: int) -> None:
        self.check_room(member, size)
        self.total_bytes += size

    def claim(self, member: str, path: str) -> None:
        if path in self._claimed:
            raise UploadError(member, "duplicate path")
        self._claimed.add(path)

    def record(self, path: str, size: int, sha256: str) -> InputFile:
        entry = InputFile(path, size, sha256)
        self._files[path] = entry
        return entry


# -- storing uploads ------------------------------------------------------------------------


def extract_archive(
    fileobj: BinaryIO,
    dest: Dest,
    limits: Limits,
    inputs: InputFiles,
    *,
    archive_name: str = "archive",
    owner: Owner | None = None,
) -> list[InputFile]:
    """Unpack a ``.tar`` or ``.tar.gz`` read as a stream from ``fileobj`` into ``dest``.

    Only gzip and plain tar are accepted (sniffed from the first bytes, not
    ``r|*``): xz and bzip2 decoders can be made to allocate far more memory
    than the upload's size.  Every header passes ``tarcheck`` before tarfile
    reads it (no sparse members, extended headers bounded in size and number,
    a truncated archive refused as such).  Member names are normalised (``./a//b`` is
    ``a/b``).  Setuid, setgid and sticky bits, owners and times are never
    applied: files get 0o755 when any exec bit is set, else 0o644.
    Errors about the archive as a whole name ``archive_name``.
    """
    stream = CheckedTarStream(fileobj, CHUNK_BYTES)
    stored: list[InputFile] = []
    with _dir_fd(dest) as root:
        try:
            tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 (closed below)
                fileobj=stream,
                mode="r|",
                tarinfo=_GuardedTarInfo,
                encoding="utf-8",
                errors="surrogateescape",
            )
        except ArchiveRefused as e:
            raise UploadError(archive_name, str(e)) from None
        except _CorruptArchive as e:
            raise UploadError(archive_name, f"corrupt archive ({e})") from None
        except _ARCHIVE_ERRORS as e:
            raise UploadError(archive_name, f"not a tar or tar.gz archive ({e})") from None
        with tar:
            seen: set[str] = set()
            while True:
                try:
                    member = tar.next()
                except ArchiveRefused as e:
                    raise UploadError(archive_name, str(e)) from None
                except _ARCHIVE_ERRORS as e:
                    raise UploadError(archive_name, f"corrupt archive ({e})") from None
                if member is None:
                    return stored
                inputs.count_member(member.name)
                path = _member_path(member, limits)
                if path is None:  # "." or "./": the job directory itself
                    continue
                if path in seen:
                    raise UploadError(member.name, "duplicate member name")
                seen.add(path)
                if member.isdir():
                    _close_dir(_open_dirs(root, path.split("/"), member.name, owner), root)
                    continue
                inputs.check_room(member.name, member.size)
                data = tar.extractfile(member)
                if data is None:  # cannot happen for a regular file
                    raise UploadError(member.name, "no data")
                executable = bool(member.mode & 0o111)
                stored.append(
                    _write_file(
                        root, path, _read_member(data, member.name, archive_name), member.name,
                        inputs, executable=executable, owner=owner,
                    )
                )


def store_file(
    name: str,
    fileobj: BinaryIO,
    dest: Dest,
    limits: Limits,
    inputs: InputFiles,
    *,
    owner: Owner | None = None,
) -> InputFile:
    """Store one uploaded file at the top of ``dest`` under its sanitised basename.

    Any directory part (``/`` or ``\\``, as old browsers send) is dropped.
    The file is made executable (0o755) only when it starts with ``#!`` or
    is an ELF binary, so that a single uploaded script or program can run
    directly; anything else is 0o644.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", ".."):
        raise UploadError(name, "not a usable file name")
    problem = relative_path_problem(base, limits)
    if problem is not None:
        raise UploadError(name, f"file name {problem}")
    inputs.count_member(base)
    with _dir_fd(dest) as root:
        return _write_file(
            root, base, _read_chunks(fileobj), base, inputs, executable=None, owner=owner
        )


def write_files_json(
    files: object,
    dest: Dest,
    limits: Limits,
    inputs: InputFiles,
    *,
    owner: Owner | None = None,
) -> list[InputFile]:
    """Store the ``files`` object of a JSON submission: ``{"path": "text" | {"base64": "..."}}``.

    Keys are safe relative paths (subdirectories allowed, created as
    needed); text is stored as UTF-8.  Modes follow :func:`store_file`.
    Entries are written in key order, so errors are deterministic.
    """
    if not isinstance(files, dict):
        raise UploadError("files", "must be an object of path to content")
    stored: list[InputFile] = []
    with _dir_fd(dest) as root:
        for key in sorted(files, key=str):
            if not isinstance(key, str):
                raise UploadError(str(key), "path must be a string")
            problem = relative_path_problem(key, limits)
            if problem is not None:
                raise UploadError(key, f"path {problem}")
            data = _json_content(key, files[key], inputs)
            inputs.count_member(key)
            inputs.check_room(key, len(data))
            chunks = (data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES))
            stored.append(
                _write_file(root, key, chunks, key, inputs, executable=None, owner=owner)
            )
    return stored


def _json_content(key: str, value: object, inputs: InputFiles) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise UploadError(key, "text is not valid UTF-8") from None
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        encoded = value["base64"]
        inputs.check_room(key, len(encoded) // 4 * 3)  # before decoding it
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise UploadError(key, "invalid base64") from None
    raise UploadError(key, 'content must be a string or {"base64": "..."}')


class _CorruptArchive(Exception):
    pass


# What reading a hostile stream can raise besides our own refusals.
_ARCHIVE_ERRORS = (
    tarfile.TarError, EOFError, zlib.error, RecursionError, UnicodeError, _CorruptArchive
)


# Headers tarfile reads whole into memory; and header errors it turns into a quiet end.
_EXTENDED_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
)


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses what tarfile would otherwise buffer whole or drop silently.

    tarfile reads a pax or GNU long-name header into memory in one piece,
    and expands GNU sparse maps header by header, so a small compressed
    upload could claim gigabytes of header; those are capped here, before
    tarfile reads them.  tarfile also ends an archive quietly at a bad
    header past the first; here that is an error, not a short upload.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _GuardedTarInfo:
        offset = tarfile_.offset
        try:
            return super().fromtarfile(tarfile_)
        except _BAD_HEADER as e:
            if offset == 0:
                raise  # tarfile reports "not a tar file" for the first header
            raise _CorruptArchive(f"bad header at byte {offset}: {e}") from None

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _CorruptArchive(f"{self.name}: sparse files are not accepted")
        if self.type in _EXTENDED_HEADERS and self.size > MAX_EXTENDED_HEADER:
            raise _CorruptArchive(f"extended header of {self.size} bytes")
        result: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return result

_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


def _member_path(member: tarfile.TarInfo, limits: Limits) -> str | None:
    """The normalised path of an acceptable member; None for the archive's root entry."""
    name = member.name
    if not (member.isreg() or member.isdir()):
        kind = _KINDS.get(member.type, f"type {member.type!r}")
        raise UploadError(name, f"{kind} members are not accepted")
    if "\x00" in name:
        raise UploadError(name, "name contains NUL")
    if name.startswith("/"):
        raise UploadError(name, "absolute member name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UploadError(name, "member name contains '..'")
    if not parts:
        if member.isdir():
            return None
        raise UploadError(name, "empty member name")
    path = "/".join(parts)
    problem = relative_path_problem(path, limits)
    if problem is not None:
        raise UploadError(name, f"member name {problem}")
    return path


def _read_member(data: BinaryIO, member: str, archive_name: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = data.read(CHUNK_BYTES)
        except ArchiveRefused as e:
            raise UploadError(archive_name, str(e)) from None
        except (*_ARCHIVE_ERRORS, OSError) as e:
            raise UploadError(member, f"archive is truncated or corrupt ({e})") from None
        if not chunk:
            return
        yield chunk


def _read_chunks(fileobj: BinaryIO) -> Iterator[bytes]:
    while chunk := fileobj.read(CHUNK_BYTES):
        yield chunk


@contextmanager
def _dir_fd(dest: Dest) -> Iterator[int]:
    if isinstance(dest, int):
        yield dest
        return
    fd = os.open(dest, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _close_dir(fd: int, root: int) -> None:
    if fd != root:
        os.close(fd)


def _open_dirs(root: int, parts: list[str], member: str, owner: Owner | None) -> int:
    """Open (creating as needed) the directory ``parts`` beneath ``root``, never via a link."""
    current = root
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o700, dir_fd=current)
                created = True
            except FileExistsError:
                created = False
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=current)
            except OSError:
                raise UploadError(member, f"{part!r} exists and is not a directory") from None
            _close_dir(current, root)
            current = child
            if created:
                os.fchmod(current, 0o755)
                if owner is not None:
                    os.fchown(current, *owner)
    except BaseException:
        _close_dir(current, root)
        raise
    return current


def _write_file(
    root: int,
    path: str,
    chunks: Iterable[bytes],
    member: str,
    inputs: InputFiles,
    *,
    executable: bool | None,
    owner: Owner | None,
) -> InputFile:
    """Create ``path`` (which must not exist) and copy ``chunks`` into it, counting bytes.

    ``executable`` None means: decide from the first bytes (``#!`` or ELF).
    A file cut short by an error is removed again.
    """
    inputs.claim(member, path)
    *dirs, name = path.split("/")
    parent = _open_dirs(root, dirs, member, owner)
    try:
        try:
            fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            raise UploadError(member, "duplicate path") from None
        except OSError as e:
            raise UploadError(member, f"cannot create file ({e.strerror})") from None
        try:
            digest = hashlib.sha256()
            size = 0
            head = b""
            for chunk in chunks:
                inputs.add_bytes(member, len(chunk))
                if size == 0:
                    head = chunk[:4]
                digest.update(chunk)
                _write_all(fd, chunk, member)
                size += len(chunk)
            if executable is None:
                executable = head.startswith(b"#!") or head == b"\x7fELF"
            os.fchmod(fd, 0o755 if executable else 0o644)
            if owner is not None:
                os.fchown(fd, *owner)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(name, dir_fd=parent)
            except OSError:
                pass
            raise
        os.close(fd)
    finally:
        _close_dir(parent, root)
    return inputs.record(path, size, digest.hexdigest())


def _write_all(fd: int, chunk: bytes, member: str) -> None:
    view = memoryview(chunk)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise UploadError(member, "no space left for the job's files") from None
            raise
        view = view[written:]


# -- outputs --------------------------------------------------------------------------------


def match_outputs(patterns: tuple[str, ...], relpath: str) -> bool:
    """Whether ``relpath`` is an output under the manifest's ``outputs`` patterns.

    ``*`` matches within one path component, ``?`` one character other than
    ``/``, ``[...]`` a character class, ``**`` as a whole component any
    number of components (``**/*.csv`` matches ``x.csv`` and ``a/b/x.csv``),
    and a trailing ``/`` everything beneath that directory.  ``*`` matches
    dotfiles too.  No patterns: everything matches.
    """
    if not patterns:
        return True
    return any(_pattern_regex(pattern).fullmatch(relpath) for pattern in patterns)


@functools.lru_cache(maxsize=512)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    segments = pattern.split("/")
    if pattern.endswith("/"):
        segments[-1] = "**"  # "out/" is "out/**": one or more components beneath
    pieces = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            pieces.append("[^/]+(?:/[^/]+)*" if last else "(?:[^/]+/)*")
        else:
            pieces.append(_segment_regex(segment) + ("" if last else "/"))
    try:
        return re.compile("".join(pieces), re.DOTALL)
    except re.error:  # e.g. a reversed range "[z-a]": the pattern only matches itself
        return re.compile(re.escape(pattern))


def _segment_regex(segment: str) -> str:
    out = []
    i = 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            while i + 1 < len(segment) and segment[i + 1] == "*":
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            start = i + 1
            negate = start < len(segment) and segment[start] in "!^"
            if negate:
                start += 1
            end = segment.find("]", start + 1)  # a "]" right after "[" is literal
            if end < 0:
                out.append(re.escape(c))
            else:
                body = "".join(ch if ch == "-" else re.escape(ch) for ch in segment[start:end])
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def list_outputs(
    job_dir: Dest, patterns: tuple[str, ...], *, max_files: int = MAX_OUTPUT_FILES,
    exclude: tuple[str, ...] = (), unchanged: Mapping[str, str] | None = None
) -> list[OutputFile]:
    """Every regular file under ``job_dir`` matching ``patterns``, hashed, sorted by path.

    Symlinks, sockets, FIFOs and devices are skipped and never followed;
    so are names that are not valid UTF-8 (no JSON or URL could carry
    them) and anything deeper than ``MAX_OUTPUT_DEPTH`` directories.  The
    walk stops after ``max_files`` matching files (``MAX_OUTPUT_FILES`` by
    default) or ``MAX_SCANNED_ENTRIES`` directory entries, so a job that
    leaves millions of files gets a partial list; which files make it is
    decided by a walk with each directory's names in sorted order.
    Directories named in ``exclude`` (relative, ending in ``/``, like
    ``.deps/``) are not walked: they neither count nor use up those caps.
    A file named in ``unchanged`` (path -> sha256 of what was uploaded) that
    still has that content is not an output: the job neither made nor changed it.
    """
    found: list[OutputFile] = []
    budget = [MAX_SCANNED_ENTRIES]
    with _dir_fd(job_dir) as root:
        _walk(root, "", 0, patterns, found, max_files, budget, exclude, unchanged or {})
    found.sort(key=lambda output: output.path)
    return found


def _walk(
    dir_fd: int,
    prefix: str,
    depth: int,
    patterns: tuple[str, ...],
    found: list[OutputFile],
    max_files: int,
    budget: list[int],
    exclude: tuple[str, ...] = (),
    unchanged: Mapping[str, str] | None = None,
) -> bool:
    """Add this directory's matching files to ``found``; False once a cap is reached."""
    with os.scandir(dir_fd) as scan:
        # Never hold more than the budget of entries, however big the directory.
        entries = sorted(itertools.islice(scan, budget[0] + 1), key=lambda entry: entry.name)
    for entry in entries:
        budget[0] -= 1
        if budget[0] < 0 or len(found) >= max_files:
            return False
        path = prefix + entry.name
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            continue
        if entry.is_dir(follow_symlinks=False):
            if depth + 1 >= MAX_OUTPUT_DEPTH or path + "/" in exclude:
                continue
            try:
                child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                if not _walk(child, path + "/", depth + 1, patterns, found, max_files, budget,
                             exclude, unchanged):
                    return False
            finally:
                os.close(child)
        elif entry.is_file(follow_symlinks=False) and match_outputs(patterns, path):
            output = _hash_output(dir_fd, entry.name, path)
            if output is not None and (unchanged or {}).get(path) != output.sha256:
                found.append(output)
    return True


def _open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
    """Open ``name`` in ``dir_fd`` for reading if it is a regular file, without following it.

    Checked before opening (so a device or FIFO is never opened) and
    again on the open descriptor (so a swap in between is caught).
    """
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode):
            return None
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        return None
    return fd, st


def _hash_output(dir_fd: int, name: str, path: str) -> OutputFile | None:
    opened = _open_regular(dir_fd, name)
    if opened is None:
        return None
    fd, st = opened
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := os.read(fd, CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    mime_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return OutputFile(path, size, digest.hexdigest(), mime_type)


def open_output(
    job_dir: Dest, relpath: str, patterns: tuple[str, ...]
) -> tuple[BinaryIO, int]:
    """Open one output for download; returns the open file and its size in bytes.

    Raises OutputNotFound for a path that does not match ``patterns``, is
    not a normalised relative path (``..``, absolute, empty components),
    passes through a symlink anywhere, or is not a regular file.  The
    caller closes the file.
    """
    if relative_path_problem(relpath, _OUTPUT_PATH_LIMITS) is not None:
        raise OutputNotFound(relpath)
    *dirs, name = relpath.split("/")
    if len(dirs) >= MAX_OUTPUT_DEPTH or not match_outputs(patterns, relpath):
        raise OutputNotFound(relpath)
    with _dir_fd(job_dir) as root:
        current = root
        try:
            for part in dirs:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=current)
                except OSError:
                    raise OutputNotFound(relpath) from None
                _close_dir(current, root)
                current = child
            opened = _open_regular(current, name)
        finally:
            _close_dir(current, root)
    if opened is None:
        raise OutputNotFound(relpath)
    fd, st = opened
    return os.fdopen(fd, "rb"), st.st_size
