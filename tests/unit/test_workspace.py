"""Uploads into a job directory and outputs out of it, against hostile archives and jobs."""

from __future__ import annotations

import base64
import bz2
import hashlib
import io
import lzma
import os
import socket
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from sandrun.config import Limits
from sandrun.jobs.workspace import (
    MAX_OUTPUT_DEPTH,
    InputFile,
    InputFiles,
    OutputFile,
    OutputNotFound,
    UploadError,
    extract_archive,
    list_outputs,
    match_outputs,
    open_output,
    store_file,
    write_files_json,
)

LIMITS = Limits()
MB = 1000 * 1000


# -- building archives -----------------------------------------------------------------------


def member(
    name: str,
    data: bytes = b"",
    *,
    type: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    linkname: str = "",
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = mode
    info.linkname = linkname
    info.size = len(data) if type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    if type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def make_tar(members: Iterable[tuple[tarfile.TarInfo, bytes]], *, gz: bool = False) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return buf


class LazyStream(io.RawIOBase):
    """A read-only stream produced chunk by chunk, counting what was read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self.produced += n
        return n


def tar_chunks(members: Iterable[tuple[tarfile.TarInfo, Iterable[bytes]]]) -> Iterator[bytes]:
    """A tar stream written on the fly, so data never has to exist in full."""
    for info, data in members:
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        for chunk in data:
            yield chunk
        if info.size % 512:
            yield b"\0" * (512 - info.size % 512)
    yield b"\0" * 1024


def gzipped(chunks: Iterable[bytes]) -> Iterator[bytes]:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: gzip framing
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()


def zeros(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = b"\0" * chunk
    for start in range(0, total, chunk):
        yield block[: min(chunk, total - start)]


def zero_member(name: str, size: int) -> tuple[tarfile.TarInfo, Iterator[bytes]]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, zeros(size)


def extract(
    archive: BinaryIO | io.BufferedReader,
    dest: Path | int,
    limits: Limits = LIMITS,
    inputs: InputFiles | None = None,
) -> list[InputFile]:
    if inputs is None:
        inputs = InputFiles(limits)
    return extract_archive(archive, dest, limits, inputs, archive_name="up.tgz")


def refused(
    archive: BinaryIO | io.BufferedReader, dest: Path, limits: Limits = LIMITS
) -> UploadError:
    with pytest.raises(UploadError) as info:
        extract(archive, dest, limits)
    return info.value


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def stored_bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "job"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


# -- archives that are fine ------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_an_archive_of_files_and_directories_is_unpacked_with_its_contents(
    dest: Path, gz: bool
) -> None:
    archive = make_tar(
        [
            member("./", type=tarfile.DIRTYPE, mode=0o755),
            member("./src", type=tarfile.DIRTYPE, mode=0o700),
            member("./src/main.py", b"print(1)\n", mode=0o755),
            member("./data/deep/x.csv", b"a,b\n"),
            member("empty", type=tarfile.DIRTYPE),
        ],
        gz=gz,
    )
    inputs = InputFiles(LIMITS)
    stored = extract(archive, dest, inputs=inputs)

    assert tree(dest) == ["data", "data/deep", "data/deep/x.csv", "empty", "src", "src/main.py"]
    assert (dest / "src/main.py").read_bytes() == b"print(1)\n"
    assert stored == [
        InputFile("src/main.py", 9, hashlib.sha256(b"print(1)\n").hexdigest()),
        InputFile("data/deep/x.csv", 4, hashlib.sha256(b"a,b\n").hexdigest()),
    ]
    assert [f.path for f in inputs.files] == ["data/deep/x.csv", "src/main.py"]
    assert inputs.total_bytes == 13
    assert inputs.members == 5


def test_modes_are_only_ever_0644_or_0755(dest: Path) -> None:
    extract(
        make_tar(
            [
                member("setuid", b"x", mode=0o4755),
                member("setgid", b"x", mode=0o2644),
                member("group-exec", b"x", mode=0o610),
                member("private", b"x", mode=0o600),
                member("sticky", type=tarfile.DIRTYPE, mode=0o1777),
                member("writable", b"x", mode=0o666),
            ]
        ),
        dest,
    )

    def mode(name: str) -> int:
        return stat.S_IMODE((dest / name).lstat().st_mode)

    assert mode("setuid") == 0o755
    assert mode("setgid") == 0o644
    assert mode("group-exec") == 0o755
    assert mode("private") == 0o644
    assert mode("sticky") == 0o755
    assert mode("writable") == 0o644


def test_an_owner_is_given_to_every_file_and_created_directory(dest: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    inputs = InputFiles(LIMITS)
    extract_archive(
        make_tar([member("a/b/c.txt", b"x"), member("d", type=tarfile.DIRTYPE)]),
        dest, LIMITS, inputs, owner=(12345, 23456),
    )
    write_files_json({"e/f.txt": "y"}, dest, LIMITS, inputs, owner=(12345, 23456))
    for name in ["a", "a/b", "a/b/c.txt", "d", "e", "e/f.txt"]:
        st = (dest / name).lstat()
        assert (st.st_uid, st.st_gid) == (12345, 23456), name


def test_an_open_directory_descriptor_works_as_destination_and_stays_open(dest: Path) -> None:
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        extract(make_tar([member("a/x.txt", b"1")]), fd)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
    assert (dest / "a/x.txt").read_bytes() == b"1"


# -- archive attacks -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "./../evil.txt", ".."])
def test_a_member_with_dotdot_is_refused_and_nothing_lands_outside(
    tmp_path: Path, dest: Path, name: str
) -> None:
    error = refused(make_tar([member(name, b"pwned")]), dest)
    assert error.member == name
    assert not (tmp_path / "evil.txt").exists()
    assert tree(dest) == []


def test_an_absolute_member_is_refused_and_its_target_not_created(
    dest: Path, outside: Path
) -> None:
    target = outside / "abs.txt"
    error = refused(make_tar([member(str(target), b"pwned")]), dest)
    assert error.member == str(target)
    assert not target.exists()
    assert tree(dest) == []


def test_a_symlink_member_is_refused_so_a_file_through_it_lands_nowhere(
    dest: Path, outside: Path
) -> None:
    archive = make_tar(
        [
            member("link", type=tarfile.SYMTYPE, linkname=str(outside)),
            member("link/pwned.txt", b"pwned"),
        ]
    )
    error = refused(archive, dest)
    assert error.member == "link"
    assert "symbolic link" in error.message
    assert not (outside / "pwned.txt").exists()
    assert not os.path.lexists(dest / "link")


def test_a_symlink_already_in_the_directory_is_never_followed(
    dest: Path, outside: Path
) -> None:
    (dest / "link").symlink_to(outside)
    (dest / "file-link").symlink_to(outside / "target.txt")

    error = refused(make_tar([member("link/pwned.txt", b"pwned")]), dest)
    assert error.member == "link/pwned.txt"
    with pytest.raises(UploadError):
        extract(make_tar([member("file-link", b"pwned")]), dest)
    with pytest.raises(UploadError):
        store_file("file-link", io.BytesIO(b"pwned"), dest, LIMITS, InputFiles(LIMITS))
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("linkname", ["/etc/passwd", "../outside/secret", "ok.txt"])
def test_a_hardlink_member_is_refused(dest: Path, outside: Path, linkname: str) -> None:
    (outside / "secret").write_text("secret")
    archive = make_tar(
        [member("ok.txt", b"fine"), member("hl", type=tarfile.LNKTYPE, linkname=linkname)]
    )
    error = refused(archive, dest)
    assert error.member == "hl"
    assert "hard link" in error.message
    assert not os.path.lexists(dest / "hl")
    assert (outside / "secret").stat().st_nlink == 1


@pytest.mark.parametrize(
    ("kind", "word"),
    [
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (b"V", "type"),  # a volume label: an unknown kind is refused too
    ],
)
def test_device_fifo_and_unknown_members_are_refused(dest: Path, kind: bytes, word: str) -> None:
    error = refused(make_tar([member("node", type=kind)]), dest)
    assert error.member == "node"
    assert word in error.message
    assert not os.path.lexists(dest / "node")


def test_a_decompression_bomb_is_refused_before_it_fills_the_disk(dest: Path) -> None:
    # 600 MB of zeros, compressed while being read: only what is read is ever made.
    stream = LazyStream(gzipped(tar_chunks([zero_member("bomb", 600 * MB)])))
    error = refused(io.BufferedReader(stream), dest)
    assert error.member == "bomb"
    assert stored_bytes(dest) == 0
    assert stream.produced < 1 * MB


def test_a_member_larger_than_the_byte_limit_is_refused_with_nothing_stored(
    dest: Path,
) -> None:
    limits = Limits(max_extracted_bytes=1 * MB)
    stream = LazyStream(gzipped(tar_chunks([zero_member("big", 10 * MB)])))
    error = refused(io.BufferedReader(stream), dest, limits)
    assert error.member == "big"
    assert stored_bytes(dest) < limits.max_extracted_bytes


def test_many_members_together_over_the_byte_limit_stop_at_the_limit(dest: Path) -> None:
    limits = Limits(max_extracted_bytes=1 * MB)
    members = (zero_member(f"part{i:02}", 100_000) for i in range(50))
    stream = LazyStream(gzipped(tar_chunks(members)))
    error = refused(io.BufferedReader(stream), dest, limits)
    assert error.member == "part10"  # parts 0-9 are exactly 1 MB
    assert stored_bytes(dest) <= limits.max_extracted_bytes
    assert not (dest / "part10").exists()


def test_the_byte_limit_holds_across_every_upload_of_a_job(dest: Path) -> None:
    limits = Limits(max_extracted_bytes=1000)
    inputs = InputFiles(limits)
    extract(make_tar([member("a", b"x" * 600)]), dest, limits, inputs)
    with pytest.raises(UploadError) as info:
        store_file("b", io.BytesIO(b"y" * 600), dest, limits, inputs)
    assert info.value.member == "b"
    assert not (dest / "b").exists()
    assert inputs.total_bytes == 600


def test_a_stream_of_100000_members_is_refused_at_the_member_limit(dest: Path) -> None:
    limits = Limits(max_archive_members=100)
    made = [0]

    def members() -> Iterator[tuple[tarfile.TarInfo, list[bytes]]]:
        for i in range(100_000):
            made[0] += 1
            yield tarfile.TarInfo(f"f{i:06}"), []

    error = refused(io.BufferedReader(LazyStream(gzipped(tar_chunks(members())))), dest, limits)
    assert error.member == "f000100"
    assert "100" in error.message
    assert made[0] < 10_000  # stopped early (the compressor buffers a few thousand)
    assert len(tree(dest)) == 100


def test_exactly_the_member_limit_is_accepted(dest: Path) -> None:
    limits = Limits(max_archive_members=100)
    stored = extract(make_tar([member(f"f{i}") for i in range(100)]), dest, limits)
    assert len(stored) == 100


def test_the_default_member_limit_refuses_10001_members(dest: Path) -> None:
    assert LIMITS.max_archive_members == 10_000
    error = refused(make_tar(member(f"f{i}") for i in range(10_001)), dest)
    assert error.member == "f10000"


@pytest.mark.parametrize(
    "names",
    [["a.txt", "a.txt"], ["a.txt", "./a.txt"], ["d/", "d"], ["x//y", "x/y"]],
)
def test_duplicate_member_names_are_refused(dest: Path, names: list[str]) -> None:
    members = [
        member(n, type=tarfile.DIRTYPE) if n.endswith("/") or n == "d" else member(n, b"v")
        for n in names
    ]
    error = refused(make_tar(members), dest)
    assert error.member == names[1]
    assert "duplicate" in error.message


def test_a_path_stored_twice_in_one_job_is_refused(dest: Path) -> None:
    inputs = InputFiles(LIMITS)
    extract(make_tar([member("main.py", b"1")]), dest, inputs=inputs)
    with pytest.raises(UploadError) as info:
        store_file("main.py", io.BytesIO(b"2"), dest, LIMITS, inputs)
    assert "duplicate" in info.value.message
    assert (dest / "main.py").read_bytes() == b"1"


def test_a_file_already_in_the_directory_is_never_overwritten(dest: Path) -> None:
    (dest / "main.py").write_text("original")
    with pytest.raises(UploadError) as info:
        extract(make_tar([member("main.py", b"replaced")]), dest)
    assert info.value.member == "main.py"
    assert (dest / "main.py").read_text() == "original"


def test_a_file_where_a_directory_must_go_is_refused(dest: Path) -> None:
    error = refused(make_tar([member("a", b"file"), member("a/b", b"x")]), dest)
    assert error.member == "a/b"
    assert (dest / "a").read_bytes() == b"file"


def test_over_long_names_and_paths_are_refused(dest: Path) -> None:
    limits = Limits(max_name_bytes=10, max_path_bytes=20)
    assert refused(make_tar([member("x" * 11)]), dest, limits).member == "x" * 11
    long_path = "/".join(["abcdefghi"] * 3)  # 29 bytes
    assert refused(make_tar([member(long_path)]), dest, limits).member == long_path
    assert tree(dest) == []


def test_a_member_name_with_nul_is_refused(dest: Path) -> None:
    info, data = member("ab")
    info.pax_headers = {"path": "a\x00b"}
    error = refused(make_tar([(info, data)]), dest)
    assert error.member == "a\x00b"
    assert tree(dest) == []


def test_a_member_name_that_is_not_utf8_is_refused(dest: Path) -> None:
    info = tarfile.TarInfo("\udcff\udcfe.txt")  # raw bytes ff fe in the header
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    assert header.startswith(b"\xff\xfe.txt\0")
    error = refused(io.BytesIO(header + b"\0" * 1024), dest)
    assert "UTF-8" in error.message
    assert tree(dest) == []


def test_a_huge_extended_header_is_refused_before_it_is_read(dest: Path) -> None:
    info, data = member("x.txt", b"1")
    info.pax_headers = {"comment": "c" * 100_000}
    error = refused(make_tar([(info, data)]), dest)
    assert error.member == "up.tgz"
    assert "header" in error.message


def test_a_sparse_member_is_refused(dest: Path) -> None:
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    archive = io.BytesIO(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    error = refused(archive, dest)
    assert "sparse" in error.message
    assert tree(dest) == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"just some text, not an archive" * 40,
        b"\x1f\x8b\x08\x00garbage-after-gzip-magic" * 20,
        bz2.compress(make_tar([member("a", b"1")]).getvalue()),
        lzma.compress(make_tar([member("a", b"1")]).getvalue()),
    ],
    ids=["empty", "text", "bad-gzip", "bzip2", "xz"],
)
def test_an_upload_that_is_not_a_tar_or_tar_gz_is_refused_clearly(
    dest: Path, data: bytes
) -> None:
    error = refused(io.BytesIO(data), dest)
    assert error.member == "up.tgz"
    assert "archive" in error.message
    assert tree(dest) == []


def test_a_gzip_that_holds_no_tar_is_refused(dest: Path) -> None:
    data = b"".join(gzipped([b"hello, not a tar\n" * 100]))
    assert refused(io.BytesIO(data), dest).member == "up.tgz"


def test_a_truncated_archive_is_refused_not_stored_in_part(dest: Path) -> None:
    whole = make_tar([member("a.txt", b"a" * 5000), member("b.txt", b"b" * 5000)], gz=True)
    cut = whole.getvalue()[: len(whole.getvalue()) // 2]
    with pytest.raises(UploadError):
        extract(io.BytesIO(cut), dest)
    assert not (dest / "b.txt").exists()


def test_a_bad_header_after_the_first_is_an_error_not_a_short_archive(dest: Path) -> None:
    data = bytearray(make_tar([member("a.txt", b"1"), member("b.txt", b"2")]).getvalue())
    second = 1024  # header of b.txt (a.txt: one header block and one data block)
    assert data[second : second + 5] == b"b.txt"
    data[second + 148 : second + 150] = b"99"  # break its checksum
    error = refused(io.BytesIO(bytes(data)), dest)
    assert error.member == "up.tgz"
    assert "corrupt" in error.message


# -- single files and the JSON form ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stored_as"),
    [
        ("main.py", "main.py"),
        ("../../etc/cron.d/x.py", "x.py"),
        ("/abs/path/data.csv", "data.csv"),
        ("C:\\Users\\me\\run.sh", "run.sh"),
        ("résumé.txt", "résumé.txt"),
    ],
)
def test_a_single_file_is_stored_under_its_basename(
    dest: Path, name: str, stored_as: str
) -> None:
    inputs = InputFiles(LIMITS)
    entry = store_file(name, io.BytesIO(b"content"), dest, LIMITS, inputs)
    assert entry == InputFile(stored_as, 7, hashlib.sha256(b"content").hexdigest())
    assert tree(dest) == [stored_as]
    assert inputs.files == (entry,)


@pytest.mark.parametrize("name", ["", ".", "..", "dir/..", "dir/", "a\x00b", "x" * 256])
def test_a_single_file_without_a_usable_name_is_refused(dest: Path, name: str) -> None:
    with pytest.raises(UploadError) as info:
        store_file(name, io.BytesIO(b"x"), dest, LIMITS, InputFiles(LIMITS))
    assert info.value.member == name
    assert tree(dest) == []


def test_a_single_script_or_binary_is_executable_and_anything_else_is_not(dest: Path) -> None:
    inputs = InputFiles(LIMITS)
    store_file("tool", io.BytesIO(b"#!/bin/sh\necho hi\n"), dest, LIMITS, inputs)
    store_file("prog", io.BytesIO(b"\x7fELF\x02\x01"), dest, LIMITS, inputs)
    store_file("data.txt", io.BytesIO(b"#not a shebang"), dest, LIMITS, inputs)
    store_file("empty", io.BytesIO(b""), dest, LIMITS, inputs)
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in dest.iterdir()}
    assert modes == {"tool": 0o755, "prog": 0o755, "data.txt": 0o644, "empty": 0o644}


def test_a_large_single_file_is_copied_whole(dest: Path) -> None:
    data = os.urandom(300_000)  # several copy chunks
    entry = store_file("blob.bin", io.BytesIO(data), dest, LIMITS, InputFiles(LIMITS))
    assert (dest / "blob.bin").read_bytes() == data
    assert entry.sha256 == hashlib.sha256(data).hexdigest()


def test_a_single_file_over_the_byte_limit_leaves_no_partial_file(dest: Path) -> None:
    limits = Limits(max_extracted_bytes=100_000)
    with pytest.raises(UploadError):
        store_file("big", io.BytesIO(b"x" * 200_000), dest, limits, InputFiles(limits))
    assert tree(dest) == []


def test_json_files_are_stored_as_text_and_base64_with_subdirectories(dest: Path) -> None:
    inputs = InputFiles(LIMITS)
    stored = write_files_json(
        {
            "main.py": "print('é')\n",
            "data/blob.bin": {"base64": base64.b64encode(b"\x00\xff\x10").decode()},
        },
        dest, LIMITS, inputs,
    )
    assert (dest / "main.py").read_text(encoding="utf-8") == "print('é')\n"
    assert (dest / "data/blob.bin").read_bytes() == b"\x00\xff\x10"
    assert [f.path for f in stored] == ["data/blob.bin", "main.py"]
    assert inputs.files[0].sha256 == hashlib.sha256(b"\x00\xff\x10").hexdigest()


@pytest.mark.parametrize(
    ("files", "member"),
    [
        ({"../x.py": "1"}, "../x.py"),
        ({"/etc/x": "1"}, "/etc/x"),
        ({"a//b": "1"}, "a//b"),
        ({"a\x00b": "1"}, "a\x00b"),
        ({"": "1"}, ""),
        ({"x.py": 1}, "x.py"),
        ({"x.py": None}, "x.py"),
        ({"x.py": ["1"]}, "x.py"),
        ({"x.bin": {"base64": 1}}, "x.bin"),
        ({"x.bin": {"b64": "AA=="}}, "x.bin"),
        ({"x.bin": {"base64": "AA==", "mode": 0o4755}}, "x.bin"),
        ({"x.bin": {"base64": "not base64!"}}, "x.bin"),
        ({"x.txt": "\udcff"}, "x.txt"),
        (["main.py"], "files"),
    ],
)
def test_a_bad_json_file_entry_is_refused_by_name(
    dest: Path, files: object, member: str
) -> None:
    with pytest.raises(UploadError) as info:
        write_files_json(files, dest, LIMITS, InputFiles(LIMITS))
    assert info.value.member == member
    assert tree(dest) == []


def test_json_files_count_against_the_byte_and_member_limits(dest: Path) -> None:
    limits = Limits(max_extracted_bytes=1000, max_archive_members=2)
    with pytest.raises(UploadError) as info:
        write_files_json({"big": {"base64": "QUFB" * 400}}, dest, limits, InputFiles(limits))
    assert info.value.member == "big"
    with pytest.raises(UploadError) as info:
        write_files_json({"a": "1", "b": "2", "c": "3"}, dest, limits, InputFiles(limits))
    assert info.value.member == "c"
    assert tree(dest) == ["a", "b"]


def test_a_json_file_where_a_directory_must_go_is_refused(dest: Path) -> None:
    with pytest.raises(UploadError) as info:
        write_files_json({"a": "file", "a/b": "x"}, dest, LIMITS, InputFiles(LIMITS))
    assert info.value.member == "a/b"


# -- matching outputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.txt", "a.txt", True),
        ("*.txt", "a/b.txt", False),
        ("*.txt", "a.txt.bak", False),
        ("*", ".hidden", True),
        ("a/*", "a/b/c", False),
        ("a/*", "a/b", True),
        ("**/*.csv", "x.csv", True),
        ("**/*.csv", "a/b/x.csv", True),
        ("**/*.csv", "a/x.txt", False),
        ("a/**/b.txt", "a/b.txt", True),
        ("a/**/b.txt", "a/x/y/b.txt", True),
        ("a/**/b.txt", "x/a/b.txt", False),
        ("**", "any/thing/at/all", True),
        ("out/", "out/a.png", True),
        ("out/", "out/sub/a.png", True),
        ("out/", "out", False),
        ("out/", "output/a.png", False),
        ("out/**", "out/sub/a.png", True),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("a?c", "a/c", False),
        ("[ab].txt", "b.txt", True),
        ("[ab].txt", "c.txt", False),
        ("[!ab].txt", "c.txt", True),
        ("[!ab].txt", "a.txt", False),
        ("[]].txt", "].txt", True),
        ("[a-c]x", "bx", True),
        ("[z-a]x", "bx", False),
        ("[z-a]x", "[z-a]x", True),
        ("[ab", "[ab", True),
        ("a.txt", "abtxt", False),
        ("a+b(1).txt", "a+b(1).txt", True),
        ("report.txt", "report.txt", True),
        ("report.txt", "x/report.txt", False),
    ],
)
def test_output_glob_semantics(pattern: str, path: str, expected: bool) -> None:
    assert match_outputs((pattern,), path) is expected


def test_no_patterns_match_everything_and_several_match_any() -> None:
    assert match_outputs((), "deep/down/file.bin") is True
    assert match_outputs(("*.csv", "out/"), "out/x.png") is True
    assert match_outputs(("*.csv", "out/"), "x.png") is False


# -- listing and opening outputs -------------------------------------------------------------


@pytest.fixture
def job(tmp_path: Path, outside: Path) -> Path:
    """A finished job's directory, with what a hostile job might leave behind."""
    root = tmp_path / "done"
    (root / "out/sub").mkdir(parents=True)
    (root / "result.csv").write_text("a,b\n")
    (root / "out/plot.png").write_bytes(b"\x89PNG")
    (root / "out/sub/notes").write_text("n")
    (root / "passwd").symlink_to("/etc/passwd")
    (outside / "secret.txt").write_text("secret")
    (root / "linkdir").symlink_to(outside)
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    return root


def test_list_outputs_reports_regular_files_sorted_with_hashes_and_types(job: Path) -> None:
    outputs = list_outputs(job, ())
    assert outputs == [
        OutputFile("out/plot.png", 4, hashlib.sha256(b"\x89PNG").hexdigest(), "image/png"),
        OutputFile(
            "out/sub/notes", 1, hashlib.sha256(b"n").hexdigest(), "application/octet-stream"
        ),
        OutputFile("result.csv", 4, hashlib.sha256(b"a,b\n").hexdigest(), "text/csv"),
    ]
    assert all(o.type == "file" for o in outputs)


def test_list_outputs_skips_symlinks_fifos_sockets_and_never_follows_them(job: Path) -> None:
    paths = [o.path for o in list_outputs(job, ())]
    assert "passwd" not in paths
    assert not any(p.startswith("linkdir") for p in paths)
    assert "fifo" not in paths and "sock" not in paths


def test_list_outputs_skips_a_device_node(job: Path) -> None:
    try:
        os.mknod(job / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod not permitted here")
    assert "null" not in [o.path for o in list_outputs(job, ())]


def test_an_excluded_directory_is_not_listed_and_does_not_use_up_the_file_cap(
        job: Path) -> None:
    (job / ".deps/python/six").mkdir(parents=True)
    for i in range(5):
        (job / f".deps/python/six/m{i}.py").write_text("x")
    listed = [o.path for o in list_outputs(job, (), max_files=3, exclude=(".deps/",))]
    assert listed == ["out/plot.png", "out/sub/notes", "result.csv"]
    assert all(o.path.startswith(".deps/") for o in list_outputs(job, (), max_files=3))


def test_list_outputs_keeps_only_matching_files(job: Path) -> None:
    assert [o.path for o in list_outputs(job, ("out/",))] == ["out/plot.png", "out/sub/notes"]
    assert [o.path for o in list_outputs(job, ("*.csv",))] == ["result.csv"]
    assert list_outputs(job, ("nothing",)) == []


def test_list_outputs_stops_at_the_file_cap(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"f{i:02}").write_text("x")
    outputs = list_outputs(tmp_path, (), max_files=10)
    assert [o.path for o in outputs] == [f"f{i:02}" for i in range(10)]


def test_list_outputs_skips_names_that_are_not_utf8_and_overly_deep_files(
    tmp_path: Path,
) -> None:
    os.close(os.open(os.path.join(os.fsencode(tmp_path), b"\xff.txt"), os.O_CREAT | os.O_WRONLY))
    deep = tmp_path.joinpath(*["d"] * (MAX_OUTPUT_DEPTH + 2))
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("x")
    (tmp_path / "d/d/shallow.txt").write_text("x")
    assert [o.path for o in list_outputs(tmp_path, ())] == ["d/d/shallow.txt"]


def test_open_output_gives_a_matching_file_and_its_size(job: Path) -> None:
    handle, size = open_output(job, "out/sub/notes", ("out/",))
    with handle:
        assert handle.read() == b"n"
    assert size == 1


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret.txt",
        "out/../result.csv",
        "linkdir/secret.txt",
        "passwd",
        "fifo",
        "sock",
        "out",
        "out/sub",
        "missing.txt",
        "",
        "./result.csv",
        "out//plot.png",
        "out/plot.png/",
        "result.csv\x00.png",
    ],
)
def test_open_output_refuses_escapes_links_and_non_files(job: Path, path: str) -> None:
    with pytest.raises(OutputNotFound):
        open_output(job, path, ())


