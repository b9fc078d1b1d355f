"""Hostile tar archives, built byte by byte: what an attacker uploads to hurt the parser.

Shared by the unit tests (``tarcheck``), the hostile-client integration tests
and ``bench/hostile.py``.  Each is small on the wire and expensive for a
parser that trusts it.
"""

from __future__ import annotations

import gzip
import io
import tarfile

BLOCK = 512


def header(name: str, kind: bytes, size: int) -> bytes:
    """One ustar header block: ``name``, type ``kind``, ``size`` bytes of content."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


def padded(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % BLOCK)


def pax_record(key: str, value: str | bytes) -> bytes:
    """``"%d %s=%s\\n"``, the length counting itself."""
    body = b" " + key.encode() + b"=" + (value if isinstance(value, bytes) else value.encode()) \
        + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax(records: bytes, kind: bytes = b"x") -> bytes:
    return header("././@PaxHeader", kind, len(records)) + padded(records)


def member(name: str, data: bytes) -> bytes:
    return header(name, b"0", len(data)) + padded(data)


END = b"\x00" * (2 * BLOCK)


def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, 9)


def sparse_map_bomb(entries: int = 4_000_000) -> bytes:
    """GNU sparse 1.0: the member's data starts with a map claiming ``entries`` regions.

    tarfile reads the whole map into a list before any member or byte cap: a
    few KB of gzip cost it gigabytes and minutes.
    """
    sparse = (pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
              + pax_record("GNU.sparse.name", "bomb") + pax_record("GNU.sparse.realsize", "1"))
    # The map sits in the member's data: its count, then an offset and a size per entry.
    data = str(entries).encode() + b"\n" + b"0\n1\n" * entries
    size = len(data)
    return gz(pax(sparse) + header("GNUSparseFile.0/bomb", b"0", size) + padded(data) + END)


def truncated_sparse_map() -> bytes:
    """A sparse 1.0 member whose map ends before it says (tarfile: an uncaught ValueError)."""
    sparse = pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
    data = b"1000\n0\n"
    return gz(pax(sparse) + header("GNUSparseFile.0/short", b"0", 1 << 20) + data)


def digit_pax_headers(count: int = 6, size: int = 64 * 1024) -> bytes:
    """``count`` pax headers of ``size`` ASCII digits each (CVE-2024-6232's quadratic regex)."""
    raw = b"".join(pax(b"1" * size) for _ in range(count))
    return gz(raw + member("a", b"x") + END)


def digit_run_pax_header(size: int = 15 * 1024) -> bytes:
    """One well-formed pax header under the size cap whose comment is all digits."""
    return gz(pax(pax_record("comment", "7" * size)) + member("a", b"x") + END)


def old_sparse_member() -> bytes:
    """A type ``S`` (old GNU sparse) member."""
    return gz(header("holes", b"S", 0) + END)


def truncated_member() -> bytes:
    """A member header that promises 1 MiB, then the stream ends."""
    return gz(header("big", b"0", 1 << 20) + b"y" * 3000)


def bytes_through_pax_size(data: bytes) -> bytes:
    """A member whose header says size 0 and whose pax ``size`` gives the real one."""
    return (pax(pax_record("size", str(len(data)))) + header("real", b"0", 0) + padded(data)
            + END)


def ordinary(members: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An honest archive in format ``fmt`` (long names use that format's extension)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
