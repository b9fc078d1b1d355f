"""Request bodies for ``POST /submit``: the JSON form and a streamed multipart form.

Both clients build their uploads here, so the wire format lives in one place.
The multipart body knows its length before it is sent (the worker refuses an
upload over its limit from ``Content-Length`` alone) and is produced in chunks
from files, never held in memory whole.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LANGUAGES",
    "MultipartBody",
    "Part",
    "archive_parts",
    "code_document",
    "files_document",
    "run_document",
    "snippet_document",
]

# Language name (lower case) -> the file a snippet is stored as.  The worker
# picks the interpreter from the extension (shared/spec/api.md, Manifest).
LANGUAGES: dict[str, str] = {
    "python": "main.py", "python3": "main.py", "py": "main.py",
    "javascript": "main.js", "js": "main.js", "node": "main.js", "nodejs": "main.js",
    "bash": "main.sh", "sh": "main.sh", "shell": "main.sh",
    "ruby": "main.rb", "rb": "main.rb",
    "r": "main.R",
    "perl": "main.pl", "pl": "main.pl",
    "php": "main.php",
}

_CHUNK = 256 * 1024
Content = str | bytes


def snippet_document(code: str, language: str = "python",
                     manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body that runs ``code`` as a one-file job in ``language``."""
    filename = LANGUAGES.get(language.strip().lower())
    if filename is None:
        known = ", ".join(sorted(set(LANGUAGES)))
        raise ValueError(f"unknown language {language!r}; use one of: {known}")
    fields = {"entrypoint": filename, **(manifest or {})}
    return {"manifest": fields, "files": {filename: code}}


def code_document(code: str, language: str = "python", *, args: list[str] | None = None,
                  stdin: str | None = None, timeout: int | None = None,
                  manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``snippet_document`` with ``args``, ``stdin`` and ``timeout`` where given.

    ``manifest`` adds fields or overrides those three; ``submit_code`` of both clients.
    """
    return snippet_document(code, language, _manifest_fields(args, stdin, timeout, manifest))


def _manifest_fields(args: list[str] | None, stdin: str | None, timeout: int | None,
                     manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """``args``, ``stdin`` and ``timeout`` where given, then ``manifest`` over them."""
    fields: dict[str, Any] = {}
    if args is not None:
        fields["args"] = list(args)
    if stdin is not None:
        fields["stdin"] = stdin
    if timeout is not None:
        fields["timeout"] = timeout
    fields.update(manifest or {})
    return fields


def run_document(code: str | None, language: str = "python", *,
                 files: Mapping[str, Content] | None = None,
                 manifest: Mapping[str, Any] | None = None, args: list[str] | None = None,
                 stdin: str | None = None, timeout: int | None = None) -> dict[str, Any]:
    """The JSON body of ``run``: ``code`` in ``language``, or ``files`` (not both)."""
    if (code is None) == (files is None):
        raise ValueError("give either code or files")
    if code is not None:
        return code_document(code, language, args=args, stdin=stdin, timeout=timeout,
                             manifest=manifest)
    return files_document(files or {}, _manifest_fields(args, stdin, timeout, manifest))


def files_document(files: Mapping[str, Content],
                   manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body for a set of files: text as is, bytes as ``{"base64": ...}``."""
    encoded: dict[str, Any] = {}
    for path, content in files.items():
        if isinstance(content, str):
            encoded[path] = content
        elif isinstance(content, (bytes, bytearray, memoryview)):
            encoded[path] = {"base64": base64.b64encode(bytes(content)).decode("ascii")}
        else:
            raise TypeError(f"{path!r}: content must be str or bytes, not "
                            f"{type(content).__name__}")
    return {"manifest": dict(manifest or {}), "files": encoded}


@dataclass(frozen=True)
class Part:
    """One form part: inline ``data``, or the file at ``path`` (read while sending)."""

    name: str
    data: bytes = b""
    filename: str | None = None
    path: str | None = None
    content_type: str = "application/octet-stream"

    @property
    def size(self) -> int:
        return os.path.getsize(self.path) if self.path is not None else len(self.data)


class MultipartBody:
    """A ``multipart/form-data`` body with a known length, produced in chunks."""

    def __init__(self, parts: list[Part], boundary: str | None = None) -> None:
        self.parts = parts
        self.boundary = boundary or "sandrun-" + secrets.token_hex(16)
        self._heads = [self._head(part) for part in parts]
        self._tail = f"--{self.boundary}--\r\n".encode()
        self.length = (sum(len(h) + p.size + 2 for h, p in zip(self._heads, parts))
                       + len(self._tail))

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _head(self, part: Part) -> bytes:
        disposition = f'form-data; name="{_quote(part.name)}"'
        if part.filename is not None:
            disposition += f'; filename="{_quote(part.filename)}"'
        return (f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n"
                f"Content-Type: {part.content_type}\r\n\r\n").encode()

    def chunks(self, progress: Callable[[int, int], None] | None = None) -> Iterator[bytes]:
        """The body; ``progress(sent, total)`` is called after each chunk."""
        sent = 0

        def step(chunk: bytes) -> bytes:
            nonlocal sent
            sent += len(chunk)
            if progress is not None:
                progress(sent, self.length)
            return chunk

        for head, part in zip(self._heads, self.parts):
            yield step(head)
            if part.path is None:
                yield step(part.data)
            else:
                with open(part.path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        yield step(chunk)
            yield step(b"\r\n")
        yield step(self._tail)


def manifest_part(manifest: Mapping[str, Any]) -> Part:
    return Part("manifest", json.dumps(dict(manifest)).encode(), content_type="application/json")


def archive_parts(archive_path: str, manifest: Mapping[str, Any] | None = None) -> list[Part]:
    """The form of a packed directory: the ``.tar.gz`` at ``archive_path``, and ``manifest``.

    Without ``manifest``, the worker reads ``job.json`` from the archive.
    """
    parts = [Part("files", filename="job.tar.gz", path=archive_path,
                  content_type="application/gzip")]
    if manifest is not None:
        parts.append(manifest_part(manifest))
    return parts


def _quote(value: str) -> str:
    # RFC 7578: names are quoted strings; escape what would end or break the quote.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace(
        "\n", "%0A")
