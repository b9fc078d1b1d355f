"""A tar stream checked header by header before ``tarfile`` sees it.

``tarfile`` trusts the archive's headers more than an upload deserves: it
expands GNU sparse maps from member data (a 15 KB upload can claim millions of
map entries, gigabytes of memory), reads each pax or GNU long-name header into
memory whole, follows chains of extended headers by recursion, and on Python
before 3.11.10 runs a regular expression over pax headers that is quadratic in
a run of digits (CVE-2024-6232: six 64 KiB all-digit headers hold the GIL for
a minute).  None of that depends on what tarfile version runs here:

- :class:`CheckedTarStream` decompresses (gzip, bounded output per read) and
  walks the tar block structure itself, in one linear pass over the same bytes
  it hands on, so tarfile never receives a header this module has not passed;
- it refuses GNU sparse members (type ``S``, any ``GNU.sparse.*`` pax key),
  extended headers over :data:`MAX_EXTENDED_HEADER` bytes, more than one of
  each kind per member, more than :data:`MAX_GLOBAL_HEADERS` global headers,
  more than :data:`MAX_EXTENDED_TOTAL` extended-header bytes per archive,
  malformed pax records, and any run of more than :data:`MAX_DIGIT_RUN`
  digits in a pax header (what the quadratic regular expression needs);
- an archive that ends inside a header or a member is refused as truncated,
  naming where.

It mirrors tarfile's reading rules (a regular member's data follows its
header; a directory's declared size is not skipped; the first pax header's
``size`` replaces the member's) so both see the same block boundaries; past a
member type the extractor refuses anyway (links, devices), or past the
end-of-archive block, it only passes bytes on.  Pure stdlib, linear time,
memory bounded by one extended header plus one read.
"""

from __future__ import annotations

import re
import zlib
from typing import BinaryIO

__all__ = [
    "MAX_DIGIT_RUN",
    "MAX_EXTENDED_HEADER",
    "MAX_EXTENDED_TOTAL",
    "MAX_GLOBAL_HEADERS",
    "ArchiveRefused",
    "CheckedTarStream",
]

BLOCK = 512
MAX_EXTENDED_HEADER = 16 * 1024  # bytes of one pax or GNU long-name/long-link header
MAX_EXTENDED_TOTAL = 8 * 1024 * 1024  # bytes of all extended headers in one archive
MAX_GLOBAL_HEADERS = 8  # pax global headers in one archive (git archive writes one)
MAX_DIGIT_RUN = 256  # longest run of ASCII digits allowed anywhere in a pax header

_REGULAR = frozenset({b"0", b"\x00", b"7"})  # tarfile.REGULAR_TYPES without sparse
_DIRECTORY = b"5"
_SPARSE = b"S"
_PAX = frozenset({b"x", b"X"})  # POSIX and Solaris per-member extended headers
_GLOBAL = b"g"
_LONG = frozenset({b"L", b"K"})  # GNU long name, long link name
_GLOBAL_FORBIDDEN = (b"size", b"path", b"linkpath")  # would apply to every later member
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_DIGIT_RUN + 1))  # linear: a fixed-length run


class ArchiveRefused(Exception):
    """The archive is refused; the message says why and where."""