def test_open_output_refuses_an_absolute_path(job: Path, outside: Path) -> None:
    with pytest.raises(OutputNotFound):
        open_output(job, str(outside / "secret.txt"), ())
    with pytest.raises(OutputNotFound):
        open_output(job, str(job / "result.csv"), ())


def test_open_output_refuses_a_file_the_patterns_do_not_match(job: Path) -> None:
    with pytest.raises(OutputNotFound):
        open_output(job, "result.csv", ("out/",))
    handle, _ = open_output(job, "result.csv", ("*.csv",))
    handle.close()


def test_open_output_refuses_a_symlinked_directory_even_when_patterns_match(job: Path) -> None:
    with pytest.raises(OutputNotFound):
        open_output(job, "linkdir/secret.txt", ("linkdir/", "**"))


def test_open_output_refuses_a_path_deeper_than_listing_goes(tmp_path: Path) -> None:
    deepest_listed = ["d"] * (MAX_OUTPUT_DEPTH - 1)
    tmp_path.joinpath(*deepest_listed, "d").mkdir(parents=True)
    tmp_path.joinpath(*deepest_listed, "x").write_text("x")
    tmp_path.joinpath(*deepest_listed, "d", "x").write_text("x")

    handle, _ = open_output(tmp_path, "/".join([*deepest_listed, "x"]), ())
    handle.close()
    with pytest.raises(OutputNotFound):
        open_output(tmp_path, "/".join([*deepest_listed, "d", "x"]), ())
    assert [o.path.count("/") for o in list_outputs(tmp_path, ())] == [MAX_OUTPUT_DEPTH - 1]
