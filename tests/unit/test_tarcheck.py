"""The tar pre-check: hostile headers refused before tarfile reads them, honest archives intact."""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from sandrun.config import Limits
from sandrun.jobs.tarcheck import (
    MAX_EXTENDED_HEADER,
    MAX_GLOBAL_HEADERS,
    ArchiveRefused,
    CheckedTarStream,
)
from sandrun.jobs.workspace import InputFiles, UploadError, extract_archive
from tests import hostile_archives as ha


def drain(data: bytes) -> int:
    """Read the checked stream to its end; the number of tar bytes it passed."""
    stream = CheckedTarStream(io.BytesIO(data), 4096)
    while stream.read(10240):
        pass
    return stream.offset


def refusal(data: bytes) -> str:
    with pytest.raises(ArchiveRefused) as info:
        drain(data)
    return str(info.value)


def extract(data: bytes, dest: Path) -> dict[str, bytes]:
    inputs = InputFiles(Limits())
    extract_archive(io.BytesIO(data), dest, Limits(), inputs, archive_name="up.tgz")
    return {f.path: (dest / f.path).read_bytes() for f in inputs.files}


def extract_refusal(data: bytes, dest: Path) -> UploadError:
    with pytest.raises(UploadError) as info:
        extract(data, dest)
    return info.value


def test_a_sparse_map_claiming_millions_of_entries_is_refused_at_its_pax_header(
        tmp_path: Path) -> None:
    bomb = ha.sparse_map_bomb()
    tracemalloc.start()
    try:
        error = extract_refusal(bomb, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.member == "up.tgz"
    assert "GNU sparse members are not accepted" in error.message
    assert "GNU.sparse.major" in error.message
    assert peak < 4 * 1024 * 1024  # the map (tens of MB as a list) was never read
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_sparse_map_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    error = extract_refusal(ha.truncated_sparse_map(), tmp_path)
    assert "GNU sparse" in error.message


def test_an_old_gnu_sparse_member_is_refused_by_name() -> None:
    assert "holes: GNU sparse members are not accepted" in refusal(ha.old_sparse_member())


def test_six_64_kib_all_digit_pax_headers_are_refused_at_the_first_header_size() -> None:
    message = refusal(ha.digit_pax_headers())
    assert f"an extended header of {64 * 1024} bytes" in message
    assert str(MAX_EXTENDED_HEADER) in message


def test_a_long_run_of_digits_in_a_pax_header_under_the_size_cap_is_refused() -> None:
    assert "a run of more than 256 digits" in refusal(ha.digit_run_pax_header())


def test_two_pax_headers_for_one_member_are_refused() -> None:
    raw = ha.pax(ha.pax_record("path", "a")) + ha.pax(ha.pax_record("path", "b")) \
        + ha.member("x", b"1") + ha.END
    assert "two extended headers" in refusal(raw)


def test_a_pax_header_and_a_gnu_long_name_for_one_member_are_allowed(tmp_path: Path) -> None:
    raw = ha.pax(ha.pax_record("mtime", "1")) + ha.header("././@LongLink", b"L", 4) \
        + ha.padded(b"long") + ha.member("short", b"data") + ha.END
    assert extract(raw, tmp_path) == {"long": b"data"}


def test_too_many_global_headers_are_refused() -> None:
    raw = b"".join(ha.pax(ha.pax_record("comment", "c"), b"g")
                   for _ in range(MAX_GLOBAL_HEADERS + 1)) + ha.END
    assert "global headers" in refusal(raw)


@pytest.mark.parametrize("key", ["size", "path", "linkpath"])
def test_a_global_header_may_not_set_a_members_size_or_path(key: str) -> None:
    raw = ha.pax(ha.pax_record(key, "5"), b"g") + ha.member("a", b"x") + ha.END
    assert f"may not set {key}" in refusal(raw)


@pytest.mark.parametrize("records", [
    b"zz comment=x\n",  # length not a number
    b"99 comment=x\n",  # longer than the header
    b"14 comment=xy\x00",  # no newline at the end
    b"9 nokey\n",  # no '='
])
def test_a_malformed_pax_record_is_refused(records: bytes) -> None:
    assert "malformed pax header" in refusal(ha.pax(records) + ha.member("a", b"x") + ha.END)


def test_an_archive_cut_inside_a_member_is_refused_as_truncated(tmp_path: Path) -> None:
    error = extract_refusal(ha.truncated_member(), tmp_path)
    assert "truncated archive" in error.message
    assert list(tmp_path.iterdir()) == []


def test_a_gzip_stream_cut_short_is_refused_as_truncated(tmp_path: Path) -> None:
    whole = ha.ordinary({"a": b"x" * 100_000})
    error = extract_refusal(whole[: len(whole) // 2], tmp_path)
    assert "truncated archive" in error.message


def test_an_archive_cut_inside_a_header_is_refused_as_truncated() -> None:
    raw = ha.member("a", b"x") + ha.header("b", b"0", 1)[:300]
    assert "inside a header" in refusal(raw)


def test_a_pax_size_moves_the_next_header_as_tarfile_reads_it(tmp_path: Path) -> None:
    data = b"z" * 1500
    assert extract(ha.bytes_through_pax_size(data), tmp_path) == {"real": data}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_honest_archives_with_long_names_in_every_format_pass_unchanged(
        tmp_path: Path, fmt: int) -> None:
    long_name = "d/" + "n" * 90 + "/" + "f" * 90 + ".txt"
    members = {long_name: b"deep", "é.txt": "ü".encode(), "empty": b"",
               "big": bytes(range(256)) * 400}
    if fmt == tarfile.USTAR_FORMAT:
        members.pop("é.txt")
    raw = ha.ordinary(members, fmt)
    assert drain(raw) == len(gzip.decompress(raw))
    assert extract(raw, tmp_path) == members


def test_a_git_archive_style_global_comment_passes(tmp_path: Path) -> None:
    raw = ha.pax(ha.pax_record("comment", "0123abcd" * 5), b"g") + ha.member("a", b"x") + ha.END
    assert extract(raw, tmp_path) == {"a": b"x"}


def test_concatenated_gzip_members_read_as_one_stream(tmp_path: Path) -> None:
    raw = ha.member("a", b"x") + ha.member("b", b"y") + ha.END
    split = gzip.compress(raw[:1024]) + gzip.compress(raw[1024:])
    assert extract(split, tmp_path) == {"a": b"x", "b": b"y"}


def test_a_link_member_is_still_refused_by_the_extractor_by_name(tmp_path: Path) -> None:
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    raw = link.tobuf(tarfile.USTAR_FORMAT) + ha.END
    error = extract_refusal(raw, tmp_path)
    assert error.member == "evil"
    assert "symbolic link" in error.message


def test_bytes_that_are_not_a_tar_are_left_to_tarfile_to_name() -> None:
    assert drain(b"this is not a tar archive at all" * 40) > 0