class CheckedTarStream:
    """A read-only stream of the tar bytes in ``fileobj`` (plain or gzip), checked as read.

    Give it to ``tarfile.open(fileobj=..., mode="r|")``.  ``read`` raises
    :class:`ArchiveRefused` before returning bytes that hold a refused header.
    """

    def __init__(self, fileobj: BinaryIO, read_size: int = 64 * 1024) -> None:
        self._raw = fileobj
        self._read_size = read_size
        head = fileobj.read(2)
        self._pending_raw = head
        self._gzip = head == b"\x1f\x8b"
        self._inflater: zlib._Decompress | None = (  # type: ignore[name-defined]
            zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzip else None)
        self._raw_done = False
        self.offset = 0  # tar bytes handed on so far
        # The walk: what the next tar bytes are.
        self._header = bytearray()  # a header block being gathered
        self._skip = 0  # data and padding bytes still to pass
        self._extended: bytearray | None = None  # an extended header's content being gathered
        self._extended_kind = b""
        self._extended_size = 0  # its size with padding, as tarfile reads it
        self._declared = 0  # its size as the header gives it
        self._member_extended: set[bytes] = set()  # kinds seen since the last member
        self._pax_size: int | None = None  # the first pax size for the coming member
        self._extended_total = 0
        self._globals = 0
        self._finished = False  # past the end-of-archive block, or past a refused type

    # -- the stream -------------------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._read_size
        data = self._next_bytes(max(1, size))
        if data:
            self._walk(data)
            self.offset += len(data)
        elif not self._finished and (self._header or self._skip or self._extended is not None):
            raise ArchiveRefused(f"truncated archive: it ends {self._where()}")
        return data

    def _next_bytes(self, size: int) -> bytes:
        if self._inflater is None:
            if not self._pending_raw:
                return self._raw.read(size)
            data, self._pending_raw = self._pending_raw[:size], self._pending_raw[size:]
            if len(data) < size:
                data += self._raw.read(size - len(data))
            return data
        while True:
            inflater = self._inflater
            if inflater.unconsumed_tail:
                source = inflater.unconsumed_tail
            elif self._pending_raw:
                source, self._pending_raw = self._pending_raw, b""
            elif self._raw_done:
                source = b""
            else:
                source = self._raw.read(self._read_size)
                self._raw_done = not source
            if not source:
                if inflater.eof or self._finished:
                    return b""
                raise ArchiveRefused("truncated archive: the gzip stream ends early "
                                     f"({self._where()})")
            try:
                data = inflater.decompress(source, size)
            except zlib.error as e:
                raise ArchiveRefused(f"not a tar or tar.gz archive: corrupt gzip data ({e})") from None
            if inflater.eof and inflater.unused_data:
                rest = inflater.unused_data
                if rest.startswith(b"\x1f\x8b"):  # another gzip member follows (cat a.gz b.gz)
                    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._pending_raw = rest
                else:  # trailing bytes after the gzip stream: ignored, as gzip does
                    self._raw_done = True
            if data:
                return data

    # -- the walk over tar blocks ---------------------------------------------------------

    def _walk(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._finished:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
            elif self._extended is not None:
                want = self._extended_size - len(self._extended)
                step = min(want, len(view))
                self._extended += view[:step]
                view = view[step:]
                if len(self._extended) == self._extended_size:
                    self._extended_done()
            else:
                step = min(BLOCK - len(self._header), len(view))
                self._header += view[:step]
                view = view[step:]
                if len(self._header) == BLOCK:
                    header, self._header = bytes(self._header), bytearray()
                    self._header_done(header)

    def _where(self) -> str:
        if self._extended is not None:
            return f"inside an extended header at byte {self.offset}"
        if self._skip:
            return f"inside a member's data, {self._skip} bytes short"
        return f"inside a header at byte {self.offset}"

    def _header_done(self, header: bytes) -> None:
        if header.count(0) == BLOCK:  # end of archive: tarfile stops reading here
            self._finished = True
            return
        if _number(header[148:156]) not in _checksums(header):
            # Not a header: tarfile refuses it too ("not a tar file", or a bad header).
            self._finished = True
            return
        kind = header[156:157]
        size = _number(header[124:136])
        if size is None or size < 0:
            raise ArchiveRefused(f"bad size field in the header at byte {self.offset}")
        name = header[0:100].split(b"\x00", 1)[0]
        if kind == _SPARSE:
            raise ArchiveRefused(f"{_show(name)}: GNU sparse members are not accepted")
        if kind in _PAX or kind == _GLOBAL or kind in _LONG:
            self._extended_start(kind, size)
            return
        # A member: its extended headers are spent.
        if self._pax_size is not None:
            size = self._pax_size
        self._member_extended.clear()
        self._pax_size = None
        if kind == b"\x00" and name.endswith(b"/"):
            kind = _DIRECTORY  # old tar's directory: tarfile skips no data for it
        if kind in _REGULAR:
            self._skip = _padded(size)
        elif kind != _DIRECTORY:
            # Links, devices, FIFOs, unknown types: the extractor refuses the member
            # by name; tarfile reads nothing further from this archive through here.
            self._finished = True

    def _extended_start(self, kind: bytes, size: int) -> None:
        family = b"x" if kind in _PAX else kind
        if kind == _GLOBAL:
            self._globals += 1
            if self._globals > MAX_GLOBAL_HEADERS:
                raise ArchiveRefused(f"more than {MAX_GLOBAL_HEADERS} pax global headers")
        elif family in self._member_extended:
            raise ArchiveRefused(f"two extended headers of type {kind.decode('latin-1')!r} "
                                 f"for one member (at byte {self.offset})")
        self._member_extended.add(family)
        if size > MAX_EXTENDED_HEADER:
            raise ArchiveRefused(f"an extended header of {size} bytes (the limit is "
                                 f"{MAX_EXTENDED_HEADER})")
        self._extended_total += size
        if self._extended_total > MAX_EXTENDED_TOTAL:
            raise ArchiveRefused(f"more than {MAX_EXTENDED_TOTAL} bytes of extended headers")
        self._extended_kind = kind
        self._extended_size = _padded(size)  # tarfile reads the padding with the content
        self._declared = size
        self._extended = bytearray()
        if self._extended_size == 0:
            self._extended_done()

    def _extended_done(self) -> None:
        content = bytes(self._extended or b"")[: self._declared]
        kind = self._extended_kind
        self._extended = None
        if kind in _LONG:
            return
        records = _pax_records(content)
        for key, value in records:
            if key.startswith(b"GNU.sparse."):
                raise ArchiveRefused("GNU sparse members are not accepted (pax key "
                                     f"{_show(key)})")
            if kind == _GLOBAL and key in _GLOBAL_FORBIDDEN:
                raise ArchiveRefused(f"a pax global header may not set {_show(key)}")
            if key == b"size" and kind in _PAX:
                if not value.isdigit() or len(value) > 20:
                    raise ArchiveRefused(f"bad pax size {_show(value)}")
                if self._pax_size is None:
                    self._pax_size = int(value)


def _pax_records(content: bytes) -> list[tuple[bytes, bytes]]:
    """``"%d %s=%s\\n"`` records, parsed in one pass; anything else is refused."""
    if _DIGIT_RUN.search(content):
        raise ArchiveRefused(f"a pax header with a run of more than {MAX_DIGIT_RUN} digits")
    records: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(content):
        space = content.find(b" ", pos, pos + 21)
        digits = content[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise ArchiveRefused(f"malformed pax header (record at offset {pos})")
        length = int(digits)
        end = pos + length
        if length <= space - pos + 1 or end > len(content) or content[end - 1] != 0x0A:
            raise ArchiveRefused(f"malformed pax header (record at offset {pos})")
        equals = content.find(b"=", space + 1, end)
        if equals <= space + 1:
            raise ArchiveRefused(f"malformed pax header (record at offset {pos})")
        records.append((content[space + 1:equals], content[equals + 1:end - 1]))
        pos = end
    return records


def _number(field: bytes) -> int | None:
    """A header number as tarfile reads it: base-256 or NUL/space-ended octal."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return -(256 ** (len(field) - 1) - value) if field[:1] == b"\xff" else value
    text = field.split(b"\x00", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


_HIGH = bytes(range(128))


def _checksums(header: bytes) -> tuple[int, int]:
    """The unsigned and the signed header sums, the checksum field read as spaces."""
    rest = header[:148] + header[156:]
    unsigned = 256 + sum(rest)
    return unsigned, unsigned - 256 * len(rest.translate(None, _HIGH))


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _show(name: bytes) -> str:
    return name[:100].decode("utf-8", "replace")
